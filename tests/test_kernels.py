"""Unit tests of locoswarm.kernels: bit packing, chunked top-k, quantization, scatter."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from locoswarm.kernels import (
    ChunkLayout,
    chunked_topk,
    dequantize,
    pack_bits,
    packed_nbytes,
    quantize,
    scatter_chunks,
    unpack_bits,
)

F32_EPS = torch.finfo(torch.float32).eps
BF16_UNIT_ROUNDOFF = 2.0**-8  # bf16 keeps 8 significant bits: round-to-nearest errs by at most 2^-8 relative


def _random_codes(count: int, width: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 1 << width, (count,), generator=gen, dtype=torch.int64)


# --------------------------------------------------------------------------- bit packing


@pytest.mark.parametrize("width", range(1, 17))
@pytest.mark.parametrize("count", [0, 1, 7, 1000])
def test_unpack_bits_inverts_pack_bits_with_exact_packed_length(width: int, count: int, gen: torch.Generator) -> None:
    values = _random_codes(count, width, gen)
    packed = pack_bits(values, width)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(count, width) == -(-count * width // 8)
    out = unpack_bits(packed, width, count)
    assert out.dtype == torch.int64
    assert torch.equal(out, values)


def test_pack_bits_of_zero_values_is_empty() -> None:
    packed = pack_bits(torch.empty(0, dtype=torch.int64), 5)
    assert packed.numel() == 0
    assert unpack_bits(packed, 5, 0).numel() == 0


def test_pack_bits_follows_the_documented_little_endian_bit_order() -> None:
    # bit j of value i is stream bit i*width + j; stream bit s is bit s%8 of byte s//8
    assert pack_bits(torch.tensor([1, 0, 1]), 1).tolist() == [0b101]
    assert pack_bits(torch.tensor([0x3, 0xA]), 4).tolist() == [0xA3]
    assert pack_bits(torch.tensor([0b101, 0b011, 0b110]), 3).tolist() == [0b10011101, 0b1]
    assert pack_bits(torch.tensor([0x1234]), 16).tolist() == [0x34, 0x12]


@pytest.mark.parametrize("width", [1, 3, 8, 13, 16])
@pytest.mark.parametrize("delta", [-1, 1])
def test_unpack_bits_rejects_a_buffer_of_the_wrong_length(width: int, delta: int, gen: torch.Generator) -> None:
    count = 37
    packed = pack_bits(_random_codes(count, width, gen), width)
    if delta < 0:
        wrong = packed[:-1]
    else:
        wrong = torch.cat([packed, packed.new_zeros(1)])
    with pytest.raises(ValueError, match="bytes"):
        unpack_bits(wrong, width, count)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=1, max_value=32).flatmap(
        lambda w: st.tuples(st.just(w), st.lists(st.integers(min_value=0, max_value=(1 << w) - 1), max_size=300))
    )
)
def test_pack_unpack_round_trip_holds_for_any_values_and_width(case: tuple[int, list[int]]) -> None:
    width, values = case
    t = torch.tensor(values, dtype=torch.int64)
    packed = pack_bits(t, width)
    assert packed.numel() == packed_nbytes(len(values), width)
    assert unpack_bits(packed, width, len(values)).tolist() == values


# --------------------------------------------------------------------------- chunked top-k


def _brute_force_topk(x: torch.Tensor, layout: ChunkLayout) -> list[list[int]]:
    """Per chunk, the sorted chunk-relative indices of the k largest |x|, lower index first on ties."""
    flat = x.reshape(-1).tolist()
    out = []
    for c in range(layout.num_chunks):
        part = flat[c * layout.chunk : (c + 1) * layout.chunk]
        k = layout.k if c < layout.num_chunks - 1 else layout.k_last
        ranked = sorted(range(len(part)), key=lambda i: (-abs(part[i]), i))
        out.append(sorted(ranked[:k]))
    return out


def _split_by_chunk(indices: torch.Tensor, layout: ChunkLayout) -> list[list[int]]:
    flat = indices.tolist()
    full = (layout.num_chunks - 1) * layout.k
    rows = [flat[i * layout.k : (i + 1) * layout.k] for i in range(layout.num_chunks - 1)]
    rows.append(flat[full:])
    return rows


TOPK_NUMELS = [1, 5, 64, 4095, 4096, 4097, 10000]
TOPK_CHUNKS = [64, 4096]
TOPK_DENSITIES = [0.02, 0.3, 1.0]


@pytest.mark.parametrize("numel", TOPK_NUMELS)
@pytest.mark.parametrize("chunk", TOPK_CHUNKS)
@pytest.mark.parametrize("density", TOPK_DENSITIES)
def test_chunked_topk_keeps_the_per_chunk_largest_magnitudes_in_ascending_order(
    numel: int, chunk: int, density: float, gen: torch.Generator
) -> None:
    layout = ChunkLayout.for_tensor(numel, chunk, density)
    x = torch.randn(numel, generator=gen)
    idx, vals = chunked_topk(x, layout)

    assert idx.dtype == torch.int64
    assert idx.numel() == vals.numel() == layout.num_selected
    rows = _split_by_chunk(idx, layout)
    for row in rows:
        assert all(a < b for a, b in zip(row, row[1:])), "indices must be strictly increasing within a chunk"
        assert all(0 <= i < layout.chunk for i in row)
    assert all(i < layout.last_len for i in rows[-1])
    assert len(rows[-1]) == layout.k_last

    positions = torch.tensor(
        [c * layout.chunk + i for c, row in enumerate(rows) for i in row], dtype=torch.int64
    )
    assert torch.equal(vals, x[positions])
    assert rows == _brute_force_topk(x, layout)


@pytest.mark.parametrize("numel, chunk, density", [(64, 64, 0.25), (300, 64, 0.1), (1000, 256, 0.05), (5, 64, 0.5)])
def test_chunked_topk_breaks_magnitude_ties_by_lower_index(
    numel: int, chunk: int, density: float, gen: torch.Generator
) -> None:
    layout = ChunkLayout.for_tensor(numel, chunk, density)
    # Three magnitudes with random signs: most kept entries tie with unkept ones.
    mags = torch.randint(1, 4, (numel,), generator=gen).float()
    signs = torch.randint(0, 2, (numel,), generator=gen).float() * 2 - 1
    x = mags * signs
    idx, vals = chunked_topk(x, layout)
    assert _split_by_chunk(idx, layout) == _brute_force_topk(x, layout)
    assert vals.abs().min() >= 1


def test_chunked_topk_ties_prefer_lower_indices_in_a_constant_chunk() -> None:
    layout = ChunkLayout(numel=16, chunk=8, k=3)
    x = torch.tensor([-2.0, 2.0] * 8)
    idx, _ = chunked_topk(x, layout)
    assert idx.tolist() == [0, 1, 2, 0, 1, 2]


# --------------------------------------------------------------------------- quantization

QUANT_LAYOUTS = [
    (5000, 256, 0.1),  # full chunks plus a shorter last chunk, k_last == k
    (300, 64, 0.5),  # several chunks
    (7, 256, 1.0),  # one chunk of 8 slots holding 7 entries: k_last < k
    (4097, 4096, 0.01),  # last chunk of one element
]


def _kept(numel: int, chunk: int, density: float, scale: float, gen: torch.Generator):
    layout = ChunkLayout.for_tensor(numel, chunk, density)
    x = torch.randn(numel, generator=gen) * scale
    idx, vals = chunked_topk(x, layout)
    ids = torch.arange(layout.num_chunks).repeat_interleave(layout.k)[: layout.num_selected]
    return layout, vals, ids


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("numel, chunk, density", QUANT_LAYOUTS)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 50.0])
def test_quantize_codes_in_range_scales_bf16_and_decode_keeps_sign_within_chunk_range(
    bits: int, numel: int, chunk: int, density: float, scale: float, gen: torch.Generator
) -> None:
    layout, vals, ids = _kept(numel, chunk, density, scale, gen)
    codes, scales = quantize(vals, layout, bits)

    assert codes.dtype == torch.int64 and codes.shape == (layout.num_selected,)
    assert int(codes.min()) >= 0 and int(codes.max()) < (1 << bits)
    assert scales.dtype == torch.float32 and scales.shape == (layout.num_chunks, 2)
    assert torch.equal(scales.to(torch.bfloat16).float(), scales)
    lo, hi = scales[:, 0], scales[:, 1]
    assert bool((lo >= 0).all()) and bool((hi >= lo).all())
    # the sign bit is the top bit of the code
    assert torch.equal((codes >> (bits - 1)) & 1, (vals < 0).to(torch.int64))

    dec = dequantize(codes, scales, layout, bits)
    assert dec.dtype == torch.float32 and dec.shape == vals.shape
    assert bool(torch.isfinite(dec).all())
    assert torch.equal(torch.sign(dec), torch.sign(vals))
    mag = dec.abs()
    # lo + (M-1)·((hi-lo)/(M-1)) may land one fp32 rounding above hi
    assert bool((mag >= lo[ids]).all())
    assert bool((mag <= hi[ids] * (1 + 2 * F32_EPS)).all())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_decodes_zero_to_zero_and_never_flips_a_sign(bits: int, gen: torch.Generator) -> None:
    # A kept zero makes the chunk's lo 0, so at low bit widths small entries may round to
    # level 0 and decode to 0; they must never come back with the opposite sign.
    layout = ChunkLayout(numel=64, chunk=64, k=64)
    vals = torch.randn(64, generator=gen)
    vals[::5] = 0.0
    codes, scales = quantize(vals, layout, bits)
    dec = dequantize(codes, scales, layout, bits)
    assert bool((dec[vals == 0] == 0).all())
    assert bool((torch.sign(dec) * torch.sign(vals) >= 0).all())
    assert float(scales[0, 0]) == 0.0


@pytest.mark.parametrize("numel, chunk, density", QUANT_LAYOUTS)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 50.0])
def test_quantize_8bit_error_is_bounded_by_half_a_level_plus_bf16_rounding(
    numel: int, chunk: int, density: float, scale: float, gen: torch.Generator
) -> None:
    layout, vals, ids = _kept(numel, chunk, density, scale, gen)
    codes, scales = quantize(vals, layout, 8)
    dec = dequantize(codes, scales, layout, 8)
    lo, hi = scales[:, 0][ids].double(), scales[:, 1][ids].double()
    step = (hi - lo) / 127
    # Entries inside [lo, hi] land within half a level; the chunk's extreme entries lie
    # outside it by at most the bf16 rounding of lo / hi, 2^-8 of their magnitude.
    v = vals.double()
    bound = step / 2 + BF16_UNIT_ROUNDOFF * v.abs() + 8 * F32_EPS * hi
    err = (dec.double() - v).abs()
    assert bool((err <= bound).all()), float((err - bound).max())
    # and relative to each chunk's scale that is small
    assert float((err / hi).max()) < 1 / 127


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dequantize_is_bitwise_repeatable(bits: int, gen: torch.Generator) -> None:
    layout, vals, _ = _kept(5000, 256, 0.1, 1.0, gen)
    codes, scales = quantize(vals, layout, bits)
    first = dequantize(codes, scales, layout, bits)
    second = dequantize(codes.clone(), scales.clone(), layout, bits)
    assert torch.equal(first, second)
    again_codes, again_scales = quantize(vals.clone(), layout, bits)
    assert torch.equal(again_codes, codes) and torch.equal(again_scales, scales)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_reproduces_each_chunks_extreme_magnitudes_up_to_bf16(bits: int, gen: torch.Generator) -> None:
    layout, vals, ids = _kept(5000, 256, 0.1, 1.0, gen)
    codes, scales = quantize(vals, layout, bits)
    dec = dequantize(codes, scales, layout, bits).abs()
    for c in range(layout.num_chunks):
        m = vals[ids == c].abs()
        d = dec[ids == c]
        assert float(d[m.argmax()]) == pytest.approx(float(m.max()), rel=BF16_UNIT_ROUNDOFF + 4 * F32_EPS)
        assert float(d[m.argmin()]) == pytest.approx(float(m.min()), rel=BF16_UNIT_ROUNDOFF + 4 * F32_EPS)


# --------------------------------------------------------------------------- scatter


@pytest.mark.parametrize("numel, chunk, density", [(1, 64, 0.5), (300, 64, 0.2), (7, 256, 1.0), (10000, 4096, 0.01)])
def test_scatter_chunks_writes_values_at_chunk_offsets_and_zeros_elsewhere(
    numel: int, chunk: int, density: float, gen: torch.Generator
) -> None:
    layout = ChunkLayout.for_tensor(numel, chunk, density)
    idx, _ = chunked_topk(torch.randn(numel, generator=gen), layout)
    values = torch.randn(layout.num_selected, generator=gen)
    dense = scatter_chunks(idx, values, layout)

    expected = torch.zeros(numel)
    rows = _split_by_chunk(idx, layout)
    j = 0
    for c, row in enumerate(rows):
        for i in row:
            expected[c * layout.chunk + i] = values[j]
            j += 1
    assert dense.shape == (numel,)
    assert torch.equal(dense, expected)
    assert int((dense != 0).sum()) == layout.num_selected


def test_scatter_chunks_writes_into_the_given_buffer(gen: torch.Generator) -> None:
    layout = ChunkLayout.for_tensor(1000, 256, 0.05)
    idx, _ = chunked_topk(torch.randn(1000, generator=gen), layout)
    values = torch.randn(layout.num_selected, generator=gen)
    out = torch.zeros(1000)
    result = scatter_chunks(idx, values, layout, out=out)
    assert result is out
    assert torch.equal(out, scatter_chunks(idx, values, layout))
