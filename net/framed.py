"""The request/response byte streams of the delta exchange (and, later, the state download)
on py-libp2p: a request of a fixed number of bytes, answered by one frame of
protocol/framing.py, several requests one after another on a kept stream. The same bytes as
node/streams.py sends over p2pd, so a hivemind peer and a py-libp2p peer serve each other.

The server admits each peer's requests and streams under protocol/admission.py's limits (a
peer's streams beyond its concurrency + 1 close its oldest) and bounds every wait; the client bounds the whole exchange with a timeout and keeps a stream per peer for
its next request. Every failure is the request's, never the host's.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from locoswarm.net.rpc import close_stream
from locoswarm.protocol.admission import PeerLimits, warn_refused
from locoswarm.protocol.framing import frame_header, read_frame_with

log = logging.getLogger(__name__)


class Refused(Exception):
    """The server will not answer this request (the answer function's verdict): the stream
    is closed unanswered."""


async def read_exactly(stream: INetStream, n: int) -> bytes:
    """`n` bytes from `stream`, or fewer where it ended (py-libp2p reads what has come)."""
    data = bytearray()
    while len(data) < n:
        try:
            chunk = await stream.read(n - len(data))
        except Exception:  # py-libp2p ends a stream with several exception types (EOF, reset, closed)
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


def serve_framed(host: IHost, protocol: str, answer: Callable[[str, bytes], Awaitable[bytes]], *, request_len: int,
                 what: str, limits: PeerLimits, timeout_s: float = 10.0, idle_s: float = 60.0,
                 sent: Callable[[int], None] | None = None) -> None:
    """Answer every request a peer sends on `protocol` with `answer(peer, request)`, a
    stream's requests in turn until the peer closes it or asks nothing for `idle_s`. A
    request must arrive within `timeout_s` of the stream's opening; `answer` raising
    Refused closes the stream unanswered (logged as a refusal); `sent(n)` hears of each
    answer's bytes."""

    async def on_stream(stream: INetStream) -> None:
        peer = str(stream.muxed_conn.peer_id)
        ok = False
        handle = _Resettable(stream)
        try:
            why = limits.open_stream(peer, handle)
            if why is not None:
                warn_refused(what, peer, why)
                return
            served = 0
            while True:
                with trio.move_on_after(idle_s if served else timeout_s):
                    request = await read_exactly(stream, request_len)
                if not request and served:
                    ok = True  # a kept stream closed or left idle between requests
                    return
                if len(request) < request_len:
                    log.info("%s request from %s abandoned: %d of %d bytes", what, peer, len(request), request_len)
                    return
                why = limits.admit(peer)
                if why is not None:
                    warn_refused(what, peer, why)
                    return
                try:
                    payload = await answer(peer, request)
                    with trio.fail_after(timeout_s):
                        await stream.write(frame_header(len(payload)) + payload)
                finally:
                    limits.release(peer)
                served += 1
                if sent is not None:
                    sent(len(payload) + len(frame_header(0)))
        except Refused as e:
            warn_refused(what, peer, str(e))
            limits.refused += 1
        except Exception as e:  # a slow or vanished client: this stream only
            log.info("%s request from %s abandoned: %s", what, peer, type(e).__name__)
        finally:
            limits.close_stream(peer, handle)
            await close_stream(stream, reset=not ok)

    host.set_stream_handler(TProtocol(protocol), on_stream)


class _Resettable:
    """A served stream as protocol/admission.py's limits close it: reset at once (its
    handler's read then ends), from a task of its own, since closing here is synchronous."""

    def __init__(self, stream: INetStream) -> None:
        self.stream = stream

    def close(self) -> None:
        trio.lowlevel.spawn_system_task(functools.partial(close_stream, self.stream, reset=True))


class KeptStreams:
    """The client side for one protocol: a stream to a peer, once its answer is read whole,
    is kept for the next request to that peer. One that failed or timed out mid-answer is
    reset; a kept one the peer closed meanwhile fails before any answer, and the request then
    goes once more on a new stream."""

    def __init__(self, host: IHost, protocol: str, *, idle_s: float = 30.0) -> None:
        self.host, self.protocol, self.idle_s = host, protocol, idle_s
        self._idle: dict[str, tuple[INetStream, float]] = {}
        self.num_opened = 0

    async def call(self, peer: ID, request: bytes, *, limit: int, limit_name: str, timeout_s: float) -> bytes | None:
        """The answer's body (None: the peer answered "nothing here"). Raises TimeoutError
        naming the peer after `timeout_s`, ConnectionResetError when the peer closed the
        stream before answering, what read_frame_with raises for a bad frame, and
        py-libp2p's dial errors."""
        key = str(peer)
        await self._close_idle(time.monotonic())
        try:
            with trio.fail_after(timeout_s):
                kept = self._idle.pop(key, None)
                if kept is not None:
                    try:
                        return await self._ask(key, kept[0], request, limit, limit_name)
                    except ConnectionResetError:
                        pass  # closed by the peer before it answered: ask on a new stream
                stream = await self.host.new_stream(peer, [TProtocol(self.protocol)])
                self.num_opened += 1
                return await self._ask(key, stream, request, limit, limit_name)
        except trio.TooSlowError:
            raise TimeoutError(f"peer {key} gave no answer on {self.protocol} within {timeout_s:g} s") from None

    async def _ask(self, key: str, stream: INetStream, request: bytes, limit: int, limit_name: str) -> bytes | None:
        kept = False
        try:
            try:
                await stream.write(request)
            except Exception as e:  # py-libp2p ends a stream with several exception types (closed, reset)
                raise ConnectionResetError(f"peer {key} closed the stream: {type(e).__name__}: {e}") from e
            body = await read_frame_with(lambda n: read_exactly(stream, n), peer=key, limit=limit,
                                         limit_name=limit_name)
            kept = key not in self._idle
            return body
        finally:
            if kept:
                self._idle[key] = (stream, time.monotonic())
            else:
                await close_stream(stream, reset=True)

    async def _close_idle(self, now: float) -> None:
        for key in [k for k, (_, since) in self._idle.items() if now - since > self.idle_s]:
            await close_stream(self._idle.pop(key)[0], reset=False)

    async def close(self) -> None:
        for stream, _ in self._idle.values():
            await close_stream(stream, reset=False)
        self._idle.clear()
