"""The CUDA C kernels (kernels/compress.cu, accumulate.cu) run on the CPU, a thread per CUDA
thread (tests/cuda_emulator.hpp), against the torch references bit for bit: the compression's
selection, tie rule, wire streams, scales, residual and sent flags, and which chunks it leaves
to the whole-chunk search; the decode-and-accumulate's sums and coverage. What CI, which has no
GPU, can check of the kernels CUDA peers run; tests/test_fused.py runs them on the GPU itself.
Skipped where g++ is missing."""

from __future__ import annotations

import ctypes
import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from locoswarm.kernels import ChunkLayout, fused, pack_bits, scatter_chunks, unpack_bits
from locoswarm.kernels.bitpack import packed_nbytes
from locoswarm.kernels.topk import chunk_ids

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("fused_cases", HERE / "test_fused.py")
fused_cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fused_cases)
CASES, _input, _reference = fused_cases.CASES, fused_cases._input, fused_cases._reference
CAPACITY = 2048  # compress.cu's CAPACITY
pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the kernel for the CPU")


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    lib = tmp_path_factory.mktemp("emulated") / "kernels.so"
    done = subprocess.run(["g++", "-std=c++20", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-pthread",
                           f"-I{HERE}", f"-I{HERE.parent / 'kernels'}", str(HERE / "cuda_emulated.cpp"), "-o", str(lib)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return ctypes.CDLL(str(lib))


def compress(lib, err, delta, lay: ChunkLayout, bits: int, mode: int = 0, decay: float = 1.0, sent=None,
             staged: bool = False):
    """What fused.compress launches on CUDA, on the CPU: (index words, code words, scales,
    flags of the chunks it listed for the whole-chunk search, each once). `staged`: the
    256-thread entry point, which Hopper runs for chunks of 4096, else the generic one."""
    shape = fused.compress_shape(lay, err, delta, sent)
    assert shape is not None, "the CUDA C kernel does not take this layout"
    assert not staged or shape[0] == 256, "the staged entry point takes only blocks of 256 threads"
    idx = torch.zeros(fused._words(lay.num_selected, lay.index_bits), dtype=torch.int32)
    codes = torch.zeros(fused._words(lay.num_selected, bits), dtype=torch.int32)
    scales = torch.full((lay.num_chunks, 2), float("nan"))
    todo = torch.full((lay.num_chunks + 1,), -1, dtype=torch.int32)  # poisoned: the count must start at 0
    todo[0] = 0
    args = fused.compress_arguments(err, delta, idx, codes, scales, sent, todo, lay, bits, mode, decay, shape[1],
                                    divide=True)
    lib.run_compress(ctypes.c_uint(staged), ctypes.c_uint(lay.num_chunks), ctypes.c_uint(shape[0]), *args)
    listed = todo[1:1 + int(todo[0])].long()
    assert int(todo[0]) <= lay.num_chunks and (listed >= 0).all() and len(set(listed.tolist())) == len(listed), todo
    full = torch.zeros(lay.num_chunks, dtype=torch.bool)
    full[listed] = True
    return idx, codes, scales, full


def expected_fallbacks(b: torch.Tensor, lay: ChunkLayout) -> torch.Tensor:
    """The chunks the kernel must leave to the whole-chunk search: a short last chunk, or one
    whose non-zero entries at or above the bound (the least of its groups' maxima) overflow
    the shared buffer."""
    threads, per_group = fused.compress_shape(lay)
    flags = torch.zeros(lay.num_chunks, dtype=torch.bool)
    pattern = b.abs().view(torch.int32)
    for c in range(lay.num_chunks):
        p = pattern[c * lay.chunk:(c + 1) * lay.chunk]
        if p.numel() < lay.chunk:
            flags[c] = True
            continue
        group_max = p.view(-1, per_group * fused.COMPRESS_VALUES).amax(dim=1)
        flags[c] = int((p >= max(int(group_max.min()), 1)).sum()) > CAPACITY
    return flags


def check(lib, b, err, delta, lay, bits, mode, decay=1.0, staged=False):
    sent = torch.ones(lay.numel, dtype=torch.bool)  # poisoned: every entry of a chunk taken must be written
    idx, codes, scales, full = compress(lib, err, delta, lay, bits, mode, decay, sent, staged)
    r_idx, r_codes, r_scales, r_err = _reference(b.clone(), lay, bits)
    assert torch.equal(full, expected_fallbacks(b, lay))
    per_entry = torch.arange(lay.num_chunks).repeat_interleave(lay.k)[: lay.num_selected]
    taken = ~full[per_entry]
    got_idx = unpack_bits(idx.view(torch.uint8)[: packed_nbytes(lay.num_selected, lay.index_bits)], lay.index_bits,
                          lay.num_selected)
    got_codes = unpack_bits(codes.view(torch.uint8)[: packed_nbytes(lay.num_selected, bits)], bits, lay.num_selected)
    assert torch.equal(got_idx[taken], r_idx[taken]) and torch.equal(got_codes[taken], r_codes[taken])
    assert not got_idx[~taken].any() and not got_codes[~taken].any(), "a chunk left to the search wrote its streams"
    assert torch.equal(scales[~full], r_scales[~full])
    per_value = torch.arange(lay.num_chunks).repeat_interleave(lay.chunk)[: lay.numel]
    mine = ~full[per_value]
    assert torch.equal(err[mine], r_err[mine]) and torch.equal(err[~mine], b[~mine])
    marks = torch.zeros(lay.numel, dtype=torch.bool)
    marks[per_entry * lay.chunk + r_idx] = True
    assert torch.equal(sent[mine], marks[mine])
    return int((~full).sum())


def _entries(case):
    """The entry points that take a case: the generic one, and the staged one for blocks of 256."""
    shape = fused.compress_shape(ChunkLayout.for_tensor(*case))
    return [] if shape is None else [False, True] if shape[0] == 256 else [False]


TAKEN = [case + (staged,) for case in CASES for staged in _entries(case)]
assert any(case[-1] for case in TAKEN), "no case runs the staged entry point"


@pytest.mark.parametrize("numel, chunk, density, staged", TAKEN)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("ties", [False, True])
def test_the_cuda_kernel_equals_the_reference_on_the_chunks_it_takes(emulated, numel, chunk, density, staged, bits,
                                                                     ties):
    lay = ChunkLayout.for_tensor(numel, chunk, density)
    d = _input(numel, numel * 31 + bits, ties).cpu()
    err = torch.full((numel,), float("nan"))  # the residual kept in the model: never read
    taken = check(emulated, d, err, d, lay, bits, mode=0, staged=staged)
    if not ties:
        assert taken == numel // lay.chunk, "a chunk of random values went to the whole-chunk search"


@pytest.mark.parametrize("staged", [False, True])
@pytest.mark.parametrize("decay", [1.0, 0.95])
def test_the_residual_kept_aside_is_added_first(emulated, decay, staged):
    """Three full chunks and a short last one, whose b (residual added) is left in the
    residual buffer for the whole-chunk search."""
    lay = ChunkLayout.for_tensor(3 * 4096 + 100, 4096, 64 / 4096)
    e0, d = _input(lay.numel, 1, False).cpu() * 0.1, _input(lay.numel, 2, False).cpu()
    b = e0 * decay + d if decay != 1.0 else e0 + d
    assert check(emulated, b, e0.clone(), d, lay, 4, mode=1 if decay == 1.0 else 2, decay=decay, staged=staged) == 3


@pytest.mark.parametrize("staged", [False, True])
@pytest.mark.parametrize("nonzero", [0, 5, 70, 200])
def test_chunks_of_zeros_keep_their_nonzeros_first_and_stay_with_the_kernel(emulated, nonzero, staged):
    """A chunk of `nonzero` non-zeros among zeros (half of them −0.0): fewer than k, and the
    lowest-indexed zeros fill the last slots; a few more than k, and the search runs among the
    non-zeros. Either way the kernel takes it (zeros are no candidates), as it takes a chunk
    whose first half is zeros (2048 non-zeros fit the buffer); one with 3096 non-zeros and a
    group of zeros overflows it and goes to the whole-chunk search."""
    lay = ChunkLayout.for_tensor(4 * 4096, 4096, 64 / 4096)
    gen = torch.Generator().manual_seed(nonzero)
    d = torch.randn(lay.numel, generator=gen)
    d[:4096] = torch.where(torch.arange(4096) % 2 == 0, 0.0, -0.0)
    d[torch.randperm(4096, generator=gen)[:nonzero]] = torch.randn(nonzero, generator=gen)
    d[2 * 4096:2 * 4096 + 2048] = 0.0
    d[3 * 4096:3 * 4096 + 1000] = 0.0
    assert check(emulated, d, torch.empty(lay.numel), d, lay, 2, mode=0, staged=staged) == 3


def test_equal_magnitudes_go_lowest_index_first_across_threads_and_warps(emulated):
    """Every entry of a chunk ±1 but a few larger ones: the k-th largest is 1, its ties fill
    the last slots in index order, across every thread and warp of the block; the bound is
    1 too, so the kernel takes only chunks whose candidates fit (one here, of 1024)."""
    lay = ChunkLayout.for_tensor(1024, 1024, 40 / 1024)
    gen = torch.Generator().manual_seed(3)
    d = torch.where(torch.rand(1024, generator=gen) < 0.5, -1.0, 1.0)
    d[torch.randperm(1024, generator=gen)[:25]] *= 3.0
    assert check(emulated, d, torch.empty(1024), d, lay, 4, mode=0) == 1


def cuda_dequantize(codes, scales, lay: ChunkLayout, bits: int) -> torch.Tensor:
    """quant.dequantize with the step as torch's CUDA kernels make it, (hi − lo) times the fp32
    reciprocal of levels − 1 (its CPU kernels divide): what the CUDA C kernels compute."""
    levels = 1 << (bits - 1)
    ids = chunk_ids(lay, "cpu")
    lo, hi = scales[:, 0][ids], scales[:, 1][ids]
    step = (hi - lo) * torch.tensor(fused._recip(bits))
    mag = lo + (codes & (levels - 1)).float() * step
    return torch.where(((codes >> (bits - 1)) & 1).bool(), -mag, mag)


@pytest.mark.parametrize("numel, chunk, density, bits, num_peers, same", [
    (5000, 1024, 0.03, 4, 4, False), (4097, 4096, 0.0156, 2, 11, False), (300, 256, 0.1, 8, 1, False),
    (20_000, 8192, 0.02, 4, 3, False), (9000, 4096, 0.03, 4, 6, True), (5000, 4096, 0.5, 4, 3, False)])
@pytest.mark.parametrize("with_cover", [False, True])
def test_the_cuda_accumulate_equals_the_reference_loop(emulated, numel, chunk, density, bits, num_peers, same,
                                                       with_cover):
    """As tests/test_fused.py's case: a chunk wider than the window (8192), peers that all
    picked the same positions, more entries a chunk (2048) than a batch of pairs holds, 11 peers."""
    lay = ChunkLayout.for_tensor(numel, chunk, density)
    gen = torch.Generator().manual_seed(numel + num_peers)
    shares = torch.rand(num_peers, generator=gen) / num_peers
    peers = []
    for p in range(num_peers):
        delta = _input(numel, 7, False).cpu() * (1 + p / 3) if same else _input(numel, 100 + p, p % 3 == 2).cpu()
        idx, codes, scales, _ = _reference(delta, lay, bits)
        peers.append((idx, codes, scales))
    streams = (fused.stack_streams([pack_bits(i, lay.index_bits) for i, _, _ in peers]),
               fused.stack_streams([pack_bits(c, bits) for _, c, _ in peers]), torch.stack([s for *_, s in peers]))
    acc = torch.full((numel,), float("nan"))  # poisoned: the kernel writes every entry
    cover = torch.full((numel,), float("nan")) if with_cover else None
    grid, args = fused.accumulate_launch(acc, cover, *streams, shares, lay, bits)
    emulated.run_accumulate(ctypes.c_uint(grid), ctypes.c_uint(fused.ACCUMULATE_THREADS), *args)
    ref, ref_cover = torch.zeros(numel), torch.zeros(numel)
    for (idx, codes, scales), share in zip(peers, shares):
        ref.add_(scatter_chunks(idx, cuda_dequantize(codes, scales, lay, bits) * share, lay))
        ref_cover.add_(scatter_chunks(idx, share.expand(lay.num_selected).contiguous(), lay))
    assert torch.equal(acc, ref)
    assert cover is None or torch.equal(cover, ref_cover)
