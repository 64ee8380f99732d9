// Runs a CUDA C kernel source of kernels/ on the CPU, a host thread per CUDA thread, so that
// its logic is tested bit for bit where there is no GPU (CI): tests/test_cuda_emulated.py
// compiles this header with the kernel's .cu into a shared library (g++, C++20).
//
// What it models: blocks run one after another; the threads of a block run concurrently, and
// __syncthreads is a barrier of the block; a warp's shuffles and ballots exchange values
// through a barrier of its 32 threads (the kernels call them with every lane, as their full
// masks say); __shared__ variables are statics, shared by the threads of the block running;
// fp32 operations round on their own (-ffp-contract=off: no fused multiply-add), as the
// kernels' __fadd_rn and the like do on the GPU. What it does not: timing, memory ordering
// weaker than a barrier's, divergent warps, or anything the kernels do not use.

#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

struct Dim3 {
    unsigned int x = 0, y = 0, z = 0;
};

inline thread_local Dim3 threadIdx, blockIdx;
inline Dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct float4 {
    float x, y, z, w;
};
struct uint4 {
    unsigned int x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return {x, y, z, w}; }

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline unsigned int __float_as_uint(float x) {
    unsigned int u;
    std::memcpy(&u, &x, 4);
    return u;
}
inline float __uint_as_float(unsigned int u) {
    float x;
    std::memcpy(&x, &u, 4);
    return x;
}
inline float __int_as_float(int i) { return __uint_as_float((unsigned int)i); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned int)x); }
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned int atomicOr(unsigned int* p, unsigned int v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }

template <class T>
inline T min(T a, T b) { return b < a ? b : a; }
template <class T>
inline T max(T a, T b) { return a < b ? b : a; }

struct Warp {
    std::barrier<> bar{32};
    unsigned long long slot[32];
};

inline std::barrier<>* block_barrier = nullptr;
inline thread_local Warp* my_warp = nullptr;

inline void __syncthreads() { block_barrier->arrive_and_wait(); }

template <class T>
inline T warp_exchange(T v, unsigned int src) {
    static_assert(sizeof(T) <= 8);
    const unsigned int lane = threadIdx.x & 31;
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    my_warp->slot[lane] = bits;
    my_warp->bar.arrive_and_wait();
    T out;
    std::memcpy(&out, &my_warp->slot[src & 31], sizeof(T));
    my_warp->bar.arrive_and_wait();  // every lane has read before the slots are reused
    return out;
}

template <class T>
inline T __shfl_xor_sync(unsigned int, T v, int d) { return warp_exchange(v, (threadIdx.x & 31) ^ (unsigned int)d); }

template <class T>
inline T __shfl_up_sync(unsigned int, T v, unsigned int d) {
    const unsigned int lane = threadIdx.x & 31;
    return warp_exchange(v, lane >= d ? lane - d : lane);
}

inline unsigned int __ballot_sync(unsigned int, int predicate) {
    const unsigned int lane = threadIdx.x & 31;
    my_warp->slot[lane] = predicate != 0;
    my_warp->bar.arrive_and_wait();
    unsigned int mask = 0;
    for (int i = 0; i < 32; ++i) mask |= (unsigned int)(my_warp->slot[i] != 0) << i;
    my_warp->bar.arrive_and_wait();
    return mask;
}

// Runs `kernel` (a call of the kernel with its arguments) on `grid` blocks of `block` threads
// (a multiple of 32), one block after another.
inline void emulate(unsigned int grid, unsigned int block, const std::function<void()>& kernel) {
    blockDim = {block, 1, 1};
    gridDim = {grid, 1, 1};
    for (unsigned int b = 0; b < grid; ++b) {
        std::barrier<> bar(block);
        std::vector<Warp> warps(block / 32);
        block_barrier = &bar;
        std::vector<std::thread> threads;
        threads.reserve(block);
        for (unsigned int t = 0; t < block; ++t)
            threads.emplace_back([&, t] {
                threadIdx = {t, 0, 0};
                blockIdx = {b, 0, 0};
                my_warp = &warps[t / 32];
                kernel();
                // A thread that has returned waits at no later barrier (as on the GPU).
                my_warp->bar.arrive_and_drop();
                block_barrier->arrive_and_drop();
            });
        for (auto& th : threads) th.join();
    }
}
