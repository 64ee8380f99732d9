"""Request/response exchanges over libp2p binary streams (hivemind's p2pd), shared by the
delta exchange and the state download: the request is a fixed number of bytes, the response
one frame of protocol/framing.py. The server bounds every wait, drops only the request that
stalls and admits each peer's requests under a concurrency and rate limit; the client
bounds the whole exchange with a timeout.

A stream may carry requests one after another (`serve_framed(idle_s=…)` on the server,
`KeptStreams` on the client): opening a stream costs libp2p's protocol negotiation and
framing, 354–415 bytes on loopback for a 16-byte question (bench/request_cost.py), every round
for every delta pulled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Awaitable, Callable

from locoswarm.protocol import admission
from locoswarm.protocol.admission import Busy, PeerLimits, warn_refused
from locoswarm.protocol.framing import frame_header, read_frame

if TYPE_CHECKING:
    from hivemind.p2p import P2P, PeerID

log = logging.getLogger(__name__)

__all__ = ["Busy", "ByteBudget", "KeptStreams", "PeerLimits", "call_framed", "peer_id_of", "serve_framed",
           "warn_refused"]


async def serve_framed(
    info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
    request_len: int, answer: Callable[[bytes], bytes | Awaitable[bytes]], timeout_s: float, what: str,
    limits: PeerLimits | None = None, admit: Callable[[str], bool] | None = None,
    idle_s: float | None = None, sent: Callable[[int], None] | None = None,
) -> int:
    """Answer one request with `answer(request)` (a function or a coroutine function), or
    with `idle_s` a kept stream's requests in turn, until the peer closes it or asks nothing
    for `idle_s`. Returns the bytes written (0 if abandoned, refused by `limits`, or from a
    peer `admit` does not admit); `sent(n)` hears of each answer as it goes out, where a kept
    stream's total comes only when it ends."""
    peer = str(getattr(info, "peer_id", "?"))
    if admit is not None and not admit(peer):
        # Not a warning: a joiner of a private run asks before its record has been read.
        log.info("%s request from %s refused: not admitted to this private run", what, peer)
        if limits is not None:
            limits.refused += 1
        writer.close()
        return 0
    kept = limits is not None and idle_s is not None
    if kept:
        why = limits.open_stream(peer, writer)
        if why is not None:
            warn_refused(what, peer, why)
            writer.close()
            return 0
    total = 0
    try:
        while True:
            try:
                request = await asyncio.wait_for(reader.readexactly(request_len), idle_s if total else timeout_s)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
                if total and not getattr(e, "partial", b""):
                    return total  # a kept stream closed or left idle between requests: done with it
                raise
            if limits is not None:
                why = limits.admit(peer)
                if why is not None:
                    warn_refused(what, peer, why)
                    return total
            try:
                payload = answer(request)
                if asyncio.iscoroutine(payload):
                    payload = await payload
                header = frame_header(len(payload))
                writer.write(header)
                writer.write(payload)
                await asyncio.wait_for(writer.drain(), timeout_s)
            finally:
                if limits is not None:
                    limits.release(peer)
            total += len(header) + len(payload)
            if sent is not None:
                sent(len(header) + len(payload))
            if idle_s is None:
                return total
    except Busy as e:
        warn_refused(what, peer, str(e))
        if limits is not None:
            limits.refused += 1  # node status' requests_refused
        return total
    except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError) as e:
        # A slow or vanished client: drop this request only.
        log.info("%s request from %s abandoned: %s", what, peer, type(e).__name__)
        return total
    except asyncio.CancelledError:
        # The daemon is stopping (p2pd's handler tasks are cancelled at shutdown). Nothing
        # awaits this task but asyncio's stream callback, which would log the cancellation
        # as an error with a traceback: end it quietly instead.
        log.info("%s request from %s abandoned: the daemon is stopping", what, peer)
        return total
    finally:
        if kept:
            limits.close_stream(peer, writer)
        writer.close()


async def call_framed(
    p2p: P2P, peer: PeerID, protocol: str, request: bytes, *, limit: int, limit_name: str, timeout_s: float,
) -> bytes | None:
    """Send `request` to `peer` and return the response body, None when the peer answered
    "nothing here". Raises what `read_frame` raises (OversizedMessage above `limit`,
    TruncatedBody on a cut body), asyncio.TimeoutError after `timeout_s`."""

    async def go() -> bytes | None:
        _, reader, writer = await p2p.call_binary_stream_handler(peer, protocol)
        try:
            writer.write(request)
            await writer.drain()
            return await read_frame(reader, peer=peer, limit=limit, limit_name=limit_name)
        finally:
            writer.close()

    return await asyncio.wait_for(go(), timeout_s)


class KeptStreams:
    """The client side of kept streams for one protocol: a stream to a peer, once its
    answer is read whole, is kept for the next request to that peer instead of closed. A
    stream is lent to one request at a time; one that failed, timed out or was cancelled
    mid-answer is closed (what is left on it is not ours to read). A kept stream that the
    peer closed meanwhile (it restarted, or the server's idle bound passed) fails before
    any answer: the request then goes once more on a new stream."""

    def __init__(self, p2p: P2P, protocol: str, *, idle_s: float) -> None:
        """`idle_s`: a kept stream unused this long is closed (the server keeps its end
        twice as long, so that it is the client that ends a stream)."""
        self.p2p, self.protocol, self.idle_s = p2p, protocol, idle_s
        self._idle: dict[str, tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = {}
        """peer → its stream not lent now, and when it was last given back."""
        self.num_opened = 0
        """Streams opened (the requests made on kept streams are the caller's count)."""

    async def call(self, peer: PeerID | str, request: bytes, *, limit: int, limit_name: str,
                   timeout_s: float) -> bytes | None:
        """`call_framed` on a kept stream; `peer` is the transport's peer id, or its base58 text."""
        if isinstance(peer, str):
            peer = peer_id_of(self.p2p, peer)
        key = peer.to_base58()
        until = time.monotonic() + timeout_s
        self._close_idle(time.monotonic())
        kept = self._idle.pop(key, None)
        if kept is not None and not kept[0].at_eof():
            try:
                return await asyncio.wait_for(self._ask(key, kept[0], kept[1], request, limit, limit_name), timeout_s)
            except ConnectionError:
                pass  # closed by the peer before it answered: ask on a new stream
        elif kept is not None:
            kept[1].close()

        async def fresh() -> bytes | None:
            _, reader, writer = await self.p2p.call_binary_stream_handler(peer, self.protocol)
            self.num_opened += 1
            return await self._ask(key, reader, writer, request, limit, limit_name)

        return await asyncio.wait_for(fresh(), max(0.0, until - time.monotonic()))

    async def _ask(self, key: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes,
                   limit: int, limit_name: str) -> bytes | None:
        kept = False
        try:
            writer.write(request)
            await writer.drain()
            body = await read_frame(reader, peer=key, limit=limit, limit_name=limit_name)
            kept = key not in self._idle  # one kept per peer: a second (two requests at once) is closed
            return body
        finally:
            if kept:
                self._idle[key] = (reader, writer, time.monotonic())
            else:
                writer.close()

    def _close_idle(self, now: float) -> None:
        for key in [k for k, (_, _, since) in self._idle.items() if now - since > self.idle_s]:
            self._idle.pop(key)[1].close()

    def close(self) -> None:
        """Close every kept stream (the daemon is stopping)."""
        for _, writer, _ in self._idle.values():
            writer.close()
        self._idle.clear()


class ByteBudget(admission.ByteBudget):
    """protocol/admission.py's byte budget, waited for on asyncio."""

    async def take(self, nbytes: int) -> None:
        """Wait until `nbytes` may go (raises Busy when the wait would pass `max_wait_s`)."""
        wait = self.reserve(nbytes)
        if wait > 0:
            await asyncio.sleep(wait)


def peer_id_of(p2p, peer: str):
    """The peer id `p2p` takes for the base58 `peer`: of the type of its own id (hivemind's
    PeerID on p2pd, net/bridge.py's PeerId on py-libp2p), so that the node's code names peers
    without importing either transport (docs/windows.md)."""
    return type(p2p.peer_id).from_base58(peer)
