"""The fused kernels (kernels/fused.py) against the plain-torch references on fresh
random inputs (never zeros; ties made on purpose): the selected indices, codes and scales,
the packed wire bytes, the updated residual, and the decode-and-accumulate of several
peers, bit for bit; repeated runs give the same bits. They run on CUDA and, for these
small sizes, under Triton's CPU interpreter (TRITON_INTERPRET=1); elsewhere they skip."""

from __future__ import annotations

import os

import pytest
import torch

from locoswarm.kernels import ChunkLayout, chunked_topk, dequantize, pack_bits, quantize, scatter_chunks, unpack_bits
from locoswarm.kernels import fused

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(fused.triton is None or not (torch.cuda.is_available() or INTERPRET),
                                reason="needs Triton and a CUDA device (or TRITON_INTERPRET=1 for the CPU interpreter)")


# The CUDA C kernels (kernels/compress.cu, accumulate.cu, shipped as PTX) and the Triton ones
# (their fallbacks, and the ones the interpreter runs).
KERNELS = ["cuda", "triton"] if torch.cuda.is_available() else ["triton"]


def _loaded(kernel: str, ptx, name: str) -> None:
    if kernel == "cuda":
        names = [name, fused._compress_entry(256, torch.device(DEVICE))] if ptx == fused.COMPRESS_PTX else [name]
        for n in names:
            assert fused._cuda_function(ptx, n, torch.device(DEVICE)) is not None, f"{ptx.name} {n} did not load"


def _input(numel: int, seed: int, ties: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=gen) * torch.rand(numel, generator=gen).add_(0.1)
    if ties:  # few distinct magnitudes: many equal entries compete for the last slots
        x = torch.round(x * 4) / 4 + 0.25 * torch.sign(x)
    return x.to(DEVICE)


def unpack(stream: torch.Tensor, width: int, lay: ChunkLayout) -> torch.Tensor:
    return unpack_bits(stream, width, lay.num_selected)


def _reference(b: torch.Tensor, lay: ChunkLayout, bits: int):
    idx, vals = chunked_topk(b, lay)
    codes, scales = quantize(vals, lay, bits)
    t = scatter_chunks(idx, dequantize(codes, scales, lay, bits), lay)
    return idx, codes, scales, b - t


# Sizes that are not multiples of the chunk, chunks where the candidates are compacted and
# chunks where they are too many (ties, high density) and the whole chunk is searched.
CASES = [(1, 1024, 0.01), (7, 1024, 0.3), (300, 256, 0.05), (4096, 4096, 0.0156), (4097, 4096, 0.0156),
         (10_000, 1024, 0.02), (3000, 512, 0.5), (20_000, 4096, 0.00366)]
if torch.cuda.is_available():  # many chunks at the bench's layout (too slow for the interpreter)
    CASES.append(((1 << 20) + 4096 * 3 + 5, 4096, 0.0156))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("numel, chunk, density", CASES)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("ties", [False, True])
def test_fused_compression_equals_the_reference_bit_for_bit(numel, chunk, density, bits, ties, kernel):
    _loaded(kernel, fused.COMPRESS_PTX, "compress_kernel")
    lay = ChunkLayout.for_tensor(numel, chunk, density)
    d = _input(numel, numel * 31 + bits, ties)
    err = torch.zeros(numel, device=DEVICE)
    sent = torch.ones(numel, dtype=torch.bool, device=DEVICE)  # poisoned: every entry must be written
    err = torch.full((numel,), float("nan"), device=DEVICE)
    idx, codes, scales = fused.compress(err, d, lay, bits, mode="model", sent=sent, kernel=kernel)
    r_idx, r_codes, r_scales, r_err = _reference(d.clone(), lay, bits)
    assert torch.equal(idx, pack_bits(r_idx, lay.index_bits))
    assert torch.equal(codes, pack_bits(r_codes, bits))
    assert torch.equal(unpack(idx, lay.index_bits, lay), r_idx) and torch.equal(unpack(codes, bits, lay), r_codes)
    assert torch.equal(scales, r_scales)
    assert torch.equal(err, r_err)
    assert torch.equal(sent, scatter_chunks(r_idx, torch.ones_like(r_idx, dtype=torch.bool), lay))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("nonzero", [0, 5, 200])
def test_a_chunk_of_mostly_zeros_keeps_its_nonzeros_then_the_lowest_indexed_zeros(nonzero, kernel):
    """An embedding row nobody trained this round: fewer non-zeros than k (or none) make the
    k-th largest 0, and the zeros that fill the chunk's slots go lowest index first."""
    lay = ChunkLayout.for_tensor(3 * 4096, 4096, 0.0156)
    d = torch.zeros(3 * 4096)
    gen = torch.Generator().manual_seed(nonzero)
    d[torch.randperm(4096, generator=gen)[:nonzero] + 4096] = torch.randn(nonzero, generator=gen)
    d[8192:] = torch.randn(4096, generator=gen)
    d = d.to(DEVICE)
    err = torch.empty(3 * 4096, device=DEVICE)
    idx, codes, scales = fused.compress(err, d, lay, 2, kernel=kernel)
    r_idx, r_codes, r_scales, r_err = _reference(d.clone(), lay, 2)
    assert torch.equal(unpack(idx, lay.index_bits, lay), r_idx) and torch.equal(unpack(codes, 2, lay), r_codes)
    assert torch.equal(scales, r_scales) and torch.equal(err, r_err)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("decay", [1.0, 0.95])
def test_the_residual_kept_aside_is_added_first(decay, kernel):
    lay = ChunkLayout.for_tensor(5000, 1024, 0.03)
    e0, d = _input(5000, 1, False) * 0.1, _input(5000, 2, False)
    err = e0.clone()
    idx, codes, scales = fused.compress(err, d, lay, 4, mode="buffer", decay=decay, kernel=kernel)
    b = e0 * decay + d if decay != 1.0 else e0 + d
    r_idx, r_codes, r_scales, r_err = _reference(b, lay, 4)
    if decay == 1.0:
        assert torch.equal(unpack(idx, lay.index_bits, lay), r_idx) and torch.equal(unpack(codes, 4, lay), r_codes)
        assert torch.equal(err, r_err)
    else:  # b = β·e + Δ may differ in its last bit (no fused-multiply-add-free form in one pass)
        torch.testing.assert_close(err, r_err, rtol=0, atol=1e-6)


def test_a_tensor_off_the_16_byte_alignment_takes_the_triton_kernel_with_the_same_bits():
    """The CUDA C kernel loads 16 bytes at a time: a view that starts one element into its
    storage is compressed by the Triton kernel, to the same outputs."""
    lay = ChunkLayout.for_tensor(8192, 4096, 0.0156)
    d = _input(8193, 3, False)[1:]
    outs = []
    for shifted in (False, True):
        err = torch.zeros(8193, device=DEVICE)[1:] if shifted else torch.zeros(8192, device=DEVICE)
        outs.append((*fused.compress(err, d.clone() if not shifted else d, lay, 4, kernel="cuda"), err))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.parametrize("kernel", KERNELS)
def test_fused_compression_is_repeatable(kernel):
    lay = ChunkLayout.for_tensor(9000, 1024, 0.05)
    d = _input(9000, 5, True)
    outs = []
    for _ in range(3):
        err = torch.zeros(9000, device=DEVICE)
        outs.append((*fused.compress(err, d, lay, 2, kernel=kernel), err))
    assert all(torch.equal(a, b) for o in outs[1:] for a, b in zip(outs[0], o))


@pytest.mark.parametrize("kernel", KERNELS)
def test_non_finite_input_is_the_callers_to_refuse_and_stays_contained(kernel):
    """The compressor (optim/compress.py) refuses non-finite deltas before calling; if one
    reaches the kernel anyway, NaN lands in that chunk's outputs only."""
    lay = ChunkLayout.for_tensor(2048, 1024, 0.05)
    d = _input(2048, 9, False)
    d[1500] = float("nan")
    err = torch.zeros(2048, device=DEVICE)
    idx, codes, scales = fused.compress(err, d, lay, 4, kernel=kernel)
    r_idx, r_codes, r_scales, _ = _reference(d[:1024].clone(), ChunkLayout.for_tensor(1024, 1024, 0.05), 4)
    assert torch.equal(unpack(idx, lay.index_bits, lay)[: lay.k], r_idx) and torch.equal(scales[0], r_scales[0])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("numel, chunk, density, bits, num_peers, same", [
    (5000, 1024, 0.03, 4, 4, False), (4097, 4096, 0.0156, 2, 11, False), (300, 256, 0.1, 8, 1, False),
    (3000, 512, 0.05, 4, 8, False), (20_000, 8192, 0.02, 4, 3, False), (9000, 4096, 0.03, 4, 6, True),
    (5000, 4096, 0.5, 4, 3, False)])
def test_fused_decode_and_accumulate_equals_the_reference_loop(numel, chunk, density, bits, num_peers, same, kernel):
    """Peers in groups of fused.ACCUMULATE_GROUP (11 peers: a full group and a partial one);
    a chunk wider than the shared kernel's window (8192); peers that all picked the same
    positions (`same`: every position's sum is a chain of additions in peer order); more
    entries a chunk (2048) than the shared kernel decodes at once."""
    _loaded(kernel, fused.ACCUMULATE_PTX, "accumulate_kernel")
    lay = ChunkLayout.for_tensor(numel, chunk, density)
    gen = torch.Generator().manual_seed(numel + num_peers)
    peers, shares = [], (torch.rand(num_peers, generator=gen) / num_peers).tolist()
    for p in range(len(shares)):
        err = torch.zeros(numel, device=DEVICE)
        delta = _input(numel, 7, False) * (1 + p / 3) if same else _input(numel, 100 + p, p % 3 == 2)
        peers.append(fused.compress(err, delta, lay, bits))
    streams = (fused.stack_streams([p[0] for p in peers]), fused.stack_streams([p[1] for p in peers]),
               torch.stack([p[2] for p in peers]))
    acc = torch.full((numel,), float("nan"), device=DEVICE)  # poisoned: the kernel overwrites every entry
    cover = torch.full((numel,), float("nan"), device=DEVICE)
    fused.accumulate(acc, *streams, shares, lay, bits, cover=cover, kernel=kernel)
    ref = torch.zeros(numel, device=DEVICE)
    ref_cover = torch.zeros(numel, device=DEVICE)
    for (packed_idx, packed_codes, scales), share in zip(peers, shares):
        idx, codes = unpack(packed_idx, lay.index_bits, lay), unpack(packed_codes, bits, lay)
        values = dequantize(codes.long(), scales, lay, bits) * share
        ref.add_(scatter_chunks(idx.long(), values, lay, out=torch.zeros(numel, device=DEVICE)))
        marks = torch.full((lay.num_selected,), share, device=DEVICE)
        ref_cover.add_(scatter_chunks(idx.long(), marks, lay, out=torch.zeros(numel, device=DEVICE)))
    assert torch.equal(acc, ref) and torch.equal(cover, ref_cover)
    again = fused.accumulate(torch.empty(numel, device=DEVICE), *streams, shares, lay, bits, kernel=kernel)
    assert torch.equal(again, acc)
