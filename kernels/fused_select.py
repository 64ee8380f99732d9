"""The fused compression kernels (kernels/fused.py's `compress` launches them): top-k
selection by magnitude per chunk, quantization, the packed wire streams and the residual, in
one pass over the chunk; bit for bit what the torch references give (fused.py's docstring
says how and what the outputs are)."""

from __future__ import annotations

try:  # Triton is optional: CPU and MPS peers never need it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

if triton is not None:
    from locoswarm.kernels.fused_ops import add, div, mul, or_field, rint, quant_step, sub, to_bf16

    @triton.jit
    def _search(pattern, k, t, top, num_steps, FIELD: tl.constexpr):
        """The k-th largest of `pattern` (int32 ≥ 0; −1 counts as absent), two bits a step
        from bits (top+1, top) down: at entry t holds the bits above and at least k
        patterns are ≥ t. The three counts of a step share one reduction, packed FIELD bits
        apart (FIELD 10: in an int32, for blocks of at most 1023; 16: in an int64). The
        search stops once exactly k patterns are ≥ t (typically after 8 or 9 bits of a
        mantissa rather than all 23): the k-th largest is then their minimum."""
        WIDE: tl.constexpr = 3 * FIELD > 31
        n_t = tl.zeros((), dtype=tl.int32) - 1  # patterns ≥ t, when a step has counted them
        for i in tl.static_range(16):  # a static bound with a uniform branch: the interpreter takes it too
            if (i < num_steps) & (n_t != k):
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
                n_t = tl.where(n3 >= k, n3, tl.where(n2 >= k, n2, tl.where(n1 >= k, n1, n_t)))
                t = tl.where(n3 >= k, c3, tl.where(n2 >= k, c2, tl.where(n1 >= k, c1, t)))
        return tl.min(tl.where(pattern >= t, pattern, 0x7FFFFFFF), axis=0)

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
        lo = to_bf16(t.to(tl.float32, bitcast=True))
        hi = to_bf16(top_pattern.to(tl.float32, bitcast=True))
        LEVELS: tl.constexpr = 1 << (BITS - 1)
        step = quant_step(hi, lo, LEVELS, recip, EXACT)
        safe = tl.where(step > 0, step, 1.0)
        mags = tl.abs(b)
        q = rint(div(sub(mags, lo, EXACT), safe, EXACT), EXACT)
        q = tl.where(step > 0, q, 0.0)
        q = tl.minimum(tl.maximum(q, 0.0), LEVELS - 1.0)
        negative = b < 0
        mag_t = add(lo, mul(q, step, EXACT), EXACT)
        code = (negative.to(tl.int32) << (BITS - 1)) | q.to(tl.int32)
        entry = pid.to(tl.int64) * K + slot
        or_field(idx_ptr, entry, local, kept, INDEX_BITS)
        or_field(code_ptr, entry, code, kept, BITS)
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
            return add(e, d, EXACT)
        return add(mul(e, decay, EXACT), d, EXACT)

    @triton.jit
    def compress_kernel(err_ptr, delta_ptr, decay, recip, idx_ptr, code_ptr, scale_ptr, sent_ptr, todo_ptr, numel,
                         CHUNK: tl.constexpr, K: tl.constexpr, ROWS: tl.constexpr, CB: tl.constexpr,
                         INDEX_BITS: tl.constexpr, BITS: tl.constexpr, MODE: tl.constexpr, SENT: tl.constexpr,
                         EXACT: tl.constexpr):
        pid = tl.program_id(0)
        base = pid.to(tl.int64) * CHUNK
        n_valid = tl.minimum(numel - base, CHUNK).to(tl.int32)
        k = tl.minimum(n_valid, K)
        # The chunk is read once and held in registers (fused.py launches a warp per 1024
        # entries) until its residual is written back.
        COLS: tl.constexpr = CHUNK // ROWS
        local = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
        valid = local < n_valid
        b = _buffer(err_ptr, delta_ptr, base + local, valid, decay, MODE, EXACT)
        p = tl.where(valid, tl.abs(b).to(tl.int32, bitcast=True), -1)
        # The chunk as ROWS × COLS (ROWS ≥ k): the smallest of the rows' maxima is a lower
        # bound of the k-th largest (at least ROWS ≥ k entries reach it), so only the
        # candidates at or above it can be kept: typically a few per cent of the chunk.
        row_max = tl.max(p, axis=1)
        bound = tl.min(row_max, axis=0)
        top = tl.max(row_max, axis=0)
        cand = (p >= bound).to(tl.int32)
        per_row = tl.sum(cand, axis=1)
        num_cand = tl.sum(per_row, axis=0)
        fits = (2 * CB <= n_valid) & (num_cand <= CB)
        # Compact the candidates, in index order, into the chunk's first 2·CB residual slots
        # as (index << 32 | value bits) pairs; the chunk is in registers, so they are free.
        slot = (tl.cumsum(per_row, axis=0) - per_row)[:, None] + tl.cumsum(cand, axis=1) - 1
        pairs = (err_ptr + base).to(tl.pointer_type(tl.int64))
        tl.debug_barrier()  # every entry of the chunk is read before its slots are overwritten
        packed = (local.to(tl.int64) << 32) | b.to(tl.uint32, bitcast=True).to(tl.int64)
        tl.store(pairs + slot, packed, mask=(cand != 0) & fits)
        if fits:
            tl.debug_barrier()
            j = tl.arange(0, CB)
            live = j < num_cand
            pair = tl.load(pairs + j, mask=live, other=0, cache_modifier=".cg")
            cb = (pair & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
            cl = (pair >> 32).to(tl.int32)
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
            tl.store(err_ptr + base + local, b, mask=valid)
            if SENT:
                flat = tl.arange(0, CHUNK)
                tl.store(sent_ptr + base + flat, tl.zeros((CHUNK,), dtype=tl.uint8), mask=flat < n_valid)
            tl.debug_barrier()
            tl.store(err_ptr + base + cl, sub(cb, sent, EXACT), mask=kept)
            if SENT:
                tl.store(sent_ptr + base + cl, tl.full((CB,), 1, dtype=tl.uint8), mask=kept)
        else:
            # Too many candidates (ties, a chunk of zeros, a short last chunk): the chunk's
            # b goes to the residual buffer, its index to the list (todo[0] counts them), and
            # compress_full_kernel searches it whole.
            tl.debug_barrier()
            tl.store(err_ptr + base + local, b, mask=valid)
            tl.store(todo_ptr + 1 + tl.atomic_add(todo_ptr, 1), pid)

    @triton.jit
    def compress_full_kernel(err_ptr, delta_ptr, decay, recip, idx_ptr, code_ptr, scale_ptr, sent_ptr, todo_ptr,
                              numel, CHUNK: tl.constexpr, K: tl.constexpr, INDEX_BITS: tl.constexpr,
                              BITS: tl.constexpr, SENT: tl.constexpr, EXACT: tl.constexpr):
        """The chunks compress_kernel listed (todo[1 .. todo[0]], their b in the residual
        buffer, whatever the mode), each searched whole, program p taking the p-th, then
        every num_programs-th after it: a grid of a few waves whatever the tensor's size (a
        program a chunk cost 0.6 ms at 1e9 entries on the H200 with none listed). A kernel
        of its own so that its registers do not cut the common path's occupancy."""
        i = tl.program_id(0)
        count = tl.load(todo_ptr)
        while i < count:  # not range(): the interpreter cannot take a loaded bound there
            c = tl.load(todo_ptr + 1 + i)
            base = c.to(tl.int64) * CHUNK
            n_valid = tl.minimum(numel - base, CHUNK).to(tl.int32)
            k = tl.minimum(n_valid, K)
            local = tl.arange(0, CHUNK)
            valid = local < n_valid
            b = tl.load(err_ptr + base + local, mask=valid, other=0.0)  # compress_kernel left b there
            pattern = tl.where(valid, tl.abs(b).to(tl.int32, bitcast=True), -1)
            t = _search(pattern, k, tl.max(pattern, axis=0) * 0, 30, 16, 16)
            kept, sent = _emit(b, pattern, local, k, t, tl.max(pattern, axis=0), c, recip, idx_ptr, code_ptr,
                               scale_ptr, K, INDEX_BITS, BITS, EXACT)
            tl.store(err_ptr + base + local, tl.where(kept, sub(b, sent, EXACT), b), mask=valid)
            if SENT:
                tl.store(sent_ptr + base + local, kept.to(tl.uint8), mask=valid)
            i += tl.num_programs(0)
