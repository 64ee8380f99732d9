"""Token-weighted averaging of received pseudo-gradients.

Deterministic by construction: contributions are summed in ascending sender order, each
decoded to a dense buffer with a non-accumulating scatter of unique positions, so every
peer that holds the same set of deltas computes the same bits on the same device type (no
atomics, no scatter_reduce; DeMo's reference notes that its scatter_reduce decode lets
replicas drift).
"""

from __future__ import annotations

import torch
from torch import Tensor

from locoswarm.protocol import DecodedDelta
from locoswarm.optim.compress import densify


def aggregate(deltas: list[DecodedDelta], shapes: list[tuple[int, ...]], device: torch.device | str) -> list[Tensor]:
    """Average of the decoded deltas weighted by their token counts, one dense fp32 tensor
    per parameter. Raises ValueError when nothing can be averaged (no delta or no tokens):
    the caller then skips the outer step rather than applying a zero."""
    ordered = sorted(deltas, key=lambda d: d.sender)
    total = sum(d.num_tokens for d in ordered)
    if not ordered or total <= 0:
        raise ValueError("no pseudo-gradient with a positive token count to aggregate")
    out = []
    for i, shape in enumerate(shapes):
        numel = ordered[0].tensors[i].layout.numel
        acc = torch.zeros(numel, dtype=torch.float32, device=device)
        scratch = torch.empty_like(acc)
        for d in ordered:
            scratch.zero_()
            acc.add_(densify(d.tensors[i], out=scratch, scale=d.num_tokens / total))
        out.append(acc.view(shape))
    return out


def average_dense(deltas: list[tuple[str, int, list[Tensor]]]) -> list[Tensor]:
    """Token-weighted average of uncompressed deltas given as (sender, tokens, tensors),
    summed in ascending sender order."""
    ordered = sorted(deltas, key=lambda d: d[0])
    total = sum(t for _, t, _ in ordered)
    if not ordered or total <= 0:
        raise ValueError("no pseudo-gradient with a positive token count to aggregate")
    out = [torch.zeros_like(t, dtype=torch.float32) for t in ordered[0][2]]
    for _, tokens, tensors in ordered:
        for acc, t in zip(out, tensors):
            acc.add_(t.float(), alpha=tokens / total)
    return out
