"""Timing of the compression kernels on CUDA (`locoswarm bench kernels`): the plain-torch
reference path and the fused kernels on the same buffers, against a device-to-device copy
measured in the same run.

Byte accounting (the floor): compression reads the residual and the delta and writes the
residual, 12 bytes per element (the selected entries' outputs are ≈1 % of that and left
out); with the residual kept in the model (the default) it reads only the delta, 8 bytes.
Decode-and-accumulate of P peers writes the dense fp32 buffer once (4 bytes per element)
and reads each peer's packed streams and scales (counted: about 0.27 bytes an element for 8 peers
at k 64 of 4096, 4 bits). A copy moves 8 bytes per element (read + write), so floor time =
bytes / (8·n / copy time).

Compression columns: `compress_fused_*` is what `fused.compress` runs by default
(COMPRESS_KERNEL), `compress_cuda_*` and `compress_triton_*` each kernel forced.

Extra memory: the peak allocated while the path runs, less what was allocated before it
(the inputs and the outputs' final size are allocated before for both paths).
"""

from __future__ import annotations

import statistics

import torch

from locoswarm.kernels.bitpack import pack_bits, unpack_bits
from locoswarm.kernels.layout import ChunkLayout
from locoswarm.kernels.quant import dequantize, quantize
from locoswarm.kernels.topk import chunked_topk, scatter_chunks


def _time(fn, reps: int, warmup: int = 2) -> float:
    """Median seconds of `fn()` over `reps` runs, CUDA events, after warm-up runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def _extra_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _reference_compress(err, delta, lay, bits):
    buf = err + delta
    idx, vals = chunked_topk(buf, lay)
    codes, scales = quantize(vals, lay, bits)
    t = scatter_chunks(idx, dequantize(codes, scales, lay, bits), lay)
    err.copy_(buf.sub_(t))
    return pack_bits(idx, lay.index_bits), pack_bits(codes, bits), scales


def _reference_accumulate(acc, peers, shares, lay, bits):
    acc.zero_()
    scratch = torch.empty_like(acc)
    for (idx, codes, scales), share in zip(peers, shares):
        scratch.zero_()
        values = dequantize(codes.long(), scales, lay, bits) * share
        acc.add_(scatter_chunks(idx.long(), values, lay, out=scratch))
    return acc


def bench_kernels(sizes=(10**7, 10**8, 10**9), chunk: int = 4096, k: int = 64, bits: int = 4, peers: int = 8,
                  reps: int = 10) -> list[dict]:
    from locoswarm.kernels import fused

    rows = []
    for n in sizes:
        free = torch.cuda.mem_get_info()[0]
        if 40 * n > free:  # the reference's temporaries need several buffers' worth
            rows.append({"elements": n, "skipped": f"needs ≈{40 * n / 2**30:.0f} GiB, {free / 2**30:.0f} free"})
            continue
        lay = ChunkLayout.for_tensor(n, chunk, k / chunk)
        gen = torch.Generator(device="cuda").manual_seed(n)
        delta = torch.randn(n, device="cuda", generator=gen)
        err = torch.randn(n, device="cuda", generator=gen).mul_(0.01)
        dst = torch.empty_like(delta)
        t_copy = _time(lambda: dst.copy_(delta), reps)
        del dst
        copy_rate = 8 * n / t_copy
        t_ref = _time(lambda: _reference_compress(err, delta, lay, bits), max(3, reps // 3))
        mem_ref = _extra_bytes(lambda: _reference_compress(err, delta, lay, bits))

        def fused_compress():
            return fused.compress(err, delta, lay, bits, mode="buffer")

        t_fused = _time(fused_compress, reps)
        mem_fused = _extra_bytes(fused_compress)
        t_model = _time(lambda: fused.compress(err, delta, lay, bits, mode="model"), reps)
        t_cuda = _time(lambda: fused.compress(err, delta, lay, bits, mode="buffer", kernel="cuda"), reps)
        t_triton = _time(lambda: fused.compress(err, delta, lay, bits, mode="buffer", kernel="triton"), reps)
        streams = []
        for p in range(peers):
            e = torch.zeros(n, device="cuda")
            streams.append(fused.compress(e, torch.randn(n, device="cuda", generator=gen), lay, bits))
            del e
        shares = [1.0 / peers] * peers
        unpacked = [(unpack_bits(i, lay.index_bits, lay.num_selected), unpack_bits(c, bits, lay.num_selected), s)
                    for i, c, s in streams]
        acc = torch.empty(n, device="cuda")
        t_acc_ref = _time(lambda: _reference_accumulate(acc, unpacked, shares, lay, bits), max(3, reps // 3))
        mem_acc_ref = _extra_bytes(lambda: _reference_accumulate(acc, unpacked, shares, lay, bits))
        del unpacked
        stacked = (fused.stack_streams([s[0] for s in streams]), fused.stack_streams([s[1] for s in streams]),
                   torch.stack([s[2] for s in streams]))
        del streams

        def fused_accumulate():
            return fused.accumulate(acc, *stacked, shares, lay, bits)

        t_acc = _time(fused_accumulate, reps)
        mem_acc = _extra_bytes(fused_accumulate)
        t_acc_triton = _time(lambda: fused.accumulate(acc, *stacked, shares, lay, bits, kernel="triton"), reps)
        stream_bytes = sum(t.numel() * t.element_size() for t in stacked)
        floor_c, floor_a = 12 * n / copy_rate, (4 * n + stream_bytes) / copy_rate
        rows.append({
            "elements": n, "copy_GBps": copy_rate / 1e9,
            "compress_ref_ms": 1e3 * t_ref, "compress_fused_ms": 1e3 * t_fused, "compress_floor_ms": 1e3 * floor_c,
            "compress_fused_GBps": 12 * n / t_fused / 1e9, "compress_vs_floor": t_fused / floor_c,
            "compress_cuda_ms": 1e3 * t_cuda, "compress_cuda_vs_floor": t_cuda / floor_c,
            "compress_triton_ms": 1e3 * t_triton, "compress_triton_vs_floor": t_triton / floor_c,
            "compress_model_ms": 1e3 * t_model,
            "compress_model_vs_floor": t_model / (8 * n / copy_rate),
            "compress_ref_extra_MiB": mem_ref / 2**20, "compress_fused_extra_MiB": mem_fused / 2**20,
            "compress_fused_extra_pct": 100 * mem_fused / (4 * n),
            f"accumulate{peers}_ref_ms": 1e3 * t_acc_ref, f"accumulate{peers}_fused_ms": 1e3 * t_acc,
            f"accumulate{peers}_triton_ms": 1e3 * t_acc_triton,
            "accumulate_floor_ms": 1e3 * floor_a, "accumulate_vs_floor": t_acc / floor_a,
            "accumulate_ref_extra_MiB": mem_acc_ref / 2**20, "accumulate_fused_extra_MiB": mem_acc / 2**20,
        })
        del delta, err, acc, stacked
        torch.cuda.empty_cache()
    return rows

