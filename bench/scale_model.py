"""The measured constants behind `locoswarm bench scale`: bytes of every control message on
the wire and CPU seconds to take one in, each with where it was measured, and `calibrate()`
to measure them again on this machine with the project's real encodings.

Why measured constants rather than a network emulator: the control plane's cost at 10,000
peers is (messages per second) × (bytes and CPU per message); the second factor is fixed by
the wire formats (protocol/records.py, hivemind's signed dictionary entries and its protobuf
answers), which we can build and time exactly, and the first is what the simulation in
bench/scale.py counts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

MIB = 1 << 20
WRITE_FRAMING_BYTES = 32
"""What libp2p adds to one write on a stream between two p2pd (yamux header, TLS record):
100 small writes measured through the kernel's socket counters, 2026-12-05."""
WAN_ADDRS = ("/ip4/203.0.113.5/tcp/31337", "/ip4/203.0.113.5/udp/31337/quic-v1", "/ip6/2001:db8::5/tcp/31337")
"""A volunteer's listen addresses in the records `calibrate` builds."""


@dataclass(kw_only=True, slots=True)
class Costs:
    registry_entry_bytes: int = 1390
    """One signed peer record as an entry of the registry's dictionary value: subkey (peer id
    and the 380-byte OpenSSH key), msgpack record with its 356-byte signature, expiration.
    DESIGN.md (measured on the project's code, 2026-12-04); `calibrate()` rebuilds one with
    three addresses (tcp, quic, ip6, each with /p2p/) and gets 1,311 B."""
    progress_entry_bytes: int = 841
    """One signed round-progress entry (node/rounds.py); the same source; rebuilt: 843 B."""
    tombstone_entry_bytes: int = 820
    """A withdrawn peer's empty record: subkey and signature without a record."""
    group_entry_bytes: int = 841
    """A signed group-membership entry (bounded design): peer id and round, signed like progress."""
    neighbour_bytes: int = 58
    """One of the up to 20 nearest nodes every find answer lists (node id 20 B, peer id 34 B,
    protobuf tags): (1,198 − 26) / 20 from hivemind's dht_pb2 FindResponse."""
    rpc_overhead_bytes: int = 443
    """One unary DHT RPC besides its value and neighbours: the request (46 B for one key), the
    answer's header (26 B), and 371 B of what p2pd adds (a libp2p stream opened per call, its
    negotiation and framing both ways: `python -m locoswarm.bench.request_cost`, 50 call_find
    between two DHT nodes, two runs, 2026-12-05; 200 B, an estimate, before)."""
    stream_message_bytes: int = 88
    """One progress message on a long-lived stream, written alone: its frame (node/progress.py
    progress_frame: kind, length, msgpack Progress with round and incarnation; 56 B late in a
    run, `message_sizes`) and what libp2p adds to one write between two p2pd (WRITE_FRAMING_BYTES)."""
    record_message_bytes: int = 618
    """A peer record told whole over a progress stream (node/progress.py record_frame, no
    signature) with three addresses (tcp, quic, ip6), its chains and two anchors
    (`message_sizes`): the first on each stream, and whenever its addresses change. On
    loopback, with one address, the daemons' frames measured 364–433 B (3 peers, 2026-12-05)."""
    update_message_bytes: int = 122
    """A record told as an update of the last one the stream carried (node/progress.py
    KIND_UPDATE: round, chains, anchors, flags, throughput, sequence number; `message_sizes`),
    what a round's changes cost; it shares a write with a progress message."""
    request_bytes: int = 85
    """A delta request beside the delta itself, on a kept stream (node/streams.py KeptStreams):
    the 16-byte request and libp2p's framing of it and its answer both ways, 63–71 B
    measured (`python -m locoswarm.bench.request_cost`: 50 requests for 6 kB between two p2pd,
    three runs, 2026-12-05)."""
    stream_open_bytes: int = 295
    """Opening a libp2p stream (multistream negotiation, the stream's open and close): a
    request on a stream of its own cost 358–415 B beside the request and answer in the same
    runs (median 361), 294 B more than on a kept stream. The daemon keeps its delta streams
    while it pulls from the same peers: charged once per group member per epoch."""
    signature_check_s: float = 70e-6
    """hivemind's RSASignatureValidator.validate of one entry (parse the key, RSA-2048-PSS
    verify): DESIGN.md; `calibrate()` measured 68 µs on 2 busy AMD EPYC cores."""
    msgpack_decode_bytes_per_s: float = 650e6
    """MSGPackSerializer.loads of a 50-entry registry dictionary (every answer's value is
    decoded before it is validated): 535–655 MB/s measured here, 2026-12-04."""
    msgpack_encode_bytes_per_s: float = 2.9e9
    """MSGPackSerializer.dumps of the same, on the node that answers: 2.96 GB/s measured here."""
    entry_decode_s: float = 16e-6
    """Our side of one entry of a get's result: strip the signature, msgpack, decode_record
    with its validation: 15.8 µs measured here, 2026-12-04."""
    rpc_cpu_s: float = 0.6e-3
    """Python CPU of one DHT RPC besides signatures and msgpack, both ends (hivemind's
    protocol and traversal, protobuf, the p2pd client, asyncio): real DHTNodes running the
    progress loop (scale_validate.measure_dht_cycle) spent 4.8–7.7, 12.8–18.6 and 27.2–31.4 ms
    per store + get at N = 3, 6 and 10 (5, 15 and 25 RPCs) in four runs, 0.5–1.3 ms per RPC
    once checks and signing are taken off (2026-12-04)."""
    p2pd_cpu_s: float = 0.75e-3
    """CPU of both p2pd processes per RPC (noise, yamux, protobuf; Go, another core): 3.5–6.3,
    9.9–14.7 and 16.9–22.0 ms per cycle in the same runs."""
    sign_s: float = 0.3e-3
    """RSASignatureValidator.sign_value of one entry (RSA-2048-PSS): 0.27 ms measured here."""
    progress_codec_s: float = 2e-6
    """encode_progress or decode_progress of one 35-byte message: 4.1 µs the pair, measured here."""
    max_dht_value_bytes: int = 4 * MIB
    """hivemind 1.1.12's unary RPC limit: a larger value breaks the key for everyone."""
    target_value_bytes: int = 100_000
    """The bounded design's ceiling on any one DHT value."""

    def dict_bytes(self, entries: float, entry_bytes: int) -> float:
        """A dictionary value of `entries` entries on the wire (msgpack map header ≈ 16 B)."""
        return 16 + entries * entry_bytes

    def answer_bytes(self, value_bytes: float, neighbours: int) -> float:
        """One find answer carrying `value_bytes` and `neighbours` nearest nodes."""
        return self.rpc_overhead_bytes + value_bytes + neighbours * self.neighbour_bytes


def message_sizes(addrs: tuple[str, ...] = WAN_ADDRS) -> dict[str, int]:
    """The Costs fields of the progress streams' messages (`record_message_bytes`,
    `update_message_bytes`, `stream_message_bytes`), built with the daemon's encoders late in
    a run (round 1,234, both chains and two anchors known) for a peer that listens on `addrs`;
    a progress message is charged the framing of the write that carries it."""
    import hashlib

    from locoswarm.node.progress import progress_frame, record_frames
    from locoswarm.protocol.records import PeerRecord, Progress

    peer = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjh001"
    record = PeerRecord(peer_id=peer, addrs=tuple(f"{a}/p2p/{peer}" for a in addrs), device="cuda",
                        tokens_per_s=12345.6, round=1234, spec_hash=hashlib.sha256(b"scale").digest(),
                        chain="a" * 32, prev_chain="b" * 32, anchors=((1232, "c" * 32), (1224, "d" * 32)),
                        incarnation=(1 << 62) + 1, seq=2468)
    progress = Progress(tokens=123456, tokens_per_s=1234.5, done=False, incarnation=(1 << 62) + 1, round=1234)
    frames = record_frames(record)
    return {"record_message_bytes": len(frames.full), "update_message_bytes": len(frames.update),
            "stream_message_bytes": len(progress_frame(progress)) + WRITE_FRAMING_BYTES}


def calibrate(base: Costs | None = None, *, entries: int = 50, seconds: float = 0.5) -> Costs:
    """`base` with the entry sizes rebuilt from the real encodings and the CPU constants
    timed on this machine (≈3 s; needs hivemind)."""
    import hashlib

    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.dht.routing import DHTID
    from hivemind.dht.storage import DictionaryDHTValue
    from hivemind.dht.validation import DHTRecord
    from hivemind.utils import MSGPackSerializer, get_dht_time
    from hivemind.utils.crypto import RSAPrivateKey

    from locoswarm.protocol.records import Progress, PeerRecord, decode_record, encode_progress, encode_record

    base = base or Costs()
    validator = RSASignatureValidator(RSAPrivateKey())
    spec = hashlib.sha256(b"scale").digest()
    key = DHTID.generate("locoswarm:run:peers").to_bytes()

    def signed(peer: str, value: bytes, ttl_s: float) -> tuple[bytes, DHTRecord]:
        subkey = peer.encode() + validator.local_public_key
        record = DHTRecord(key, MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(value), get_dht_time() + ttl_s)
        blob = validator.sign_value(record)
        return subkey, replace(record, value=blob)

    registry, progress, records = DictionaryDHTValue(), DictionaryDHTValue(), []
    for i in range(entries):
        peer = f"QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjh{i:03d}"
        p2p = f"/p2p/{peer}"
        rec = PeerRecord(peer_id=peer, addrs=(f"/ip4/203.0.113.5/tcp/31337{p2p}", f"/ip4/203.0.113.5/udp/31337/quic-v1{p2p}",
                                              f"/ip6/2001:db8::5/tcp/31337{p2p}"),
                         device="cuda", tokens_per_s=12345.6, round=1234, spec_hash=spec, chain="a" * 32,
                         prev_chain="b" * 32)
        subkey, record = signed(peer, encode_record(rec), 60.0)
        registry.store(subkey, record.value, record.expiration_time)
        records.append(record)
        subkey, record = signed(peer, encode_progress(Progress(tokens=123456, tokens_per_s=1234.5, done=False)), 60.0)
        progress.store(subkey, record.value, record.expiration_time)
    reg_blob, prog_blob = MSGPackSerializer.dumps(registry), MSGPackSerializer.dumps(progress)

    def rate(fn) -> float:
        """Seconds per call of fn, over about `seconds`."""
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            fn()
            calls += 1
        return (time.perf_counter() - start) / calls

    def decode_entries() -> None:
        for subkey, (blob, _) in MSGPackSerializer.loads(reg_blob).items():
            raw = validator.strip_value(DHTRecord(key, MSGPackSerializer.dumps(subkey), blob, 0.0))
            decode_record(MSGPackSerializer.loads(raw), spec)

    check_s = rate(lambda: [validator.validate(r) for r in records]) / entries
    return replace(
        base,
        **message_sizes(),
        registry_entry_bytes=round((len(reg_blob) - 16) / entries),
        progress_entry_bytes=round((len(prog_blob) - 16) / entries),
        signature_check_s=check_s,
        msgpack_decode_bytes_per_s=len(reg_blob) / rate(lambda: MSGPackSerializer.loads(reg_blob)),
        msgpack_encode_bytes_per_s=len(reg_blob) / rate(lambda: MSGPackSerializer.dumps(registry)),
        entry_decode_s=rate(decode_entries) / entries,
    )


@dataclass(kw_only=True, slots=True)
class Churn:
    session_min: float = 60.0
    """Mean session length (exponential), minutes."""
    churn_s: float | None = None
    """Instead: one peer leaves every this many seconds on average, whatever N (as `bench swarm --churn`)."""
    withdraw_fraction: float = 0.0
    """Share of leaves that are clean (tombstone, no wait); the rest are kills."""

    def rate_per_s(self, num_peers: int) -> float:
        return 1.0 / self.churn_s if self.churn_s else num_peers / (60.0 * self.session_min)


@dataclass(kw_only=True, slots=True)
class Links:
    """Each peer's network link and the share of a core its control loop gets."""

    rtt_median_s: float = 0.060
    """Round-trip time to another peer: lognormal around this median (WAN)."""
    rtt_sigma: float = 0.5
    """Lognormal shape of the RTT (0.5: a tenth of the pairs above ≈ 115 ms)."""
    upload_mbit: tuple[float, float] = (10.0, 100.0)
    """Upload, uniform over this range (home links); inf: no cap (loopback)."""
    download_factor: float = 4.0
    """Download = upload × this (asymmetric home links)."""
    rpc_s: float = 0.0005
    """Per request beyond the RTT: p2pd's hop through its unix socket, protobuf, the answering
    node's event loop (estimate)."""
    cpu_share: float = 1.0
    """Share of a core the control loop (one asyncio thread) gets: 1.0 on a volunteer's
    machine; less when several daemons share a machine (the loopback validation)."""
    exchange_share: float | None = None
    """Share of a core a round's exchange compute gets (None: `cpu_share`). Every peer's
    exchange runs at the same time, beside its next round's training, so where daemons share
    a machine it is the share of 2N busy threads, not of N."""

    @classmethod
    def loopback(cls, cpu_share: float = 1.0) -> "Links":
        """One machine: RTT 0.1 ms, no bandwidth cap."""
        return cls(rtt_median_s=1e-4, rtt_sigma=0.0, upload_mbit=(float("inf"), float("inf")), cpu_share=cpu_share)

    def validate(self) -> None:
        lo, hi = self.upload_mbit
        if not (self.rtt_median_s > 0 and self.rtt_sigma >= 0 and 0 < lo <= hi and self.download_factor > 0
                and 0 < self.cpu_share <= 1 and self.rpc_s >= 0
                and (self.exchange_share is None or 0 < self.exchange_share <= 1)):
            raise ValueError("links: rtt_median_s, upload_mbit, download_factor must be > 0, cpu_share and "
                             "exchange_share in (0, 1]")


@dataclass(kw_only=True, slots=True)
class Workload:
    """What a round is made of (defaults: the shipped spec's quick preset, node/spec.py)."""

    inner_steps: int = 5
    """H: inner steps per peer per round (DiLoCoConfig.inner_steps)."""
    batch_size: int = 8
    seq_len: int = 64
    tokens_per_s_median: float = 1000.0
    """Per-peer training throughput, lognormal around this median: the 1.2M-parameter model
    trains ≈2,300 tokens/s per peer with 3 peers on 2 CPU cores (bench swarm, 2026-12-04);
    volunteers' machines vary, so a wide spread."""
    tokens_per_s_sigma: float = 0.5
    delta_bytes: int = 8600
    """One peer's compressed delta of the 1.2M-parameter model (0.375 % of each 4096-entry
    chunk, 12-bit positions, 2-bit codes: ≈4,400 entries × 14 bits): 6 real daemons each sent
    43,098 B of delta payload per round to their 5 pullers (bench swarm, 2026-12-04)."""
    fanout: int = 16
    """F: deltas a peer pulls per round (NodeConfig.fanout)."""
    overlap: bool = True
    """The next round trains while this one's deltas are pulled (RoundsConfig.overlap)."""
    apply_s: float = 0.04
    """A round's exchange compute that does not grow with the deltas pulled: encode this
    peer's own delta (1.2M parameters, one CPU thread; `locoswarm bench checks`: 35–46 ms on
    a core of the 2-core machine, 2026-12-06), seconds of one whole core."""
    per_delta_s: float = 0.022
    """A round's exchange compute per delta pulled: decode it off the wire, screen and check
    it, and its part of the aggregate and outer step (`bench checks --replicas 4` and `17` with
    one torch thread: 8.5 + 4.5 + 0.5 + 8.6 ms a delta, 2026-12-06), seconds of one whole core.
    Both are divided by the CPU share the exchange gets (`Links.exchange_share`): 17 deltas
    are 0.37 s on a whole core, and 24 peers on 16 cores waited 0.84 s a round for them."""
    decode_s: float = 0.0085
    """Of `per_delta_s`: decoding the delta off the wire, which the daemon does as it pulls
    (the rest, screening to the outer step, after the pull)."""
    poll_s: float = 0.1
    """Mean wait added by the delta pull's retries of a delta not ready yet (20 ms × 1.5 up to 250 ms)."""
    detect_killed_s: float = 2.0
    """A pulled peer that was killed: its dial is refused, the stream retried, then dropped."""

    @property
    def round_tokens(self) -> int:
        return self.inner_steps * self.batch_size * self.seq_len

    def validate(self) -> None:
        if min(self.inner_steps, self.batch_size, self.seq_len, self.fanout, self.delta_bytes) < 1:
            raise ValueError("workload: inner_steps, batch_size, seq_len, fanout, delta_bytes must be >= 1")
        if min(self.apply_s, self.per_delta_s, self.poll_s, self.detect_killed_s) < 0:
            raise ValueError("workload: apply_s, per_delta_s, poll_s and detect_killed_s must be >= 0")
        if not 0 <= self.decode_s <= self.per_delta_s:
            raise ValueError("workload: decode_s must be in [0, per_delta_s]")
        if not (self.tokens_per_s_median > 0 and self.tokens_per_s_sigma >= 0):
            raise ValueError("workload: tokens_per_s_median must be > 0 and tokens_per_s_sigma >= 0")
