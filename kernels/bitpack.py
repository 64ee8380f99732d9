"""Bit packing of small unsigned integers into a little-endian bit stream.

Layout: bit j (least significant first) of value i is stream bit i·width + j, and
stream bit s is bit (s mod 8) of byte ⌊s / 8⌋. The stream is zero-padded to a whole
byte, so `count` values of `width` bits take ⌈count·width / 8⌉ bytes.
"""

from __future__ import annotations

import torch
from torch import Tensor

_BYTE_WEIGHTS = [1 << j for j in range(8)]


def packed_nbytes(count: int, width: int) -> int:
    return -(-count * width // 8)


def pack_bits(values: Tensor, width: int) -> Tensor:
    """Pack `values` (count,) integers in [0, 2**width) into (⌈count·width/8⌉,) uint8."""
    assert 1 <= width <= 32, "width must be 1..32"
    v = values.reshape(-1).to(torch.int64)
    shifts = torch.arange(width, device=v.device, dtype=torch.int64)
    bits = ((v[:, None] >> shifts) & 1).to(torch.uint8).reshape(-1)  # (count·width,)
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    weights = torch.tensor(_BYTE_WEIGHTS, device=v.device, dtype=torch.int32)
    return (bits.view(-1, 8).to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: Tensor, width: int, count: int) -> Tensor:
    """Inverse of `pack_bits`: (⌈count·width/8⌉,) uint8 → (count,) int64.

    Raises ValueError when `packed` does not hold exactly ⌈count·width/8⌉ bytes."""
    assert 1 <= width <= 32, "width must be 1..32"
    expected = packed_nbytes(count, width)
    if packed.numel() != expected:
        raise ValueError(f"packed stream holds {packed.numel()} bytes, expected {expected}")
    p = packed.reshape(-1).to(torch.int64)
    bit_shifts = torch.arange(8, device=p.device, dtype=torch.int64)
    bits = ((p[:, None] >> bit_shifts) & 1).reshape(-1)[: count * width].view(count, width)
    value_shifts = torch.arange(width, device=p.device, dtype=torch.int64)
    return (bits << value_shifts).sum(dim=1)
