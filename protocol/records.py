"""The peer record every peer keeps in the DHT under its run's key: who it is, where to
reach it, what it runs on, how fast it trains, which round it is at, and under which run
spec, whether it is paused, (in a private run) its proof of the run's secret, and whether
its outer state went its own way (after a partition, that says which side takes whose state:
node/reunion.py), and a digest of the deltas its outer state is made of, at its round and
the round before (peers that aggregated different sets of deltas in a round see it, even
while some are a round ahead: node/reunion.py), and its incarnation (a number drawn at each
start of the process: a restarted peer, same identity, shows a new one, so nobody waits for
what its previous life promised), and a sequence number within that incarnation (the same
record also travels over the progress streams, node/progress.py: the larger number is the
newer statement), and (in a run that asks for it) its proof of work on its identity
(protocol/work.py). Encoded as a msgpack map, version 10;
`decode_record` validates every field and raises a ProtocolError subclass naming what was
wrong. Signing (so that no peer can overwrite another's record) is the DHT layer's job:
hivemind's signature validator.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace

import msgpack

from locoswarm.protocol.envelope import unpack_envelope
from locoswarm.protocol.errors import MalformedMessage, SpecMismatch

RECORD_VERSION = 10
MAX_RECORD_BYTES = 4096
MAX_ADDRS = 16
DEVICE_CLASSES = ("cuda", "mps", "cpu")
CHAIN_HEX_LEN = 32
"""A round chain is 16 bytes (BLAKE2b), written as lowercase hex."""
_HEX = frozenset("0123456789abcdef")
BUCKET_ENTRIES = 32
"""Records a registry bucket should hold on average: the level follows N_est / BUCKET_ENTRIES
(node/buckets.py; a reader that finds bucket 0:0 holding fewer than BUCKET_ENTRIES · √2
records has everyone)."""


def bucket_of(peer_id: str, level: int) -> int:
    """The registry bucket of `peer_id` at `level`: the first `level` bits of sha256(peer id's ASCII)."""
    if level == 0:
        return 0
    digest = hashlib.sha256(peer_id.encode()).digest()
    return int.from_bytes(digest[:(level + 7) // 8], "big") >> (8 * ((level + 7) // 8) - level)


def bucket_key(run_id: str, level: int, bucket: int) -> str:
    """The DHT key of one registry bucket (docs/protocol.md, "Finding every peer")."""
    return f"locoswarm:{run_id}:peers:{level}:{bucket}"


MAX_LEVEL = 24
"""The highest registry level considered (32 · 2^24 ≈ 5e8 peers): bounds the bootstrap probe
and whatever an estimate says."""


def level_of(peers_estimate: float) -> float:
    """ℓ = log2(N_est / BUCKET_ENTRIES), clamped to [0, MAX_LEVEL] (node/buckets.py says why
    writers and readers meet)."""
    if not peers_estimate > BUCKET_ENTRIES:
        return 0.0
    return min(float(MAX_LEVEL), math.log2(peers_estimate / BUCKET_ENTRIES))


def write_levels(peers_estimate: float) -> tuple[int, ...]:
    """The levels a peer writes its record at: ⌊ℓ⌋ and ⌊ℓ⌋ + 1; only level 0 below
    BUCKET_ENTRIES / √2 peers, where every reader within a factor √2 reads level 0."""
    if peers_estimate < BUCKET_ENTRIES / math.sqrt(2):
        return (0,)
    low = math.floor(level_of(peers_estimate))
    return low, low + 1


def read_level(peers_estimate: float) -> int:
    """The level a peer reads at: ℓ rounded, halves up (one of the writers' two levels for
    every writer whose estimate is within a factor √2 of ours)."""
    return math.floor(level_of(peers_estimate) + 0.5)


def is_chain(value: object) -> bool:
    """A round chain as records and checkpoints hold it: CHAIN_HEX_LEN lowercase hex digits."""
    return isinstance(value, str) and len(value) == CHAIN_HEX_LEN and set(value) <= _HEX

_KEYS = frozenset({"v", "peer", "addrs", "device", "tokens_per_s", "round", "spec", "paused", "proof", "diverged",
                   "chain", "prev_chain", "inc", "anchors", "seq", "work"})
MAX_ANCHORS = 2


@dataclass(frozen=True, slots=True)
class PeerRecord:
    peer_id: str
    """base58 libp2p peer id."""
    addrs: tuple[str, ...]
    """Multiaddrs the peer listens on."""
    device: str
    """cuda, mps or cpu."""
    tokens_per_s: float
    """Measured training throughput."""
    round: int
    """The outer steps the peer has taken (the round of the state it serves)."""
    spec_hash: bytes
    """Hash of the run spec the peer runs."""
    paused: bool = False
    """Its owner's machine is busy (idle governor): reachable, but not training."""
    proof: bytes = b""
    """HMAC of the spec hash and peer id under the run's secret (empty: open run)."""
    diverged: bool = False
    """It aggregated a round alone while others trained it, and has not taken another's state since."""
    chain: str = ""
    """The round chain of its outer state at `round` (reunion.round_chain), hex; empty when it
    does not know it (resumed from a checkpoint, or the state it took moved on meanwhile)."""
    prev_chain: str = ""
    """Its round chain at `round` − 1, empty when it does not know it: with it, peers a round
    apart still show one round's chains side by side."""
    anchors: tuple[tuple[int, str], ...] = ()
    """(round, chain) at the last MAX_ANCHORS rounds before `round` that are multiples of
    node/chains.py ANCHOR_EVERY, where known: peers whose records stand several rounds apart (fast
    rounds, records refreshed once a second) still share a round to compare chains at."""
    incarnation: int = 0
    """Drawn at random when the process starts (0 < incarnation < 2⁶³): a new one says the
    peer restarted, and what it promised before (a delta, a round) will not come."""
    seq: int = 0
    """Counts the changes of the record within its incarnation: of two records of one life
    (one read from the DHT, one told over a stream), the larger number is the newer."""
    work: int = 0
    """The nonce proving work on this identity for the run (protocol/work.py; 0 where the run
    asks for none)."""


def encode_record(r: PeerRecord) -> bytes:
    return msgpack.packb({"v": RECORD_VERSION, "peer": r.peer_id, "addrs": list(r.addrs), "device": r.device,
                          "tokens_per_s": float(r.tokens_per_s), "round": r.round, "spec": r.spec_hash,
                          "paused": r.paused, "proof": r.proof, "diverged": r.diverged,
                          "chain": r.chain, "prev_chain": r.prev_chain, "inc": r.incarnation,
                          "anchors": [[k, c] for k, c in r.anchors], "seq": r.seq, "work": r.work},
                         use_bin_type=True)


def decode_record(blob: bytes, spec_hash: bytes) -> PeerRecord:
    """Validate a record read from the DHT; a record of another run spec is SpecMismatch."""
    m = unpack_envelope(blob, "peer record", max_bytes=MAX_RECORD_BYTES, version=RECORD_VERSION, keys=_KEYS,
                        max_bin_len=64, max_str_len=512, max_array_len=MAX_ADDRS + 1)
    if m["spec"] != spec_hash:
        raise SpecMismatch(f"peer {m.get('peer')!r} runs another run spec")
    peer, addrs, device, tps, round_ = m["peer"], m["addrs"], m["device"], m["tokens_per_s"], m["round"]
    if not isinstance(peer, str) or not 1 <= len(peer) <= 128 or not peer.isalnum():
        raise MalformedMessage(f"peer record: peer id {peer!r} is not a base58 id")
    if (not isinstance(addrs, list) or not 1 <= len(addrs) <= MAX_ADDRS
            or not all(isinstance(a, str) and a.startswith("/") and len(a) <= 256 for a in addrs)):
        raise MalformedMessage(f"peer record of {peer}: addrs must be 1..{MAX_ADDRS} multiaddr strings")
    if device not in DEVICE_CLASSES:
        raise MalformedMessage(f"peer record of {peer}: device {device!r} not one of {DEVICE_CLASSES}")
    if not isinstance(tps, float) or not 0 <= tps < 1e12:
        raise MalformedMessage(f"peer record of {peer}: tokens_per_s {tps!r} invalid")
    if type(round_) is not int or not 0 <= round_ < 2**62:
        raise MalformedMessage(f"peer record of {peer}: round {round_!r} invalid")
    if not isinstance(m["paused"], bool):
        raise MalformedMessage(f"peer record of {peer}: paused {m['paused']!r} is not a boolean")
    if not isinstance(m["proof"], bytes) or len(m["proof"]) not in (0, 32):
        raise MalformedMessage(f"peer record of {peer}: proof must be empty or 32 bytes")
    if not isinstance(m["diverged"], bool):
        raise MalformedMessage(f"peer record of {peer}: diverged {m['diverged']!r} is not a boolean")
    for key in ("chain", "prev_chain"):
        if m[key] != "" and not is_chain(m[key]):
            raise MalformedMessage(f"peer record of {peer}: {key} must be empty or {CHAIN_HEX_LEN} "
                                   "lowercase hex digits")
    if type(m["inc"]) is not int or not 0 <= m["inc"] < 2**63:
        raise MalformedMessage(f"peer record of {peer}: incarnation {m['inc']!r} is not an integer in [0, 2**63)")
    if type(m["seq"]) is not int or not 0 <= m["seq"] < 2**63:
        raise MalformedMessage(f"peer record of {peer}: seq {m['seq']!r} is not an integer in [0, 2**63)")
    if type(m["work"]) is not int or not 0 <= m["work"] < 2**64:
        raise MalformedMessage(f"peer record of {peer}: work {m['work']!r} is not an integer in [0, 2**64)")
    if m["prev_chain"] and round_ == 0:
        raise MalformedMessage(f"peer record of {peer}: prev_chain given at round 0, which has no round before it")
    anchors = m["anchors"]
    if (not isinstance(anchors, list) or len(anchors) > MAX_ANCHORS
            or not all(isinstance(a, list) and len(a) == 2 and type(a[0]) is int and 0 <= a[0] <= round_
                       and is_chain(a[1]) for a in anchors)):
        raise MalformedMessage(f"peer record of {peer}: anchors must be at most {MAX_ANCHORS} [round <= {round_}, "
                               f"chain] pairs")
    return PeerRecord(peer_id=peer, addrs=tuple(addrs), device=device, tokens_per_s=tps, round=round_,
                      spec_hash=m["spec"], paused=m["paused"], proof=m["proof"], diverged=m["diverged"],
                      chain=m["chain"], prev_chain=m["prev_chain"], incarnation=m["inc"],
                      anchors=tuple((k, c) for k, c in anchors), seq=m["seq"], work=m["work"])


# ---------------------------------------------------------------- record updates

UPDATE_VERSION = 1
MAX_UPDATE_BYTES = 512
_UPDATE_KEYS = frozenset({"v", "t", "r", "p", "d", "c", "pc", "a", "s"})
"""tokens_per_s, round, paused, diverged, chain, prev_chain, anchors, seq: short keys, and
the chains as their 16 bytes rather than hex, for a message sent every round."""


def record_base(r: PeerRecord) -> tuple:
    """What a record update leaves as it was: who the peer is, where it listens, what it
    runs, its proofs, and which life of its process this is."""
    return r.peer_id, r.addrs, r.device, r.spec_hash, r.proof, r.incarnation, r.work


def encode_update(r: PeerRecord) -> bytes:
    """The fields of `r` that change as it trains (its round, chains, anchors, flags,
    throughput and sequence number): sent over a progress stream that already carried a
    whole record with the same `record_base`, at a fifth to a third of its size."""
    return msgpack.packb({"v": UPDATE_VERSION, "t": float(r.tokens_per_s), "r": r.round, "p": r.paused,
                          "d": r.diverged, "c": bytes.fromhex(r.chain), "pc": bytes.fromhex(r.prev_chain),
                          "a": [[k, bytes.fromhex(c)] for k, c in r.anchors], "s": r.seq}, use_bin_type=True)


def apply_update(base: PeerRecord, blob: bytes, spec_hash: bytes) -> PeerRecord:
    """`base` with the changes of update `blob`, validated as a whole record is
    (decode_record); MalformedMessage naming what is wrong otherwise."""
    m = unpack_envelope(blob, "record update", max_bytes=MAX_UPDATE_BYTES, version=UPDATE_VERSION, keys=_UPDATE_KEYS,
                        max_bin_len=CHAIN_HEX_LEN // 2, max_str_len=2, max_array_len=MAX_ANCHORS)
    anchors = m["a"]
    if not isinstance(anchors, list) or not all(isinstance(a, list) and len(a) == 2 and isinstance(a[1], bytes)
                                                for a in anchors):
        raise MalformedMessage(f"record update of {base.peer_id}: anchors must be [round, chain] pairs")
    if not all(isinstance(m[k], bytes) for k in ("c", "pc")):
        raise MalformedMessage(f"record update of {base.peer_id}: chains must be bytes")
    try:
        updated = replace(base, tokens_per_s=m["t"], round=m["r"], paused=m["p"], diverged=m["d"], chain=m["c"].hex(),
                          prev_chain=m["pc"].hex(), anchors=tuple((k, c.hex()) for k, c in anchors), seq=m["s"])
        # Every check a whole record passes (types, ranges, chains, anchors within the round).
        return decode_record(encode_record(updated), spec_hash)
    except (TypeError, ValueError, OverflowError) as e:
        raise MalformedMessage(f"record update of {base.peer_id}: {e}") from None


# ---------------------------------------------------------------- round progress

PROGRESS_VERSION = 3
MAX_PROGRESS_BYTES = 128
_PROGRESS_KEYS = frozenset({"v", "r", "tokens", "tps", "done", "inc"})


@dataclass(frozen=True, slots=True)
class Progress:
    """A peer's progress in one round, as it tells the round's peers (node/progress.py)."""

    tokens: int
    """Tokens it has trained on in this round so far."""
    tokens_per_s: float
    """Its current throughput, for extrapolating between reports."""
    done: bool
    """It has stopped training for this round; `tokens` is final."""
    incarnation: int = 0
    """The incarnation of the process that reported it (PeerRecord.incarnation): a delta is
    asked of that life only, and a restarted peer says "never" instead of "not yet"."""
    round: int = 0
    """The round it reports on."""


def encode_progress(p: Progress) -> bytes:
    return msgpack.packb({"v": PROGRESS_VERSION, "r": p.round, "tokens": p.tokens, "tps": float(p.tokens_per_s),
                          "done": p.done, "inc": p.incarnation}, use_bin_type=True)


def decode_progress(blob: bytes) -> Progress:
    m = unpack_envelope(blob, "round progress", max_bytes=MAX_PROGRESS_BYTES, version=PROGRESS_VERSION,
                        keys=_PROGRESS_KEYS, max_bin_len=0, max_str_len=16, max_array_len=0)
    round_, tokens, tps, done = m["r"], m["tokens"], m["tps"], m["done"]
    if type(round_) is not int or not 0 <= round_ < 2**62:
        raise MalformedMessage(f"round progress: round {round_!r} invalid")
    if type(tokens) is not int or not 0 <= tokens < 2**62:
        raise MalformedMessage(f"round progress: tokens {tokens!r} invalid")
    if not isinstance(tps, float) or not 0 <= tps < 1e12:
        raise MalformedMessage(f"round progress: tokens_per_s {tps!r} invalid")
    if not isinstance(done, bool):
        raise MalformedMessage(f"round progress: done {done!r} is not a boolean")
    if type(m["inc"]) is not int or not 0 <= m["inc"] < 2**63:
        raise MalformedMessage(f"round progress: incarnation {m['inc']!r} is not an integer in [0, 2**63)")
    return Progress(tokens=tokens, tokens_per_s=tps, done=done, incarnation=m["inc"], round=round_)
