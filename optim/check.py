"""Checked contributions: every peer checks the deltas it aggregates against its own work of
the same round, and tells the swarm which failed; peers holding a majority of the earned
weight that say so exclude a sender for credit.EXCLUSION_ROUNDS rounds (optim/screen.py,
optim/credit.py).

The check. A peer's own pseudo-gradient g = θ_outer − θ_replica of a round (the shared round
start, its own data) is an independent estimate of where the round's training goes; a delta D
that came from training on the run's data agrees with it. How much depends on the model, the
compression and the data, so the measure is relative to the peer's own delta D_own (the same
compression of g):

    agreement = cos(D, g) / cos(D_own, g) = (D·g · ‖D_own‖) / (‖D‖ · D_own·g)

computed on D's support alone (a gather of g at the positions sent, one copy of the model's
size while it runs): the round's deltas are decoded from their packed wire streams on g's
device, every tensor of a batch of deltas at once, through quant.dequantize's own arithmetic
(`decode_levels`).
Measured on the quick preset of `bench convergence`
(4 replicas, 64 rounds, every ordered pair of replicas, 2026-12-05; docs/trust.md):

| delta                                                   | agreement (min … max, median) |
|---------------------------------------------------------|-------------------------------|
| another replica's, honest                               | 0.295 … 0.927, 0.548          |
| the same, negated                                       | −0.927 … −0.295               |
| its support and magnitudes with random signs (noise)    | −0.118 … 0.090                |
| noise plus a tenth of the honest delta                  | −0.066 … 0.146                |
| the honest delta of 5 rounds before (a replay)          | 0.011 … 0.487, 0.053          |

A delta fails below `[diloco.robust] check_agreement` (0.15): twice below the least honest
agreement seen, above noise. What no check of this kind catches: a copy of another peer's
delta of the same round (it agrees as well as the original); such a copy is clipped to the
established median and, from a newcomer, pooled (optim/screen.py), and it earns its sender
weight without work: docs/trust.md says what that leaves open.

A check is a local measurement in floating point: two peers may judge one delta a little
differently. So a verdict acts only through the consensus: the failed checks travel in the
checker's next delta (protocol/delta.py `checks`), every peer aggregating that round reads
the same checks, and the screening weighs them by the ledger every such peer holds.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from locoswarm.kernels.bitpack import packed_nbytes
from locoswarm.kernels.layout import ChunkLayout
from locoswarm.kernels.quant import decode_levels
from locoswarm.kernels.topk import chunk_ids
from locoswarm.protocol import DecodedDelta

SCALE = 1000
"""Agreements travel as integers, in thousandths."""
LIMIT = 4 * SCALE
"""Agreements are clamped to ±4 (an honest one lies below 1)."""
MIN_SHARE = 4
"""Neither side of a check may have trained less than 1/MIN_SHARE of a round's plan: a
delta of a step or two is a noisy direction, and its weight in the round is small anyway."""


@dataclass(frozen=True, slots=True)
class Check:
    sender: str
    agreement: int
    """cos(D, g) / cos(D_own, g), in thousandths, clamped to ±LIMIT."""


MAX_ENTRIES = 1 << 23
"""Entries (deltas × their selected entries) a check decodes at once: a handful of (n, E)
intermediates of 4–8 bytes each, ~64 MB apiece at this bound, whatever the model's size."""


class _Layout:
    """Where every selected entry of a delta of this run lies on the wire and lands in the
    model, for all its tensors at once (the layouts are the spec's, the same for every delta):
    a check decodes a batch of deltas straight from their packed streams in a handful of
    operations on the device, not a handful per tensor and delta on the host."""

    def __init__(self, shapes: tuple[tuple[ChunkLayout, int], ...], device: torch.device) -> None:
        """`shapes`: each tensor's (layout, bits)."""
        chunks, positions, bits, code_at, index_at, index_bits = [], [], [], [], [], []
        chunk_at, numel_at, code_bytes, index_bytes = 0, 0, 0, 0
        starts: dict[str, list[int]] = {"packed_codes": [], "packed_indices": [], "scales": []}
        for lay, b in shapes:
            starts["packed_codes"].append(code_bytes)
            starts["packed_indices"].append(index_bytes)
            starts["scales"].append(4 * 2 * chunk_at)  # float32 (lo, hi) pairs
            ids = chunk_ids(lay, device)
            chunks.append(ids + chunk_at)
            positions.append(ids * lay.chunk + numel_at)
            n = lay.num_selected
            entry = torch.arange(n, dtype=torch.int64, device=device)
            bits.append(torch.full((n,), b, dtype=torch.int32, device=device))
            code_at.append(8 * code_bytes + b * entry)
            index_at.append(8 * index_bytes + lay.index_bits * entry)
            index_bits.append(torch.full((n,), lay.index_bits, dtype=torch.int64, device=device))
            chunk_at += lay.num_chunks
            numel_at += lay.numel
            code_bytes += packed_nbytes(n, b)
            index_bytes += packed_nbytes(n, lay.index_bits)
        self.chunk = torch.cat(chunks)
        """(entries,) the chunk of each selected entry, counted over all tensors."""
        self.base = torch.cat(positions)
        """(entries,) the flat position of each entry's chunk start, over all tensors."""
        self.bits = torch.cat(bits)
        """(entries,) each entry's bits."""
        self.pieces = {"packed_codes": (starts["packed_codes"], code_bytes),
                       "packed_indices": (starts["packed_indices"], index_bytes),
                       "scales": (starts["scales"], 2 * chunk_at)}
        """Each field a check reads: (each tensor's byte offset in the delta's joined payload,
        the payload's elements)."""
        self.codes = _Stream(torch.cat(code_at), self.bits)
        self.indices = _Stream(torch.cat(index_at), torch.cat(index_bits))
        self.device = device

    @property
    def entries(self) -> int:
        return self.chunk.numel()

    def values(self, deltas: list[DecodedDelta]) -> tuple[Tensor, Tensor]:
        """(the decoded values, their flat positions) of `deltas`, each (len(deltas), entries):
        their packed codes, indices and scales moved to the device in one copy each, and
        quant.dequantize's arithmetic on every tensor of every delta at once."""
        host = {field: _stacked(deltas, field, *self.pieces[field], self.device) for field in self.pieces}
        codes = self.codes.read(host["packed_codes"], self.device)
        indices = self.indices.read(host["packed_indices"], self.device)
        scales = host["scales"].to(self.device, non_blocking=True).view(len(deltas), -1, 2)
        lo, hi = scales[:, self.chunk, 0], scales[:, self.chunk, 1]
        return decode_levels(codes, lo, hi, self.bits), self.base + indices


def _stacked(deltas: list[DecodedDelta], field: str, offsets: list[int], total: int, device: torch.device) -> Tensor:
    """(len(deltas), total) on the host, pinned for a CUDA `device`: each delta's tensors'
    `field` end to end in the spec's order (`offsets`: where each tensor's begins, in bytes)."""
    rows = [joined([getattr(t, field) for t in d.tensors], offsets, total) for d in deltas]
    out = torch.empty((len(rows), total), dtype=rows[0].dtype, pin_memory=device.type == "cuda")
    return torch.stack(rows, out=out)


def joined(pieces: list[Tensor], offsets: list[int], total: int) -> Tensor:
    """`pieces` end to end, flat (`total` elements): without a copy where they already lie so
    in one buffer, each at its byte offset of `offsets` from the first (a decoded delta's
    payloads do: protocol/delta.py), else concatenated."""
    first = pieces[0]
    at, storage = first.data_ptr(), first.untyped_storage()
    # Within the first piece's buffer (torch.Tensor.set_ does not check it): pieces merely
    # allocated side by side are copied.
    inside = (first.storage_offset() + total) * first.element_size() <= storage.nbytes()
    if inside and [p.data_ptr() - at for p in pieces] == offsets:
        return first.new_empty(0).set_(storage, first.storage_offset(), (total,))
    return torch.cat([p.reshape(-1) for p in pieces])


class _Stream:
    """Entries of several tensors' packed bit streams, laid end to end (kernels/bitpack.py's
    layout: entry i of width w is stream bits [at, at + w), least significant first)."""

    def __init__(self, at: Tensor, width: Tensor) -> None:
        self.window = (7 + int(width.max()) + 7) // 8
        """Bytes that hold any one entry, wherever it starts in its first byte."""
        self.word = torch.int32 if self.window <= 3 else torch.int64
        """The entries' integer type: int32 while a window fits in it (codes of 2 bits and
        indices of up to 17 do), half the device memory and time of int64."""
        byte = at >> 3
        self.bytes = [byte + j for j in range(self.window)]
        """Each window byte's position, for every entry (kept: rebuilt, they cost a pass each)."""
        self.shift = (at & 7).to(self.word)
        self.mask = ((1 << width) - 1).to(self.word)

    def read(self, packed: Tensor, device: torch.device) -> Tensor:
        """(n, entries) of `self.word`: the entries of n streams, `packed` (n, nbytes) uint8 on
        the host."""
        packed = torch.nn.functional.pad(packed.to(device, non_blocking=True), (0, self.window))
        word = packed[:, self.bytes[0]].to(self.word)  # the last entry's window stays inside the padding
        for j in range(1, self.window):
            word |= packed[:, self.bytes[j]].to(self.word) << (8 * j)
        return (word >> self.shift) & self.mask


@functools.lru_cache(maxsize=4)
def _layout(shapes: tuple[tuple[ChunkLayout, int], ...], device: torch.device) -> _Layout:
    """The run's _Layout, built once: its ~10 small operations per tensor cost more than a
    round's checks on a GPU (4.6 ms for the 124M model's 74 tensors on an H100)."""
    return _Layout(shapes, device)


def _dots_and_norms(deltas: list[DecodedDelta], g: Tensor, layout: _Layout) -> list[tuple[float, float]]:
    """(D·g, ‖D‖) of each delta D over its support (g, flat over all tensors, gathered at the
    positions D sent), in batches of at most MAX_ENTRIES entries; one wait for the device."""
    per_batch = max(1, MAX_ENTRIES // max(1, layout.entries))
    dots, norms = [], []
    for i in range(0, len(deltas), per_batch):
        values, positions = layout.values(deltas[i:i + per_batch])
        dots.append((values * g[positions]).sum(dim=1))
        norms.append((values * values).sum(dim=1).sqrt())
    return list(zip(torch.cat(dots).tolist(), torch.cat(norms).tolist()))


@torch.no_grad()
def check_round(outer: list[Tensor], replica: list[Tensor], own: DecodedDelta, deltas: list[DecodedDelta],
                *, plan_tokens: int) -> list[Check]:
    """The agreement of each of `deltas` (other senders', of the round `own` was sent in) with
    this peer's pseudo-gradient outer − replica; empty when this peer's own round is no
    measure (fewer than plan_tokens / MIN_SHARE tokens, or its delta does not agree with its
    own pseudo-gradient). Deltas claiming fewer tokens than that, or all zero, go unchecked."""
    least = max(1, plan_tokens // MIN_SHARE)
    if own.num_tokens < least:
        return []
    g = torch.cat([(o - r.to(o.device, o.dtype)).reshape(-1) for o, r in zip(outer, replica)])
    layout = _layout(tuple((t.layout, t.bits) for t in own.tensors), g.device)
    checked = sorted((d for d in deltas if d.sender != own.sender and d.num_tokens >= least), key=lambda d: d.sender)
    (own_dot, own_norm), *measured = _dots_and_norms([own] + checked, g, layout)
    if not own_dot > 0 or not own_norm > 0:
        return []
    out = []
    for d, (dot, norm) in zip(checked, measured):
        ratio = dot * own_norm / (norm * own_dot) if norm > 0 else math.nan
        if not math.isfinite(ratio):
            continue
        out.append(Check(d.sender, max(-LIMIT, min(LIMIT, round(SCALE * ratio)))))
    return out


def failing(checks: list[Check], threshold: float) -> list[Check]:
    """The checks below `threshold` (a fraction, e.g. 0.15): what a peer tells the swarm."""
    limit = threshold_milli(threshold)
    return [c for c in checks if c.agreement < limit]


def threshold_milli(threshold: float) -> int:
    """The threshold as the receivers compare it with the integers a delta carries."""
    return round(threshold * SCALE)
