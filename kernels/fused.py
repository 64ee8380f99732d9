"""Fused CUDA kernels (Triton, and CUDA C kernels shipped as PTX) for the compression of
a pseudo-gradient and the decode and accumulation of many peers' deltas: the same outputs
as the plain-torch references
(kernels/topk.py, quant.py, bitpack.py; optim/compress.py; optim/aggregate.py), bit for bit.

`compress(err, delta, ...)`: one program per chunk reads the chunk from memory once, forms the buffer
b (b = delta with the residual kept in the model; b = decay·err + delta with it kept
aside), selects the chunk's top-k by magnitude, quantizes them, ORs the kept entries'
indices and codes straight into the two packed wire streams, writes the chunk's scale
pair, and writes err ← b − decode(encode(b)) in place. Nothing but the outputs is
allocated: the two packed streams and the scales, 0.8 % of the fp32 buffer at chunk 4096,
k 64, 4 bits (kernels/bench.py measures it).

Output layout (what `compress` returns; the streams are the wire's bytes):
- indices: (⌈num_selected·log2(chunk)/8⌉,) uint8, each entry's chunk-relative index in
  log2(chunk) bits, ascending within each chunk, chunk after chunk (the last chunk holds
  k_last = min(k, its length) entries);
- codes: (⌈num_selected·bits/8⌉,) uint8, each entry's code in `bits` bits: sign bit
  (bits−1) and level in the low bits−1 bits;
- in both streams value i's bit j is stream bit i·width + j, stream bit s is bit s mod 8
  of byte s // 8, zero-padded (kernels/bitpack.py's layout, byte for byte);
- scales: (num_chunks, 2) float32 (lo, hi), each exactly a bfloat16.

How the reference's results are reproduced exactly:
- selection: magnitudes' float bit patterns order like the magnitudes (they are ≥ 0). The
  chunk, seen as ROWS × COLS with ROWS ≥ k, gives a lower bound of the k-th largest: the
  smallest of the rows' maxima (ROWS ≥ k entries reach it). The entries at or above it (a
  few per cent) are compacted in index order into the chunk's own residual slots, and a
  search two bits a step over the bits below the bound's and the maximum's common prefix
  finds the k-th largest pattern t among them (one reduction a step). A chunk with more
  candidates than the compact block holds (ties, runs of zeros, a short last chunk) is
  listed, its b left in the residual buffer, and searched whole by a second kernel
  (fused_select.py) whose few programs take the listed chunks in turn. Every
  entry above t is kept and, of those equal to t, the lowest-indexed ones up to k (a prefix
  count): the reference's rule (a stable descending sort: ties go to the lower index).
  kernels/compress.cu does the same in CUDA C (a block a chunk, 16 entries a thread in
  registers, groups of threads for the bound, the candidates compacted into shared memory
  by a block scan, 8 bits of t a step counted in a shared-memory histogram; zeros are never
  candidates, so a chunk with fewer non-zeros than k keeps them and then its lowest-indexed
  zeros without the whole-chunk search); it is run on the CPU, a thread per CUDA thread, in
  CI (tests/test_cuda_emulated.py). `compress` runs it on large tensors, the Triton kernel on
  small ones (COMPRESS_KERNEL says why).
- packing: an entry's bits land in one or two 32-bit words of the zeroed stream, set with
  an atomic OR. Entries never share a bit, so the OR of their fields is the same whatever
  order the atomics land in: the bytes are deterministic.
- arithmetic: every operation the reference does as its own torch kernel is done here as a
  correctly rounded single operation (Triton's `/` is an approximate division and `a*b+c`
  may be fused into one rounding, so `div_rn`, `mul_rn`, `add_rn`, `sub_rn` are used, and
  `rint` for torch.round's half-to-even), and as torch does it on that device: torch's
  CUDA kernels divide by a scalar as a product with its fp32 reciprocal (its CPU kernels
  divide), which the quantizer's step (hi − lo) / (levels − 1) follows. (So a CUDA peer and
  a CPU peer can decode a code to values one ulp apart: bitwise agreement holds among peers
  of one device type, as the references' docstrings say.) The one exception: with the residual kept aside
  and a decay β ≠ 1, b = β·e + Δ may differ from torch's in the last bit (no ulp-exact
  form of it in one pass); the default keeps the residual in the model (b = Δ).
- decode and accumulate: on CUDA the CUDA C kernel of kernels/accumulate.cu (shipped as
  PTX, compiled by the driver: kernels/cuda_module.py) sums a window of the chunk in shared
  memory, peer after peer, and writes it once; where it cannot load (and under the
  interpreter) a Triton kernel does the same in global memory: one program per chunk writes
  the chunk's zeros, loads a group of peers' fields at once, then adds the peers in the
  given order, one peer's values at its positions only (read, add, write). Either way
  positions are unique within a peer, a barrier separates peers and there are no atomics:
  the same bits every run, equal to the reference's acc + densify(peer)·share in the same
  order.

Non-finite input: the reference compressor refuses it before compressing; `compress`
here leaves that check to its caller too (optim/compress.py checks every tensor first).
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import torch
from torch import Tensor

from locoswarm.kernels import cuda_module
from locoswarm.kernels.bitpack import packed_nbytes
from locoswarm.kernels.layout import ChunkLayout, next_pow2
from locoswarm.kernels.quant import SUPPORTED_BITS

log = logging.getLogger(__name__)

try:  # Triton is optional: CPU and MPS peers never need it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

if triton is not None:
    from locoswarm.kernels.fused_ops import add, mul, read_field, quant_step
    from locoswarm.kernels.fused_select import compress_full_kernel, compress_kernel

    @triton.jit
    def _accumulate_kernel(acc_ptr, cover_ptr, idx_ptr, code_ptr, scale_ptr, shares_ptr, recip, numel,
                           idx_words, code_words, num_peers, NUM_GROUPS: tl.constexpr, CHUNK: tl.constexpr, K: tl.constexpr, KB: tl.constexpr,
                           GROUP: tl.constexpr, INDEX_BITS: tl.constexpr, BITS: tl.constexpr, COVER: tl.constexpr,
                           EXACT: tl.constexpr):
        pid = tl.program_id(0)
        start = pid.to(tl.int64) * CHUNK
        offs = start + tl.arange(0, CHUNK)
        zeros = tl.zeros((CHUNK,), dtype=tl.float32)
        tl.store(acc_ptr + offs, zeros, mask=offs < numel)
        if COVER:
            tl.store(cover_ptr + offs, zeros, mask=offs < numel)
        rows = tl.arange(0, GROUP)[:, None]
        j = tl.arange(0, KB)[None, :]
        n_kept = tl.minimum(tl.minimum(numel - start, CHUNK).to(tl.int32), K)
        entry = pid.to(tl.int64) * K + j
        num_chunks = (numel + CHUNK - 1) // CHUNK
        LEVELS: tl.constexpr = 1 << (BITS - 1)
        for gi in range(NUM_GROUPS):  # constexpr: a kernel per group count, not per peer count
            g = gi * GROUP
            # A group of peers' fields and values at once: their loads are all in flight
            # together, so the chain of additions below waits on memory once a group.
            peer = g + rows
            has = peer < num_peers
            live = has & (j < n_kept)
            p64 = peer.to(tl.int64)
            idx = read_field(idx_ptr + p64 * idx_words, entry, live, INDEX_BITS)
            code = read_field(code_ptr + p64 * code_words, entry, live, BITS)
            lo = tl.load(scale_ptr + (p64 * num_chunks + pid) * 2, mask=has, other=0.0)
            hi = tl.load(scale_ptr + (p64 * num_chunks + pid) * 2 + 1, mask=has, other=0.0)
            share = tl.load(shares_ptr + peer, mask=has, other=0.0)
            step = quant_step(hi, lo, LEVELS, recip, EXACT)
            mag = add(lo, mul((code & (LEVELS - 1)).to(tl.float32), step, EXACT), EXACT)
            value = mul(tl.where(((code >> (BITS - 1)) & 1) != 0, -mag, mag), share, EXACT)
            bits = value.to(tl.int32, bitcast=True)
            tl.debug_barrier()  # the zeros, or the last group's sums, are in place
            for q in tl.static_range(GROUP):
                # Peer g + q's row, taken out exactly (integer sums of one non-zero term).
                mine = rows == q
                pos = start + tl.sum(tl.where(mine, idx, 0), axis=0)
                v = tl.sum(tl.where(mine, bits, 0), axis=0).to(tl.float32, bitcast=True)
                ok = (tl.sum(tl.where(mine, live.to(tl.int32), 0), axis=0) != 0) & (pos < numel)
                old = tl.load(acc_ptr + pos, mask=ok, other=0.0, cache_modifier=".cg")
                tl.store(acc_ptr + pos, add(old, v, EXACT), mask=ok)
                if COVER:
                    w = tl.load(cover_ptr + pos, mask=ok, other=0.0, cache_modifier=".cg")
                    tl.store(cover_ptr + pos, add(w, tl.load(shares_ptr + g + q, mask=g + q < num_peers), EXACT),
                             mask=ok)
                tl.debug_barrier()  # positions are unique within a peer, not across peers


ENTRIES_PER_WARP = 1024
"""The compression kernel holds a chunk in registers, a warp per this many entries (32 a
thread)."""


def compress_warps(chunk: int) -> int:
    """Warps of the compression kernel for a chunk of `chunk` entries (1 to 32)."""
    return max(1, min(32, chunk // ENTRIES_PER_WARP))

FULL_WARPS = 8
"""Warps per chunk of the whole-chunk search (the few chunks with too many candidates)."""
FULL_PROGRAMS_PER_SM = 4
"""Programs of the whole-chunk search a multiprocessor (they take the listed chunks in turn)."""


def full_programs(device: torch.device, num_chunks: int) -> int:
    """The whole-chunk search's grid: a few waves on a GPU, 4 programs under the CPU interpreter."""
    per_device = (FULL_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
                  if device.type == "cuda" else 4)
    return max(1, min(num_chunks, per_device))


def _recip(bits: int) -> float:
    """1 / (levels − 1) rounded to fp32, as torch's CUDA division by a scalar makes it."""
    return float(torch.tensor(1.0, dtype=torch.float32) / ((1 << (bits - 1)) - 1))


def _exact(t: Tensor) -> bool:
    return t.is_cuda  # the interpreter runs on CPU tensors


def _words(count: int, width: int) -> int:
    return -(-count * width // 32)


COMPRESS_KERNEL = "auto"
"""The compression kernel `compress` runs by default on CUDA: "auto" takes the CUDA C one
(kernels/compress.cu) for tensors of COMPRESS_CUDA_MIN entries and more, the Triton one below.
Both give the same bits; on the H200 the CUDA C kernel took 3.45 against 5.57 ms
at 1e9 entries and 0.44 against 0.64 at 1e8, but 0.14 against 0.14 at 1e7, where its ctypes
launch costs as much as it saves (docs/kernels.md, "Compression in CUDA C")."""
COMPRESS_CUDA_MIN = 1 << 25
"""Entries from which "auto" takes the CUDA C kernel: between the sizes measured (1e7, 1e8)."""
COMPRESS_PTX = Path(__file__).with_name("compress.ptx")
"""kernels/compress.cu as PTX, made as ACCUMULATE_PTX is."""
COMPRESS_VALUES = 16
"""Entries a thread of the CUDA C compression kernel holds (its VALUES)."""
COMPRESS_MAX_THREADS = 1024
COMPRESS_CAPPED_MAJORS = (9,)
"""Compute capability majors whose 256-thread blocks (chunks of 4096) run compress.cu's staged,
register-capped entry point (the chunk through 25.5 KB of shared memory, 5 blocks a
multiprocessor): Hopper, where it measured faster (3.55 against 5.31 ms for the generic entry at
1e9 on the H200, .ci/gpu-compress-sweep.py); other GPUs, whose multiprocessors hold less shared
memory, keep the generic one until measured there."""


def compress_shape(layout: ChunkLayout, *tensors: Tensor | None) -> tuple[int, int] | None:
    """(threads a block, threads a group of the bound) for the CUDA C compression kernel, or
    None where it does not apply: a chunk under 16 or over 16384 entries, more groups of 16
    entries needed than the chunk has (k above chunk/16), or a tensor not 16-byte aligned
    for its vector loads."""
    chunk, rows = layout.chunk, next_pow2(layout.k)
    if not COMPRESS_VALUES <= chunk <= COMPRESS_VALUES * COMPRESS_MAX_THREADS:
        return None
    valid = chunk // COMPRESS_VALUES
    if rows > valid or any(t is not None and t.data_ptr() % 16 for t in tensors):
        return None
    return max(32, valid), min(32, valid // rows)


def _compress_entry(threads: int, device: torch.device) -> str:
    capped = threads == 256 and torch.cuda.get_device_capability(device)[0] in COMPRESS_CAPPED_MAJORS
    return "compress_kernel_256" if capped else "compress_kernel"


def _cuda_function(ptx: Path, name: str, device: torch.device):
    """Kernel `name` of the shipped PTX for `device`, or None where the driver cannot load
    it (then the Triton kernel runs: the same bits, slower)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if (ptx.name, index) in _ptx_failed:
        return None
    try:
        return cuda_module.load(ptx, name, device)
    except (cuda_module.CudaModuleError, OSError) as e:
        _ptx_failed.add((ptx.name, index))
        log.warning("%s falls back to its Triton kernel on cuda:%d: %s", name, index, e)
        return None


def compress_arguments(err: Tensor, delta: Tensor, idx: Tensor, codes: Tensor, scales: Tensor, sent: Tensor | None,
                       todo: Tensor, layout: ChunkLayout, bits: int, mode: int, decay: float, per_group: int, *,
                       divide: bool) -> list:
    """compress_kernel's parameters (kernels/compress.cu), in order, as ctypes scalars: `mode`
    0, 1, 2 as the Triton kernel's MODE; `divide` the quantizer's step as torch's CPU kernels
    compute it (for the CPU build of tests/cuda_emulator.hpp), else as its CUDA kernels do."""
    u64, u32 = ctypes.c_uint64, ctypes.c_uint32
    return [u64(err.data_ptr()), u64(delta.data_ptr()), ctypes.c_float(decay), ctypes.c_float(_recip(bits)),
            u64(idx.data_ptr()), u64(codes.data_ptr()), u64(scales.data_ptr()),
            u64((sent if sent is not None else err).data_ptr()), u64(todo.data_ptr()), u64(layout.numel)] + [
        u32(v) for v in (layout.chunk, layout.k, per_group, layout.index_bits, bits, mode, sent is not None, divide)]


def compress(err: Tensor, delta: Tensor, layout: ChunkLayout, bits: int, *, mode: str = "model",
             decay: float = 1.0, sent: Tensor | None = None,
             kernel: str = COMPRESS_KERNEL) -> tuple[Tensor, Tensor, Tensor]:
    """Fused error-feedback compression of one flat fp32 tensor (see the module docstring).

    `mode` "model": b = delta (the residual lives in the replica); "buffer": b = decay·err +
    delta. `err` (numel,) fp32 is overwritten with the new residual; `sent` (numel,) bool,
    when given, with where an entry was kept. Returns (packed indices uint8, packed codes
    uint8, scales (num_chunks, 2) float32), the streams exactly as the wire carries them.
    `kernel` "cuda": the CUDA C kernel of kernels/compress.cu where it applies (compress_shape)
    and loads, else the Triton one; "triton": the Triton one (always under the interpreter);
    "auto": "cuda" from COMPRESS_CUDA_MIN entries, else "triton"."""
    assert kernel in ("auto", "cuda", "triton")
    assert bits in SUPPORTED_BITS, f"bits must be one of {SUPPORTED_BITS}"  # as the references take
    assert err.dtype == torch.float32 and delta.dtype == torch.float32 and err.is_contiguous()
    assert err.numel() == delta.numel() == layout.numel
    assert layout.chunk <= 1 << 15, "the fused kernel counts a chunk's entries in 16-bit fields"
    assert sent is None or (sent.dtype == torch.bool and sent.numel() == layout.numel and sent.is_contiguous())
    delta = delta.contiguous()
    if err.data_ptr() % 8:
        # The Triton kernel compacts a chunk's candidates as 8-byte pairs in err's storage: a
        # view 4 bytes off works on an aligned copy (the compressor's own buffers are aligned).
        aligned = err.clone()
        out = compress(aligned, delta, layout, bits, mode=mode, decay=decay, sent=sent, kernel=kernel)
        err.copy_(aligned)
        return out
    kernel_mode = 0 if mode == "model" else (1 if decay == 1.0 else 2)
    m, n_sel, dev = layout.num_chunks, layout.num_selected, err.device
    idx = torch.zeros(_words(n_sel, layout.index_bits), dtype=torch.int32, device=dev)
    codes = torch.zeros(_words(n_sel, bits), dtype=torch.int32, device=dev)
    scales = torch.empty((m, 2), dtype=torch.float32, device=dev)
    todo = torch.zeros(m + 1, dtype=torch.int32, device=dev)  # count, then the chunks for the whole-chunk search
    args = (err, delta, float(decay), _recip(bits), idx, codes, scales, sent.view(torch.uint8) if sent is not None else err,
            todo, layout.numel)
    common = dict(CHUNK=layout.chunk, K=layout.k, INDEX_BITS=layout.index_bits, BITS=bits, SENT=sent is not None,
                  EXACT=_exact(err))
    cuda_c = kernel == "cuda" or (kernel == "auto" and layout.numel >= COMPRESS_CUDA_MIN)
    shape = compress_shape(layout, err, delta, sent) if cuda_c and err.is_cuda else None
    function = _cuda_function(COMPRESS_PTX, _compress_entry(shape[0], dev), dev) if shape is not None else None
    if function is not None:
        cargs = compress_arguments(err, delta, idx, codes, scales, sent, todo, layout, bits, kernel_mode, decay,
                                   shape[1], divide=False)
        cuda_module.launch(function, m, shape[0], cargs, dev)
    else:
        rows = min(layout.chunk, triton.next_power_of_2(layout.k))
        cb = max(16, min(layout.chunk // 2, triton.next_power_of_2(8 * layout.k)))
        compress_kernel[(m,)](*args, ROWS=rows, CB=cb, MODE=kernel_mode, **common,
                              num_warps=compress_warps(layout.chunk))
    compress_full_kernel[(full_programs(dev, m),)](*args, **common, num_warps=FULL_WARPS)
    return (idx.view(torch.uint8)[: packed_nbytes(n_sel, layout.index_bits)],
            codes.view(torch.uint8)[: packed_nbytes(n_sel, bits)], scales)


def stack_streams(streams: list[Tensor]) -> Tensor:
    """Peers' packed streams of one tensor (each (nbytes,) uint8, all the same length) as
    one (num_peers, words) int32 tensor for `accumulate`, zero-padded to whole words."""
    nbytes = streams[0].numel()
    out = torch.zeros((len(streams), -(-nbytes // 4) * 4), dtype=torch.uint8, device=streams[0].device)
    for row, s in zip(out, streams):
        assert s.numel() == nbytes, "streams of one tensor differ in length"
        row[:nbytes] = s
    return out.view(torch.int32)


ACCUMULATE_GROUP = 8
"""Peers whose fields one program of the Triton accumulate kernel loads at once."""
ACCUMULATE_PTX = Path(__file__).with_name("accumulate.ptx")
"""kernels/accumulate.cu as PTX, made with `nvcc -arch=compute_75 -ptx -O3 kernels/accumulate.cu` and
its `.version` line set to 7.5 (it uses nothing newer), so that drivers from CUDA 11.5 on
can compile it."""
ACCUMULATE_THREADS = 128
ACCUMULATE_WINDOW = 4096
"""Positions a block of the shared-memory kernel sums (its SHARED_FLOATS; half with the coverage)."""
_ptx_failed: set[tuple[str, int]] = set()
"""(PTX file, device index) pairs the driver refused: not tried again."""


def accumulate_launch(acc: Tensor, cover: Tensor | None, indices: Tensor, codes: Tensor, scales: Tensor, shares: Tensor,
                      layout: ChunkLayout, bits: int) -> tuple[int, list]:
    """The grid (blocks of ACCUMULATE_THREADS) and accumulate_kernel's parameters
    (kernels/accumulate.cu), in order, as ctypes scalars; `shares` (num_peers,) fp32."""
    window = ACCUMULATE_WINDOW // 2 if cover is not None else ACCUMULATE_WINDOW
    u64 = ctypes.c_uint64
    args = [u64(acc.data_ptr()), u64((cover if cover is not None else acc).data_ptr()), u64(indices.data_ptr()),
            u64(codes.data_ptr()), u64(scales.data_ptr()), u64(shares.data_ptr()), ctypes.c_float(_recip(bits)),
            u64(layout.numel), u64(indices.shape[1]), u64(codes.shape[1])] + [
        ctypes.c_uint32(v) for v in (indices.shape[0], layout.chunk, layout.k, layout.index_bits, bits, cover is not None)]
    return layout.num_chunks * -(-layout.chunk // window), args


def accumulate(acc: Tensor, indices: Tensor, codes: Tensor, scales: Tensor, shares: list[float], layout: ChunkLayout,
               bits: int, cover: Tensor | None = None, num_warps: int = 4, kernel: str = "cuda") -> Tensor:
    """acc (numel,) fp32 ← Σ_p share_p · decode(peer p), peers in the given order (acc's
    old contents are overwritten); `cover` (numel,) fp32, when given, ← Σ_p share_p where
    peer p sent a value (optim.aggregate's coverage). `indices` and `codes`: the peers'
    packed streams as `stack_streams` makes them, (num_peers, words) int32, their indices
    validated (optim's decoder does); `scales`: (num_peers, num_chunks, 2) fp32. Bitwise
    equal to the reference loop on the same device type. On CUDA the shared-memory kernel
    of kernels/accumulate.cu runs; the Triton kernel where that cannot load (and under
    Triton's interpreter, or with `kernel` "triton", for comparison); `num_warps` is the
    Triton kernel's."""
    assert kernel in ("cuda", "triton")
    num_peers = indices.shape[0]
    assert codes.shape[0] == num_peers == len(shares) and scales.shape == (num_peers, layout.num_chunks, 2)
    assert indices.shape[1] * 32 >= layout.num_selected * layout.index_bits
    assert codes.shape[1] * 32 >= layout.num_selected * bits
    assert acc.dtype == torch.float32 and acc.is_contiguous() and acc.numel() == layout.numel
    assert num_peers * layout.k < 1 << 32, "accumulate.cu counts a chunk's (peer, entry) pairs in 32 bits"
    assert cover is None or (cover.dtype == torch.float32 and cover.is_contiguous() and cover.numel() == layout.numel)
    indices, codes, scales = indices.contiguous(), codes.contiguous(), scales.contiguous()
    shares_t = torch.tensor(shares, dtype=torch.float32, device=acc.device)
    function = _cuda_function(ACCUMULATE_PTX, "accumulate_kernel", acc.device) if kernel == "cuda" and acc.is_cuda else None
    if function is not None:
        grid, args = accumulate_launch(acc, cover, indices, codes, scales, shares_t, layout, bits)
        cuda_module.launch(function, grid, ACCUMULATE_THREADS, args, acc.device)
        return acc
    group = min(ACCUMULATE_GROUP, triton.next_power_of_2(max(num_peers, 1)))
    _accumulate_kernel[(layout.num_chunks,)](
        acc, cover if cover is not None else acc, indices, codes, scales, shares_t, _recip(bits),
        layout.numel, indices.shape[1], codes.shape[1], num_peers, NUM_GROUPS=-(-num_peers // group), CHUNK=layout.chunk,
        K=layout.k, KB=triton.next_power_of_2(layout.k), GROUP=group,
        INDEX_BITS=layout.index_bits, BITS=bits, COVER=cover is not None, EXACT=_exact(acc), num_warps=num_warps)
    return acc
