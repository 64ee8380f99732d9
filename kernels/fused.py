"""Fused CUDA kernels (Triton) for the compression of a pseudo-gradient and the decode and
accumulation of many peers' deltas: the same outputs as the plain-torch references
(kernels/topk.py, quant.py, bitpack.py; optim/compress.py; optim/aggregate.py), bit for bit.

`compress(err, delta, ...)`: one program per chunk reads the chunk once, forms the buffer
b (b = delta with the residual kept in the model; b = decay·err + delta with it kept
aside), selects the chunk's top-k by magnitude, quantizes them, writes the chunk's indices,
codes and scale pair, and writes err ← b − decode(encode(b)) in place. No temporary of the
buffer's size is made; the extra memory is the selected entries' indices and codes (6 bytes
per kept entry, e.g. 0.55 % of the fp32 buffer at chunk 4096, k 64) plus the two packed
streams. Then `pack_bits` packs indices and codes into the wire's little-endian bit
streams, byte for byte what kernels/bitpack.py writes.

Output layout (what `compress` returns, then what goes on the wire):
- indices: (num_selected,) int32, chunk-relative, ascending within each chunk, chunk after
  chunk (the last chunk holds k_last = min(k, its length) entries);
- codes: (num_selected,) uint8, sign bit (bits−1) and level in the low bits−1 bits;
- scales: (num_chunks, 2) float32 (lo, hi), each exactly a bfloat16;
- wire: indices packed at log2(chunk) bits each and codes at `bits` each, value i's bit j
  at stream bit i·width + j, stream bit s in bit s mod 8 of byte s // 8, zero-padded.

How the reference's results are reproduced exactly:
- selection: magnitudes' float bit patterns order like the magnitudes (they are ≥ 0); a
  search on the pattern, two bits a step (16 reductions), finds the k-th largest, t; every entry above t is
  kept and, of those equal to t, the lowest-indexed ones up to k (a prefix count): the
  reference's rule (a stable descending sort: ties go to the lower index).
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
- decode and accumulate: peers are added in the given order, one peer's values written
  at its positions only (read, add, write; positions within a chunk are unique, programs
  own disjoint chunks, and a barrier separates peers): no atomics, the same bits every
  run, equal to the reference's acc + densify(peer)·share in the same order.

Non-finite input: the reference compressor refuses it before compressing; `compress`
here leaves that check to its caller too (optim/compress.py checks every tensor first).
"""

from __future__ import annotations

import torch
from torch import Tensor

from locoswarm.kernels.bitpack import packed_nbytes
from locoswarm.kernels.layout import ChunkLayout

try:  # Triton is optional: CPU and MPS peers never need it
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - depends on the installation
    triton = None


if triton is not None:
    # Correctly rounded single operations. On CUDA they must be spelled out (Triton's `/`
    # is approximate, a*b+c may fuse); Triton's CPU interpreter (numpy) has no libdevice but
    # rounds every operation on its own, so there the plain operators are exact.

    @triton.jit
    def _add(a, b, EXACT: tl.constexpr):
        if EXACT:
            return libdevice.add_rn(a, b)
        return a + b

    @triton.jit
    def _sub(a, b, EXACT: tl.constexpr):
        if EXACT:
            return libdevice.sub_rn(a, b)
        return a - b

    @triton.jit
    def _mul(a, b, EXACT: tl.constexpr):
        if EXACT:
            return libdevice.mul_rn(a, b)
        return a * b

    @triton.jit
    def _div(a, b, EXACT: tl.constexpr):
        if EXACT:
            return libdevice.div_rn(a, b)
        return a / b

    @triton.jit
    def _rint(x, EXACT: tl.constexpr):
        """Round half to even, as torch.round."""
        if EXACT:
            return libdevice.rint(x)
        r = tl.floor(x + 0.5)
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0
        return tl.where(((r - x) == 0.5) & odd, r - 1.0, r)

    @triton.jit
    def _step(hi, lo, LEVELS: tl.constexpr, recip, EXACT: tl.constexpr):
        """(hi − lo) / (levels − 1) as torch computes it: on CUDA torch divides by a scalar
        as a product with its fp32 reciprocal; on the CPU it divides."""
        if EXACT:
            return libdevice.mul_rn(libdevice.sub_rn(hi, lo), recip)
        return (hi - lo) / (LEVELS - 1.0)

    @triton.jit
    def _to_bf16(x):
        """x ≥ 0 rounded to the nearest bfloat16, ties to even, as a float32 (torch's
        .to(torch.bfloat16)); spelled out on the bits because the interpreter truncates."""
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _compress_kernel(err_ptr, delta_ptr, decay, recip, idx_ptr, code_ptr, scale_ptr, numel,
                         CHUNK: tl.constexpr, K: tl.constexpr, BITS: tl.constexpr, MODE: tl.constexpr,
                         EXACT: tl.constexpr):
        # MODE 0: b = delta; 1: b = err + delta; 2: b = decay * err + delta
        pid = tl.program_id(0)
        local = tl.arange(0, CHUNK)
        offs = pid.to(tl.int64) * CHUNK + local
        valid = offs < numel
        d = tl.load(delta_ptr + offs, mask=valid, other=0.0)
        if MODE == 0:
            b = d
        elif MODE == 1:
            b = _add(tl.load(err_ptr + offs, mask=valid, other=0.0), d, EXACT)
        else:
            e = tl.load(err_ptr + offs, mask=valid, other=0.0)
            b = _add(_mul(e, decay, EXACT), d, EXACT)
        mags = tl.abs(b)
        pattern = tl.where(valid, mags.to(tl.int32, bitcast=True), -1)
        n_valid = tl.minimum(numel - pid.to(tl.int64) * CHUNK, CHUNK).to(tl.int32)
        k = tl.minimum(n_valid, K)
        # The k-th largest pattern: the largest t with count(pattern >= t) >= k, two bits at a
        # time (bit 30 alone first): the three counts of a step share one reduction, packed
        # 16 bits apart in an int64 (a count is at most CHUNK ≤ 2^15).
        t = tl.where(tl.sum((pattern >= (1 << 30)).to(tl.int32), axis=0) >= k, 1 << 30, 0)
        for step in tl.static_range(15):
            shift = 28 - 2 * step
            c1 = t | (1 << shift)
            c2 = t | (2 << shift)
            c3 = t | (3 << shift)
            packed = ((pattern >= c1).to(tl.int64) + ((pattern >= c2).to(tl.int64) << 16)
                      + ((pattern >= c3).to(tl.int64) << 32))
            counts = tl.sum(packed, axis=0)
            n1 = (counts & 0xFFFF).to(tl.int32)
            n2 = ((counts >> 16) & 0xFFFF).to(tl.int32)
            n3 = ((counts >> 32) & 0xFFFF).to(tl.int32)
            t = tl.where(n3 >= k, c3, tl.where(n2 >= k, c2, tl.where(n1 >= k, c1, t)))
        above = pattern > t
        need = k - tl.sum(above.to(tl.int32), axis=0)
        equal = pattern == t
        kept = above | (equal & (tl.cumsum(equal.to(tl.int32), axis=0) <= need))
        slot = tl.cumsum(kept.to(tl.int32), axis=0) - 1
        lo = _to_bf16(tl.min(tl.where(kept, mags, float("inf")), axis=0))
        hi = _to_bf16(tl.max(tl.where(kept, mags, -1.0), axis=0))
        LEVELS: tl.constexpr = 1 << (BITS - 1)
        step = _step(hi, lo, LEVELS, recip, EXACT)
        safe = tl.where(step > 0, step, 1.0)
        q = _rint(_div(_sub(mags, lo, EXACT), safe, EXACT), EXACT)
        q = tl.where(step > 0, q, 0.0)
        q = tl.minimum(tl.maximum(q, 0.0), LEVELS - 1.0)
        negative = b < 0
        mag_t = _add(lo, _mul(q, step, EXACT), EXACT)
        sent = tl.where(negative, -mag_t, mag_t)
        code = (negative.to(tl.int32) << (BITS - 1)) | q.to(tl.int32)
        out = pid.to(tl.int64) * K + slot
        tl.store(idx_ptr + out, local, mask=kept)
        tl.store(code_ptr + out, code.to(tl.uint8), mask=kept)
        tl.store(scale_ptr + pid * 2, lo)
        tl.store(scale_ptr + pid * 2 + 1, hi)
        tl.store(err_ptr + offs, tl.where(kept, _sub(b, sent, EXACT), b), mask=valid)

    @triton.jit
    def _pack_kernel(src_ptr, dst_ptr, count, nbytes, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        byte = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), dtype=tl.int32)
        for s in tl.static_range(8):
            g = byte * 8 + s
            i = g // WIDTH
            v = tl.load(src_ptr + i, mask=(i < count) & (byte < nbytes), other=0).to(tl.int32)
            acc |= ((v >> (g % WIDTH).to(tl.int32)) & 1) << s
        tl.store(dst_ptr + byte, acc.to(tl.uint8), mask=byte < nbytes)

    @triton.jit
    def _accumulate_kernel(acc_ptr, cover_ptr, idx_ptr, code_ptr, scale_ptr, shares_ptr, recip, numel,
                           num_selected, NUM_PEERS: tl.constexpr, CHUNK: tl.constexpr, K: tl.constexpr, KB: tl.constexpr,
                           BITS: tl.constexpr, COVER: tl.constexpr, EXACT: tl.constexpr):
        pid = tl.program_id(0)
        j = tl.arange(0, KB)
        chunk_len = tl.minimum(numel - pid.to(tl.int64) * CHUNK, CHUNK)
        k = tl.minimum(chunk_len, K)
        live = j < k
        LEVELS: tl.constexpr = 1 << (BITS - 1)
        for p in range(NUM_PEERS):
            p64 = pid.to(tl.int64) * 0 + p  # int64 offsets: peers × selected entries can pass 2^31
            base = p64 * num_selected + pid.to(tl.int64) * K
            idx = tl.load(idx_ptr + base + j, mask=live, other=0).to(tl.int64)
            code = tl.load(code_ptr + base + j, mask=live, other=0).to(tl.int32)
            row = (p64 * ((numel + CHUNK - 1) // CHUNK) + pid) * 2
            lo = tl.load(scale_ptr + row)
            hi = tl.load(scale_ptr + row + 1)
            share = tl.load(shares_ptr + p)
            step = _step(hi, lo, LEVELS, recip, EXACT)
            mag = _add(lo, _mul((code & (LEVELS - 1)).to(tl.float32), step, EXACT), EXACT)
            value = tl.where(((code >> (BITS - 1)) & 1) != 0, -mag, mag)
            value = _mul(value, share, EXACT)
            pos = pid.to(tl.int64) * CHUNK + idx
            old = tl.load(acc_ptr + pos, mask=live, other=0.0)
            tl.store(acc_ptr + pos, _add(old, value, EXACT), mask=live)
            if COVER:
                w = tl.load(cover_ptr + pos, mask=live, other=0.0)
                tl.store(cover_ptr + pos, _add(w, share, EXACT), mask=live)
            tl.debug_barrier()


COMPRESS_WARPS = 4
"""Warps per chunk of the compression kernel: at 1e8 elements on the H100, 1 → 7.9 ms,
2 → 6.1, 4 → 2.0, 8 → 2.2, 16 → 2.6 (kernels/bench.py sweep_warps)."""


def _recip(bits: int) -> float:
    """1 / (levels − 1) rounded to fp32, as torch's CUDA division by a scalar makes it."""
    return float(torch.tensor(1.0, dtype=torch.float32) / ((1 << (bits - 1)) - 1))


def _exact(t: Tensor) -> bool:
    return t.is_cuda  # the interpreter runs on CPU tensors


def compress(err: Tensor, delta: Tensor, layout: ChunkLayout, bits: int, *, mode: str = "model",
             decay: float = 1.0, num_warps: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Fused error-feedback compression of one flat fp32 tensor (see the module docstring).

    `mode` "model": b = delta (the residual lives in the replica); "buffer": b = decay·err +
    delta. `err` (numel,) fp32 is overwritten with the new residual. Returns (indices int32,
    codes uint8, scales (num_chunks, 2) float32)."""
    assert err.dtype == torch.float32 and delta.dtype == torch.float32 and err.is_contiguous()
    assert err.numel() == delta.numel() == layout.numel
    assert layout.chunk <= 1 << 15, "the fused kernel counts a chunk's entries in 16-bit fields"
    delta = delta.contiguous()
    kernel_mode = 0 if mode == "model" else (1 if decay == 1.0 else 2)
    m = layout.num_chunks
    idx = torch.empty(layout.num_selected, dtype=torch.int32, device=err.device)
    codes = torch.empty(layout.num_selected, dtype=torch.uint8, device=err.device)
    scales = torch.empty((m, 2), dtype=torch.float32, device=err.device)
    _compress_kernel[(m,)](err, delta, float(decay), _recip(bits), idx, codes, scales, layout.numel, CHUNK=layout.chunk,
                           K=layout.k, BITS=bits, MODE=kernel_mode, EXACT=_exact(err),
                           num_warps=num_warps or COMPRESS_WARPS)
    return idx, codes, scales


def pack_bits(values: Tensor, width: int) -> Tensor:
    """kernels/bitpack.py's pack_bits for a CUDA tensor, in one pass: (count,) integers in
    [0, 2**width) → (⌈count·width/8⌉,) uint8."""
    count = values.numel()
    nbytes = packed_nbytes(count, width)
    out = torch.empty(nbytes, dtype=torch.uint8, device=values.device)
    block = 1024
    _pack_kernel[(triton.cdiv(max(nbytes, 1), block),)](values.contiguous(), out, count, nbytes, WIDTH=width,
                                                        BLOCK=block)
    return out


def accumulate(acc: Tensor, peers: list[tuple[Tensor, Tensor, Tensor]], shares: list[float], layout: ChunkLayout,
               bits: int, cover: Tensor | None = None) -> Tensor:
    """acc (numel,) fp32 += Σ_p share_p · decode(peer p), peers in the given order, each a
    (indices int, codes int, scales (num_chunks, 2) fp32) triple of one tensor; `cover`
    (numel,) fp32, when given, += share_p where peer p sent a value (optim.aggregate's
    coverage). Bitwise equal to the reference loop on the same device type."""
    if not peers:
        return acc
    idx = torch.stack([p[0].to(torch.int32) for p in peers]).contiguous()
    codes = torch.stack([p[1].to(torch.uint8) for p in peers]).contiguous()
    scales = torch.stack([p[2].to(torch.float32) for p in peers]).contiguous()
    shares_t = torch.tensor(shares, dtype=torch.float32, device=acc.device)
    _accumulate_kernel[(layout.num_chunks,)](
        acc, cover if cover is not None else acc, idx, codes, scales, shares_t, _recip(bits), layout.numel,
        layout.num_selected, NUM_PEERS=len(peers), CHUNK=layout.chunk, K=layout.k, KB=triton.next_power_of_2(layout.k), BITS=bits,
        COVER=cover is not None, EXACT=_exact(acc))
    return acc
