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

import collections
import hashlib
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable

import msgpack
import numpy as np
import torch
from torch import Tensor

from locoswarm.protocol.envelope import unpack_envelope
from locoswarm.protocol.errors import MalformedMessage, NonFiniteValue, ShapeMismatch, SpecMismatch
from locoswarm.protocol.framing import TruncatedBody
from locoswarm.protocol.records import is_chain

log = logging.getLogger(__name__)
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
"""The stream a donor serves its state on (node/statesync.py on p2pd, net/statesync.py on py-libp2p)."""
MANIFEST, CHUNK, RESIDUAL_MANIFEST, RESIDUAL_CHUNK, ROUND_DELTAS = 0, 1, 2, 3, 4
"""Request kinds."""
REQUEST_LEN = 25
LATEST = (1 << 64) - 1
"""The round a request names for "the newest"."""


def encode_state_request(kind: int, round_: int, index: int, offset: int = 0) -> bytes:
    """A request on the state stream: its kind, round, chunk index and offset into the chunk."""
    return bytes([kind]) + round_.to_bytes(8, "big") + index.to_bytes(8, "big") + offset.to_bytes(8, "big")


MANIFEST_DONORS = 4
"""Donors a joiner asks for their manifest at once (the caller passes them shuffled)."""
AGREEING = 2
"""Donors that must show the same digest for a state to be taken over a newer single one."""
DONOR_FAILURES = 2
"""Failed chunk requests after which a donor is dropped from a download."""
DONOR_CUTS = 8
"""Chunk streams cut inside the body, one after another, after which a donor is dropped
(each cut keeps what came; a delivered chunk starts the count again)."""


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


def same_state(m: Manifest) -> tuple:
    """What two donors' manifests must both show to serve one state."""
    return m.round, m.digest, m.chain, m.ledger


def choose_state(manifests: list[Manifest]) -> Manifest:
    """The newest state (round, digest, chain and ledger) at least AGREEING manifests show,
    else the newest one (a joiner's choice, on either transport)."""
    counts = collections.Counter(same_state(m) for m in manifests)
    agreed = [m for m in manifests if counts[same_state(m)] >= AGREEING]
    return max(agreed or manifests, key=lambda m: m.round)


def serving(manifests: dict, chosen: Manifest) -> list:
    """The donors (keys of `manifests`) whose manifest shows `chosen`'s state cut alike: donors
    cut a state alike only at the same chunk size (an upload budget makes it smaller)."""
    return [p for p, m in manifests.items()
            if same_state(m) == same_state(chosen) and m.chunk_bytes == chosen.chunk_bytes]


class StateUnavailable(Exception):
    """No donor served a state that could be downloaded whole; says why."""


def pick_manifest(manifests: dict, *, asked: int, trusted: list | None = None,
                  target: tuple[int, str] | None = None) -> Manifest:
    """The manifest a download takes among `manifests` (donor → its manifest, `asked` donors
    asked), on either transport: with a `target` (round, chain), the state a majority of
    earned weight attests, only manifests of that round and chain count, and of those the
    state most of them show; else where attesters are asked for (`trusted`: those among the
    donors, maybe none), the newest state one of them showed, whatever the others show; else
    `choose_state`. StateUnavailable naming why when none fits."""
    if target is not None:
        fitting = [m for m in manifests.values() if (m.round, m.chain) == target]
        if not fitting:
            raise StateUnavailable(f"none of the {asked} donors asked served the attested state of round "
                                   f"{target[0]} (chain {target[1][:12]}…)")
        counts = collections.Counter(same_state(m) for m in fitting)
        return max(fitting, key=lambda m: counts[same_state(m)])
    if trusted is not None:
        vouched = [m for p, m in manifests.items() if p in trusted]
        if not vouched:
            raise StateUnavailable(f"none of the {len(trusted)} trusted donors served a state manifest")
        return max(vouched, key=lambda m: m.round)
    if not manifests:
        raise StateUnavailable(f"none of the {asked} donors asked served a valid state manifest")
    return choose_state(list(manifests.values()))


class ChunkPull:
    """Which chunk of one state each donor asks for next, without I/O (node/statedownload.py
    drives it on p2pd, net/statesync.py on py-libp2p): one shared queue, one request in flight
    per donor. A chunk whose stream was cut inside the body is asked again for its rest only,
    first, from any donor; one that failed (or did not match its hash) goes to the queue's end
    for another donor. `Donor` counts one donor's failures."""

    def __init__(self, asm: StateAssembler) -> None:
        self.asm = asm
        self.queue = collections.deque(asm.missing())
        self.partial: dict[int, bytes] = {}
        """chunk index → the bytes of it that came before its stream was cut."""
        self.in_flight: dict[int, bytes] = {}
        """chunk index → what of it was had when it was asked for."""

    def idle(self) -> bool:
        """Nothing left to ask for and nothing in flight that could come back to the queue."""
        return not self.queue and not self.in_flight

    def take(self) -> tuple[int, int] | None:
        """The next chunk to ask for and the offset to ask from; None while the queue is empty."""
        if not self.queue:
            return None
        index = self.queue.popleft()
        have = self.partial.pop(index, b"")
        self.in_flight[index] = have
        return index, len(have)

    def delivered(self, index: int, rest: bytes) -> None:
        """The rest of chunk `index` came: kept when it matches its hash, else back to the queue
        and the assembler's error raised."""
        have = self.in_flight.pop(index)
        try:
            self.asm.add(index, have + rest)
        except Exception:
            self.queue.append(index)
            raise

    def cut(self, index: int, partial: bytes) -> None:
        """Its stream was cut inside the body after `partial`: the rest is asked for next."""
        self.partial[index] = self.in_flight.pop(index) + partial
        self.queue.appendleft(index)

    def failed(self, index: int) -> None:
        """The request failed: the chunk goes to another donor (whatever of it was had is dropped)."""
        if index in self.in_flight:
            del self.in_flight[index]
            self.queue.append(index)


class Donor:
    """One donor's standing in a pull: dropped after DONOR_FAILURES failures, or DONOR_CUTS cuts
    in a row (a delivered chunk starts that count again)."""

    def __init__(self) -> None:
        self.failures = self.cuts = 0

    @property
    def alive(self) -> bool:
        return self.failures < DONOR_FAILURES and self.cuts < DONOR_CUTS

    def delivered(self) -> None:
        self.cuts = 0

    def cut(self) -> None:
        self.cuts += 1

    def failed(self) -> None:
        self.failures += 1


async def pull_chunks(pull: ChunkPull, peer: object, ask: Callable[[int, int], Awaitable[bytes]],
                      sleep: Callable[[float], Awaitable[object]],
                      on_chunk: Callable[[], None] | None = None) -> None:
    """One donor's part of `pull` until the queue is done or the donor is dropped (`Donor`):
    `ask(index, offset)` returns the rest of a chunk from `offset` (raising what the request
    raised: TruncatedBody when cut inside the body). It awaits nothing but `ask` and `sleep`,
    so it runs on asyncio (node/statedownload.py) and on trio (net/statesync.py) alike."""
    donor = Donor()
    while donor.alive:
        job = pull.take()
        if job is None:
            if pull.idle():
                return
            await sleep(0.05)  # another donor's chunk may fail and come back to the queue
            continue
        index, offset = job
        try:
            pull.delivered(index, await ask(index, offset))
            donor.delivered()
        except TruncatedBody as e:  # cut inside the body: the next request asks for the rest only
            log.info("chunk %d from %s cut after %d bytes: resuming it", index, peer, offset + len(e.partial))
            pull.cut(index, e.partial)
            donor.cut()
            continue
        except Exception as e:  # any failure: the chunk goes to another donor
            log.warning("chunk %d from %s failed: %s: %s", index, peer, type(e).__name__, e)
            pull.failed(index)
            donor.failed()
            continue
        if on_chunk is not None:
            on_chunk()


RESIDUAL_DONORS = 2
"""Donors of the state asked for their residual, one after another, before going without."""


async def take_residual(pool: list, spec: StateSpec, round_: int,
                        manifest_of: Callable[[object], Awaitable[Manifest | None]],
                        pull: Callable[[object, StateAssembler], Awaitable[None]]) -> dict[str, Tensor] | None:
    """One donor's residual at `round_`, whole, from the first of `pool` (RESIDUAL_DONORS
    tried) that serves a valid one, None when none does: `manifest_of(peer)` asks a donor for
    its residual's manifest of the round, `pull(peer, assembler)` fills the assembler from it.
    Runtime-agnostic, as `pull_chunks`."""
    for peer in pool[:RESIDUAL_DONORS]:
        manifest = await manifest_of(peer)
        if manifest is None or manifest.round != round_:
            continue
        asm = StateAssembler(spec, manifest)
        await pull(peer, asm)
        try:
            return asm.finish()
        except Exception as e:  # incomplete, or values no replica can start from
            log.warning("residual of %s skipped: %s: %s", peer, type(e).__name__, e)
    log.info("no donor of round %d served its residual: the replica starts at the outer state", round_)
    return None


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
