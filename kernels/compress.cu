// Fused error-feedback compression of one flat fp32 tensor: the source of
// kernels/compress.ptx, which kernels/fused.py's `compress` has the CUDA driver compile and
// launch (kernels/cuda_module.py). Regenerate the PTX as fused.COMPRESS_PTX's docstring says.
// The same outputs, bit for bit, as the Triton kernel of kernels/fused_select.py and the torch
// references (fused.py's docstring gives the rule and the output layout).
//
// One block per chunk, 16 consecutive entries a thread, held in registers from the one read
// of the chunk until its residual is written back:
// 1. b (the buffer compressed) and its magnitude's bit pattern p (non-negative floats' bit
//    patterns order like the floats). The 256-thread entry point (chunks of 4096, the default;
//    "staged") reads the chunk through shared memory, a warp's 16-byte loads at consecutive
//    addresses, and keeps the chunk's b there too; the generic one reads a thread's 64 bytes
//    where they lie (a warp's 16-byte access then spans 2 KB).
// 2. A lower bound of the k-th largest pattern: the chunk cut into at least k groups of
//    consecutive entries (`per_group` threads each), the smallest of the groups' maxima
//    (every group holds one entry at or above it, so at least k do). The non-zero entries at
//    or above it, the candidates (a few per cent of the chunk), are compacted in index order
//    into shared memory by a block scan. A bound of 0 (a group of zeros) may leave fewer than
//    k: then t is 0, the non-zero entries are kept and the lowest-indexed zeros after them.
// 3. The k-th largest pattern t among the candidates, DIGIT bits a step below the common
//    prefix of the bound and the maximum: the candidates that share t's bits above the step
//    are counted in a histogram of the step's digit (shared-memory atomics: counts, so any
//    order gives the same); one warp's scan of the bins, highest first, finds the largest digit
//    with at least k candidates at or above it. Once exactly k are, t is the least of them.
// 4. Every entry above t is kept and, of those equal to t, the lowest-indexed up to k (one
//    block scan of both counts gives each kept entry its slot). The kept entries go to shared
//    memory in slot order, where a thread a slot quantizes one and ORs its index and code
//    into the wire streams (entries never share a bit: any order of the atomics gives the
//    same bytes). The residual of the chunk is written once: b − sent where kept, b elsewhere;
//    staged, the slot's thread writes b − sent over b in shared memory and the block stores
//    the chunk from there, coalesced; else each thread corrects and stores its own 16.
//    On the H200 at 1e9 the staged entry took 3.46 ms against 4.88 for a kernel that read
//    and wrote the chunk in place.
// A chunk whose candidates overflow the shared buffer (ties), or a short last chunk, writes b
// to the residual and appends its index to the list `todo` (todo[0] counts them):
// fused_select.compress_full_kernel then searches those whole.
//
// Every operation the torch references do as a kernel of its own is one correctly rounded
// operation here (__fadd_rn and the like: the compiler may fuse a plain a * b + c).

#define VALUES 16     // entries a thread: fused.COMPRESS_VALUES
#define CAPACITY 2048 // candidates the shared buffer holds: fused.COMPRESS_CAPACITY
#define DIGIT 8       // bits of t found a step
#define MAX_KEPT 1024 // entries kept a chunk: k ≤ chunk / VALUES (fused.compress_shape)
#define MAX_WARPS 32

__device__ __forceinline__ float bf16_round(float x) {  // x ≥ 0, to nearest, ties to even
    unsigned int bits = __float_as_uint(x);
    bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
    return __uint_as_float(bits);
}

__device__ __forceinline__ void or_field(unsigned int* words, long long entry, unsigned int value, int width) {
    const long long g = entry * width;
    const long long w = g >> 5;
    const unsigned int o = (unsigned int)(g & 31);
    atomicOr(words + w, value << o);
    if (o + width > 32) atomicOr(words + w + 1, value >> (32 - o));
}

// b, the buffer compressed, from the residual e and the delta d: mode 0 d (the residual kept
// in the model; e is not read), 1 e + d, 2 decay·e + d.
__device__ __forceinline__ float with_residual(float e, float d, unsigned int mode, float decay) {
    return __fadd_rn(mode == 1 ? e : __fmul_rn(e, decay), d);
}

#define STAGED_THREADS 256  // the block of the staged layout: a chunk of STAGED_THREADS · VALUES entries

// The staged layout's place in shared memory of the 16 bytes j (0-3) of thread `owner`'s
// entries: a thread's four in a row of 64 bytes, their order turned by bits 1-2 of the row, so
// that neither the eight threads of a quarter-warp writing consecutive 16 bytes of the chunk
// nor the eight reading their own j-th 16 bytes meet in a bank.
__device__ __forceinline__ unsigned int staged_slot(unsigned int owner, unsigned int j) {
    return owner * 4 + (j ^ ((owner >> 1) & 3));
}

// b of the thread's VALUES entries from d (and e where mode ≠ 0), 16-byte aligned: STAGED, a
// warp's 16-byte loads at consecutive addresses, b exchanged through `stage`, where the chunk's
// b stays (every thread of the block calls this, and chunk = STAGED_THREADS · VALUES); else the
// thread's own 64 bytes.
template <bool STAGED>
__device__ __forceinline__ void load_values(float* b, const float* d, const float* e, unsigned int mode, float decay,
                                            float4* stage) {
    const float4* d4 = reinterpret_cast<const float4*>(d);
    const float4* e4 = reinterpret_cast<const float4*>(e);
#pragma unroll
    for (int i = 0; i < VALUES / 4; ++i) {
        const unsigned int at = STAGED ? i * STAGED_THREADS + threadIdx.x : threadIdx.x * (VALUES / 4) + i;
        float4 v = d4[at];
        if (mode != 0) {
            const float4 r = e4[at];
            v = make_float4(with_residual(r.x, v.x, mode, decay), with_residual(r.y, v.y, mode, decay),
                            with_residual(r.z, v.z, mode, decay), with_residual(r.w, v.w, mode, decay));
        }
        if (STAGED) stage[staged_slot(at / 4, at % 4)] = v;
        else b[4 * i] = v.x, b[4 * i + 1] = v.y, b[4 * i + 2] = v.z, b[4 * i + 3] = v.w;
    }
    if (!STAGED) return;
    __syncthreads();
#pragma unroll
    for (int i = 0; i < VALUES / 4; ++i) {
        const float4 v = stage[staged_slot(threadIdx.x, i)];
        b[4 * i] = v.x, b[4 * i + 1] = v.y, b[4 * i + 2] = v.z, b[4 * i + 3] = v.w;
    }
}

// The thread's VALUES entries b to `out`, the chunk's start (16-byte aligned), where they lie.
__device__ __forceinline__ void store_values(float* out, const float* b) {
    float4* o4 = reinterpret_cast<float4*>(out) + threadIdx.x * (VALUES / 4);
#pragma unroll
    for (int i = 0; i < VALUES / 4; ++i) o4[i] = make_float4(b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]);
}

// The chunk in `stage` (the staged layout) to `out`, its start, a warp's 16-byte stores at
// consecutive addresses, once every thread has written its part (every thread calls this).
__device__ __forceinline__ void store_stage(float* out, const float4* stage) {
    __syncthreads();
    float4* o4 = reinterpret_cast<float4*>(out);
#pragma unroll
    for (int i = 0; i < VALUES / 4; ++i) {
        const unsigned int at = i * STAGED_THREADS + threadIdx.x;
        o4[at] = stage[staged_slot(at / 4, at % 4)];
    }
}

// Where entry `entry` of the chunk lies in the staged layout, as a float of `stage`.
__device__ __forceinline__ unsigned int staged_float(unsigned int entry) {
    return 4 * staged_slot(entry / VALUES, entry % VALUES / 4) + entry % 4;
}

// Chunk c to the list of those the whole-chunk search takes: todo[0] counts them, the
// atomic hands each its own slot (one thread of the block calls this).
__device__ __forceinline__ void list_for_search(unsigned int* todo, unsigned long long c) {
    todo[1 + atomicAdd(todo, 1u)] = (unsigned int)c;
}

// Inclusive scan of `value` over the warp, in lane order (every lane calls this).
__device__ __forceinline__ unsigned int warp_scan(unsigned int value, unsigned int lane) {
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
        const unsigned int up = __shfl_up_sync(0xFFFFFFFFu, value, d);
        if (lane >= d) value += up;
    }
    return value;
}

// Exclusive scan of `value` over the block, in thread order; `total` gets the sum. Uses
// scratch[0 .. warps] and two barriers.
__device__ __forceinline__ unsigned int block_scan(unsigned int value, unsigned int* scratch, unsigned int& total) {
    const unsigned int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const unsigned int inclusive = warp_scan(value, lane);
    if (lane == 31) scratch[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
        const unsigned int w = warp_scan(lane < warps ? scratch[lane] : 0u, lane);
        if (lane < warps) scratch[lane] = w;  // inclusive over warps
    }
    __syncthreads();
    total = scratch[warps - 1];
    const unsigned int before = warp == 0 ? 0u : scratch[warp - 1];
    return before + inclusive - value;
}

// The kernel's parameters, in the order fused.compress_arguments gives them, for its body and
// its two entry points.
#define COMPRESS_PARAMETERS                                                                                      \
    float *err, const float *delta, float decay, float recip, unsigned int *idx_words, unsigned int *code_words, \
        float *scales, unsigned char *sent, unsigned int *todo, unsigned long long numel, unsigned int chunk,    \
        unsigned int k, unsigned int per_group, unsigned int index_bits, unsigned int bits, unsigned int mode,   \
        unsigned int with_sent, unsigned int divide
#define COMPRESS_ARGUMENTS                                                                                    \
    err, delta, decay, recip, idx_words, code_words, scales, sent, todo, numel, chunk, k, per_group, index_bits, \
        bits, mode, with_sent, divide

// The kernel's body, for the two entry points below: STAGED the 256-thread one.
template <bool STAGED>
__device__ __forceinline__ void compress_chunk(COMPRESS_PARAMETERS) {
    __shared__ float4 stage[STAGED ? STAGED_THREADS * VALUES / 4 : 1];
    __shared__ int cand[CAPACITY];
    __shared__ unsigned int scratch[MAX_WARPS + 1];
    __shared__ int reduce_lo[MAX_WARPS], reduce_hi[MAX_WARPS];
    __shared__ unsigned int hist[1 << DIGIT];
    __shared__ unsigned int choice[3];
    __shared__ int least[MAX_WARPS];

    const unsigned int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const unsigned long long c = blockIdx.x;
    const unsigned long long base = c * chunk;
    const unsigned int n_valid = (unsigned int)min((unsigned long long)chunk, numel - base);
    const unsigned int first = threadIdx.x * VALUES;  // this thread's first entry in the chunk
    if (n_valid < chunk) {
        // A short last chunk: its b to the residual, for the whole-chunk search.
        for (unsigned int i = first; i < min(first + VALUES, n_valid); ++i) {
            const float d = delta[base + i];
            err[base + i] = mode == 0 ? d : with_residual(err[base + i], d, mode, decay);
        }
        if (threadIdx.x == 0) list_for_search(todo, c);
        return;
    }
    const bool mine = first < chunk;  // chunk ≥ VALUES: a thread's entries are all in the chunk or all out

    float b[VALUES];
    if (mine) load_values<STAGED>(b, delta + base, err + base, mode, decay, stage);  // STAGED: all are mine
#define PATTERN(x) ((int)(__float_as_uint(x) & 0x7FFFFFFFu))
    // 2. The groups' maxima (a group is `per_group` threads, a power of two ≤ 32, at least k
    //    groups in the chunk), their least (the bound) and the chunk's maximum.
    int my_max = -1;
    if (mine) {
#pragma unroll
        for (int i = 0; i < VALUES; ++i) my_max = max(my_max, PATTERN(b[i]));
    }
    int group_max = my_max;
    for (unsigned int d = 1; d < per_group; d <<= 1) group_max = max(group_max, __shfl_xor_sync(0xFFFFFFFFu, group_max, d));
    int lo = mine ? group_max : 0x7FFFFFFF, hi = my_max;  // threads past a small chunk hold no group
#pragma unroll
    for (int d = 16; d >= 1; d >>= 1) {
        lo = min(lo, __shfl_xor_sync(0xFFFFFFFFu, lo, d));
        hi = max(hi, __shfl_xor_sync(0xFFFFFFFFu, hi, d));
    }
    if (lane == 0) reduce_lo[warp] = lo, reduce_hi[warp] = hi;
    for (unsigned int j = threadIdx.x; j < (1u << DIGIT); j += blockDim.x) hist[j] = 0;
    __syncthreads();
    int bound = reduce_lo[0], top = reduce_hi[0];
    for (unsigned int w = 1; w < warps; ++w) bound = min(bound, reduce_lo[w]), top = max(top, reduce_hi[w]);

    // Candidates: compacted in index order. Zeros never are: where a group is all zeros (the
    // bound 0) the candidates are the non-zero entries, and when they are fewer than k the
    // lowest-indexed zeros fill the rest (t = 0, no search), so a chunk of zeros stays here.
    const int at_least = max(bound, 1);
    unsigned int mask = 0;
    if (mine) {
#pragma unroll
        for (int i = 0; i < VALUES; ++i) mask |= (unsigned int)(PATTERN(b[i]) >= at_least) << i;
    }
    unsigned int num_cand;
    unsigned int slot = block_scan(__popc(mask), scratch, num_cand);
    if (num_cand > CAPACITY) {
        // The whole-chunk search takes it (fused_select.compress_full_kernel reads b here).
        if (STAGED) store_stage(err + base, stage);  // b, as loaded
        else if (mine) store_values(err + base, b);
        if (threadIdx.x == 0) list_for_search(todo, c);
        return;
    }
#pragma unroll
    for (int i = 0; i < VALUES; ++i)
        if (mask >> i & 1u) cand[slot++] = PATTERN(b[i]);
    __syncthreads();

    // 3. The k-th largest pattern t: below the common prefix of bound and top, DIGIT bits a step.
    //    A step counts, in a histogram, the candidates that share t's bits above it; the
    //    digit is the largest whose candidates with those above t's prefix reach k.
    int t = bound;  // 0 where fewer than k candidates (only a bound of 0 allows that)
    if (num_cand >= k && bound != top) {
        const int high = 31 - __clz(bound ^ top);  // the highest differing bit
        t = bound & ~((int)(0xFFFFFFFFu >> (31 - high)));  // the common prefix, bits ≤ high cleared
        unsigned int above = 0;  // candidates above every pattern with t's bits above the step
        bool exact = false;
        for (int top_bit = high; top_bit >= 0 && !exact; top_bit -= DIGIT) {
            const int low_bit = max(0, top_bit - DIGIT + 1);
            const unsigned int bins = 1u << (top_bit - low_bit + 1);
            const int prefix = t >> (top_bit + 1);
            for (unsigned int i = threadIdx.x; i < num_cand; i += blockDim.x)
                if (cand[i] >> (top_bit + 1) == prefix) atomicAdd(&hist[(cand[i] >> low_bit) & (bins - 1)], 1u);
            __syncthreads();
            // Warp 0 finds the digit: a lane's bins, highest first, and a warp scan of their counts
            // give the candidates in the bins above each.
            if (warp == 0) {
                const unsigned int per = max(1u, bins / 32), r0 = lane * per;
                unsigned int mine_count = 0;
                for (unsigned int r = r0; r < min(r0 + per, bins); ++r) mine_count += hist[bins - 1 - r];
                unsigned int higher = above + warp_scan(mine_count, lane) - mine_count;
                for (unsigned int r = r0; r < min(r0 + per, bins); ++r) {
                    const unsigned int j = bins - 1 - r, n = hist[j];
                    if (higher < k && higher + n >= k) choice[0] = j, choice[1] = higher, choice[2] = higher + n;
                    higher += n;
                    hist[j] = 0;
                }
            }
            __syncthreads();
            t |= (int)(choice[0] << low_bit);
            above = choice[1];
            exact = choice[2] == k;  // exactly k candidates are ≥ t
        }
        if (exact) {  // the k-th largest is the least of them
            int m = 0x7FFFFFFF;
            for (unsigned int i = threadIdx.x; i < num_cand; i += blockDim.x)
                if (cand[i] >= t) m = min(m, cand[i]);
#pragma unroll
            for (int d = 16; d >= 1; d >>= 1) m = min(m, __shfl_xor_sync(0xFFFFFFFFu, m, d));
            if (lane == 0) least[warp] = m;
            __syncthreads();
            t = least[0];
            for (unsigned int w = 1; w < warps; ++w) t = min(t, least[w]);
        }
    }

    // 4. Keep the entries above t and the lowest-indexed equal ones up to k: one scan of both
    //    counts, 16 bits apart (a chunk holds at most 2^15 entries).
    unsigned int above = 0, equal = 0;
    if (mine) {
#pragma unroll
        for (int i = 0; i < VALUES; ++i) {
            above |= (unsigned int)(PATTERN(b[i]) > t) << i;
            equal |= (unsigned int)(PATTERN(b[i]) == t) << i;
        }
    }
    unsigned int totals;
    const unsigned int before = block_scan(__popc(above) | (__popc(equal) << 16), scratch, totals);
    const unsigned int need = k - (totals & 0xFFFFu);  // ≥ 1: t is the k-th largest
    const float lo_f = bf16_round(__int_as_float(t)), hi_f = bf16_round(__int_as_float(top));
    const unsigned int levels = 1u << (bits - 1);
    // The quantizer's step as torch computes it: its CUDA kernels divide by a scalar as a product
    // with its fp32 reciprocal, its CPU kernels divide (`divide`: this source run on the CPU,
    // tests/cuda_emulator.hpp).
    const float span = __fsub_rn(hi_f, lo_f);
    const float step = divide ? __fdiv_rn(span, (float)(levels - 1)) : __fmul_rn(span, recip);
    const float safe = step > 0.0f ? step : 1.0f;
    if (threadIdx.x == 0) scales[2 * c] = lo_f, scales[2 * c + 1] = hi_f;
    // The kept entries to shared memory in slot order (the candidates are no longer read:
    // the scan's barriers passed), for k threads to quantize and OR into the wire streams.
    unsigned int* kept_entry = reinterpret_cast<unsigned int*>(cand);      // index | code << 16
    float* kept_value = reinterpret_cast<float*>(cand) + MAX_KEPT;         // b, then what was sent
    unsigned int flags = 0;
    if (STAGED) {
        // A thread's entries at or above t only, their b read from `stage`.
        for (unsigned int rest = above | equal; rest != 0; rest &= rest - 1) {
            const int i = __ffs(rest) - 1;
            const unsigned int upto = (2u << i) - 1;  // entries 0 .. i of the thread
            const unsigned int n_above = (before & 0xFFFFu) + __popc(above & upto);
            const unsigned int n_equal = (before >> 16) + __popc(equal & upto);
            if ((above >> i & 1u) || n_equal <= need) {
                const unsigned int s = n_above + min(n_equal, need) - 1;
                kept_entry[s] = first + i, kept_value[s] = reinterpret_cast<const float*>(stage)[staged_float(first + i)];
                flags |= 1u << i;
            }
        }
    } else {
        unsigned int n_above = before & 0xFFFFu, n_equal = before >> 16;
#pragma unroll
        for (int i = 0; i < VALUES; ++i) {
            const bool is_above = above >> i & 1u, is_equal = equal >> i & 1u;
            n_above += is_above, n_equal += is_equal;
            if (mine && (is_above || (is_equal && n_equal <= need))) {
                const unsigned int s = n_above + min(n_equal, need) - 1;
                kept_entry[s] = first + i, kept_value[s] = b[i];
                flags |= 1u << i;
            }
        }
    }
    __syncthreads();
    for (unsigned int s = threadIdx.x; s < k; s += blockDim.x) {
        const float v = kept_value[s];
        const float mag = fabsf(v);
        float q = step > 0.0f ? rintf(__fdiv_rn(__fsub_rn(mag, lo_f), safe)) : 0.0f;
        q = fminf(fmaxf(q, 0.0f), (float)(levels - 1));
        const bool negative = v < 0.0f;
        const float m = __fadd_rn(lo_f, __fmul_rn(q, step));
        const long long entry = (long long)c * k + s;
        or_field(idx_words, entry, kept_entry[s], index_bits);
        or_field(code_words, entry, ((unsigned int)negative << (bits - 1)) | (unsigned int)q, bits);
        // STAGED: the residual b − sent into `stage`, in place of b; else back to its thread.
        if (STAGED) reinterpret_cast<float*>(stage)[staged_float(kept_entry[s])] = __fsub_rn(v, negative ? -m : m);
        else kept_value[s] = negative ? -m : m;
    }
    if (STAGED) {
        store_stage(err + base, stage);
    } else {
        __syncthreads();
        if (!mine) return;
        unsigned int n_above = before & 0xFFFFu, n_equal = before >> 16;
#pragma unroll
        for (int i = 0; i < VALUES; ++i) {
            const bool is_above = above >> i & 1u, is_equal = equal >> i & 1u;
            n_above += is_above, n_equal += is_equal;
            if (flags >> i & 1u) b[i] = __fsub_rn(b[i], kept_value[n_above + min(n_equal, need) - 1]);
        }
        store_values(err + base, b);
    }
    if (with_sent) {
        unsigned int words[VALUES / 4];
#pragma unroll
        for (int i = 0; i < VALUES / 4; ++i)
            words[i] = (flags >> (4 * i) & 1u) | (flags >> (4 * i + 1) & 1u) << 8 | (flags >> (4 * i + 2) & 1u) << 16 |
                       (flags >> (4 * i + 3) & 1u) << 24;
        *reinterpret_cast<uint4*>(sent + base + first) = make_uint4(words[0], words[1], words[2], words[3]);
    }
}

// Any block size up to 1024 threads (chunks up to 16384 entries).
extern "C" __global__ void __launch_bounds__(1024) compress_kernel(COMPRESS_PARAMETERS) {
    compress_chunk<false>(COMPRESS_ARGUMENTS);
}

// Blocks of STAGED_THREADS threads and chunks of 4096 entries (the default) only, staged, with
// registers capped for 5 blocks a multiprocessor where 58 registers allow 4 (48, no spill).
extern "C" __global__ void __launch_bounds__(STAGED_THREADS, 5) compress_kernel_256(COMPRESS_PARAMETERS) {
    compress_chunk<true>(COMPRESS_ARGUMENTS);
}
