"""The two control planes `locoswarm bench scale` compares, as what one operation of each
costs on the wire and in CPU, given the size of the values it touches.

current — what the daemon does today. keep_record (node/upkeep.py) stores the peer's
signed record under the run's one registry key and reads the whole dictionary back with
get(latest=True) every second; the round loop (node/roundloop.py `_train`, node/rounds.py
RoundProgress) does the same with the round's progress key every 0.1 s. In hivemind 1.1.12
(dht/node.py) a store first runs a find over the whole beam, and every node asked answers
with the key's whole value, since every reader caches what it read (cache_locally); the
entry then goes to the num_replicas nearest nodes; a peer that is not one of them also
refreshes its cached copy at once (`_update_cache_on_store` → `_refresh_stale_cache_entries`,
a get that stops at the first answer while num_workers requests are in flight). The get
asks the whole beam again (latest=True never stops early) and, having found a newer value
than it held, pushes the whole dictionary to the nearest node (cache_nearest = 1), which
validates every entry. Every entry of every copy received is signature-checked.

bounded — the design we intend to build (BoundedDesign's fields, defaults documented there):
the registry sharded into 2^L bucket keys of ≈ `bucket_entries` entries, each peer storing
its own entry directly at its bucket's replicas every 20 s and reading a bounded sample of
buckets with gets that stop at the first fresh copy; round progress exchanged inside a
group of G peers over long-lived streams; group membership through one small key per grid
dimension per epoch (Moshpit-style grid groups, Ryabinin et al. 2021).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from locoswarm.bench.scale_dht import TraversalStats, traversal_stats
from locoswarm.bench.scale_model import Costs


@dataclass(slots=True)
class OpCost:
    """What one operation moves and burns, summed over the peer that runs it and the nodes
    that answer it (all peers of the swarm, so per-peer averages follow by symmetry)."""

    bytes: float = 0.0
    """Bytes on the wire, both directions, all nodes: equal on average to what a peer receives."""
    received_bytes: float = 0.0
    """What the peer that runs it receives (its downlink's share of the op's latency)."""
    dht_calls: float = 0.0
    """store/get calls."""
    rpcs: float = 0.0
    """Unary DHT RPCs (find and store requests)."""
    stream_msgs: float = 0.0
    """Messages on long-lived streams."""
    checks: float = 0.0
    """Signature verifications, hivemind's validator as it is (every entry of every copy)."""
    checks_cached: float = 0.0
    """Verifications with verdicts cached by content: distinct entry contents received."""
    cpu_s: float = 0.0
    """CPU seconds besides signature checks (msgpack, decoding, encoding answers)."""
    waves: float = 0.0
    """Sequential round trips on the caller's critical path."""

    def __add__(self, other: "OpCost") -> "OpCost":
        return OpCost(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def scaled(self, factor: float) -> "OpCost":
        return OpCost(*(getattr(self, f.name) * factor for f in fields(self)))


@dataclass(kw_only=True, slots=True)
class CurrentDesign:
    record_refresh_s: float = 1.0
    """keep_record's interval: min(1 s, record_ttl_s / 3) (node/daemon.py)."""
    record_ttl_s: float = 10.0
    """NodeConfig.record_ttl_s."""
    report_interval_s: float = 0.1
    """NodeConfig.report_interval_s: progress written and read this often."""
    num_replicas: int = 5
    """hivemind DHTNode default."""
    beam_size: int = 20
    """hivemind DHTNode bucket_size, the beam of every traversal."""
    num_workers: int = 4
    """hivemind's concurrent requests per traversal (HIVEMIND_DHT_NUM_WORKERS)."""
    cache_nearest: int = 1
    """hivemind DHTNode default: after a get that found a newer value, push it to 1 node."""
    signature_cache: bool = False
    """Whether verdicts are cached by content (CachedSignatureValidator; not on this branch)."""


@dataclass(kw_only=True, slots=True)
class BoundedDesign:
    bucket_entries: int = 32
    """Registry buckets: L = max(0, ceil(log2(N_est / bucket_entries))), so a bucket holds
    16–32 entries on average and far below 100 KB at its fullest."""
    record_refresh_s: float = 20.0
    """Each peer stores its own entry this often."""
    record_ttl_s: float = 60.0
    """An entry's lifetime: a killed peer is forgotten within a minute."""
    read_period_s: float = 20.0
    """Each peer reads a sample of buckets this often."""
    sample_entries: int = 64
    """Buckets read per period: its own plus random ones, round(sample_entries / mean
    occupancy) in all (so 2–4: the traffic does not follow occupancy's 16–32 saw-tooth)."""
    view_max: int = 200
    """At most this many live peers in a peer's partial view."""
    read_workers: int = 1
    """Concurrent requests of a read: answers in flight when the first copy arrives are paid
    for nothing (node/registry.py READ_WORKERS; 2 until 2026-12-05: 9.6 kB/s of sample reads
    per peer at N = 1,000 against 4.8 with 1)."""
    store: str = "direct"
    """"direct": call_store at the replicas the last read of the bucket found; "traverse":
    hivemind's store, whose find brings back the bucket from every replica it asks."""
    group_size: int = 16
    """G: peers whose progress a peer follows and whose deltas it pulls."""
    report_interval_s: float = 0.3
    """Progress messages to the group at most this often: the daemon tells its count when it
    changes (once a step: the simulation sends one a step where steps are slower), at most
    every 3 of its 0.1 s report intervals (node/rounds.py REPORT_SPACING_INTERVALS), and
    "done" at once (charged per round)."""
    records_per_round: float = 1.2
    """Record changes told to each group member per round (as updates of the record the
    stream carried whole first): a record changes when its round moves and again when the
    round's chain is known, and a change not yet written replaces the one before it; 1.13
    and 1.28 measured on daemons at 3 and 6 peers (from bytes and message counts, 2026-12-05)."""
    progress_via: str = "streams"
    """"streams": to each group member over a long-lived stream (authenticated by the
    connection, no signature); "group_key": a signed entry in a group key, read back."""
    exchange: str = "grid"
    """Above one group: "grid", each peer steps its own state with its group's aggregate
    (Moshpit groups rotating over the grid); "tree", one consensus aggregated up the grid's
    d dimensions (bench/groups.py run_tree, the design docs/scale.md chose): at each level
    above the row a peer fetches the G − 1 other groups' aggregates (a request each)
    and tells the level's group which it took (a stream message each)."""
    group_epoch_s: float = 60.0
    """Grid positions are drawn for an epoch; a peer joins one group key per grid dimension."""
    num_replicas: int = 5
    beam_size: int = 20
    num_workers: int = 4
    signature_cache: bool = True
    """Verdicts cached by content: a bucket entry is checked once per version."""

    def validate(self) -> None:
        if self.store not in ("direct", "traverse"):
            raise ValueError(f"bounded.store must be direct or traverse, got {self.store!r}")
        if self.exchange not in ("grid", "tree"):
            raise ValueError(f"bounded.exchange must be grid or tree, got {self.exchange!r}")
        if self.progress_via not in ("streams", "group_key"):
            raise ValueError(f"bounded.progress_via must be streams or group_key, got {self.progress_via!r}")
        if self.bucket_entries < 1 or self.group_size < 2 or self.sample_entries < 1 or self.read_workers < 1:
            raise ValueError("bounded: bucket_entries, sample_entries, read_workers must be >= 1, group_size >= 2")

    def bucket_bits(self, num_peers_est: float) -> int:
        return max(0, math.ceil(math.log2(max(1.0, num_peers_est) / self.bucket_entries)))

    def grid_dims(self, num_peers: int) -> int:
        """Moshpit grid dimensions: groups of G along each, G^d ≥ N."""
        return max(1, math.ceil(math.log(max(2, num_peers)) / math.log(self.group_size) - 1e-9))


class Dht:
    """The DHT primitives of both designs for a swarm of `num_nodes` (traversal counts from
    scale_dht, bytes and CPU from `costs`)."""

    def __init__(self, costs: Costs, num_nodes: int, *, num_replicas: int, beam_size: int, num_workers: int,
                 read_workers: int | None = None, seed: int = 0) -> None:
        self.costs = costs
        self.num_nodes = num_nodes
        self.num_replicas = num_replicas
        kw = dict(num_replicas=num_replicas, beam_size=beam_size, seed=seed)
        self.full = traversal_stats(num_nodes, "full", num_workers=num_workers, **kw)
        self.first_any = traversal_stats(num_nodes, "first_any", num_workers=num_workers, **kw)
        self.first_replicas = traversal_stats(num_nodes, "first_replicas", num_workers=read_workers or num_workers,
                                              **kw)
        self.full_replicas = traversal_stats(num_nodes, "full_replicas", num_workers=num_workers, **kw)
        self.lookup = traversal_stats(num_nodes, "lookup", num_workers=num_workers, **kw)
        self.neighbours = min(beam_size, max(0, num_nodes - 2))
        """Nodes listed in an answer: the nearest in the answerer's table, not itself or the requester."""
        self.p_replica = min(1.0, num_replicas / num_nodes)
        """Chance that the caller is one of a key's replicas."""
        self.remote_replicas = min(num_replicas, num_nodes) - self.p_replica
        """Replicas a store reaches over the network (the caller stores locally when it is one)."""

    def answers(self, stats: TraversalStats, value_bytes: float, entries: float) -> OpCost:
        """A traversal's answers: each lists neighbours; `value_answers` of them carry the value."""
        c = self.costs
        value_in = stats.value_answers * value_bytes
        received = stats.visits * c.answer_bytes(0, self.neighbours) + value_in
        return OpCost(bytes=received, received_bytes=received, rpcs=stats.visits,
                      checks=stats.value_answers * entries,
                      cpu_s=(value_in / c.msgpack_decode_bytes_per_s + value_in / c.msgpack_encode_bytes_per_s
                             + stats.visits * c.rpc_cpu_s),
                      waves=stats.waves)

    def store_rpcs(self, count: float, entry_bytes: float) -> OpCost:
        """Sign one entry and call_store it at `count` nodes; each validates it (a new content)."""
        c = self.costs
        return OpCost(bytes=count * (c.rpc_overhead_bytes + entry_bytes), rpcs=count, checks=count,
                      checks_cached=count, cpu_s=c.sign_s + count * c.rpc_cpu_s, waves=1.0 if count else 0.0)

    def push(self, value_bytes: float, entries: float) -> OpCost:
        """cache_nearest: the whole value stored at one node, which validates every entry."""
        c = self.costs
        return OpCost(bytes=c.rpc_overhead_bytes + value_bytes, rpcs=1, checks=entries,
                      cpu_s=value_bytes / c.msgpack_decode_bytes_per_s + c.rpc_cpu_s)


def current_cycle(dht: Dht, design: CurrentDesign, entries: float, entry_bytes: float, *, period_s: float,
                  refresh_s: float) -> OpCost:
    """One pass of keep_record or of the progress loop: store the peer's own entry, then
    get(latest=True) the whole dictionary of `entries` entries. `period_s`: how often the
    pass runs; `refresh_s`: how often each entry changes (for the cached-verdict count)."""
    c = dht.costs
    value = c.dict_bytes(entries, entry_bytes)
    others = 1.0 - dht.p_replica
    store = (dht.answers(dht.full, value, entries)
             + dht.store_rpcs(dht.remote_replicas, entry_bytes))
    refresh = dht.answers(dht.first_any, value, entries).scaled(others)
    refresh.waves = 0.0  # runs in the background, off the loop's critical path
    get = dht.answers(dht.full, value, entries)
    get.cpu_s += entries * c.entry_decode_s  # the result, merged, goes through our decode
    push = dht.push(value, entries).scaled(others if design.cache_nearest else 0.0)
    out = store + refresh + get + push
    out.dht_calls = 2.0
    out.checks_cached = entries * min(1.0, period_s / refresh_s) + store.checks_cached
    return out


def bounded_record(dht: Dht, design: BoundedDesign, entries: float, entry_bytes: float) -> OpCost:
    """A peer's store of its own entry into a key of `entries` entries."""
    out = dht.store_rpcs(dht.remote_replicas, entry_bytes)
    if design.store == "traverse":
        out = out + dht.answers(dht.full_replicas, dht.costs.dict_bytes(entries, entry_bytes), entries)
    out.dht_calls = 1.0
    return out


def bounded_read(dht: Dht, entries: float, entry_bytes: float) -> OpCost:
    """A read of a sampled bucket of `entries` entries (node/registry.py, hivemind's get with
    one request in flight) that stops at the first fresh copy; every entry read is a version
    this peer has not seen (a bucket is read at most every 20 s)."""
    out = dht.answers(dht.first_replicas, dht.costs.dict_bytes(entries, entry_bytes), entries)
    out.cpu_s += entries * dht.costs.entry_decode_s
    out.dht_calls = 1.0
    out.checks_cached = entries if dht.first_replicas.visits else 0.0
    return out


def bounded_own_read(dht: Dht, entries: float, entry_bytes: float) -> OpCost:
    """A read of this peer's own bucket as node/replicas.py reads it: a look-up of the key's
    replicas (a traversal whose answers carry no value; looked up again after 10 s, so once
    every 20-s read, shared with the store that follows), then one replica's copy, the
    replicas asked in turn, ourselves among them where we are one (a copy that missed a
    store then sets nothing back): over the network but for our own turn."""
    c = dht.costs
    lookup = dht.answers(dht.lookup, 0.0, 0.0)
    value = c.dict_bytes(entries, entry_bytes)
    remote = 1.0 - dht.p_replica / max(1, min(dht.num_replicas, dht.num_nodes))
    received = remote * (c.rpc_overhead_bytes + value)
    copy = OpCost(bytes=received, received_bytes=received, rpcs=remote, checks=remote * entries,
                  checks_cached=entries,
                  cpu_s=(remote * (value / c.msgpack_decode_bytes_per_s + value / c.msgpack_encode_bytes_per_s
                                   + c.rpc_cpu_s) + entries * c.entry_decode_s), waves=remote)
    out = lookup + copy
    out.dht_calls = 1.0
    return out


def bounded_progress(dht: Dht, design: BoundedDesign, group: int) -> OpCost:
    """One progress report inside a group of `group` peers (this one included)."""
    c = dht.costs
    if design.progress_via == "streams":
        return OpCost(bytes=(group - 1) * c.stream_message_bytes, stream_msgs=group - 1,
                      cpu_s=(group - 1) * 2 * c.progress_codec_s, waves=0.5)
    return bounded_record(dht, design, group, c.progress_entry_bytes) + bounded_read(dht, group, c.progress_entry_bytes)


def bounded_round(dht: Dht, design: BoundedDesign, group: int, pulled: int, levels: int = 1) -> OpCost:
    """What a round adds besides the timers: to each other member of the group, our record's
    changes (updates of the record the stream carried whole when it opened, which this does
    not charge: streams stay open while rounds run) and "done"; a request stream for each
    delta pulled on a kept stream (the deltas themselves are not control traffic); in a tree of
    `levels`, at each level above the row a request for each of the G − 1 other groups'
    aggregates and a message to each saying which this peer took."""
    c = dht.costs
    above = (levels - 1) * (group - 1) if design.exchange == "tree" else 0
    if design.progress_via != "streams":
        return OpCost(bytes=(pulled + above) * c.request_bytes)
    told = group - 1
    return OpCost(bytes=told * (design.records_per_round * c.update_message_bytes + c.stream_message_bytes)
                  + pulled * c.request_bytes + above * (c.request_bytes + c.stream_message_bytes),
                  stream_msgs=told * (design.records_per_round + 1) + above,
                  cpu_s=(told * (design.records_per_round + 1) + above) * 2 * c.progress_codec_s)


def bounded_groups(dht: Dht, design: BoundedDesign, group: int) -> OpCost:
    """Joining one epoch's groups: per grid dimension, read the group key (to find its
    replicas and the members so far), store this peer's entry there, read it again later,
    and open a stream to each of the group's G − 1 others for the epoch's requests (kept
    while the epoch lasts)."""
    c = dht.costs
    one = (bounded_read(dht, group / 2, c.group_entry_bytes) + bounded_record(dht, design, group, c.group_entry_bytes)
           + bounded_read(dht, group, c.group_entry_bytes) + OpCost(bytes=(group - 1) * c.stream_open_bytes))
    return one.scaled(design.grid_dims(dht.num_nodes))


def current_hot_node(dht: Dht, design: CurrentDesign, num_peers: int) -> tuple[float, float]:
    """(bytes/s, CPU cores) of the node nearest the registry and progress keys: every
    peer's store finds and gets reach it, and every push after a get lands on it."""
    c = dht.costs
    out_bytes = cpu = 0.0
    for rate, entry in ((1 / design.record_refresh_s, c.registry_entry_bytes),
                        (1 / design.report_interval_s, c.progress_entry_bytes)):
        value = c.dict_bytes(num_peers, entry)
        answers = 2 * num_peers * rate
        pushes = num_peers * rate * (1 - dht.p_replica) * (design.cache_nearest > 0)
        checks = 0 if design.signature_cache else num_peers
        out_bytes += (answers + pushes) * value
        cpu += (answers * (value / c.msgpack_encode_bytes_per_s + c.rpc_cpu_s)
                + pushes * (value / c.msgpack_decode_bytes_per_s + checks * c.signature_check_s + c.rpc_cpu_s))
    return out_bytes, cpu


def bounded_hot_node(costs: Costs, design: BoundedDesign, num_peers: int, bits: int,
                     buckets_per_read: int) -> tuple[float, float]:
    """(bytes/s, CPU cores) of the replica nearest a registry bucket, taken to answer every
    read of it and to take every store into it."""
    occupancy = num_peers / 2 ** bits
    value = costs.dict_bytes(occupancy, costs.registry_entry_bytes)
    reads = num_peers * buckets_per_read / design.read_period_s / 2 ** bits
    stores = occupancy / design.record_refresh_s
    out_bytes = reads * value + stores * (costs.registry_entry_bytes + costs.rpc_overhead_bytes)
    cpu = (reads * (value / costs.msgpack_encode_bytes_per_s + costs.rpc_cpu_s)
           + stores * (costs.signature_check_s + costs.rpc_cpu_s))
    return out_bytes, cpu
