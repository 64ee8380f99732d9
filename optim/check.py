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
agreement seen, above noise. A copy of another peer's delta of the same round agrees as well as
the original, so a newcomer's delta is held to a second measure, its novelty: the agreement of
what is left of it once the checker's own delta and the established senders' deltas of the
round are taken out (least squares). A copy, with noise or mixed from several, has nothing of
its own left; an honest newcomer keeps what its data taught it. An established peer's copy, or
a copy of a delta the checker does not hold, still passes: docs/trust.md says what that leaves
open.

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


NOVELTY_WEIGHT = 1.5
"""A newcomer's novelty counts 1.5 times against the threshold (fails below 0.1 at the default
0.15): an honest delta's novelty falls as the span grows, to 0.09 … 0.39 (median 0.25) with 15
other deltas in it, and none that most of its checkers found below 0.1; copies, with noise or
mixed, are below 0.1 for most checkers every time (bench/lazy_sybil.py --copies, docs/trust.md)."""

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
                *, plan_tokens: int, established: frozenset[str] = frozenset()) -> list[Check]:
    """The agreement of each of `deltas` (other senders', of the round `own` was sent in) with
    this peer's pseudo-gradient outer − replica; empty when this peer's own round is no
    measure (fewer than plan_tokens / MIN_SHARE tokens, or its delta does not agree with its
    own pseudo-gradient). Deltas claiming fewer tokens than that, or all zero, go unchecked.
    A delta of a sender not in `established` (the ledger's established peers) is measured
    by the lower of its agreement and NOVELTY_WEIGHT times its novelty (`_novelty`): what it
    adds to this peer's own delta and the established senders' deltas of the round."""
    least = max(1, plan_tokens // MIN_SHARE)
    if own.num_tokens < least:
        return []
    g = torch.cat([(o - r.to(o.device, o.dtype)).reshape(-1) for o, r in zip(outer, replica)])
    layout = _layout(tuple((t.layout, t.bits) for t in own.tensors), g.device)
    checked = sorted((d for d in deltas if d.sender != own.sender and d.num_tokens >= least), key=lambda d: d.sender)
    measured = _dots_and_norms([own] + checked, g, layout)
    own_dot, own_norm = measured[0]
    if not own_dot > 0 or not own_norm > 0:
        return []
    novel = _novelty([own] + checked, measured, established, layout) if established else {}
    out = []
    for d, (dot, norm) in zip(checked, measured[1:]):
        ratio = dot * own_norm / (norm * own_dot) if norm > 0 else math.nan
        if not math.isfinite(ratio):
            continue
        if d.sender in novel:
            ratio = min(ratio, NOVELTY_WEIGHT * novel[d.sender])
        out.append(Check(d.sender, max(-LIMIT, min(LIMIT, round(SCALE * ratio)))))
    return out


def _novelty(deltas: list[DecodedDelta], measured: list[tuple[float, float]], established: frozenset[str],
             layout: _Layout) -> dict[str, float]:
    """Of each delta of `deltas[1:]` whose sender is not established, the part r that the
    span S of this peer's own delta `deltas[0]` and the established senders' deltas does not
    already hold (D's least-squares residual against S), measured as the check measures D:
    (r·g / ‖r‖) / (D_own·g / ‖D_own‖). A copy of a delta in S, with noise or mixed with others,
    has only its noise left, which agrees with nothing: a copy earns no weight from peers that
    hold its source. An honest newcomer's delta keeps what its own data taught it (on the quick
    preset, with 15 other deltas in S, above the least honest agreement: docs/trust.md).
    `measured`: each delta's (D·g, ‖D‖) over its support. From S's Gram matrix and its dot
    products with the new deltas over their common positions (a delta's positions strictly
    increase: protocol/delta.py), summed and solved in float64; S's entries stay on the device
    while it runs."""
    span = [0] + [i for i in range(1, len(deltas)) if deltas[i].sender in established]
    fresh = [i for i in range(1, len(deltas)) if deltas[i].sender not in established]
    if not fresh:
        return {}
    s_values, s_positions = layout.values([deltas[i] for i in span])
    per_batch = max(1, MAX_ENTRIES // max(1, layout.entries))
    gram = _common_dots(s_values, s_positions, s_values, s_positions)
    cross, squares = [], []
    for at in range(0, len(fresh), per_batch):
        values, positions = layout.values([deltas[i] for i in fresh[at:at + per_batch]])
        cross.append(_common_dots(s_values, s_positions, values, positions))
        squares.append(values.double().square().sum(dim=1).cpu())
    cross, squares = torch.cat(cross, dim=1), torch.cat(squares)
    span_dots = torch.tensor([measured[i][0] for i in span], dtype=torch.float64)
    coef = torch.linalg.lstsq(gram, cross).solution
    own_rate = measured[0][0] / measured[0][1]
    out = {}
    for j, i in enumerate(fresh):
        square = float(squares[j])
        left = square - float(cross[:, j] @ coef[:, j])
        if not left > 1e-9 * square:
            out[deltas[i].sender] = 0.0  # nothing of its own
            continue
        out[deltas[i].sender] = (measured[i][0] - float(span_dots @ coef[:, j])) / math.sqrt(left) / own_rate
    return out


def _common_dots(a_values: Tensor, a_positions: Tensor, b_values: Tensor, b_positions: Tensor) -> Tensor:
    """(len(a), len(b)) float64 on the host: the dot products of the sparse vectors a (their
    values at strictly increasing positions, one row each) with those of b, over the positions
    they share (float32 products, float64 sums)."""
    out = torch.empty(a_values.shape[0], b_values.shape[0], dtype=torch.float64, device=a_values.device)
    last = a_positions.shape[1] - 1
    for k in range(a_values.shape[0]):
        at = torch.searchsorted(a_positions[k], b_positions).clamp_(max=last)
        hit = a_positions[k][at] == b_positions
        out[k] = (a_values[k][at] * b_values).where(hit, 0).double().sum(dim=1)
    return out.cpu()


def failing(checks: list[Check], threshold: float) -> list[Check]:
    """The checks below `threshold` (a fraction, e.g. 0.15): what a peer tells the swarm."""
    limit = threshold_milli(threshold)
    return [c for c in checks if c.agreement < limit]


def threshold_milli(threshold: float) -> int:
    """The threshold as the receivers compare it with the integers a delta carries."""
    return round(threshold * SCALE)
