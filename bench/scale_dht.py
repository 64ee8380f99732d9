"""Kademlia traversals as hivemind 1.1.12 runs them, on a synthetic network: how many nodes
a `get` or a `store` asks, how many of those answers carry the key's value, and how many
sequential waves of requests (round trips) it takes, for a swarm of N nodes.

Why simulate rather than assume "about 20": the cost of the control plane is answers ×
value size, and the number of answers is what hivemind's traversal does, not a constant.
`DHTNode.get(latest=True)` and the find that every `store` runs first (`find_nearest_nodes`)
keep asking until the `beam_size` nodes nearest the key that they know of have all answered
(traverse.py: no candidate left within the upper bound), so they ask the beam plus the
nodes met on the way; a `get` whose first valid copy is sufficient stops at the first
answer that carries it, while the other `num_workers` − 1 requests already sent still
arrive. This module replays traverse_dht's rules (nearest unvisited candidate first, heaps
bounded by the beam, each node answering with the `bucket_size` nodes nearest the key in its
routing table, the requester excluded) with requests sent in waves of `num_workers`.

Routing tables are built as hivemind's `RoutingTable` would hold them once full: buckets of
`bucket_size` over the id space, a full bucket split while it holds the node's own id or its
depth is not a multiple of `depth_modulo` (routing.py), and a full bucket that may not split
holding `bucket_size` of its nodes at random. A real table holds only nodes it has met, so
it is sparser than this: the counts here are the fewest a traversal can make. Ids are 64-bit
rather than 160-bit: with N ≤ 10^5 nodes only the first ~20 bits ever separate them.
"""

from __future__ import annotations

import bisect
import functools
import heapq
import random
from dataclasses import dataclass

ID_BITS = 64


@dataclass(frozen=True, slots=True)
class TraversalStats:
    """Means over sampled traversals of one kind, for one swarm size."""

    visits: float
    """Nodes asked (find RPCs answered), the requester not counted."""
    value_answers: float
    """Answers that carried the key's value."""
    waves: float
    """Sequential waves of requests: the traversal's latency in round trips."""


class Network:
    """N node ids; each node's routing table is the full one, built where a traversal looks."""

    def __init__(self, num_nodes: int, *, bucket_size: int = 20, depth_modulo: int = 5, seed: int = 0) -> None:
        if num_nodes < 2:
            raise ValueError(f"a DHT traversal needs at least 2 nodes, got {num_nodes}")
        rng = random.Random(seed)
        ids: set[int] = set()
        while len(ids) < num_nodes:
            ids.add(rng.getrandbits(ID_BITS))
        self.ids = sorted(ids)
        self.bucket_size = bucket_size
        self.depth_modulo = depth_modulo
        self.seed = seed

    def answer(self, node: int, key: int, requester: int | None) -> list[int]:
        """What `node` answers a find for `key`: the bucket_size nodes nearest the key in its
        routing table, the requester left out. Only the buckets along the key's path are
        built: a deeper subtree's nodes are all nearer the key than a shallower one's."""
        k = self.bucket_size
        siblings = []
        prefix = depth = 0
        while True:
            count, mine, i, j = self._count(node, prefix, depth)
            if count <= k:
                found = [n for n in self.ids[i:j] if n != node]
                break
            if not (mine or depth % self.depth_modulo != 0):
                found = self._sample(node, prefix, depth, i, j)
                break
            bit = (key >> (ID_BITS - depth - 1)) & 1
            siblings.append((prefix * 2 + 1 - bit, depth + 1))
            prefix, depth = prefix * 2 + bit, depth + 1
        found = [n for n in found if n != requester]
        for sib_prefix, sib_depth in reversed(siblings):
            if len(found) >= k:
                break
            found.extend(n for n in self._subtree(node, sib_prefix, sib_depth) if n != requester)
        return heapq.nsmallest(k, found, key=lambda n: n ^ key)

    def _count(self, node: int, prefix: int, depth: int) -> tuple[int, bool, int, int]:
        shift = ID_BITS - depth
        lo, hi = prefix << shift, (prefix + 1) << shift
        i, j = bisect.bisect_left(self.ids, lo), bisect.bisect_left(self.ids, hi)
        mine = lo <= node < hi
        return j - i - mine, mine, i, j

    def _sample(self, node: int, prefix: int, depth: int, i: int, j: int) -> list[int]:
        """A full bucket that may not split: the bucket_size of its nodes this node met."""
        rng = random.Random(hash((self.seed, node, prefix, depth)))
        return [self.ids[x] for x in rng.sample(range(i, j), self.bucket_size)]

    def _subtree(self, node: int, prefix: int, depth: int) -> list[int]:
        """`node`'s routing-table entries among the ids starting with `prefix` (`depth` bits)."""
        count, mine, i, j = self._count(node, prefix, depth)
        if count <= self.bucket_size:
            return [n for n in self.ids[i:j] if n != node]
        if mine or depth % self.depth_modulo != 0:
            return self._subtree(node, prefix * 2, depth + 1) + self._subtree(node, prefix * 2 + 1, depth + 1)
        return self._sample(node, prefix, depth, i, j)

    def nearest(self, key: int, k: int) -> list[int]:
        """The k ids nearest `key` in the whole network (XOR metric)."""
        return heapq.nsmallest(k, self.ids, key=lambda n: n ^ key)

    def traverse(self, start: int, key: int, *, beam_size: int, num_workers: int, holders: set[int] | None,
                 stop_at_value: bool) -> tuple[int, int, int]:
        """One traversal from `start` for `key`: (visits, value answers, waves). `holders`:
        the nodes holding the value (None: every node does); `stop_at_value`: a get that a
        first copy satisfies (latest=False) rather than one that asks the whole beam."""
        visited = {start}
        initial = self.answer(start, key, None)
        known = set(initial)
        candidates = [(n ^ key, n) for n in initial]
        heapq.heapify(candidates)
        nearest = [-(n ^ key) for n in initial]  # max-heap of the beam's distances
        heapq.heapify(nearest)
        while len(nearest) > beam_size:
            heapq.heappop(nearest)
        visits = value_answers = waves = 0
        while True:
            bound = -nearest[0] if len(nearest) >= beam_size else None
            wave = []
            while candidates and len(wave) < num_workers:
                distance, node = heapq.heappop(candidates)
                if node in visited:
                    continue
                if bound is not None and distance > bound:
                    candidates.clear()  # every candidate left is farther still
                    break
                wave.append(node)
            if not wave:
                return visits, value_answers, waves
            waves += 1
            found = False
            for node in wave:
                visited.add(node)
                visits += 1
                if holders is None or node in holders:
                    value_answers += 1
                    found = True
                for neighbour in self.answer(node, key, start):
                    if neighbour in known or neighbour == start:
                        continue
                    known.add(neighbour)
                    distance = neighbour ^ key
                    if len(nearest) < beam_size:
                        heapq.heappush(candidates, (distance, neighbour))
                        heapq.heappush(nearest, -distance)
                    elif distance <= -nearest[0]:
                        heapq.heappush(candidates, (distance, neighbour))
                        heapq.heappushpop(nearest, -distance)
            if stop_at_value and found:
                return visits, value_answers, waves  # the rest of this wave was already in flight: counted


@functools.lru_cache(maxsize=64)
def traversal_stats(num_nodes: int, kind: str, *, num_replicas: int = 5, beam_size: int = 20, num_workers: int = 4,
                    samples: int = 24, seed: int = 0) -> TraversalStats:
    """Mean traversal of one `kind` in a network of `num_nodes`:
    "full": get(latest=True) or a store's find, every node holding the value (as in today's
    swarm, where every node caches the keys it reads);
    "first_any": a get that a first copy satisfies, every node holding it (hivemind's
    refresh of a cached key after a store);
    "first_replicas": a get that a first copy satisfies, only the `num_replicas` nodes
    nearest the key holding it (a key that readers do not cache for others);
    "full_replicas": a store's find on such a key (the whole beam, the replicas answering
    with the value);
    "lookup": `find_nearest_nodes`, the whole beam, no answer carrying a value (the daemon's
    look-up of a key's replicas, node/replicas.py)."""
    if kind not in ("full", "first_any", "first_replicas", "full_replicas", "lookup"):
        raise ValueError(f"unknown traversal kind {kind!r}")
    net = Network(num_nodes, bucket_size=beam_size, seed=seed)
    rng = random.Random(seed + 1)
    totals = [0, 0, 0]
    for _ in range(samples):
        key = rng.getrandbits(ID_BITS)
        start = rng.choice(net.ids)
        holders = set(net.nearest(key, num_replicas)) if kind.endswith("replicas") else None
        if kind == "lookup":
            holders = set()
        if kind == "first_replicas" and start in holders:
            continue  # a replica reads its own storage: no request at all
        out = net.traverse(start, key, beam_size=beam_size, num_workers=num_workers, holders=holders,
                           stop_at_value=kind.startswith("first"))
        totals = [t + o for t, o in zip(totals, out)]
    return TraversalStats(*(t / samples for t in totals))
