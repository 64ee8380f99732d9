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

computed on D's support alone (a gather of g at the positions sent, every tensor at once:
under a millisecond a delta for the default model, one copy of the model's size while it
runs). The values decode through quant.dequantize's own arithmetic (`decode_levels`).
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


class _Layout:
    """Where every selected entry of a delta of this run lands, for all its tensors at once
    (the layouts are the spec's, the same for every delta): a check is then a handful of
    operations on the whole delta, not a handful per tensor."""

    def __init__(self, shapes: tuple[tuple[ChunkLayout, int], ...], device: torch.device) -> None:
        """`shapes`: each tensor's (layout, bits)."""
        chunks, positions, bits = [], [], []
        chunk_at, numel_at = 0, 0
        for lay, b in shapes:
            ids = chunk_ids(lay, device)
            chunks.append(ids + chunk_at)
            positions.append(ids * lay.chunk + numel_at)
            bits.append(torch.full((lay.num_selected,), b, dtype=torch.int64, device=device))
            chunk_at += lay.num_chunks
            numel_at += lay.numel
        self.chunk = torch.cat(chunks)
        """(entries,) the chunk of each selected entry, counted over all tensors."""
        self.base = torch.cat(positions)
        """(entries,) the flat position of each entry's chunk start, over all tensors."""
        self.bits = torch.cat(bits)
        """(entries,) each entry's bits."""
        self.device = device

    def values(self, d: DecodedDelta) -> tuple[Tensor, Tensor]:
        """(the decoded values, their flat positions) of delta `d`: quant.dequantize on every
        tensor at once."""
        codes = torch.cat([t.codes for t in d.tensors]).to(self.device)
        scales = torch.cat([t.scales for t in d.tensors]).to(self.device)
        indices = torch.cat([t.indices for t in d.tensors]).to(self.device)
        return decode_levels(codes, scales[self.chunk, 0], scales[self.chunk, 1], self.bits), self.base + indices


@functools.lru_cache(maxsize=4)
def _layout(shapes: tuple[tuple[ChunkLayout, int], ...], device: torch.device) -> _Layout:
    """The run's _Layout, built once: its ~6 small operations per tensor cost more than a
    delta's check on a GPU (4.6 ms for the 124M model's 74 tensors on an H100)."""
    return _Layout(shapes, device)


def _dot_and_norm(d: DecodedDelta, g: Tensor, layout: _Layout) -> tuple[float, float]:
    """(D·g, ‖D‖) over D's support: g (flat, all tensors) gathered at the positions D sent."""
    values, positions = layout.values(d)
    return float(torch.dot(values, g[positions])), float(torch.dot(values, values)) ** 0.5


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
    own_dot, own_norm = _dot_and_norm(own, g, layout)
    if not own_dot > 0 or not own_norm > 0:
        return []
    out = []
    for d in sorted(deltas, key=lambda d: d.sender):
        if d.sender == own.sender or d.num_tokens < least:
            continue
        dot, norm = _dot_and_norm(d, g, layout)
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
