"""Fused CUDA kernels (Triton) for the compression of a pseudo-gradient and the decode and
accumulation of many peers' deltas: the same outputs as the plain-torch references
(kernels/topk.py, quant.py, bitpack.py; optim/compress.py; optim/aggregate.py), bit for bit.

`compress(err, delta, ...)`: one program per chunk reads the chunk once, forms the buffer
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
- selection: magnitudes' float bit patterns order like the magnitudes (they are ≥ 0). A
  radix select finds the k-th largest pattern t in four histogram passes over 8, 8, 8 and
  7 bits, most significant first (tl.histogram: warp ballots, no sort); every entry above t
  is kept and, of those equal to t, the lowest-indexed ones up to k (a prefix count): the
  reference's rule (a stable descending sort: ties go to the lower index).
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
- decode and accumulate: one program per chunk writes the chunk's zeros, then adds the
  peers in the given order, one peer's values at its positions only (read, add, write;
  positions within a chunk are unique, programs own disjoint chunks, a barrier separates
  peers): no atomics, the same bits every run, equal to the reference's
  acc + densify(peer)·share in the same order. The chunk stays in L2 between the writes,
  so the dense buffer goes to memory about once.

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
    def _search(pattern, k, t, top, num_steps, FIELD: tl.constexpr):
        """The k-th largest of `pattern` (int32 ≥ 0; −1 counts as absent), two bits a step
        from bits (top+1, top) down: at entry t holds the bits above and at least k
        patterns are ≥ t. The three counts of a step share one reduction, packed FIELD bits
        apart (FIELD 10: in an int32, for blocks of at most 1023; 16: in an int64)."""
        WIDE: tl.constexpr = 3 * FIELD > 31
        for i in tl.static_range(16):  # a static bound with a uniform branch: the interpreter takes it too
            if i < num_steps:
                s = top - 2 * i
                c1 = t | (1 << s)
                c2 = tl.where(s >= 30, c1, t | (2 << s))  # bit 31 is the sign: never set
                c3 = tl.where(s >= 30, c1, t | (3 << s))
                if WIDE:
                    packed = ((pattern >= c1).to(tl.int64) + ((pattern >= c2).to(tl.int64) << FIELD)
                              + ((pattern >= c3).to(tl.int64) << (2 * FIELD)))
                else:
                    packed = ((pattern >= c1).to(tl.int32) + ((pattern >= c2).to(tl.int32) << FIELD)
                              + ((pattern >= c3).to(tl.int32) << (2 * FIELD)))
                counts = tl.sum(packed, axis=0)
                n1 = (counts & ((1 << FIELD) - 1)).to(tl.int32)
                n2 = ((counts >> FIELD) & ((1 << FIELD) - 1)).to(tl.int32)
                n3 = ((counts >> (2 * FIELD)) & ((1 << FIELD) - 1)).to(tl.int32)
                t = tl.where(n3 >= k, c3, tl.where(n2 >= k, c2, tl.where(n1 >= k, c1, t)))
        return t

    @triton.jit
    def _emit(b, pattern, local, k, t, top_pattern, pid, recip, idx_ptr, code_ptr, scale_ptr, K: tl.constexpr,
              INDEX_BITS: tl.constexpr, BITS: tl.constexpr, EXACT: tl.constexpr):
        """Given the k-th largest pattern t of a chunk whose entries (1-D, in ascending index
        order, all those ≥ t among them) are b/pattern/local: keeps the entries above t and
        the lowest-indexed ones equal to it up to k, quantizes them, ORs their indices and
        codes into the streams, writes the chunk's scales. Returns (kept, sent values)."""
        above = pattern > t
        equal = pattern == t
        need = k - tl.sum(above.to(tl.int32), axis=0)  # ≥ 1: t is the k-th largest
        # One scan gives both prefix counts (16 bits apart: a chunk holds at most 2^15).
        counts = tl.cumsum(above.to(tl.int32) + (equal.to(tl.int32) << 16), axis=0)
        n_equal = counts >> 16
        kept = above | (equal & (n_equal <= need))
        slot = (counts & 0xFFFF) + tl.minimum(n_equal, need) - 1
        # lo: the smallest kept magnitude is t itself; hi: the largest of the chunk is kept.
        lo = _to_bf16(t.to(tl.float32, bitcast=True))
        hi = _to_bf16(top_pattern.to(tl.float32, bitcast=True))
        LEVELS: tl.constexpr = 1 << (BITS - 1)
        step = _step(hi, lo, LEVELS, recip, EXACT)
        safe = tl.where(step > 0, step, 1.0)
        mags = tl.abs(b)
        q = _rint(_div(_sub(mags, lo, EXACT), safe, EXACT), EXACT)
        q = tl.where(step > 0, q, 0.0)
        q = tl.minimum(tl.maximum(q, 0.0), LEVELS - 1.0)
        negative = b < 0
        mag_t = _add(lo, _mul(q, step, EXACT), EXACT)
        code = (negative.to(tl.int32) << (BITS - 1)) | q.to(tl.int32)
        entry = pid.to(tl.int64) * K + slot
        _or_field(idx_ptr, entry, local, kept, INDEX_BITS)
        _or_field(code_ptr, entry, code, kept, BITS)
        tl.store(scale_ptr + pid * 2, lo)
        tl.store(scale_ptr + pid * 2 + 1, hi)
        return kept, tl.where(negative, -mag_t, mag_t)

    @triton.jit
    def _buffer(err_ptr, delta_ptr, offs, valid, decay, MODE: tl.constexpr, EXACT: tl.constexpr):
        """b, the buffer compressed: MODE 0 delta; 1 err + delta; 2 decay·err + delta."""
        d = tl.load(delta_ptr + offs, mask=valid, other=0.0)
        if MODE == 0:
            return d
        e = tl.load(err_ptr + offs, mask=valid, other=0.0)
        if MODE == 1:
            return _add(e, d, EXACT)
        return _add(_mul(e, decay, EXACT), d, EXACT)

    @triton.jit
    def _or_field(words_ptr, entry, value, mask, WIDTH: tl.constexpr):
        """ORs `value` (< 2^WIDTH) into bits entry·WIDTH … of a zeroed little-endian stream
        of int32 words: one word, or two where the field crosses a word boundary."""
        g = entry * WIDTH
        w = g >> 5
        o = (g & 31).to(tl.int32)
        tl.atomic_or(words_ptr + w, value << o, mask=mask, sem="relaxed")
        if 32 % WIDTH != 0:
            tl.atomic_or(words_ptr + w + 1, value >> ((32 - o) & 31), mask=mask & (o + WIDTH > 32), sem="relaxed")

    @triton.jit
    def _read_field(words_ptr, entry, mask, WIDTH: tl.constexpr):
        """The WIDTH-bit field of `entry` in a little-endian stream of int32 words."""
        g = entry * WIDTH
        w = g >> 5
        o = (g & 31).to(tl.uint32)
        v = tl.load(words_ptr + w, mask=mask, other=0).to(tl.uint32, bitcast=True) >> o
        if 32 % WIDTH != 0:
            spill = mask & (o + WIDTH > 32)
            hi = tl.load(words_ptr + w + 1, mask=spill, other=0).to(tl.uint32, bitcast=True)
            v = v | tl.where(spill, hi << ((32 - o) & 31), 0)
        return (v & ((1 << WIDTH) - 1)).to(tl.int32)

    @triton.jit
    def _compress_kernel(err_ptr, delta_ptr, decay, recip, idx_ptr, code_ptr, scale_ptr, sent_ptr, full_ptr, numel,
                         CHUNK: tl.constexpr, K: tl.constexpr, ROWS: tl.constexpr, CB: tl.constexpr,
                         SLAB: tl.constexpr, INDEX_BITS: tl.constexpr, BITS: tl.constexpr, MODE: tl.constexpr,
                         SENT: tl.constexpr, EXACT: tl.constexpr):
        pid = tl.program_id(0)
        base = pid.to(tl.int64) * CHUNK
        n_valid = tl.minimum(numel - base, CHUNK).to(tl.int32)
        k = tl.minimum(n_valid, K)
        # The chunk as ROWS × COLS (ROWS ≥ k): the smallest of the rows' maxima is a lower
        # bound of the k-th largest (at least ROWS ≥ k entries reach it), so only the
        # candidates at or above it can be kept: typically a few per cent of the chunk.
        # The chunk is walked in slabs of whole rows so that few registers hold it (more
        # chunks in flight per multiprocessor); the first slab stays in registers, the
        # others are read again (from L1/L2) when needed.
        COLS: tl.constexpr = CHUNK // ROWS
        NUM_SLABS: tl.constexpr = CHUNK // SLAB
        sl = tl.arange(0, SLAB // COLS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
        valid0 = sl < n_valid
        d0 = tl.load(delta_ptr + base + sl, mask=valid0, other=0.0)
        if MODE == 0:
            b0 = d0
        else:
            e0 = tl.load(err_ptr + base + sl, mask=valid0, other=0.0)
            if MODE == 1:
                b0 = _add(e0, d0, EXACT)
            else:
                b0 = _add(_mul(e0, decay, EXACT), d0, EXACT)
        p0 = tl.where(valid0, tl.abs(b0).to(tl.int32, bitcast=True), -1)
        row_max = tl.max(p0, axis=1)
        bound = tl.min(row_max, axis=0)
        top = tl.max(row_max, axis=0)
        for s in tl.static_range(1, NUM_SLABS):
            local = s * SLAB + sl
            valid = local < n_valid
            p = tl.where(valid, tl.abs(_buffer(err_ptr, delta_ptr, base + local, valid, decay, MODE, EXACT)).to(
                tl.int32, bitcast=True), -1)
            row_max = tl.max(p, axis=1)
            bound = tl.minimum(bound, tl.min(row_max, axis=0))
            top = tl.maximum(top, tl.max(row_max, axis=0))
        # Compact the candidates, in index order, into the chunk's first 2·CB residual slots
        # (the first slab, held in registers; SLAB ≥ 2·CB): values, then their indices.
        tl.debug_barrier()  # the first slab is read everywhere before it is overwritten
        fits = 2 * CB <= n_valid
        num_cand = tl.zeros((), dtype=tl.int32)
        for s in tl.static_range(NUM_SLABS):
            local = s * SLAB + sl
            valid = local < n_valid
            if s == 0:
                b = b0
            else:
                b = _buffer(err_ptr, delta_ptr, base + local, valid, decay, MODE, EXACT)
            cand = valid & (tl.abs(b).to(tl.int32, bitcast=True) >= bound)
            per_row = tl.sum(cand.to(tl.int32), axis=1)
            cslot = num_cand + (tl.cumsum(per_row, axis=0) - per_row)[:, None] + tl.cumsum(cand.to(tl.int32), axis=1) - 1
            room = cand & (cslot < CB) & fits
            tl.store(err_ptr + base + cslot, b, mask=room)
            tl.store(err_ptr + base + CB + cslot, local.to(tl.float32, bitcast=True), mask=room)
            num_cand += tl.sum(per_row, axis=0)
        if (num_cand > CB) | (not fits):
            # Too many candidates (ties, a chunk of zeros, a short last chunk):
            # _compress_full_kernel searches the whole chunk; the residual is put back.
            if MODE != 0:
                tl.debug_barrier()
                tl.store(err_ptr + base + sl, e0, mask=valid0)
            tl.store(full_ptr + pid, 1)
        else:
            tl.debug_barrier()
            j = tl.arange(0, CB)
            live = j < num_cand
            cb = tl.load(err_ptr + base + j, mask=live, other=0.0, cache_modifier=".cg")
            cl = tl.load(err_ptr + base + CB + j, mask=live, other=0.0, cache_modifier=".cg").to(tl.int32,
                                                                                                  bitcast=True)
            cp = tl.where(live, tl.abs(cb).to(tl.int32, bitcast=True), -1)
            # t lies in [bound, top]: the bits above their highest differing bit are fixed.
            diff = top ^ bound
            high = (diff.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127  # ≥ floor(log2(diff))
            first = high & ~1
            start = tl.where(first >= 30, 0, (bound >> (first + 2)) << (first + 2))
            steps = (first // 2 + 1) * (diff != 0).to(tl.int32)  # none when bound = top
            FIELD: tl.constexpr = 10 if CB < 1024 else 16
            t = _search(cp, k, tl.where(diff == 0, bound, start), first, steps, FIELD)
            kept, sent = _emit(cb, cp, cl, k, t, top, pid, recip, idx_ptr, code_ptr, scale_ptr, K, INDEX_BITS, BITS,
                               EXACT)
            tl.debug_barrier()  # every candidate read back before the residual overwrites them
            # The residual where nothing was kept is b; then the kept entries' residuals.
            tl.store(err_ptr + base + sl, b0, mask=valid0)
            for s in tl.static_range(1, NUM_SLABS):
                local = s * SLAB + sl
                valid = local < n_valid
                tl.store(err_ptr + base + local, _buffer(err_ptr, delta_ptr, base + local, valid, decay, MODE, EXACT),
                         mask=valid)
            if SENT:
                flat = tl.arange(0, CHUNK)
                tl.store(sent_ptr + base + flat, tl.zeros((CHUNK,), dtype=tl.uint8), mask=flat < n_valid)
            tl.debug_barrier()
            tl.store(err_ptr + base + cl, _sub(cb, sent, EXACT), mask=kept)
            if SENT:
                tl.store(sent_ptr + base + cl, tl.full((CB,), 1, dtype=tl.uint8), mask=kept)

    @triton.jit
    def _compress_full_kernel(err_ptr, delta_ptr, decay, recip, idx_ptr, code_ptr, scale_ptr, sent_ptr, full_ptr,
                              numel, CHUNK: tl.constexpr, K: tl.constexpr, INDEX_BITS: tl.constexpr,
                              BITS: tl.constexpr, MODE: tl.constexpr, SENT: tl.constexpr, EXACT: tl.constexpr):
        """The chunks _compress_kernel left (its flag set): the whole chunk searched. A
        kernel of its own so that its registers do not cut the common path's occupancy."""
        pid = tl.program_id(0)
        if tl.load(full_ptr + pid) != 0:
            base = pid.to(tl.int64) * CHUNK
            n_valid = tl.minimum(numel - base, CHUNK).to(tl.int32)
            k = tl.minimum(n_valid, K)
            local = tl.arange(0, CHUNK)
            valid = local < n_valid
            b = _buffer(err_ptr, delta_ptr, base + local, valid, decay, MODE, EXACT)
            pattern = tl.where(valid, tl.abs(b).to(tl.int32, bitcast=True), -1)
            t = _search(pattern, k, tl.max(pattern, axis=0) * 0, 30, 16, 16)
            kept, sent = _emit(b, pattern, local, k, t, tl.max(pattern, axis=0), pid, recip, idx_ptr, code_ptr,
                               scale_ptr, K, INDEX_BITS, BITS, EXACT)
            tl.store(err_ptr + base + local, tl.where(kept, _sub(b, sent, EXACT), b), mask=valid)
            if SENT:
                tl.store(sent_ptr + base + local, kept.to(tl.uint8), mask=valid)

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
            idx = _read_field(idx_ptr + p64 * idx_words, entry, live, INDEX_BITS)
            code = _read_field(code_ptr + p64 * code_words, entry, live, BITS)
            lo = tl.load(scale_ptr + (p64 * num_chunks + pid) * 2, mask=has, other=0.0)
            hi = tl.load(scale_ptr + (p64 * num_chunks + pid) * 2 + 1, mask=has, other=0.0)
            share = tl.load(shares_ptr + peer, mask=has, other=0.0)
            step = _step(hi, lo, LEVELS, recip, EXACT)
            mag = _add(lo, _mul((code & (LEVELS - 1)).to(tl.float32), step, EXACT), EXACT)
            value = _mul(tl.where(((code >> (BITS - 1)) & 1) != 0, -mag, mag), share, EXACT)
            bits = value.to(tl.int32, bitcast=True)
            tl.debug_barrier()  # the zeros, or the last group's sums, are in place
            for q in tl.static_range(GROUP):
                # Peer g + q's row, taken out exactly (integer sums of one non-zero term).
                mine = rows == q
                pos = start + tl.sum(tl.where(mine, idx, 0), axis=0)
                v = tl.sum(tl.where(mine, bits, 0), axis=0).to(tl.float32, bitcast=True)
                ok = (tl.sum(tl.where(mine, live.to(tl.int32), 0), axis=0) != 0) & (pos < numel)
                old = tl.load(acc_ptr + pos, mask=ok, other=0.0, cache_modifier=".cg")
                tl.store(acc_ptr + pos, _add(old, v, EXACT), mask=ok)
                if COVER:
                    w = tl.load(cover_ptr + pos, mask=ok, other=0.0, cache_modifier=".cg")
                    tl.store(cover_ptr + pos, _add(w, tl.load(shares_ptr + g + q, mask=g + q < num_peers), EXACT),
                             mask=ok)
                tl.debug_barrier()  # positions are unique within a peer, not across peers


COMPRESS_WARPS = 4
"""Warps per chunk of the compression kernel: at 1e9 elements (chunk 4096, k 64, residual
aside) on the H200, 4 → 9.9 ms, 8 → 10.0, 16 → 13.6 (node/sim/results/kernels-h200-sweep.log)."""
FULL_WARPS = 8
"""Warps per chunk of the whole-chunk search (the few chunks with too many candidates)."""


def _recip(bits: int) -> float:
    """1 / (levels − 1) rounded to fp32, as torch's CUDA division by a scalar makes it."""
    return float(torch.tensor(1.0, dtype=torch.float32) / ((1 << (bits - 1)) - 1))


def _exact(t: Tensor) -> bool:
    return t.is_cuda  # the interpreter runs on CPU tensors


def _words(count: int, width: int) -> int:
    return -(-count * width // 32)


def compress(err: Tensor, delta: Tensor, layout: ChunkLayout, bits: int, *, mode: str = "model",
             decay: float = 1.0, sent: Tensor | None = None,
             num_warps: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Fused error-feedback compression of one flat fp32 tensor (see the module docstring).

    `mode` "model": b = delta (the residual lives in the replica); "buffer": b = decay·err +
    delta. `err` (numel,) fp32 is overwritten with the new residual; `sent` (numel,) bool,
    when given, with where an entry was kept. Returns (packed indices uint8, packed codes
    uint8, scales (num_chunks, 2) float32), the streams exactly as the wire carries them."""
    assert err.dtype == torch.float32 and delta.dtype == torch.float32 and err.is_contiguous()
    assert err.numel() == delta.numel() == layout.numel
    assert layout.chunk <= 1 << 15, "the fused kernel counts a chunk's entries in 16-bit fields"
    assert sent is None or (sent.dtype == torch.bool and sent.numel() == layout.numel and sent.is_contiguous())
    delta = delta.contiguous()
    kernel_mode = 0 if mode == "model" else (1 if decay == 1.0 else 2)
    m, n_sel, dev = layout.num_chunks, layout.num_selected, err.device
    idx = torch.zeros(_words(n_sel, layout.index_bits), dtype=torch.int32, device=dev)
    codes = torch.zeros(_words(n_sel, bits), dtype=torch.int32, device=dev)
    scales = torch.empty((m, 2), dtype=torch.float32, device=dev)
    full = torch.zeros(m, dtype=torch.int8, device=dev)
    args = (err, delta, float(decay), _recip(bits), idx, codes, scales, sent.view(torch.uint8) if sent is not None else err,
            full, layout.numel)
    common = dict(CHUNK=layout.chunk, K=layout.k, INDEX_BITS=layout.index_bits, BITS=bits, MODE=kernel_mode,
                  SENT=sent is not None, EXACT=_exact(err))
    rows = min(layout.chunk, triton.next_power_of_2(layout.k))
    cb = max(16, min(layout.chunk // 2, triton.next_power_of_2(8 * layout.k)))
    slab = min(layout.chunk, max(2 * cb, layout.chunk // rows, 1024))
    _compress_kernel[(m,)](*args, ROWS=rows, CB=cb, SLAB=slab, **common, num_warps=num_warps or COMPRESS_WARPS)
    _compress_full_kernel[(m,)](*args, **common, num_warps=FULL_WARPS)
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
"""Peers whose fields one program loads at once."""


def accumulate(acc: Tensor, indices: Tensor, codes: Tensor, scales: Tensor, shares: list[float], layout: ChunkLayout,
               bits: int, cover: Tensor | None = None, num_warps: int = 4) -> Tensor:
    """acc (numel,) fp32 ← Σ_p share_p · decode(peer p), peers in the given order (acc's
    old contents are overwritten); `cover` (numel,) fp32, when given, ← Σ_p share_p where
    peer p sent a value (optim.aggregate's coverage). `indices` and `codes`: the peers'
    packed streams as `stack_streams` makes them, (num_peers, words) int32, their indices
    validated (optim's decoder does); `scales`: (num_peers, num_chunks, 2) fp32. Bitwise
    equal to the reference loop on the same device type."""
    num_peers = indices.shape[0]
    assert codes.shape[0] == num_peers == len(shares) and scales.shape == (num_peers, layout.num_chunks, 2)
    assert indices.shape[1] * 32 >= layout.num_selected * layout.index_bits
    assert codes.shape[1] * 32 >= layout.num_selected * bits
    shares_t = torch.tensor(shares, dtype=torch.float32, device=acc.device)
    group = min(ACCUMULATE_GROUP, triton.next_power_of_2(max(num_peers, 1)))
    _accumulate_kernel[(layout.num_chunks,)](
        acc, cover if cover is not None else acc, indices, codes, scales.contiguous(), shares_t, _recip(bits),
        layout.numel, indices.shape[1], codes.shape[1], num_peers, NUM_GROUPS=-(-num_peers // group), CHUNK=layout.chunk,
        K=layout.k, KB=triton.next_power_of_2(layout.k), GROUP=group,
        INDEX_BITS=layout.index_bits, BITS=bits, COVER=cover is not None, EXACT=_exact(acc), num_warps=num_warps)
    return acc
