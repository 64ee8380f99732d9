"""Request/response exchanges over libp2p binary streams (hivemind's p2pd), shared by the
delta exchange and the state download: the request is a fixed number of bytes, the response
one frame of protocol/framing.py. The server bounds every wait, drops only the request that
stalls and admits each peer's requests under a concurrency and rate limit; the client
bounds the whole exchange with a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from hivemind.p2p import P2P, PeerID

from locoswarm.protocol.framing import frame_header, read_frame

log = logging.getLogger(__name__)


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
        header = frame_header(len(payload))
        writer.write(header)
        writer.write(payload)
        await asyncio.wait_for(writer.drain(), timeout_s)
        return len(header) + len(payload)
    except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError) as e:
        # A slow or vanished client: drop this request only.
        log.info("%s request from %s abandoned: %s", what, peer, type(e).__name__)
        return 0
    except asyncio.CancelledError:
        # The daemon is stopping (p2pd's handler tasks are cancelled at shutdown). Nothing
        # awaits this task but asyncio's stream callback, which would log the cancellation
        # as an error with a traceback: end it quietly instead.
        log.info("%s request from %s abandoned: the daemon is stopping", what, peer)
        return 0
    finally:
        if limits is not None:
            limits.release(peer)
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
