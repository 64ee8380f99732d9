"""Token-weighted averaging of received pseudo-gradients.

Deterministic by construction: contributions are summed in ascending sender order, each
decoded to a dense buffer with a non-accumulating scatter of unique positions, so every
peer that holds the same set of deltas computes the same bits on the same device type (no
atomics, no scatter_reduce; DeMo's reference notes that its scatter_reduce decode lets
replicas drift). On CUDA the fused kernel (kernels/fused.py accumulate) does the same sums
in the same order in one pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from locoswarm.kernels import fused_kernels, scatter_chunks
from locoswarm.protocol import DecodedDelta
from locoswarm.optim.compress import densify
from locoswarm.optim.trimmed import trimmed_mean


def aggregate(
    deltas: list[DecodedDelta],
    shapes: list[tuple[int, ...]],
    device: torch.device | str,
    rule: str = "mean",
    shares: list[Tensor] | None = None,
    trim: float = 0.0,
) -> list[Tensor]:
    """Token-weighted average of the decoded deltas, one dense fp32 tensor per parameter.

    rule "mean": every peer weighs in at every coordinate, an unsent entry counting as 0
    (DiLoCo's average; the unsent part arrives in later rounds through error feedback).
    rule "masked": at each coordinate, the average over the peers that sent it; a
    coordinate no peer sent stays 0. Raises ValueError when nothing can be averaged (no
    delta or no tokens): the caller then skips the outer step rather than applying a zero.
    `shares`: `coverage(deltas)` when the caller already has it (rule "masked" needs it).
    `trim` β > 0: the coordinate-wise trimmed mean of optim/trimmed.py under the same rule
    instead (β = 0 is this plain average, bit for bit)."""
    if rule not in ("mean", "masked"):
        raise ValueError(f"aggregation rule must be 'mean' or 'masked', got {rule!r}")
    if trim:
        return trimmed_mean(deltas, shapes, device, trim=trim, masked=rule == "masked")
    ordered = sorted(deltas, key=lambda d: d.sender)
    _check_unique([d.sender for d in ordered])
    total = sum(d.num_tokens for d in ordered)
    if not ordered or total <= 0:
        raise ValueError("no pseudo-gradient with a positive token count to aggregate")
    if rule == "masked" and shares is None:
        shares = coverage(ordered, device)
    out = []
    fused = fused_kernels(device)
    for i, shape in enumerate(shapes):
        lay = ordered[0].tensors[i].layout
        if fused is not None:  # one pass over the dense buffer for all peers, the same bits
            # The packed wire streams travel to the device (one copy per stream for all
            # peers), not the int64 indices: the kernel unpacks them as it reads.
            ts = [d.tensors[i] for d in ordered]
            acc = torch.empty(lay.numel, dtype=torch.float32, device=device)
            fused.accumulate(acc, fused.stack_streams([t.packed_indices for t in ts]).to(device),
                             fused.stack_streams([t.packed_codes for t in ts]).to(device),
                             torch.stack([t.scales for t in ts]).to(device), [d.num_tokens / total for d in ordered],
                             lay, ts[0].bits)
        else:
            acc = torch.zeros(lay.numel, dtype=torch.float32, device=device)
            scratch = torch.empty_like(acc)
            for d in ordered:
                scratch.zero_()
                acc.add_(densify(d.tensors[i], out=scratch, scale=d.num_tokens / total))
        if rule == "masked":
            # where nobody sent a coordinate both acc and its share are 0: divide by 1 there
            w = shares[i]
            acc = acc / torch.where(w > 0, w, torch.ones_like(w))
        out.append(acc.view(shape))
    return out


def coverage(deltas: list[DecodedDelta], device: torch.device | str) -> list[Tensor]:
    """Per parameter, a flat fp32 tensor: at each coordinate the token share of the peers
    that sent it (0 where nobody did), summed in ascending sender order."""
    ordered = sorted(deltas, key=lambda d: d.sender)
    if not ordered:
        raise ValueError("no pseudo-gradient to aggregate")
    total = sum(d.num_tokens for d in ordered)
    out = []
    for i in range(len(ordered[0].tensors)):
        lay = ordered[0].tensors[i].layout
        acc = torch.zeros(lay.numel, dtype=torch.float32, device=device)
        scratch = torch.empty_like(acc)
        for d in ordered:
            t = d.tensors[i]
            scratch.zero_()
            marks = torch.full((t.layout.num_selected,), d.num_tokens / total, device=device)
            acc.add_(scatter_chunks(t.indices.to(device), marks, t.layout, out=scratch))
        out.append(acc)
    return out


def average_dense(deltas: list[tuple[str, int, list[Tensor]]]) -> list[Tensor]:
    """Token-weighted average of uncompressed deltas given as (sender, tokens, tensors),
    summed in ascending sender order."""
    ordered = sorted(deltas, key=lambda d: d[0])
    _check_unique([d[0] for d in ordered])
    total = sum(t for _, t, _ in ordered)
    if not ordered or total <= 0:
        raise ValueError("no pseudo-gradient with a positive token count to aggregate")
    out = [torch.zeros_like(t, dtype=torch.float32) for t in ordered[0][2]]
    for _, tokens, tensors in ordered:
        for acc, t in zip(out, tensors):
            acc.add_(t.float(), alpha=tokens / total)
    return out


def _check_unique(senders: list[str]) -> None:
    # Two deltas from one sender would be summed in arrival order (not deterministic across
    # peers) and would count that sender twice: the caller must keep one per sender.
    dupes = sorted({s for s in senders if senders.count(s) > 1})
    if dupes:
        raise ValueError(f"more than one delta from sender(s) {dupes}")
