"""The arithmetic of the bounded peer registry (docs/scale.md, "The bounded design"): which
bucket key a peer's record lives under, at which levels a peer writes and reads, the swarm
size estimated from what it read, and the partial view kept from the reads. Pure functions
and small classes, no I/O: node/registry.py does the DHT reads and writes. The levels'
arithmetic (`level_of`, `write_levels`, `read_level`, with BUCKET_ENTRIES) lives in
protocol/records.py beside the bucket keys, where the py-libp2p peer (net/registry.py) reads it too.

**Buckets.** At level L the registry is 2^L DHT keys `locoswarm:<run>:peers:<L>:<b>`; a
peer's record lives in bucket b = the first L bits of sha256(its base58 peer id, as ASCII
bytes), read as a big-endian integer. Level 0 is one key, bucket 0: everyone.

**Levels agreed without agreement.** Each peer computes ℓ = log2(N_est / BUCKET_ENTRIES)
from its own estimate N_est, clamped at 0, WRITES its record at levels ⌊ℓ⌋ and ⌊ℓ⌋ + 1 and
READS at ⌊ℓ + ½⌋ (ℓ rounded, halves up). Two peers whose estimates differ by less than a
factor √2 have |ℓ_reader − ℓ_writer| < ½, so ℓ_writer < ℓ_reader + ½ < ℓ_writer + 1 and the
reader's level ⌊ℓ_reader + ½⌋ is ⌊ℓ_writer⌋ or ⌊ℓ_writer⌋ + 1: one of the writer's two
levels, so the reader meets the writer. Clamping at 0 moves no two values further apart, so
the argument holds there too. With BUCKET_ENTRIES = 32 and peers agreeing on ℓ, a read
bucket holds N / 2^⌊ℓ+½⌋ entries on average: 32/√2 … 32·√2 (23–45), and every record is
written twice (2 small stores a refresh). Below ≈45 peers (ℓ < ½) everyone reads level 0,
the one key holding everyone, as the registry did before it had buckets; below 32/√2 ≈ 23
(an estimate whose every reader within √2 stays under 32, so reads level 0) a record is
written at level 0 only: one store a refresh where most swarms start.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass

from locoswarm.protocol.records import MAX_LEVEL, PeerRecord, level_of, read_level, write_levels

__all__ = ["MAX_LEVEL", "PartialView", "SizeEstimate", "buckets_to_sample", "level_of", "read_level", "write_levels"]

SAMPLE_ENTRIES = 64
"""A view read aims to see this many records: round(SAMPLE_ENTRIES / mean occupancy) buckets."""
VIEW_MAX = 200
"""At most this many records are kept in the partial view (the most recently seen)."""
ESTIMATES_KEPT = 5
"""The estimate used is the median of the last this many samples, so L does not flap."""


def buckets_to_sample(level: int, mean_occupancy: float) -> int:
    """How many buckets of `level` a view read covers, the own one included:
    round(SAMPLE_ENTRIES / mean occupancy), at least 1, at most all 2^level."""
    wanted = round(SAMPLE_ENTRIES / mean_occupancy) if mean_occupancy > 0 else 2 ** level
    return max(1, min(2 ** level, wanted))


class SizeEstimate:
    """N_est: the median of the last ESTIMATES_KEPT samples, each the mean number of live
    records per bucket read at one level times 2^level."""

    def __init__(self) -> None:
        self._samples: deque[float] = deque(maxlen=ESTIMATES_KEPT)

    def add(self, mean_entries: float, level: int) -> None:
        self._samples.append(mean_entries * 2 ** level)

    def reset(self, peers_estimate: float) -> None:
        """Start again from one figure (a bootstrap probe found the level the swarm writes at)."""
        self._samples.clear()
        self._samples.append(peers_estimate)

    @property
    def value(self) -> float:
        """The estimate; 1 (this peer alone) before any sample."""
        return statistics.median(self._samples) if self._samples else 1.0


@dataclass(slots=True)
class Seen:
    record: PeerRecord
    key: str
    """The bucket key it was last read from."""
    at: float
    """When (monotonic seconds) it was last read live."""
    expires: float | None = None
    """Its entry's DHT expiration time, when it came from a one-replica read (None: from a
    whole bucket read, dropped when a later read of the bucket no longer shows it)."""


class PartialView:
    """The live records this peer knows of, at most VIEW_MAX. A record stays while the
    bucket it was read from shows it at each re-read of that bucket, and for at most
    `keep_s` after it was last seen (buckets sampled at random are not re-read every
    period); one withdrawn, or missing when its bucket is read again, is dropped at once."""

    def __init__(self, keep_s: float, clock=time.monotonic, dht_clock=time.time) -> None:
        self.keep_s = keep_s
        self.clock = clock
        self.dht_clock = dht_clock
        self._seen: dict[str, Seen] = {}
        self.aged_out: set[str] = set()
        """Peers the last `records()` call dropped for age or for room, not because their
        bucket showed them gone: out of sight, not known to have vanished."""

    def update(self, key: str, live: list[PeerRecord], withdrawn: set[str],
               expires: dict[str, float] | None = None) -> None:
        """Take one read of bucket `key`: its live records and the peers withdrawn in it.
        `expires` (peer id → its entry's DHT expiration time, tombstones included) marks a
        copy from one replica, which may have missed stores: a peer missing from it is
        kept, and an entry is taken only when it expires later than the one held (an older
        copy sets nothing back); such records are dropped once their entry expires."""
        now = self.clock()
        if expires is None:
            present = {r.peer_id for r in live}
            for peer in [p for p, s in self._seen.items() if (s.key == key and p not in present) or p in withdrawn]:
                del self._seen[peer]
            for record in live:
                self._seen[record.peer_id] = Seen(record, key, now)
            return
        for peer in withdrawn:
            held = self._seen.get(peer)
            if held is not None and (held.expires is None or expires[peer] > held.expires):
                del self._seen[peer]
        for record in live:
            held = self._seen.get(record.peer_id)
            when = expires[record.peer_id]
            if held is None or held.expires is None or when > held.expires:
                self._seen[record.peer_id] = Seen(record, key, now, when)
            elif when == held.expires:
                held.at = now

    def records(self) -> list[PeerRecord]:
        """The view, by peer id: records older than keep_s dropped, then the most recently
        seen VIEW_MAX kept."""
        now = self.clock()
        dht_now = self.dht_clock()
        for peer in [p for p, s in self._seen.items() if s.expires is not None and s.expires < dht_now]:
            del self._seen[peer]  # its entry expired: gone, not aged out
        self.aged_out = {p for p, s in self._seen.items() if now - s.at > self.keep_s}
        if len(self._seen) - len(self.aged_out) > VIEW_MAX:
            kept = sorted((p for p in self._seen if p not in self.aged_out), key=lambda p: self._seen[p].at)
            self.aged_out.update(kept[:len(kept) - VIEW_MAX])
        for peer in self.aged_out:
            del self._seen[peer]
        return [self._seen[p].record for p in sorted(self._seen)]
