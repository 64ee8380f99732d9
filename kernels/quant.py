"""Sign-magnitude quantization of the kept entries with a per-chunk scale pair.

For `bits` = b, a code holds a sign bit (bit b−1, set for negative values) and a level
q ∈ [0, M) in its low b−1 bits, M = 2^(b−1). Each chunk carries (lo, hi): the smallest
and largest kept magnitude, rounded to bfloat16 (what travels). A level decodes to
lo + q·(hi − lo)/(M − 1), so the kept entry of largest and smallest magnitude in a chunk
are reproduced up to bf16 rounding and the others to the nearest of M evenly spaced
levels. Top-k keeps large magnitudes, so [lo, hi] is much narrower than [0, hi]: the
levels are spent where the values are.

Decoding is elementwise arithmetic with no reductions: the same inputs give the same
bits on every run of one device type; the sender decodes through this same function.
"""

from __future__ import annotations

import torch
from torch import Tensor

from locoswarm.kernels.layout import ChunkLayout
from locoswarm.kernels.topk import chunk_ids

SUPPORTED_BITS = (2, 4, 8)


def _per_chunk_rows(values: Tensor, layout: ChunkLayout) -> Tensor:
    """(num_chunks, k) view of the kept values; the last chunk's missing slots repeat
    its first entry so per-row min/max are unchanged."""
    m, k = layout.num_chunks, layout.k
    if layout.k_last == k:
        return values.view(m, k)
    last = values[(m - 1) * k :]
    fill = last[:1].expand(k - layout.k_last)
    return torch.cat([values, fill]).view(m, k)


def quantize(values: Tensor, layout: ChunkLayout, bits: int) -> tuple[Tensor, Tensor]:
    """Quantize the kept `values` (num_selected,) float.

    Returns (codes (num_selected,) int64 in [0, 2**bits), scales (num_chunks, 2) float32
    holding (lo, hi) per chunk, each exactly representable in bfloat16).
    """
    assert bits in SUPPORTED_BITS, f"bits must be one of {SUPPORTED_BITS}"
    levels = 1 << (bits - 1)
    v = values.float()
    mags_rows = _per_chunk_rows(v.abs(), layout)
    lo = mags_rows.amin(dim=1).to(torch.bfloat16).float()
    hi = mags_rows.amax(dim=1).to(torch.bfloat16).float()
    scales = torch.stack([lo, hi], dim=1)
    ids = chunk_ids(layout, v.device)
    lo_e, hi_e = lo[ids], hi[ids]
    step = (hi_e - lo_e) / (levels - 1)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.where(step > 0, torch.round((v.abs() - lo_e) / safe), torch.zeros_like(v))
    q = q.clamp_(0, levels - 1).to(torch.int64)
    sign = (v < 0).to(torch.int64)
    return (sign << (bits - 1)) | q, scales


def dequantize(codes: Tensor, scales: Tensor, layout: ChunkLayout, bits: int) -> Tensor:
    """Inverse of `quantize`: codes (num_selected,) int, scales (num_chunks, 2) float32
    → values (num_selected,) float32."""
    assert bits in SUPPORTED_BITS, f"bits must be one of {SUPPORTED_BITS}"
    ids = chunk_ids(layout, codes.device)
    return decode_levels(codes, scales[:, 0][ids], scales[:, 1][ids], bits)


def decode_levels(codes: Tensor, lo: Tensor, hi: Tensor, bits: int | Tensor) -> Tensor:
    """The values of `codes` given each entry's scale pair (lo, hi) and `bits` (one for all,
    or one per entry: several tensors' entries decoded at once, optim/check.py)."""
    levels = 1 << (bits - 1)
    step = (hi - lo) / (levels - 1)
    q = (codes & (levels - 1)).float()
    mag = lo + q * step
    negative = (codes >> (bits - 1)) & 1
    return torch.where(negative.bool(), -mag, mag)
