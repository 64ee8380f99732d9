"""The fused Triton kernels (kernels/fused.py) against the plain-torch references on fresh
random inputs (never zeros; ties made on purpose): the selected indices, codes and scales,
the packed wire bytes, the updated residual, and the decode-and-accumulate of several
peers, bit for bit; repeated runs give the same bits. They run on CUDA and, for these
small sizes, under Triton's CPU interpreter (TRITON_INTERPRET=1); elsewhere they skip."""

from __future__ import annotations

import os

import pytest
import torch

from locoswarm.kernels import ChunkLayout, chunked_topk, dequantize, pack_bits, quantize, scatter_chunks
from locoswarm.kernels import fused

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(fused.triton is None or not (torch.cuda.is_available() or INTERPRET),
                                reason="needs Triton and a CUDA device (or TRITON_INTERPRET=1 for the CPU interpreter)")


def _input(numel: int, seed: int, ties: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=gen) * torch.rand(numel, generator=gen).add_(0.1)
    if ties:  # few distinct magnitudes: many equal entries compete for the last slots
        x = torch.round(x * 4) / 4 + 0.25 * torch.sign(x)
    return x.to(DEVICE)


def _reference(b: torch.Tensor, lay: ChunkLayout, bits: int):
    idx, vals = chunked_topk(b, lay)
    codes, scales = quantize(vals, lay, bits)
    t = scatter_chunks(idx, dequantize(codes, scales, lay, bits), lay)
    return idx, codes, scales, b - t


CASES = [(1, 1024, 0.01), (7, 1024, 0.3), (300, 256, 0.05), (4096, 4096, 0.0156), (4097, 4096, 0.0156),
         (10_000, 1024, 0.02), (3000, 512, 0.5)]


@pytest.mark.parametrize("numel, chunk, density", CASES)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("ties", [False, True])
def test_fused_compression_equals_the_reference_bit_for_bit(numel, chunk, density, bits, ties):
    lay = ChunkLayout.for_tensor(numel, chunk, density)
    d = _input(numel, numel * 31 + bits, ties)
    err = torch.zeros(numel, device=DEVICE)
    idx, codes, scales = fused.compress(err, d, lay, bits, mode="model")
    r_idx, r_codes, r_scales, r_err = _reference(d.clone(), lay, bits)
    assert torch.equal(idx.long(), r_idx)
    assert torch.equal(codes.long(), r_codes)
    assert torch.equal(scales, r_scales)
    assert torch.equal(err, r_err)
    assert torch.equal(fused.pack_bits(idx, lay.index_bits), pack_bits(r_idx, lay.index_bits))
    assert torch.equal(fused.pack_bits(codes, bits), pack_bits(r_codes, bits))


@pytest.mark.parametrize("decay", [1.0, 0.95])
def test_the_residual_kept_aside_is_added_first(decay):
    lay = ChunkLayout.for_tensor(5000, 1024, 0.03)
    e0, d = _input(5000, 1, False) * 0.1, _input(5000, 2, False)
    err = e0.clone()
    idx, codes, scales = fused.compress(err, d, lay, 4, mode="buffer", decay=decay)
    b = e0 * decay + d if decay != 1.0 else e0 + d
    r_idx, r_codes, r_scales, r_err = _reference(b, lay, 4)
    if decay == 1.0:
        assert torch.equal(idx.long(), r_idx) and torch.equal(codes.long(), r_codes) and torch.equal(err, r_err)
    else:  # b = β·e + Δ may differ in its last bit (no fused-multiply-add-free form in one pass)
        torch.testing.assert_close(err, r_err, rtol=0, atol=1e-6)


def test_fused_compression_is_repeatable():
    lay = ChunkLayout.for_tensor(9000, 1024, 0.05)
    d = _input(9000, 5, True)
    outs = []
    for _ in range(3):
        err = torch.zeros(9000, device=DEVICE)
        outs.append((*fused.compress(err, d, lay, 2), err))
    assert all(torch.equal(a, b) for o in outs[1:] for a, b in zip(outs[0], o))


def test_non_finite_input_is_the_callers_to_refuse_and_stays_contained():
    """The compressor (optim/compress.py) refuses non-finite deltas before calling; if one
    reaches the kernel anyway, NaN lands in that chunk's outputs only."""
    lay = ChunkLayout.for_tensor(2048, 1024, 0.05)
    d = _input(2048, 9, False)
    d[1500] = float("nan")
    err = torch.zeros(2048, device=DEVICE)
    idx, codes, scales = fused.compress(err, d, lay, 4)
    r_idx, r_codes, r_scales, _ = _reference(d[:1024].clone(), ChunkLayout.for_tensor(1024, 1024, 0.05), 4)
    assert torch.equal(idx[: lay.k].long(), r_idx) and torch.equal(scales[0], r_scales[0])


@pytest.mark.parametrize("numel, chunk, density, bits", [(5000, 1024, 0.03, 4), (4097, 4096, 0.0156, 2),
                                                         (300, 256, 0.1, 8)])
def test_fused_decode_and_accumulate_equals_the_reference_loop(numel, chunk, density, bits):
    lay = ChunkLayout.for_tensor(numel, chunk, density)
    peers, shares = [], [0.5, 0.3, 0.2, 0.125]
    for p in range(len(shares)):
        err = torch.zeros(numel, device=DEVICE)
        peers.append(fused.compress(err, _input(numel, 100 + p, p == 2), lay, bits))
    acc = torch.zeros(numel, device=DEVICE)
    cover = torch.zeros(numel, device=DEVICE)
    fused.accumulate(acc, peers, shares, lay, bits, cover=cover)
    ref = torch.zeros(numel, device=DEVICE)
    ref_cover = torch.zeros(numel, device=DEVICE)
    for (idx, codes, scales), share in zip(peers, shares):
        values = dequantize(codes.long(), scales, lay, bits) * share
        ref.add_(scatter_chunks(idx.long(), values, lay, out=torch.zeros(numel, device=DEVICE)))
        marks = torch.full((lay.num_selected,), share, device=DEVICE)
        ref_cover.add_(scatter_chunks(idx.long(), marks, lay, out=torch.zeros(numel, device=DEVICE)))
    assert torch.equal(acc, ref) and torch.equal(cover, ref_cover)
    again = fused.accumulate(torch.zeros(numel, device=DEVICE), peers, shares, lay, bits)
    assert torch.equal(again, acc)
