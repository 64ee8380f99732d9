// Decode and accumulate of many peers' compressed deltas into one dense fp32 buffer: the
// source of kernels/accumulate.ptx, which kernels/fused.py's `accumulate` has the CUDA driver
// compile and launch (kernels/cuda_module.py). Regenerate the PTX on a machine with nvcc as
// fused.ACCUMULATE_PTX's docstring says.
//
// One block per window of W positions of one chunk (W = 4096, or 2048 with the coverage
// sums beside the values; the last window of a chunk may be shorter). The window's sums live
// in shared memory: zeroed, then each peer in the given order adds its values at its
// positions (unique within a peer, so no two threads touch one position between barriers;
// a barrier separates peers), then the window is written out once, coalesced. The block's
// (peer, entry) pairs are decoded PAIRS a thread at a time into registers, the next batch's
// loads issued once the current one is added. No atomics:
// the same bits every run, equal to the torch reference acc + densify(peer)·share, peer
// after peer, with every operation correctly rounded on its own as torch's kernels do it.

#ifndef SHARED_FLOATS
#define SHARED_FLOATS 4096  // the window: fused.ACCUMULATE_WINDOW
#endif
#ifndef PAIRS
#define PAIRS 3  // (peer, entry) pairs a thread decodes into registers at once
#endif

__device__ __forceinline__ unsigned int read_field(const unsigned int* words, long long entry, int width) {
    long long g = entry * width;
    long long w = g >> 5;
    unsigned int o = (unsigned int)(g & 31);
    unsigned int v = words[w] >> o;
    if (o + width > 32) v |= words[w + 1] << (32 - o);
    return v & ((1u << width) - 1u);
}

// One (peer, entry) pair decoded: the peer (num_peers for none), the position in the chunk,
// the value times the peer's share.
struct Pair {
    unsigned int peer, pos;
    float value;
};

// The block's pairs first + r · blockDim.x + threadIdx.x, r < PAIRS, of chunk c (pairs are
// peer-major: pair i is entry i mod k_c of peer i / k_c), their loads all in flight together.
__device__ __forceinline__ void decode_pairs(Pair* out, unsigned int first, unsigned int total, unsigned int k_c,
                                             unsigned long long c, unsigned int k, unsigned long long num_chunks,
                                             const unsigned int* idx_words, const unsigned int* code_words,
                                             const float* scales, const float* shares, float recip,
                                             unsigned long long idx_stride, unsigned long long code_stride,
                                             unsigned int index_bits, unsigned int bits, unsigned int num_peers) {
    const unsigned int levels = 1u << (bits - 1);
#pragma unroll
    for (int r = 0; r < PAIRS; ++r) {
        const unsigned int i = first + r * blockDim.x + threadIdx.x;
        out[r].peer = num_peers;
        if (i >= total) continue;
        const unsigned int p = i / k_c, e = i - p * k_c;
        const long long entry = (long long)c * k + e;
        const float lo = scales[(p * num_chunks + c) * 2];
        const float hi = scales[(p * num_chunks + c) * 2 + 1];
        // torch's CUDA kernels divide by a scalar as a product with its fp32 reciprocal
        const float step = __fmul_rn(__fsub_rn(hi, lo), recip);
        const unsigned int code = read_field(code_words + p * code_stride, entry, bits);
        const float mag = __fadd_rn(lo, __fmul_rn((float)(code & (levels - 1)), step));
        out[r] = {p, read_field(idx_words + p * idx_stride, entry, index_bits),
                  __fmul_rn((code >> (bits - 1)) & 1u ? -mag : mag, shares[p])};
    }
}

// num_peers · min(k, chunk) < 2^32 (fused.accumulate asserts it).
extern "C" __global__ void accumulate_kernel(
    float* acc, float* cover, const unsigned int* idx_words, const unsigned int* code_words, const float* scales,
    const float* shares, float recip, unsigned long long numel, unsigned long long idx_stride,
    unsigned long long code_stride, unsigned int num_peers, unsigned int chunk, unsigned int k,
    unsigned int index_bits, unsigned int bits, unsigned int with_cover) {
    __shared__ float smem[SHARED_FLOATS];
    const unsigned int window = with_cover ? SHARED_FLOATS / 2 : SHARED_FLOATS;
    float* sums = smem;
    float* shares_sum = smem + window;
    const unsigned int windows = (chunk + window - 1) / window;
    const unsigned long long c = blockIdx.x / windows;
    const unsigned int w0 = (blockIdx.x % windows) * window;
    const unsigned long long start = c * chunk;
    const unsigned int chunk_len = (unsigned int)min((unsigned long long)chunk, numel - start);
    if (w0 >= chunk_len) return;
    const unsigned int width = min(window, chunk_len - w0);
    const unsigned int k_c = min(k, chunk_len);
    const unsigned long long num_chunks = (numel + chunk - 1) / chunk;
    const unsigned int total = num_peers * k_c, batch = PAIRS * blockDim.x;
    // The first batch's loads go out before the window is zeroed, so that their latency and
    // the zeroing overlap.
    Pair pairs[PAIRS];
    auto decode = [&](unsigned int first) {
        decode_pairs(pairs, first, total, k_c, c, k, num_chunks, idx_words, code_words, scales, shares, recip,
                     idx_stride, code_stride, index_bits, bits, num_peers);
    };
    decode(0);
    for (unsigned int i = threadIdx.x; i < width; i += blockDim.x) {
        sums[i] = 0.0f;
        if (with_cover) shares_sum[i] = 0.0f;
    }
    for (unsigned int first = 0; first < total; first += batch) {
        const unsigned int first_peer = first / k_c, last_peer = (min(first + batch, total) - 1) / k_c;
        for (unsigned int q = first_peer; q <= last_peer; ++q) {
            __syncthreads();  // the zeros, or the sums of the peers before q, are in place
            const float share = shares[q];
#pragma unroll
            for (int r = 0; r < PAIRS; ++r) {
                const unsigned int pos = pairs[r].pos;  // unique within a peer
                if (pairs[r].peer != q || pos < w0 || pos >= w0 + width) continue;
                sums[pos - w0] = __fadd_rn(sums[pos - w0], pairs[r].value);
                if (with_cover) shares_sum[pos - w0] = __fadd_rn(shares_sum[pos - w0], share);
            }
        }
        if (first + batch < total) decode(first + batch);
    }
    __syncthreads();
    float* out = acc + start + w0;
    float* out_cover = cover + start + w0;
    if (width % 4 == 0 && (start + w0) % 4 == 0) {
        for (unsigned int i = threadIdx.x * 4; i < width; i += blockDim.x * 4) {
            *reinterpret_cast<float4*>(out + i) = *reinterpret_cast<const float4*>(sums + i);
            if (with_cover) *reinterpret_cast<float4*>(out_cover + i) = *reinterpret_cast<const float4*>(shares_sum + i);
        }
    } else {
        for (unsigned int i = threadIdx.x; i < width; i += blockDim.x) {
            out[i] = sums[i];
            if (with_cover) out_cover[i] = shares_sum[i];
        }
    }
}
