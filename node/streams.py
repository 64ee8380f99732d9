"""Request/response framing over libp2p binary streams (hivemind's p2pd), shared by the
delta exchange and the state download. The request is a fixed number of bytes; the
response an 8-byte big-endian length and that many bytes, length 0 meaning "nothing here".
The server bounds every wait and drops only the request that stalls; the client refuses a
declared length above its limit before reading a byte of the body, and bounds the whole
exchange with a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from hivemind.p2p import P2P, PeerID

from locoswarm.protocol import MalformedMessage, OversizedMessage

HEADER = 8
log = logging.getLogger(__name__)


class TruncatedBody(MalformedMessage):
    """The stream ended inside the announced body. A bad peer can do it on purpose, but a
    lossy link resets streams too (seen in the fault suite: a delta cut after its header at
    1 % loss, dropped as malformed, and the peers' outer states split), so a caller may ask
    again before it holds it against the peer."""


class PeerLimits:
    """Admission of one peer's requests to a stream handler: at most `max_concurrent` in
    flight and, over time, `rate` a second (a token bucket holding up to `burst`). One
    peer opening streams in a loop then costs the others nothing: its excess streams are
    closed unanswered. Honest use stays far below: a delta is pulled once a round, a state
    download asks one chunk at a time."""

    def __init__(self, *, max_concurrent: int, rate: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 max_peers: int = 4096) -> None:
        self.max_concurrent, self.rate, self.burst, self.clock = max_concurrent, rate, burst, clock
        self.max_peers = max_peers
        self._active: dict[str, int] = {}
        self._bucket: dict[str, tuple[float, float]] = {}
        """peer → (tokens, time of the last refill)."""
        self.refused = 0

    def admit(self, peer: str) -> str | None:
        """None when `peer` may go on (call `release` when done), else why not."""
        if self._active.get(peer, 0) >= self.max_concurrent:
            self.refused += 1
            return f"{self.max_concurrent} requests already in flight"
        now = self.clock()
        tokens, last = self._bucket.get(peer, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._bucket[peer] = (tokens, now)
            self.refused += 1
            return f"more than {self.rate:g} requests a second"
        if peer not in self._bucket and len(self._bucket) >= self.max_peers:
            # Bounded memory under an id-rotating flood: forget the fullest buckets (idle peers).
            for idle in [p for p, (t, _) in self._bucket.items() if t >= self.burst and p not in self._active]:
                del self._bucket[idle]
        self._bucket[peer] = (tokens - 1.0, now)
        self._active[peer] = self._active.get(peer, 0) + 1
        return None

    def release(self, peer: str) -> None:
        left = self._active.get(peer, 0) - 1
        if left > 0:
            self._active[peer] = left
        else:
            self._active.pop(peer, None)


async def serve_framed(
    info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
    request_len: int, answer: Callable[[bytes], bytes | Awaitable[bytes]], timeout_s: float, what: str,
    limits: PeerLimits | None = None, admit: Callable[[str], bool] | None = None,
) -> int:
    """Answer one request with `answer(request)` (a function or a coroutine function);
    returns the bytes written (0 if abandoned, refused by `limits`, or from a peer `admit`
    does not admit)."""
    peer = str(getattr(info, "peer_id", "?"))
    if admit is not None and not admit(peer):
        log.info("%s request from %s refused: not admitted to this private run", what, peer)
        if limits is not None:
            limits.refused += 1
        writer.close()
        return 0
    if limits is not None:
        why = limits.admit(peer)
        if why is not None:
            log.info("%s request from %s refused: %s", what, peer, why)
            writer.close()
            return 0
    try:
        request = await asyncio.wait_for(reader.readexactly(request_len), timeout_s)
        payload = answer(request)
        if asyncio.iscoroutine(payload):
            payload = await payload
        writer.write(len(payload).to_bytes(HEADER, "big"))
        writer.write(payload)
        await asyncio.wait_for(writer.drain(), timeout_s)
        return HEADER + len(payload)
    except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError) as e:
        # A slow or vanished client: drop this request only.
        log.info("%s request from %s abandoned: %s", what, peer, type(e).__name__)
        return 0
    finally:
        if limits is not None:
            limits.release(peer)
        writer.close()


async def call_framed(
    p2p: P2P, peer: PeerID, protocol: str, request: bytes, *, limit: int, limit_name: str, timeout_s: float,
) -> bytes | None:
    """Send `request` to `peer` and return the response body, None when the peer answered
    "nothing here". Raises OversizedMessage above `limit`, MalformedMessage on a cut
    stream, asyncio.TimeoutError after `timeout_s`."""

    async def go() -> bytes | None:
        _, reader, writer = await p2p.call_binary_stream_handler(peer, protocol)
        try:
            writer.write(request)
            await writer.drain()
            try:
                length = int.from_bytes(await reader.readexactly(HEADER), "big")
            except asyncio.IncompleteReadError:
                # Not a protocol fault: the peer is leaving, or its handler is gone.
                raise ConnectionResetError(f"peer {peer} closed the stream before the length header") from None
            if length == 0:
                return None
            if length > limit:
                raise OversizedMessage(f"peer {peer} announced {length} bytes, above {limit_name} of {limit}")
            try:
                return await reader.readexactly(length)
            except asyncio.IncompleteReadError as e:
                raise TruncatedBody(f"peer {peer} sent {len(e.partial)} of {length} announced bytes") from None
        finally:
            writer.close()

    return await asyncio.wait_for(go(), timeout_s)
