"""State-transfer frames: how a joining peer downloads the outer state (parameters, outer
momentum, round) from a donor, in verifiable chunks that can be resumed or fetched from
another donor.

A manifest (msgpack, version 3) comes first:

    {"v": 3, "run": str, "spec": bytes, "round": int, "tensors": [[name, shape], …],
     "chunk_bytes": int, "chunks": [sha256, …], "digest": sha256, "chain": str,
     "ledger": [[peer id, credit], …]}

`chain` is the donor's round chain at that round (node/lineage.py; 32 hex digits, "" when it
does not know it): a joiner takes it with the state, so it can compare chains with the
others (and be healed after a split) from its first round on. `ledger` is the earned weight
of that outer state (optim/credit.py; at most MAX_LEDGER_ENTRIES pairs in ascending peer id
order): the joiner weighs peers as the donors do from its first round on.

The body is every tensor's float32 values, little-endian, concatenated in manifest order and
cut into `chunk_bytes` pieces; `chunks[i]` is the SHA-256 of piece i and `digest` that of
the whole body. The joiner checks the manifest against what its own run spec says the state
looks like (names and shapes, hence the exact byte count: nothing a donor sends can make it
allocate more), then accepts pieces in any order from any donor whose manifest has the same
digest, verifying each against its hash before writing it.

A donor's residual (its error-feedback residual e at that round, what its replica restarts
from: θ_outer − β·e) travels the same way, as a second manifest and body of its own: tensors
`residual.<i>` in bfloat16 (the 16-bit patterns, little-endian). It is the donor's own, not
the swarm's: no two donors hold the same, so it is taken from one donor whole, and the joiner
keeps it only where it helps (node/handover.py `take_state`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import msgpack
import numpy as np
import torch
from torch import Tensor

from locoswarm.protocol.envelope import unpack_envelope
from locoswarm.protocol.errors import MalformedMessage, NonFiniteValue, ShapeMismatch, SpecMismatch
from locoswarm.protocol.records import is_chain

STATE_VERSION = 3
DEFAULT_CHUNK_BYTES = 4 << 20
_MIN_CHUNK, _MAX_CHUNK = 1 << 10, 64 << 20
_KEYS = frozenset({"v", "run", "spec", "round", "tensors", "chunk_bytes", "chunks", "digest", "chain", "ledger"})
MAX_LEDGER_ENTRIES = 4096
"""Peers a ledger holds at most (optim/credit.py keeps no more)."""
MAX_CREDIT = 2**62
MAX_PEER_ID_LEN = 128
Ledger = tuple[tuple[str, int], ...]
"""Earned weight as (peer id, credit) pairs in ascending peer id order."""


PROTOCOL = "locoswarm/state/3"
"""The stream a donor serves its state on (node/statesync.py, on either transport)."""
MANIFEST, CHUNK, RESIDUAL_MANIFEST, RESIDUAL_CHUNK, ROUND_DELTAS = 0, 1, 2, 3, 4
"""Request kinds."""
REQUEST_LEN = 25
LATEST = (1 << 64) - 1
"""The round a request names for "the newest"."""


def encode_state_request(kind: int, round_: int, index: int, offset: int = 0) -> bytes:
    """A request on the state stream: its kind, round, chunk index and offset into the chunk."""
    return bytes([kind]) + round_.to_bytes(8, "big") + index.to_bytes(8, "big") + offset.to_bytes(8, "big")


_ITEMSIZE = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True, slots=True)
class StateSpec:
    """What the run spec says the outer state (or a donor's residual) looks like."""

    run_id: str
    spec_hash: bytes
    tensors: tuple[tuple[str, tuple[int, ...]], ...]
    dtype: str = "float32"
    """How the body holds the values: "float32", or "bfloat16" (a residual)."""

    def __post_init__(self) -> None:
        if self.dtype not in _ITEMSIZE:
            raise ValueError(f"state dtype must be one of {sorted(_ITEMSIZE)}, got {self.dtype!r}")

    @property
    def total_bytes(self) -> int:
        return sum(_ITEMSIZE[self.dtype] * int(np.prod(shape, dtype=np.int64)) for _, shape in self.tensors)


@dataclass(frozen=True, slots=True)
class Manifest:
    round: int
    chunk_bytes: int
    chunks: tuple[bytes, ...]
    digest: bytes
    chain: str = ""
    ledger: Ledger = ()


def check_ledger(pairs: object, what: str = "ledger") -> Ledger:
    """`pairs` as a Ledger, or MalformedMessage naming what is wrong: a list of at most
    MAX_LEDGER_ENTRIES [peer id, credit] pairs, peer ids of 1..MAX_PEER_ID_LEN characters in
    strictly ascending order, credits integers in [-MAX_CREDIT, MAX_CREDIT] (a negative one
    marks a peer excluded, optim/credit.py)."""
    if not isinstance(pairs, (list, tuple)):
        raise MalformedMessage(f"{what} must be a list of [peer id, credit] pairs, got {type(pairs).__name__}")
    if len(pairs) > MAX_LEDGER_ENTRIES:
        raise MalformedMessage(f"{what} holds {len(pairs)} entries, more than {MAX_LEDGER_ENTRIES}")
    out, last = [], ""
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise MalformedMessage(f"{what} entry {i} is not a [peer id, credit] pair")
        peer, credit = pair
        if not isinstance(peer, str) or not 0 < len(peer) <= MAX_PEER_ID_LEN:
            raise MalformedMessage(f"{what} entry {i}: peer id must be a string of 1..{MAX_PEER_ID_LEN} characters")
        if type(credit) is not int or not -MAX_CREDIT <= credit <= MAX_CREDIT:
            raise MalformedMessage(f"{what} entry {i} ({peer}): credit {credit!r} outside [-2**62, 2**62]")
        if peer <= last:
            raise MalformedMessage(f"{what} entry {i} ({peer}): peer ids must be unique and in ascending order")
        out.append((peer, credit))
        last = peer
    return tuple(out)


def state_digest(body: bytes, ledger: Ledger = ()) -> str:
    """SHA-256 (hex) of an outer state: its body, then its ledger's pairs when it has any
    (so a state without earned weight hashes as its body alone)."""
    h = hashlib.sha256(body)
    for peer, credit in ledger:
        h.update(peer.encode() + b"\0" + credit.to_bytes(8, "big", signed=True))
    return h.hexdigest()


def encode_state(spec: StateSpec, state: dict[str, Tensor], round_: int,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, chain: str = "", ledger: Ledger = ()) -> tuple[bytes, bytes]:
    """Returns (manifest bytes, body bytes) for `state`, whose tensors follow `spec`'s order."""
    assert [n for n, _ in spec.tensors] == list(state), "state must follow the spec's tensor order"
    body = b"".join(_bytes(t, spec.dtype) for t in state.values())
    assert len(body) == spec.total_bytes
    chunks = [hashlib.sha256(body[i : i + chunk_bytes]).digest() for i in range(0, len(body), chunk_bytes)]
    manifest = {
        "v": STATE_VERSION, "run": spec.run_id, "spec": spec.spec_hash, "round": round_,
        "tensors": [[n, list(s)] for n, s in spec.tensors], "chunk_bytes": chunk_bytes,
        "chunks": chunks, "digest": hashlib.sha256(body).digest(), "chain": chain,
        "ledger": [list(pair) for pair in ledger],
    }
    return msgpack.packb(manifest, use_bin_type=True), body


def _bytes(t: Tensor, dtype: str) -> bytes:
    if dtype == "bfloat16":
        return t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().astype("<i2").tobytes()
    return t.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()


def _tensor(body: bytearray, dtype: str, count: int, offset: int) -> Tensor:
    """`count` values of `dtype` at byte `offset` of `body`, as float32."""
    if dtype == "bfloat16":
        bits = np.frombuffer(body, dtype="<i2", count=count, offset=offset).astype(np.int16)
        return torch.from_numpy(bits).view(torch.bfloat16).float()
    return torch.from_numpy(np.frombuffer(body, dtype="<f4", count=count, offset=offset).astype(np.float32))


def decode_manifest(blob: bytes, spec: StateSpec) -> Manifest:
    """Validate a donor's manifest against `spec`; raises a ProtocolError subclass."""
    num_chunks_max = spec.total_bytes // _MIN_CHUNK + 1
    limit = (1024 + 64 * num_chunks_max + sum(64 + len(n.encode()) + 10 * len(s) for n, s in spec.tensors)
             + MAX_LEDGER_ENTRIES * (MAX_PEER_ID_LEN + 16))
    m = unpack_envelope(blob, "state manifest", max_bytes=limit, version=STATE_VERSION, keys=_KEYS,
                        max_bin_len=64, max_str_len=4096,
                        max_array_len=max(num_chunks_max, len(spec.tensors), MAX_LEDGER_ENTRIES) + 16)
    if m["run"] != spec.run_id or m["spec"] != spec.spec_hash:
        raise SpecMismatch("state manifest is from another run or run spec")
    expected = [[n, list(s)] for n, s in spec.tensors]
    if m["tensors"] != expected:
        raise ShapeMismatch("state manifest's tensors differ from the run spec's model")
    round_, chunk_bytes = m["round"], m["chunk_bytes"]
    if type(round_) is not int or not 0 <= round_ < 2**62:
        raise MalformedMessage(f"state manifest round {round_!r} invalid")
    if type(chunk_bytes) is not int or not _MIN_CHUNK <= chunk_bytes <= _MAX_CHUNK:
        raise MalformedMessage(f"state chunk size {chunk_bytes!r} outside [{_MIN_CHUNK}, {_MAX_CHUNK}]")
    chunks = m["chunks"]
    need = -(-spec.total_bytes // chunk_bytes)
    if not isinstance(chunks, list) or len(chunks) != need:
        raise MalformedMessage(f"state manifest lists {len(chunks) if isinstance(chunks, list) else '?'} chunks, "
                               f"expected {need}")
    if not all(isinstance(c, bytes) and len(c) == 32 for c in chunks + [m["digest"]]):
        raise MalformedMessage("state manifest hashes must be 32-byte SHA-256 digests")
    if m["chain"] != "" and not is_chain(m["chain"]):
        raise MalformedMessage("state manifest chain must be empty or 32 lowercase hex digits")
    return Manifest(round=round_, chunk_bytes=chunk_bytes, chunks=tuple(chunks), digest=m["digest"], chain=m["chain"],
                    ledger=check_ledger(m["ledger"], "state manifest ledger"))


class StateAssembler:
    """Collects verified chunks of one manifest's body, from any donors, in any order."""

    def __init__(self, spec: StateSpec, manifest: Manifest) -> None:
        self.spec = spec
        self.manifest = manifest
        self._body = bytearray(spec.total_bytes)
        self._have = [False] * len(manifest.chunks)

    def missing(self) -> list[int]:
        return [i for i, ok in enumerate(self._have) if not ok]

    def add(self, index: int, data: bytes) -> None:
        """Verify chunk `index` against the manifest and keep it; raises a ProtocolError
        (and keeps nothing) when it does not match, so it can be fetched again elsewhere."""
        if not 0 <= index < len(self._have):
            raise MalformedMessage(f"state chunk index {index} outside [0, {len(self._have)})")
        start = index * self.manifest.chunk_bytes
        size = min(self.manifest.chunk_bytes, self.spec.total_bytes - start)
        if len(data) != size:
            raise MalformedMessage(f"state chunk {index} holds {len(data)} bytes, expected {size}")
        if hashlib.sha256(data).digest() != self.manifest.chunks[index]:
            raise MalformedMessage(f"state chunk {index} does not match its hash")
        self._body[start : start + size] = data
        self._have[index] = True

    def digest(self) -> str:
        """`state_digest` of the assembled body and the manifest's ledger (the digest donors
        report serving), once every chunk is in."""
        if self.missing():
            raise MalformedMessage(f"state incomplete: {len(self.missing())} chunks missing")
        return state_digest(bytes(self._body), self.manifest.ledger)

    def finish(self) -> dict[str, Tensor]:
        """The state as float32 tensors, once every chunk is in and the digest matches."""
        if self.missing():
            raise MalformedMessage(f"state incomplete: {len(self.missing())} chunks missing")
        if hashlib.sha256(self._body).digest() != self.manifest.digest:
            raise MalformedMessage("state body does not match the manifest digest")
        out, offset = {}, 0
        for name, shape in self.spec.tensors:
            n = int(np.prod(shape, dtype=np.int64))
            out[name] = _tensor(self._body, self.spec.dtype, n, offset).view(shape)
            offset += _ITEMSIZE[self.spec.dtype] * n
        bad = [n for n, t in out.items() if not bool(torch.isfinite(t).all())]
        if bad:
            raise NonFiniteValue(f"state tensors {bad} hold non-finite values")
        return out
