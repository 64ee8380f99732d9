// The CUDA C kernels of kernels/ built for the CPU through tests/cuda_emulator.hpp, with one
// C entry point a kernel that tests/test_cuda_emulated.py calls through ctypes.
#include "cuda_emulator.hpp"

#include "compress.cu"

// `staged`: the 256-thread entry point, compress_kernel_256 (fused._compress_entry's choice on Hopper).
extern "C" void run_compress(unsigned int staged, unsigned int grid, unsigned int block, float* err,
                             const float* delta, float decay, float recip, unsigned int* idx, unsigned int* code,
                             float* scales, unsigned char* sent, unsigned int* todo, unsigned long long numel,
                             unsigned int chunk, unsigned int k, unsigned int per_group, unsigned int index_bits,
                             unsigned int bits, unsigned int mode, unsigned int with_sent, unsigned int divide) {
    emulate(grid, block, [&] {
        if (staged)
            compress_kernel_256(err, delta, decay, recip, idx, code, scales, sent, todo, numel, chunk, k, per_group,
                                index_bits, bits, mode, with_sent, divide);
        else
            compress_kernel(err, delta, decay, recip, idx, code, scales, sent, todo, numel, chunk, k, per_group,
                            index_bits, bits, mode, with_sent, divide);
    });
}

#include "accumulate.cu"

extern "C" void run_accumulate(unsigned int grid, unsigned int block, float* acc, float* cover,
                               const unsigned int* idx_words, const unsigned int* code_words, const float* scales,
                               const float* shares, float recip, unsigned long long numel,
                               unsigned long long idx_stride, unsigned long long code_stride, unsigned int num_peers,
                               unsigned int chunk, unsigned int k, unsigned int index_bits, unsigned int bits,
                               unsigned int with_cover) {
    emulate(grid, block, [&] {
        accumulate_kernel(acc, cover, idx_words, code_words, scales, shares, recip, numel, idx_stride, code_stride,
                          num_peers, chunk, k, index_bits, bits, with_cover);
    });
}
