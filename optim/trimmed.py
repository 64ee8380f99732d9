"""Coordinate-wise trimmed mean of a round's deltas, after Yin et al. 2018,
"Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates"
(arXiv:1803.01498): at every coordinate the values of the peers taking part there are
sorted, the ⌊β·n⌋ lowest and the ⌊β·n⌋ highest are dropped, and the rest are averaged,
weighted by tokens.

Which peers take part at a coordinate follows the aggregation rule. "masked": the peers
that sent it (a sparse delta says nothing about a coordinate it did not send), so a
coordinate sent by n peers loses ⌊β·n⌋ values at each end, and one sent by fewer than 1/β
peers keeps them all. Trimming then acts where deltas overlap (peers training one model
pick many of the same large coordinates), not where a peer sent a coordinate alone: there
the norm clip of screen.py is what bounds it. "mean": every peer at every coordinate, an
unsent one counting as its 0.

Runs after screening (its clipped scales and capped token counts are the input). With β = 0
it is the plain rule of aggregate.py, which the daemon then calls instead, so the default
stays bit for bit what it was.

Deterministic: peers in ascending sender order, a stable sort (equal values keep that
order), and the kept values summed one sorted position at a time, no atomics and no
reduction whose order depends on threads: every peer holding the same deltas gets the same
bits on the same device type. Memory: one dense fp32 copy per peer of a parameter at a time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from locoswarm.kernels import scatter_chunks
from locoswarm.optim.compress import densify
from locoswarm.protocol import DecodedDelta


def trimmed_mean(deltas: list[DecodedDelta], shapes: list[tuple[int, ...]], device: torch.device | str, *,
                 trim: float, masked: bool) -> list[Tensor]:
    """Token-weighted coordinate-wise trimmed mean, one dense fp32 tensor per parameter; a
    coordinate no peer sent (rule masked) stays 0. Raises ValueError for a trim outside
    [0, 0.5), a repeated sender, or nothing to average (no delta or no tokens)."""
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim must lie in [0, 0.5), got {trim}")
    ordered = sorted(deltas, key=lambda d: d.sender)
    senders = [d.sender for d in ordered]
    if len(set(senders)) != len(senders):
        raise ValueError("a sender appears twice among the deltas to aggregate")
    if not ordered or sum(d.num_tokens for d in ordered) <= 0:
        raise ValueError("no pseudo-gradient with a positive token count to aggregate")
    num_peers = len(ordered)
    weights = torch.tensor([float(d.num_tokens) for d in ordered], dtype=torch.float32, device=device)
    out = []
    for i, shape in enumerate(shapes):
        lay = ordered[0].tensors[i].layout
        values = torch.zeros((num_peers, lay.numel), dtype=torch.float32, device=device)  # (P, numel)
        for p, d in enumerate(ordered):
            densify(d.tensors[i], out=values[p])
        if masked:
            sent = torch.zeros((num_peers, lay.numel), dtype=torch.float32, device=device)  # (P, numel)
            for p, d in enumerate(ordered):
                t = d.tensors[i]
                scatter_chunks(t.indices.to(device), torch.ones(lay.num_selected, device=device), lay, out=sent[p])
            present = sent > 0
            count = present.sum(0)  # (numel,) peers taking part at each coordinate
            # Absent values sort after every present one, so positions < count are the present ones.
            keys = torch.where(present, values, torch.full_like(values, float("inf")))
        else:
            count = torch.full((lay.numel,), num_peers, dtype=torch.int64, device=device)
            keys = values
        sorted_values, order = torch.sort(keys, dim=0, stable=True)  # (P, numel) each
        cut = torch.floor(count.double() * trim).long()  # (numel,) dropped at each end
        acc = torch.zeros(lay.numel, dtype=torch.float32, device=device)
        total = torch.zeros(lay.numel, dtype=torch.float32, device=device)
        zero = torch.zeros((), dtype=torch.float32, device=device)
        for j in range(num_peers):
            keep = (j >= cut) & (j < count - cut)
            w = torch.where(keep, weights[order[j]], zero)
            acc += torch.where(keep, sorted_values[j], zero) * w
            total += w
        safe = torch.where(total > 0, total, torch.ones_like(total))  # nobody kept: 0 there, not 0/0
        out.append(torch.where(total > 0, acc / safe, zero).view(shape))
    return out
