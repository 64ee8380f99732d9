"""The discrete-event simulation behind `locoswarm bench scale`: one swarm of N peers, one
control-plane design, over simulated time, with churn.

What runs event by event and what by statistics. Membership is simulated for all N peers:
a peer's session ends (exponential, or one kill every `churn_s` on average), it is killed
(its entries linger until they expire) or withdraws (a tombstone outlives it), and a
newcomer takes its slot, so the swarm stays at N; each slot has its throughput and its
registry bucket. A sample of S peers (16) also runs its control loops and its rounds event
by event: each timer fires, is charged what its operation costs against the values as they
are at that moment (bench/scale_designs.py), and comes round again after its period —
stretched when the peer's control work exceeds its share of a core or its link, as a
saturated asyncio loop falls behind — plus the operation's latency. The other N − S peers
are not run one by one: by symmetry each does what a sampled one does, so per-peer figures
are the sample's means, and a peer's traffic (what it receives) equals what the peers it
talks to send for it. Simulating 10,000 peers' loops message by message would take hours
in Python; this takes a second.

Rounds (per sampled peer): the round's tokens, round_tokens × (peers in the round), are
trained at the round's peers' summed throughput; then its deltas are pulled from up to F
of them: the wait for the last one to notice the end (a progress-loop period, stretched
with the loop) and finish its step, the transfer, the pull's polling, and 2 s more when a
pulled peer was killed during the round (a withdrawn one says so: no wait). With overlap
(the shipped default) the next round trains meanwhile and waits only for what is left.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter, deque
from dataclasses import dataclass, field

from locoswarm.bench.scale_designs import (BoundedDesign, CurrentDesign, Dht, OpCost, bounded_groups, bounded_own_read,
                                           bounded_progress, bounded_read, bounded_record, bounded_round, current_cycle)
from locoswarm.bench.scale_model import Churn, Costs, Links, Workload

REESTIMATE_S = 5.0
"""How often a sampled peer's loop stretch is recomputed from what its operations cost now."""


@dataclass(slots=True)
class Sampled:
    """A peer whose loops and rounds are simulated event by event."""

    slot: int
    rtt_s: float
    up_bytes_per_s: float
    down_bytes_per_s: float
    stretch: float = 1.0
    stretched_at: float = -math.inf
    last: dict[str, OpCost] = field(default_factory=dict)
    """The latest cost of each of its timers."""
    latency_s: dict[str, float] = field(default_factory=dict)
    fired: Counter = field(default_factory=Counter)
    """(timer, memo key) → firings."""
    killed_pulled: int = 0
    """Pulled peers of the current round that were killed."""
    next_compute_s: float = 0.0
    """Training time of the round in progress."""
    compute_s: float = 0.0
    exchange_s: float = 0.0
    """Its rounds' exchanges, summed (from a round's end to its outer step)."""
    rounds: int = 0
    last_round_end: float = 0.0
    exchange_done: float = 0.0
    """When the last round's exchange ends (the next round's delta waits for it)."""
    reads: deque = field(default_factory=deque)
    """(time, bucket, entries) of its registry reads in the last TTL (bounded)."""
    round_cost: OpCost = field(default_factory=OpCost)
    """What its rounds cost besides the timers, summed (bounded: records, "done", delta requests)."""


class Simulation:
    def __init__(self, design: str, num_peers: int, *, current: CurrentDesign, bounded: BoundedDesign, costs: Costs,
                 links: Links, workload: Workload, churn: Churn, sample_peers: int = 16, seed: int = 0) -> None:
        if design not in ("current", "bounded"):
            raise ValueError(f"unknown design {design!r}")
        self.design, self.n = design, num_peers
        self.cur, self.bnd, self.costs, self.links, self.work, self.churn = current, bounded, costs, links, workload, churn
        self.rng = random.Random(seed * 7919 + num_peers * 2 + (design == "bounded"))
        d = bounded if design == "bounded" else current
        self.dht = Dht(costs, num_peers, num_replicas=d.num_replicas, beam_size=d.beam_size,
                       num_workers=d.num_workers, read_workers=bounded.read_workers if design == "bounded" else None,
                       seed=seed)
        self.bits = bounded.bucket_bits(num_peers) if design == "bounded" else 0
        self.ttl_s = d.record_ttl_s
        self.refresh_s = d.record_refresh_s
        self.group = min(bounded.group_size, num_peers) if design == "bounded" else num_peers
        self.levels = bounded.grid_dims(num_peers) if design == "bounded" and num_peers > bounded.group_size else 1
        """Levels of a tree exchange (bounded.exchange = "tree"): rows, then groups of rows, …"""
        self.timers = ({"registry": current.record_refresh_s, "progress": current.report_interval_s}
                       if design == "current" else
                       {"record": bounded.record_refresh_s, "sample": bounded.read_period_s,
                        # A count is told when it changes, once a step, at most every report interval.
                        "progress": max(bounded.report_interval_s,
                                        workload.batch_size * workload.seq_len / workload.tokens_per_s_median),
                        "groups": bounded.group_epoch_s})
        if design == "bounded" and num_peers <= bounded.group_size:
            del self.timers["groups"]  # one group holds the swarm: no grid, no group keys
        self.tps = [self._draw_tps() for _ in range(num_peers)]
        self.tps_sum = sum(self.tps)
        self.bucket = [self.rng.getrandbits(self.bits) if self.bits else 0 for _ in range(num_peers)]
        self.live = Counter(self.bucket)
        self.lingering: list[tuple[float, int]] = []
        self.lingering_in = Counter()
        self.max_entries = max(self.live.values())
        self.memo: dict[tuple, OpCost] = {}
        self.events: list[tuple[float, int, str, int]] = []
        self._seq = 0
        num_sampled = min(sample_peers, num_peers)
        self.sampled = [self._sample(slot) for slot in self.rng.sample(range(num_peers), num_sampled)]

    # ---------------------------------------------------------------- setup

    def _draw_tps(self) -> float:
        return self.work.tokens_per_s_median * math.exp(self.rng.gauss(0.0, self.work.tokens_per_s_sigma))

    def _sample(self, slot: int) -> Sampled:
        links = self.links
        lo, hi = links.upload_mbit
        up = (lo if lo == hi else self.rng.uniform(lo, hi)) * 1e6 / 8  # uniform(inf, inf) is nan
        rtt = links.rtt_median_s * math.exp(self.rng.gauss(0.0, links.rtt_sigma))
        return Sampled(slot, rtt, up, up * links.download_factor)

    def _push(self, at: float, kind: str, who: int) -> None:
        self._seq += 1
        heapq.heappush(self.events, (at, self._seq, kind, who))

    # ---------------------------------------------------------------- membership

    def occupancy(self, bucket: int) -> int:
        return self.live[bucket] + self.lingering_in[bucket]

    def _expire(self, now: float) -> None:
        while self.lingering and self.lingering[0][0] <= now:
            _, b = heapq.heappop(self.lingering)
            self.lingering_in[b] -= 1

    def _leave(self, now: float) -> None:
        """A peer leaves and a newcomer takes its slot (a sampled slot's observer carries on
        with the newcomer: its own join is not modelled)."""
        slot = self.rng.randrange(self.n)
        killed = self.rng.random() >= self.churn.withdraw_fraction
        b = self.bucket[slot]
        until = now + (self.ttl_s - self.rng.uniform(0, self.refresh_s) if killed else 2 * self.ttl_s)
        heapq.heappush(self.lingering, (until, b))
        self.lingering_in[b] += 1
        self.live[b] -= 1
        if killed:
            pulled = min(self.work.fanout, self.group - 1) / max(1, self.n - 1)
            for s in self.sampled:
                if s.slot != slot and self.rng.random() < pulled:
                    s.killed_pulled += 1
        self.tps_sum -= self.tps[slot]
        self.tps[slot] = self._draw_tps()
        self.tps_sum += self.tps[slot]
        nb = self.rng.getrandbits(self.bits) if self.bits else 0
        self.bucket[slot] = nb
        self.live[nb] += 1
        self.max_entries = max(self.max_entries, self.occupancy(b), self.occupancy(nb))

    # ---------------------------------------------------------------- control loops

    def _cost(self, s: Sampled, name: str, now: float) -> tuple[tuple, OpCost]:
        c = self.costs
        if self.design == "current":
            if name == "registry":
                key = (name, self.n + len(self.lingering))
                make = lambda: current_cycle(self.dht, self.cur, key[1], c.registry_entry_bytes,
                                             period_s=self.cur.record_refresh_s, refresh_s=self.cur.record_refresh_s)
            else:
                key = (name, self.n)
                make = lambda: current_cycle(self.dht, self.cur, self.n, c.progress_entry_bytes,
                                             period_s=self.cur.report_interval_s, refresh_s=self.cur.report_interval_s)
        elif name == "sample":
            own = self.bucket[s.slot]
            others = self.rng.sample([b for b in range(2 ** self.bits) if b != own], self.buckets_per_read() - 1)
            key = (name, self.occupancy(own), tuple(sorted(self.occupancy(b) for b in others)))
            for b in [own] + others:
                s.reads.append((now, b, self.occupancy(b)))
            make = lambda: sum((bounded_read(self.dht, e, c.registry_entry_bytes) for e in key[2]),
                               bounded_own_read(self.dht, key[1], c.registry_entry_bytes))
        elif name == "record":
            key = (name, self.occupancy(self.bucket[s.slot]))
            make = lambda: bounded_record(self.dht, self.bnd, key[1], c.registry_entry_bytes)
        elif name == "progress":
            key = (name,)
            make = lambda: bounded_progress(self.dht, self.bnd, self.group)
        else:
            key = (name,)
            make = lambda: bounded_groups(self.dht, self.bnd, self.group)
        return key, self._memoized(key, make)

    def _memoized(self, key: tuple, make) -> OpCost:
        """An operation's cost, computed once per key (the values it depends on are in the key)."""
        cost = self.memo.get(key)
        if cost is None:
            cost = self.memo[key] = make()
        return cost

    def buckets_per_read(self) -> int:
        return min(2 ** self.bits, max(1, round(self.bnd.sample_entries / (self.n / 2 ** self.bits))))

    def cpu_s(self, cost: OpCost) -> float:
        cached = (self.bnd if self.design == "bounded" else self.cur).signature_cache
        return cost.cpu_s + (cost.checks_cached if cached else cost.checks) * self.costs.signature_check_s

    def _unloaded_s(self, s: Sampled, name: str) -> float:
        """Timer `name`'s period when the loop keeps up: its interval, then the operation's
        round trips, its transfer and its CPU at the loop's share of a core."""
        cost = s.last[name]
        return (self.timers[name] + cost.waves * (s.rtt_s + self.links.rpc_s)
                + cost.received_bytes / s.down_bytes_per_s + self.cpu_s(cost) / self.links.cpu_share)

    def _restretch(self, s: Sampled, now: float) -> None:
        """The loop's stretch: the least s ≥ 1 for which its work fits in its share of a
        core when every timer comes round after max(s × interval, its unloaded period), and
        its traffic in its uplink."""
        share, costs = self.links.cpu_share, s.last
        sent = sum(cost.bytes / self.timers[name] for name, cost in costs.items())
        lo = max(1.0, sent / s.up_bytes_per_s)

        def busy(stretch: float) -> float:
            return sum(self.cpu_s(cost) / max(stretch * self.timers[name], self._unloaded_s(s, name))
                       for name, cost in costs.items())

        if busy(lo) > share:
            hi = lo * 2
            while busy(hi) > share:
                hi *= 2
            for _ in range(40):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if busy(mid) > share else (lo, mid)
            lo = hi
        s.stretch = lo
        s.stretched_at = now

    def _fire(self, s: Sampled, name: str, now: float) -> float:
        """Run timer `name` of `s` now; when it comes round next."""
        key, cost = self._cost(s, name, now)
        s.fired[key] += 1
        s.last[name] = cost
        if now - s.stretched_at >= REESTIMATE_S:
            self._restretch(s, now)
        period = max(self.timers[name] * s.stretch, self._unloaded_s(s, name))
        s.latency_s[name] = period - self.timers[name]
        return now + period

    # ---------------------------------------------------------------- rounds

    def progress_period_s(self, s: Sampled) -> float:
        """How stale another peer's view of the round's end is: its progress loop's period."""
        return self.timers["progress"] + s.latency_s.get("progress", s.rtt_s)

    def _round(self, s: Sampled, now: float) -> float:
        """Sampled peer `s` ended training a round at `now`: its exchange; when the next ends."""
        w, rng = self.work, self.rng
        pulled = min(w.fanout, self.group - 1)
        above = self.levels - 1 if self.design == "bounded" and self.bnd.exchange == "tree" else 0
        """Tree levels above the row: each fetches, decodes and aggregates G − 1 aggregates."""
        # the exchange's compute, on the share of a core the peer gets: encoding its delta,
        # then (after the pull) screening to the outer step, and the levels above the row
        share = self.links.exchange_share or self.links.cpu_share
        exchange = (w.apply_s + pulled * (w.per_delta_s - w.decode_s) + above * (self.group - 1) * w.per_delta_s) / share
        if pulled:
            period = self.progress_period_s(s)
            others = [rng.uniform(0, period) + rng.uniform(0, w.batch_size * w.seq_len / self.tps[rng.randrange(self.n)])
                      for _ in range(pulled)]
            # each peer ends its round in the step it is in when it sees the end (ours too); a
            # delta is decoded as it comes, so the last one's lag hides behind the others' decoding
            ours = rng.uniform(0, period) + rng.uniform(0, w.batch_size * w.seq_len / self.tps[s.slot])
            lag = max(0.0, max(others) - ours)
            exchange += max(pulled * w.decode_s / share, lag + w.decode_s / share)
            exchange += 2 * s.rtt_s + max(pulled * w.delta_bytes / s.down_bytes_per_s,
                                          pulled * w.delta_bytes / s.up_bytes_per_s) + w.poll_s
            exchange += w.detect_killed_s if s.killed_pulled else 0.0
            if above:
                # each level above the row: its groups' aggregates, fetched once the level below is in
                up = (self.group - 1) * w.delta_bytes
                exchange += above * (2 * s.rtt_s + max(up / s.down_bytes_per_s, up / s.up_bytes_per_s))
        if self.design == "bounded":
            cost = self._memoized(("round", self.group, pulled, self.levels),
                                  lambda: bounded_round(self.dht, self.bnd, self.group, pulled, self.levels))
            s.round_cost = s.round_cost + cost
        # With overlap the round's delta is taken once the last round's outer step is in (the
        # boundary waits for its exchange), and its exchange runs beside the next round's training.
        start = max(now, s.exchange_done) if w.overlap else now
        s.exchange_done = start + exchange
        s.compute_s += s.next_compute_s
        s.exchange_s += exchange
        s.rounds += 1
        s.last_round_end = now
        s.killed_pulled = 0
        s.next_compute_s = self._round_compute_s(s)
        return (start if w.overlap else s.exchange_done) + s.next_compute_s

    def _round_compute_s(self, s: Sampled) -> float:
        if self.design == "current":
            return self.work.round_tokens * self.n / self.tps_sum
        group = [self.tps[s.slot]] + [self.tps[self.rng.randrange(self.n)] for _ in range(self.group - 1)]
        return self.work.round_tokens * len(group) / sum(group)

    # ---------------------------------------------------------------- run

    def run(self, duration_s: float) -> None:
        rate = self.churn.rate_per_s(self.n)
        if rate > 0:
            self._push(self.rng.expovariate(rate), "leave", -1)
        for i, s in enumerate(self.sampled):
            for name, period in self.timers.items():
                self._push(self.rng.uniform(0, period), name, i)
            s.next_compute_s = self._round_compute_s(s)
            self._push(s.next_compute_s, "round", i)
        while self.events and self.events[0][0] < duration_s:
            now, _, kind, who = heapq.heappop(self.events)
            self._expire(now)
            if kind == "leave":
                self._leave(now)
                self._push(now + self.rng.expovariate(rate), "leave", -1)
            elif kind == "round":
                self._push(self._round(self.sampled[who], now), "round", who)
            else:
                self._push(self._fire(self.sampled[who], kind, now), kind, who)
                self._trim_reads(self.sampled[who], now)

    def _trim_reads(self, s: Sampled, now: float) -> None:
        while s.reads and s.reads[0][0] < now - self.ttl_s:
            s.reads.popleft()
