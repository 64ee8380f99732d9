"""hivemind's P2P, as far as the node's stream code uses it, on py-libp2p: `TrioP2P` runs a
py-libp2p host under trio on a thread of its own and offers asyncio code the calls the node
makes of p2pd (`add_binary_stream_handler`, `call_binary_stream_handler`, `peer_id`,
`get_visible_maddrs`, `shutdown`), each stream as an asyncio StreamReader and a writer with
`write`, `drain` and `close`. The node's servers and clients (node/exchange.py,
node/streams.py, node/statesync.py …) then run unchanged over py-libp2p, in a process that
never imports hivemind (docs/windows.md: the way to one round loop on both transports).

A stream's bytes cross the two threads in order: what the peer sends is fed to the reader as
it comes, then EOF when the peer closes or resets the stream (the node's reads then end short,
which protocol/framing.py reports as a closed or cut stream), and
what asyncio writes is queued to one trio task per stream that writes it in order; `drain()`
returns once everything written before it is on the stream. `close()` closes the stream after
what was queued, as closing p2pd's socket does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Awaitable, Callable

import trio
from libp2p.abc import INetStream
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from locoswarm.net.host import LOOPBACK, dial, run_host

READ_BYTES = 1 << 16
OPEN_TIMEOUT_S = 10.0
"""A stream that does not open within this long fails (ConnectionError naming the peer)."""


class PeerId(str):
    """A base58 peer id that the node's code takes for hivemind's PeerID (`to_base58`, `str`)."""

    def to_base58(self) -> str:
        return str(self)

    @classmethod
    def from_base58(cls, text: str) -> PeerId:
        return cls(text)


@dataclass(frozen=True)
class StreamInfo:
    """What a stream handler is told of the stream, as p2pd's StreamInfo tells it."""
    peer_id: PeerId
    protocol: str


class _Writer:
    """The asyncio side of a bridged stream's writing half."""

    def __init__(self, bridge: TrioP2P, send: trio.MemorySendChannel) -> None:
        self._bridge, self._send = bridge, send
        self._queued = self._written = 0
        self._waiters: list[asyncio.Future] = []
        self._closing = False
        self._error: BaseException | None = None

    def write(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        if self._closing:
            raise ConnectionResetError("write on a closed stream")
        if data:
            self._queued += len(data)
            self._bridge._soon(self._send.send_nowait, bytes(data))

    async def drain(self) -> None:
        target = self._queued
        while self._written < target and self._error is None:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._bridge._soon(self._send.send_nowait, None)

    def is_closing(self) -> bool:
        return self._closing

    async def wait_closed(self) -> None:
        return None

    def _wrote(self, n: int) -> None:  # on the asyncio thread
        self._written += n
        self._wake()

    def _failed(self, error: BaseException) -> None:  # on the asyncio thread
        if self._error is None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


class TrioP2P:
    """A py-libp2p host of `key_pair` on a trio thread, offered to asyncio code as p2pd is."""

    def __init__(self, key_pair: KeyPair, listen: Sequence[str] = LOOPBACK, *, announce: Sequence[str] = ()) -> None:
        """`announce`: the addresses to show peers instead of the listen addresses (a public
        address behind port forwarding)."""
        self.key_pair, self.listen, self.announce = key_pair, tuple(listen), tuple(announce)
        self.peer_id = PeerId(ID.from_pubkey(key_pair.public_key).to_base58())
        self.host = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ life

    async def start(self) -> None:
        """Run the host until `shutdown`; returns once it listens."""
        self._loop = asyncio.get_running_loop()
        ready: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="py-libp2p", daemon=True)
        self._thread.start()
        await asyncio.wrap_future(ready)

    def _run(self, ready: concurrent.futures.Future) -> None:
        try:
            trio.run(self._main, ready)
        except BaseException as e:  # the host never came up: say why to start()
            if not ready.done():
                ready.set_exception(e)

    async def _main(self, ready: concurrent.futures.Future) -> None:
        async with run_host(self.key_pair, self.listen) as host, trio.open_nursery() as nursery:
            self.host, self._nursery = host, nursery
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            ready.set_result(None)
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    async def shutdown(self) -> None:
        if self._token is not None and self._thread is not None and self._thread.is_alive():
            self._soon(self._stop.set)
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)

    def _soon(self, fn: Callable, *args) -> bool:
        """Run `fn(*args)` on the trio thread, soon (thread-safe, in order); nothing once the
        host has stopped (a stream closed after `shutdown` is gone with it): False then."""
        try:
            self._token.run_sync_soon(fn, *args)
            return True
        except trio.RunFinishedError:
            return False

    def _later(self, fn: Callable, *args) -> None:
        """Run `fn(*args)` on the asyncio thread, soon; nothing once its loop has closed."""
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody reads these streams any more
            pass

    async def run(self, fn: Callable[..., Awaitable], *args):
        """`await fn(*args)` on the trio thread (the host's: py-libp2p calls, net/dht.py's
        client), its result or its exception here; ConnectionError once the host has stopped,
        also when it stops while `fn` runs. Cancelled here, `fn` is cancelled there."""
        done = self._loop.create_future()
        scope = trio.CancelScope()

        async def call() -> None:
            try:
                with scope:
                    result = await fn(*args)
            except Exception as e:
                self._later(_settle, done, None, e)
            except BaseException:  # the host's nursery cancelled: it stops
                self._later(_settle, done, None, ConnectionError("the py-libp2p host stopped"))
                raise
            else:
                if scope.cancelled_caught:
                    result, error = None, asyncio.CancelledError()
                else:
                    error = None
                self._later(_settle, done, result, error)

        if not self._soon(self._nursery.start_soon, call):
            raise ConnectionError("the py-libp2p host has stopped")
        try:
            return await done
        except asyncio.CancelledError:
            self._soon(scope.cancel)
            raise

    async def connect(self, maddr: str) -> PeerId:
        """Dial the peer at `maddr` (ending in /p2p/<id>), so that streams to it can open;
        net/host.py's DialError when it cannot be reached."""
        return PeerId(str(await self.run(dial, self.host, maddr)))

    async def get_visible_maddrs(self) -> list[str]:
        """The addresses peers can dial, each ending in /p2p/<our id>: `announce` when given,
        else the listen addresses, one on 0.0.0.0 as one on each IPv4 address of this
        machine (as p2pd shows them)."""
        own = f"/p2p/{self.peer_id}"
        if self.announce:
            return [a if "/p2p/" in a else a + own for a in self.announce]
        out = []
        for addr in (str(a).split("/p2p/")[0] for a in self.host.get_addrs()):
            if addr.startswith("/ip4/0.0.0.0/"):
                out += [addr.replace("/ip4/0.0.0.0/", f"/ip4/{ip}/", 1) + own for ip in _ipv4_addresses()]
            else:
                out.append(addr + own)
        return out

    # ------------------------------------------------------------------ streams

    async def add_binary_stream_handler(self, protocol: str,
                                        handler: Callable[[StreamInfo, asyncio.StreamReader, _Writer],
                                                          Awaitable[None]]) -> None:
        """Serve `protocol`: each stream a peer opens runs `handler(info, reader, writer)` on
        this asyncio loop."""
        async def on_stream(stream: INetStream) -> None:  # on the trio thread
            info = StreamInfo(PeerId(str(stream.muxed_conn.peer_id)), protocol)
            made: concurrent.futures.Future = concurrent.futures.Future()
            self._later(self._pair_for_handler, made, info, handler)
            reader, writer, recv = await trio.to_thread.run_sync(made.result)
            await self._pump(stream, reader, writer, recv)

        done: concurrent.futures.Future = concurrent.futures.Future()

        def register() -> None:
            self.host.set_stream_handler(TProtocol(protocol), on_stream)
            done.set_result(None)

        self._soon(register)
        await asyncio.wrap_future(done)

    def _pair(self) -> tuple[asyncio.StreamReader, _Writer, trio.MemoryReceiveChannel]:
        send, recv = trio.open_memory_channel(math.inf)
        return asyncio.StreamReader(), _Writer(self, send), recv

    def _pair_for_handler(self, made: concurrent.futures.Future, info: StreamInfo, handler) -> None:
        reader, writer, recv = self._pair()
        made.set_result((reader, writer, recv))
        task = asyncio.ensure_future(handler(info, reader, writer))
        task.add_done_callback(lambda _: writer.close())  # however the handler ended

    async def call_binary_stream_handler(self, peer_id, protocol: str
                                         ) -> tuple[StreamInfo, asyncio.StreamReader, _Writer]:
        """Open a stream to `peer_id` (a PeerId, or anything whose str() or to_base58() is
        its base58 id) for `protocol`; ConnectionError naming the peer when it does not open,
        ConnectionRefusedError when it cannot open now (`_refused`)."""
        peer = PeerId(peer_id.to_base58() if hasattr(peer_id, "to_base58") else str(peer_id))
        reader, writer, recv = self._pair()
        opened = self._loop.create_future()
        self._soon(self._nursery.start_soon, self._open, peer, protocol, reader, writer, recv, opened)
        try:
            await opened
        except asyncio.CancelledError:
            writer.close()  # the stream, should it open, closes at once
            raise
        return StreamInfo(peer, protocol), reader, writer

    async def _open(self, peer: PeerId, protocol: str, reader: asyncio.StreamReader, writer: _Writer,
                    recv: trio.MemoryReceiveChannel, opened: asyncio.Future) -> None:
        try:
            with trio.fail_after(OPEN_TIMEOUT_S):
                stream = await self.host.new_stream(ID.from_base58(peer), [TProtocol(protocol)])
        except Exception as e:  # py-libp2p raises many types: one the node's code handles
            error = (ConnectionRefusedError if _refused(e) else ConnectionError)(
                f"no {protocol} stream to {peer}: {_why(e)}")
            self._later(_settle, opened, None, error)
            return
        self._later(_settle, opened, None, None)
        await self._pump(stream, reader, writer, recv)

    async def _pump(self, stream: INetStream, reader: asyncio.StreamReader, writer: _Writer,
                    recv: trio.MemoryReceiveChannel) -> None:
        """Carry `stream`'s bytes both ways until the asyncio side closes it or it breaks."""
        async def read() -> None:
            try:
                while True:
                    data = await stream.read(READ_BYTES)
                    if not data:
                        break
                    self._later(reader.feed_data, data)
                self._later(reader.feed_eof)
            except Exception:  # py-libp2p ends a stream the peer closed with StreamEOF, a reset with
                # StreamReset: both end the reader after what came (an exception set on an asyncio
                # reader would hide the bytes still buffered there, a whole answer among them); a
                # short read then raises where the node's code expects it (protocol/framing.py)
                self._later(reader.feed_eof)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            try:
                async for data in recv:
                    if data is None:
                        break
                    await stream.write(data)
                    self._later(writer._wrote, len(data))
            except Exception as e:
                self._later(writer._failed, ConnectionResetError(f"stream write failed: {type(e).__name__}: {e}"))
            finally:
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                    try:
                        await stream.close()
                    except Exception:
                        pass


REFUSED_SIGNS = ("unable to connect", "no known addresses", "protocol not supported", "protocols not supported",
                 "connection refused", "dialallfailed")
"""What py-libp2p's errors say when a stream cannot open now and waiting will not help: no
connection could be made (the peer is gone, or no address of it is known) or the peer does
not serve the protocol (a process that lost its daemon's handlers)."""


def _chain(e: BaseException | None) -> list[BaseException]:
    """`e` and what caused it (py-libp2p wraps the reason a stream failed: its causes say it)."""
    seen: list[BaseException] = []
    while e is not None and e not in seen and len(seen) < 8:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def _why(e: BaseException) -> str:
    """The first line of `e` and of its deepest cause."""
    def line(x: BaseException) -> str:
        return f"{type(x).__name__}: {(str(x).strip().splitlines() or [''])[0][:200]}"
    root = _chain(e)[-1]
    return line(e) if root is e else f"{line(e)} ({line(root)})"


def _refused(e: BaseException) -> bool:
    """Whether a failed stream open is one of REFUSED_SIGNS (node/pull.py then stops waiting
    for the peer, as for p2pd's refused dials), not a timeout or a cut."""
    seen = _chain(e)
    text = " | ".join(f"{type(x).__name__}: {x}" for x in seen).lower()
    return any(isinstance(x, ConnectionRefusedError) for x in seen) or any(s in text for s in REFUSED_SIGNS)


def _ipv4_addresses() -> list[str]:
    """This machine's IPv4 addresses, loopback first."""
    import psutil

    found = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == socket.AF_INET}
    return sorted(found, key=lambda ip: (not ip.startswith("127."), ip))


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
