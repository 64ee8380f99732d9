"""Admission of one peer's requests to a stream handler, whatever transport carries the
streams (node/streams.py, on hivemind's p2pd or on py-libp2p through net/bridge.py): a concurrency and rate
limit per peer, a bound on the streams a peer keeps open, and refusals logged as warnings at
a bounded rate. Counts identities' requests; what a server sends in all is bounded by bytes
(node/streams.py ByteBudget)."""

from __future__ import annotations

import logging
import time
from typing import Callable, Protocol

log = logging.getLogger(__name__)
WARN_EVERY_S = 10.0
"""Refusals of one kind to one peer are warned about at most this often (with a count of
those between): a flood must show in the log without becoming one."""
_warned: dict[tuple[str, str], tuple[float, int]] = {}


def warn_refused(what: str, peer: str, why: str, clock: Callable[[], float] = time.monotonic) -> None:
    """Log a refused or dropped request of `peer` as a warning, at most every WARN_EVERY_S
    per (what, peer)."""
    now = clock()
    last, since = _warned.get((what, peer), (float("-inf"), 0))
    if now - last < WARN_EVERY_S:
        _warned[(what, peer)] = (last, since + 1)
        return
    if len(_warned) >= 4096:
        _warned.clear()  # bounded under an id-rotating flood; a warning may come early
    _warned[(what, peer)] = (now, 0)
    more = f" ({since} more since the last warning)" if since else ""
    log.warning("%s request from %s refused: %s%s", what, peer, why, more)


class Closable(Protocol):
    """A stream's end that closing ends (asyncio's writer; a py-libp2p stream's wrapper)."""

    def close(self) -> None: ...


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
        self._streams: dict[str, list[Closable]] = {}
        """peer → its kept streams open now, oldest first."""
        self.refused = 0
        """Requests and streams turned away."""

    def open_stream(self, peer: str, stream: Closable) -> str | None:
        """Count a kept stream of `peer` open (call `close_stream` when it ends); None, or
        why it is refused. A peer's streams beyond `max_concurrent` + 1 close its oldest:
        an honest client keeps one and opens another only when it gave the last up (a
        request cut off by its timeout); more are left over or a flood. Past
        `max_peers` streams in all, new ones are refused."""
        mine = self._streams.setdefault(peer, [])
        if not mine and sum(map(len, self._streams.values())) >= self.max_peers:
            del self._streams[peer]
            self.refused += 1
            return f"{self.max_peers} streams open"
        mine.append(stream)
        while len(mine) > self.max_concurrent + 1:
            mine.pop(0).close()
            self.refused += 1
        return None

    def close_stream(self, peer: str, stream: Closable) -> None:
        mine = self._streams.get(peer, [])
        if stream in mine:
            mine.remove(stream)
        if not mine:
            self._streams.pop(peer, None)

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


class Busy(Exception):
    """The server will not answer this request now (over its byte budget): the stream is
    closed unanswered, and the client asks again later or elsewhere."""


class ByteBudget:
    """Bytes a server may send per second, whoever asks (the generic cell rate algorithm,
    reservations served in order): an answer waits until the budget allows it, and is refused
    (`Busy`) when that wait would pass `max_wait_s`. It counts bytes, not identities: a
    hundred identities asking at once share it as one does, and what the node itself must
    send (its deltas) keeps the rest of the link."""

    def __init__(self, bytes_per_s: float, *, burst_bytes: float, max_wait_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.bytes_per_s, self.max_wait_s, self.clock = bytes_per_s, max_wait_s, clock
        self.tolerance_s = burst_bytes / bytes_per_s
        """How far ahead of the rate reservations may run: `burst_bytes` go at once after a pause."""
        self._paid_at = clock()
        """When every reservation so far is paid for at the rate."""
        self.refused = 0
        self.waited_s = 0.0
        """Total time answers waited for the budget."""

    def reserve(self, nbytes: int) -> float:
        """Reserve `nbytes`: the seconds to wait before sending them; Busy if too long."""
        now = self.clock()
        paid_at = max(self._paid_at, now)
        wait = max(0.0, paid_at - self.tolerance_s - now)
        if wait > self.max_wait_s:
            self.refused += 1
            raise Busy(f"the upload budget of {self.bytes_per_s / 1e6:.3g} MB/s is taken for the next {wait:.1f} s")
        self._paid_at = paid_at + nbytes / self.bytes_per_s
        self.waited_s += wait
        return wait
