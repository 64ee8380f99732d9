"""Chunked top-k by magnitude (the sparsifier of SparseLoCo and DeMo) and its inverse.

Selection rule, which any fused version must reproduce: within each chunk the `k`
entries of largest |x| are kept; among equal magnitudes the lower index wins. Kept
indices are returned in ascending order within each chunk, chunk after chunk, so a
receiver can check that they are strictly increasing. Inputs must be finite (the
compressor checks); a NaN's rank is unspecified.
"""

from __future__ import annotations

import torch
from torch import Tensor

from locoswarm.kernels.layout import ChunkLayout


def chunked_topk(x: Tensor, layout: ChunkLayout) -> tuple[Tensor, Tensor]:
    """Select the top-k entries of each chunk of `x` (numel,).

    Returns (indices, values): indices (num_selected,) int64 within their chunk,
    values (num_selected,) in x's dtype, ordered chunk by chunk, ascending index inside.
    """
    flat = x.reshape(-1)
    assert flat.numel() == layout.numel, "tensor does not match its layout"
    m, c, k = layout.num_chunks, layout.chunk, layout.k
    mags = flat.abs()
    pad = m * c - layout.numel
    if pad:
        # Padding ranks below every real entry (|x| ≥ 0 > −1), so it is never kept
        # while a real entry remains in the chunk.
        mags = torch.cat([mags, mags.new_full((pad,), -1.0)])
    # A stable descending sort ranks ties by ascending index: the documented rule.
    order = torch.sort(mags.view(m, c), dim=1, descending=True, stable=True).indices
    kept = torch.sort(order[:, :k], dim=1).values  # (m, k), ascending within chunk
    if layout.k_last < k:
        kept_flat = torch.cat([kept[:-1].reshape(-1), kept[-1, : layout.k_last]])
    else:
        kept_flat = kept.reshape(-1)
    base = torch.arange(m, device=flat.device, dtype=torch.int64).repeat_interleave(k)
    if layout.k_last < k:
        base = base[: layout.num_selected]
    values = flat[base * c + kept_flat]
    return kept_flat, values


def chunk_ids(layout: ChunkLayout, device: torch.device | str) -> Tensor:
    """(num_selected,) int64: the chunk each selected entry belongs to."""
    ids = torch.arange(layout.num_chunks, device=device, dtype=torch.int64).repeat_interleave(layout.k)
    return ids[: layout.num_selected]


def scatter_chunks(indices: Tensor, values: Tensor, layout: ChunkLayout, out: Tensor | None = None) -> Tensor:
    """Write `values` at chunk-relative `indices` into a dense (numel,) tensor.

    Positions are unique (the sender's selection guarantees it and the protocol checks
    it), so the write is a plain index_put without accumulation: no atomics, the same
    bits on every run. `out`, when given, must be zeroed (numel,) and is returned.
    """
    pos = chunk_ids(layout, indices.device) * layout.chunk + indices
    if out is None:
        out = torch.zeros(layout.numel, dtype=values.dtype, device=values.device)
    out[pos] = values
    return out
