"""The wire format of one peer's compressed pseudo-gradient for one round.

A msgpack map, format version 2:

    {"v": 2, "run": str, "spec": bytes (spec hash), "round": int, "sender": str,
     "tokens": int, "tensors": [[name, shape, chunk, k, bits, indices, values, scales], …],
     "base": str, "checks": [[peer id, agreement], …]}

per tensor, in the spec's order: `indices` packs each kept entry's position inside its
chunk at log2(chunk) bits, `values` packs its b-bit sign-magnitude code, `scales` holds
(lo, hi) per chunk as little-endian bfloat16 (see locoswarm.kernels for both layouts).
The chunk layout (how many chunks, how many entries each) follows from the spec, so every
byte string has one exact length. The encoded size is `len(encode_delta(msg))`.

`base` is the round chain (node/lineage.py, 32 hex digits; "" when the sender does not know
it) of the outer state the delta was taken from: a peer on another outer state (a diverged
one) cannot be checked against, and its delta is not aggregated (optim/screen.py).

`checks` are the sender's failed checks of the round before (optim/check.py): the peers whose
deltas of that round agreed with the sender's own pseudo-gradient less than the spec allows,
each with the agreement measured (thousandths), at most MAX_CHECKS, in ascending peer id
order. They travel inside the delta, so the noise-authenticated stream that brings the delta
vouches for them and the round chain that hashes its content (node/lineage.py) covers them.

`decode_delta` trusts nothing: it bounds the message by the spec before parsing, checks
every field's type, value and exact length, and the ranges of indices and scales, and
raises a `ProtocolError` subclass naming what was wrong. It never allocates more than the
spec's model implies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch
from torch import Tensor

from locoswarm.kernels import ChunkLayout, packed_nbytes, unpack_bits
from locoswarm.protocol.envelope import unpack_envelope
from locoswarm.protocol.errors import IndexOutOfRange, MalformedMessage, NonFiniteValue, ShapeMismatch, SpecMismatch

FORMAT_VERSION = 2
MAX_SENDER_LEN = 128
MAX_ROUND = 2**62
MAX_CHECKS = 256
"""Failed checks one delta may carry (a round aggregates at most the fanout's deltas)."""
MAX_AGREEMENT = 10**6
"""Bound of a check's agreement, in thousandths (optim/check.py clamps to far less)."""
MAX_BASE_LEN = 64
_TOP_KEYS = frozenset({"v", "run", "spec", "round", "sender", "tokens", "tensors", "base", "checks"})
_TENSOR_FIELDS = 8


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """What the run spec says one tensor of every delta looks like."""

    name: str
    shape: tuple[int, ...]
    chunk: int
    k: int
    bits: int

    @property
    def layout(self) -> ChunkLayout:
        numel = 1
        for d in self.shape:
            numel *= d
        return ChunkLayout(numel=numel, chunk=self.chunk, k=self.k)

    def payload_nbytes(self) -> tuple[int, int, int]:
        """Exact byte lengths of (indices, values, scales)."""
        lay = self.layout
        return (
            packed_nbytes(lay.num_selected, lay.index_bits),
            packed_nbytes(lay.num_selected, self.bits),
            4 * lay.num_chunks,
        )


@dataclass(frozen=True, slots=True)
class DeltaSpec:
    """Everything a receiver needs to validate a delta before it allocates anything."""

    run_id: str
    spec_hash: bytes
    tensors: tuple[TensorSpec, ...]
    max_tokens: int
    """Largest token count one peer may claim for one round."""

    @property
    def max_message_bytes(self) -> int:
        payload = sum(sum(t.payload_nbytes()) for t in self.tensors)
        # msgpack framing: a few bytes per field plus names and shapes; generous but bounded.
        # Strings are counted in UTF-8 bytes: a sender may use 4 bytes per character.
        framing = 512 + len(self.run_id.encode()) + len(self.spec_hash) + 4 * MAX_SENDER_LEN
        framing += sum(64 + len(t.name.encode()) + 10 * len(t.shape) for t in self.tensors)
        checks = MAX_CHECKS * (4 * MAX_SENDER_LEN + 16)
        return payload + framing + checks

    @property
    def max_string_bytes(self) -> int:
        """The longest string a valid delta of this spec can carry, in UTF-8 bytes."""
        names = max((len(t.name.encode()) for t in self.tensors), default=0)
        return max(len(self.run_id.encode()), 4 * MAX_SENDER_LEN, names)


@dataclass(frozen=True, slots=True)
class PackedTensor:
    """One tensor's compressed delta, as it travels."""

    name: str
    shape: tuple[int, ...]
    chunk: int
    k: int
    bits: int
    indices: bytes
    values: bytes
    scales: bytes


@dataclass(frozen=True, slots=True)
class DeltaMessage:
    """One peer's delta for one round, as it travels."""

    run_id: str
    spec_hash: bytes
    round: int
    sender: str
    num_tokens: int
    tensors: tuple[PackedTensor, ...]
    base: str = ""
    """The round chain of the outer state the delta was taken from ("": unknown)."""
    checks: tuple[tuple[str, int], ...] = ()
    """(peer id, agreement in thousandths) of the sender's failed checks of the round before."""


@dataclass(frozen=True, slots=True)
class SparseTensor:
    """A validated tensor of a received delta, ready to dequantize and scatter."""

    name: str
    layout: ChunkLayout
    bits: int
    indices: Tensor
    """(num_selected,) int64, chunk-relative, strictly increasing within each chunk."""
    codes: Tensor
    """(num_selected,) int64 in [0, 2**bits)."""
    scales: Tensor
    """(num_chunks, 2) float32: finite (lo, hi) with 0 ≤ lo ≤ hi."""
    packed_indices: Tensor
    """The validated `indices` as the wire packed them: (⌈num_selected·index_bits/8⌉,) uint8
    (what the fused CUDA decode reads: a fifth of the bytes of the int64 form)."""
    packed_codes: Tensor
    """The `codes` as the wire packed them: (⌈num_selected·bits/8⌉,) uint8."""


@dataclass(frozen=True, slots=True)
class DecodedDelta:
    """A received delta that passed every check."""

    round: int
    sender: str
    num_tokens: int
    tensors: tuple[SparseTensor, ...]
    nbytes: int
    """Size of the message on the wire."""
    base: str = ""
    """The round chain the delta was taken from (DeltaMessage.base), validated."""
    checks: tuple[tuple[str, int], ...] = ()
    """The sender's failed checks of the round before (DeltaMessage.checks), validated."""
    wire: bytes = field(default=b"", repr=False, compare=False)
    """The message as it came: what a peer serves to one catching up by the round's deltas
    (node/replay.py)."""


def encode_delta(msg: DeltaMessage) -> bytes:
    body = {
        "v": FORMAT_VERSION,
        "run": msg.run_id,
        "spec": msg.spec_hash,
        "round": msg.round,
        "sender": msg.sender,
        "tokens": msg.num_tokens,
        "tensors": [
            [t.name, list(t.shape), t.chunk, t.k, t.bits, t.indices, t.values, t.scales]
            for t in msg.tensors
        ],
        "base": msg.base,
        "checks": [[peer, agreement] for peer, agreement in msg.checks],
    }
    return msgpack.packb(body, use_bin_type=True)


def decode_delta(data: bytes, spec: DeltaSpec) -> DecodedDelta:
    """Parse and validate one delta against `spec`; raises a ProtocolError subclass."""
    limit = spec.max_message_bytes
    body = unpack_envelope(
        data, "delta", max_bytes=limit, version=FORMAT_VERSION, keys=_TOP_KEYS,
        max_bin_len=limit, max_str_len=spec.max_string_bytes,
        max_array_len=max(2 * MAX_CHECKS, 8 * len(spec.tensors) + 64),  # a few too many: named below
    )
    if body["run"] != spec.run_id:
        raise SpecMismatch(f"delta is for run {body['run']!r}, this peer is in run {spec.run_id!r}")
    if body["spec"] != spec.spec_hash:
        raise SpecMismatch("delta was made under another run spec (spec hash differs)")
    round_ = int_field(body, "round", 0, MAX_ROUND)
    tokens = int_field(body, "tokens", 0, spec.max_tokens)
    sender = body["sender"]
    if not isinstance(sender, str) or not 0 < len(sender) <= MAX_SENDER_LEN:
        raise MalformedMessage(f"sender must be a string of 1..{MAX_SENDER_LEN} characters")
    items = body["tensors"]
    if not isinstance(items, list) or len(items) != len(spec.tensors):
        count = len(items) if isinstance(items, list) else type(items).__name__
        raise ShapeMismatch(f"delta carries {count} tensors, the spec has {len(spec.tensors)}")
    tensors = _decode_tensors([_tensor_fields(item, ts) for item, ts in zip(items, spec.tensors)], spec.tensors)
    base = body["base"]
    if not isinstance(base, str) or len(base) > MAX_BASE_LEN or base.strip("0123456789abcdef"):
        raise MalformedMessage(f"base must be a string of at most {MAX_BASE_LEN} lowercase hex digits")
    return DecodedDelta(round=round_, sender=sender, num_tokens=tokens, tensors=tensors, nbytes=len(data),
                        base=base, checks=_decode_checks(body["checks"]), wire=bytes(data))


def _decode_checks(items: Any) -> tuple[tuple[str, int], ...]:
    if not isinstance(items, list) or len(items) > MAX_CHECKS:
        count = len(items) if isinstance(items, list) else type(items).__name__
        raise MalformedMessage(f"checks must be a list of at most {MAX_CHECKS} [peer id, agreement] pairs, got {count}")
    out, last = [], ""
    for i, item in enumerate(items):
        if not isinstance(item, list) or len(item) != 2:
            raise MalformedMessage(f"checks entry {i} is not a [peer id, agreement] pair")
        peer, agreement = item
        if not isinstance(peer, str) or not 0 < len(peer) <= MAX_SENDER_LEN:
            raise MalformedMessage(f"checks entry {i}: peer id must be a string of 1..{MAX_SENDER_LEN} characters")
        if peer <= last:
            raise MalformedMessage(f"checks entry {i} ({peer}): peer ids must be unique and in ascending order")
        if type(agreement) is not int or not -MAX_AGREEMENT <= agreement <= MAX_AGREEMENT:
            raise MalformedMessage(f"checks entry {i} ({peer}): agreement {agreement!r} outside "
                                   f"[-{MAX_AGREEMENT}, {MAX_AGREEMENT}]")
        out.append((peer, agreement))
        last = peer
    return tuple(out)


def int_field(body: dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = body[key]
    if type(value) is not int:
        raise MalformedMessage(f"field {key!r} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise MalformedMessage(f"field {key!r} = {value} outside [{lo}, {hi}]")
    return value


def _tensor_fields(item: Any, ts: TensorSpec) -> tuple[bytes, bytes, bytes]:
    """A tensor entry's (indices, values, scales) payloads, its other fields checked against `ts`."""
    if not isinstance(item, list) or len(item) != _TENSOR_FIELDS:
        raise MalformedMessage(f"tensor {ts.name!r}: entry must be a list of {_TENSOR_FIELDS} fields")
    name, shape, chunk, k, bits, idx_b, val_b, scale_b = item
    if name != ts.name:
        raise ShapeMismatch(f"tensor {ts.name!r} expected, got {name!r}")
    if not isinstance(shape, list) or tuple(shape) != ts.shape:
        raise ShapeMismatch(f"tensor {ts.name!r}: shape {shape!r}, the spec says {list(ts.shape)}")
    if (chunk, k, bits) != (ts.chunk, ts.k, ts.bits):
        raise ShapeMismatch(
            f"tensor {ts.name!r}: chunk/k/bits {chunk}/{k}/{bits}, the spec says {ts.chunk}/{ts.k}/{ts.bits}"
        )
    for label, blob, expected in zip(("indices", "values", "scales"), (idx_b, val_b, scale_b), ts.payload_nbytes()):
        if not isinstance(blob, bytes) or len(blob) != expected:
            got = len(blob) if isinstance(blob, bytes) else type(blob).__name__
            raise MalformedMessage(f"tensor {ts.name!r}: {label} hold {got} bytes, expected {expected}")
    return idx_b, val_b, scale_b


def _decode_tensors(fields: list[tuple[bytes, bytes, bytes]],
                    specs: tuple[TensorSpec, ...]) -> tuple[SparseTensor, ...]:
    """The tensors of a delta whose payloads passed `_tensor_fields`. Each payload kind lies end
    to end in one buffer, in the spec's order, and every tensor's field is a view of it: a
    round's checks read a delta's streams whole (optim/check.py `joined`)."""
    indices_all = _u8(b"".join(f[0] for f in fields))
    codes_all = _u8(b"".join(f[1] for f in fields))
    scales_all = torch.frombuffer(bytearray(b"".join(f[2] for f in fields)), dtype=torch.bfloat16).float()
    out, at = [], [0, 0, 0]
    for ts, (idx_b, val_b, _) in zip(specs, fields):
        lay = ts.layout
        packed_indices = indices_all[at[0]:at[0] + len(idx_b)]
        packed_codes = codes_all[at[1]:at[1] + len(val_b)]
        scales = scales_all[at[2]:at[2] + 2 * lay.num_chunks].view(lay.num_chunks, 2)
        at = [at[0] + len(idx_b), at[1] + len(val_b), at[2] + 2 * lay.num_chunks]
        indices = unpack_bits(packed_indices, lay.index_bits, lay.num_selected)
        _check_indices(ts.name, indices, lay)
        codes = unpack_bits(packed_codes, ts.bits, lay.num_selected)
        if not bool(torch.isfinite(scales).all()):
            raise NonFiniteValue(f"tensor {ts.name!r}: non-finite scale")
        lo, hi = scales[:, 0], scales[:, 1]
        if bool((lo < 0).any()) or bool((hi < lo).any()):
            raise NonFiniteValue(f"tensor {ts.name!r}: scales must satisfy 0 <= lo <= hi")
        out.append(SparseTensor(name=ts.name, layout=lay, bits=ts.bits, indices=indices, codes=codes, scales=scales,
                                packed_indices=packed_indices, packed_codes=packed_codes))
    return tuple(out)


def _u8(blob: bytes) -> Tensor:
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.empty(0, dtype=torch.uint8)


def _check_indices(name: str, indices: Tensor, lay: ChunkLayout) -> None:
    full = (lay.num_chunks - 1) * lay.k
    if full:
        rows = indices[:full].view(lay.num_chunks - 1, lay.k)
        if bool((rows >= lay.chunk).any()):
            raise IndexOutOfRange(f"tensor {name!r}: index beyond chunk size {lay.chunk}")
        if lay.k > 1 and bool((rows[:, 1:] <= rows[:, :-1]).any()):
            raise IndexOutOfRange(f"tensor {name!r}: indices not strictly increasing within a chunk")
    last = indices[full:]
    if bool((last >= lay.last_len).any()):
        raise IndexOutOfRange(f"tensor {name!r}: index beyond the last chunk's {lay.last_len} elements")
    if last.numel() > 1 and bool((last[1:] <= last[:-1]).any()):
        raise IndexOutOfRange(f"tensor {name!r}: indices not strictly increasing within the last chunk")
