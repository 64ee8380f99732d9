"""On a lent GPU (after `out=$OUT; . .ci/gpu-env.sh`): `python3 .ci/gpu-compress-sweep.py`.
The compression kernels against each other, in one process, interleaved (medians of three
medians of 10 runs): Triton; CUDA C with the generic entry point (`cuda_1024`: any block size,
uncapped) and the staged, register-capped 256-thread one (`cuda_256x5`, Hopper's default);
both on all-zero tensors (every chunk listed for the whole-chunk search); that search alone
with none listed. First checks that every variant gives the Triton kernel's bits, ties
included. Prints a line a size and writes $OUT/compress-sweep.json. The figures of 2026-12-02
in bench/results/kernels-h200-sweep-2026-12-02.log (run 2) came from its first form (the same
variants, checks and timing, written as one flat script); this one first ran on the H200 on the
evening of 2026-12-02 (kernels-h200-sweep-2026-12-02-evening.log, run 2); its run of 2026-12-03,
with the staged entry point, is kernels-h200-sweep-2026-12-03.log."""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import torch

from locoswarm.kernels import ChunkLayout, fused
from locoswarm.kernels.bench import _time

DEVICE = torch.device("cuda")
SIZES = (10**7, 10**8, 10**9)


def compress(err, delta, lay, kernel: str, capped: bool = True, mode: str = "buffer"):
    fused.COMPRESS_CAPPED_MAJORS = (9,) if capped else ()
    return fused.compress(err, delta, lay, 4, mode=mode, kernel=kernel)


def mismatches() -> list:
    """(size, mode, capped) of every CUDA C variant whose outputs differ from Triton's."""
    bad = []
    for n in (4096 * 37 + 100, 10**6 + 3, 10**7, 3 * 10**7 + 5):
        lay = ChunkLayout.for_tensor(n, 4096, 64 / 4096)
        gen = torch.Generator(device="cuda").manual_seed(n)
        d = torch.randn(n, device="cuda", generator=gen)
        d[: 4096 * 20] = torch.randint(-2, 3, (4096 * 20,), device="cuda", generator=gen).float()  # ties: listed
        e0 = torch.randn(n, device="cuda", generator=gen) * 0.01
        for mode in ("model", "buffer"):
            want_err = e0.clone()
            want = compress(want_err, d, lay, "triton", mode=mode)
            for capped in (False, True):
                got_err = e0.clone()
                got = compress(got_err, d, lay, "cuda", capped, mode)
                if not (all(torch.equal(x, y) for x, y in zip(got, want)) and torch.equal(got_err, want_err)):
                    bad.append((n, mode, capped))
    return bad


def timings(n: int) -> dict[str, float]:
    """Median milliseconds of each variant at `n` entries."""
    lay = ChunkLayout.for_tensor(n, 4096, 64 / 4096)
    gen = torch.Generator(device="cuda").manual_seed(n)
    delta = torch.randn(n, device="cuda", generator=gen)
    err = torch.randn(n, device="cuda", generator=gen).mul_(0.01)
    zeros = torch.zeros(n, device="cuda")
    dst = torch.empty_like(delta)
    m = lay.num_chunks
    none_listed = torch.zeros(m + 1, dtype=torch.int32, device=DEVICE)
    search_args = (err, delta, 1.0, fused._recip(4), torch.zeros(fused._words(lay.num_selected, lay.index_bits),
                   dtype=torch.int32, device=DEVICE), torch.zeros(fused._words(lay.num_selected, 4), dtype=torch.int32,
                   device=DEVICE), torch.empty((m, 2), device=DEVICE), err, none_listed, lay.numel)
    search = dict(CHUNK=lay.chunk, K=lay.k, INDEX_BITS=lay.index_bits, BITS=4, SENT=False, EXACT=True,
                  num_warps=fused.FULL_WARPS)
    variants = {
        "copy": lambda: dst.copy_(delta),
        "triton": lambda: compress(err, delta, lay, "triton"),
        "cuda_1024": lambda: compress(err, delta, lay, "cuda", capped=False),
        "cuda_256x5": lambda: compress(err, delta, lay, "cuda"),
        "zeros_triton": lambda: compress(err, zeros, lay, "triton", mode="model"),
        "zeros_cuda": lambda: compress(err, zeros, lay, "cuda", mode="model"),
        "full_only_none_listed": lambda: fused.compress_full_kernel[(fused.full_programs(DEVICE, m),)](
            *search_args, **search),
    }
    samples = {name: [] for name in variants}
    for _ in range(3):  # interleaved, so that a slow spell of the machine hits every variant
        for name, fn in variants.items():
            samples[name].append(_time(fn, 10))
    med = {name: 1e3 * statistics.median(v) for name, v in samples.items()}
    med["compress_floor_ms"] = med["copy"] * 12 / 8
    return med


def main() -> None:
    report = {"compress_mismatches": mismatches()}
    print("compress cuda vs triton mismatches:", report["compress_mismatches"], flush=True)
    report["timing_ms"] = {}
    for n in SIZES:
        report["timing_ms"][n] = med = timings(n)
        print(n, json.dumps({k: round(v, 4) for k, v in med.items()}), flush=True)
        torch.cuda.empty_cache()
    big = report["timing_ms"][SIZES[-1]]
    report["capped_wins"] = big["cuda_256x5"] < big["cuda_1024"]
    print("capped wins:", report["capped_wins"], flush=True)
    (Path(os.environ["OUT"]) / "compress-sweep.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
