"""`locoswarm bench kernels` (needs CUDA): the compression kernels against the plain-torch
reference and a device-to-device copy, and the inner step's throughput, MFU and peak memory,
with the largest model that trains inside a 24 GB cap.

Inner step: the daemon's own Trainer (its precision, micro-batch fit, fused linear
cross-entropy, optional activation checkpointing and torch.compile) on GPT-2-tokenized
Shakespeare, timed over whole steps after warm-up steps, synchronised. FLOPs per token:
6·N (N: parameters, the tied output matrix counted once, as its matmul is real work) plus
the attention scores and values, 12·layers·dim·seq_len (the PaLM paper's accounting; a
causal kernel skips half of it, which this counts as done). MFU: achieved FLOP/s over the
GPU's dense bf16 peak from its datasheet (989 TFLOP/s for an H100 SXM or H200), or, for a
GPU not in the table, the matmul rate measured in the same run.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

DATASHEET_BF16 = {"H100 80GB HBM3": 989e12, "H100 SXM": 989e12, "H200": 989e12, "H100 PCIe": 756e12,
                  "H100 NVL": 835e12, "A100": 312e12}


def peak_flops(name: str, measured: float) -> tuple[float, str]:
    for key, value in DATASHEET_BF16.items():
        if key in name:
            return value, f"datasheet bf16 dense ({key})"
    return measured, "measured bf16 matmul"


def matmul_rate(n: int = 8192, reps: int = 10) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def _bench_spec(size: str, batch: int, seq_len: int):
    """The default run spec with model `size`, GPT-2 tokens, this batch and sequence length."""
    from locoswarm.node.spec import RunSpec

    base = RunSpec()
    return replace(base, model=size, tokenizer="gpt2", batch_size=batch, data=replace(base.data, seq_len=seq_len))


def inner_step(size: str, *, batch: int, seq_len: int, steps: int = 8, warmup: int = 3,
               memory_fraction: float = 0.0, checkpointing: bool = False, compile: bool = False) -> dict:
    """Tokens/s, FLOP/s and peak memory of the daemon's inner step for model `size`."""
    import torch

    from locoswarm.node.trainer import Trainer
    from locoswarm.workload.model import num_params

    spec = _bench_spec(size, batch, seq_len)
    dev = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    row = {"model": size, "batch": batch, "seq_len": seq_len, "checkpointing": checkpointing, "compile": compile,
           "memory_cap_gib": round(memory_fraction * torch.cuda.mem_get_info(dev)[1] / 2**30, 1) if memory_fraction
           else None}
    t = None
    try:
        t = Trainer(spec, spec.hash(), shard=0, device=dev, memory_fraction=memory_fraction,
                    activation_checkpointing=checkpointing, compile=compile)
        n = num_params(t.model)
        cfg = t.model.cfg
        stop = threading.Event()
        t.train_until(stop, lambda done: done >= warmup * t.tokens_per_step)
        torch.cuda.synchronize()
        t.tokens = 0
        started = time.perf_counter()
        t.train_until(stop, lambda done: done >= steps * t.tokens_per_step)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        tokens_per_s = steps * t.tokens_per_step / elapsed
        flops_per_token = 6 * n + 12 * cfg.num_layers * cfg.dim * seq_len
        row.update(ok=True, params=n, precision=t.precision, micro_batch=t.micro_batch, tokens_per_s=tokens_per_s,
                   step_s=elapsed / steps, flops_per_s=tokens_per_s * flops_per_token,
                   peak_allocated_gib=torch.cuda.max_memory_allocated(dev) / 2**30,
                   peak_reserved_gib=torch.cuda.max_memory_reserved(dev) / 2**30, final_loss=t.losses[-1])
    except torch.OutOfMemoryError as e:
        row.update(ok=False, error=f"out of memory: {str(e).splitlines()[0]}")
    finally:
        del t
        torch.cuda.set_per_process_memory_fraction(1.0, torch.cuda.current_device())
        torch.cuda.empty_cache()
    return row


def run(*, sizes: tuple[float, ...] = (1e7, 1e8, 1e9), inner: bool = True, compression: bool = True,
        cap_gib: float = 24.0) -> dict:
    """The whole benchmark as a JSON-able dict."""
    import torch

    if not torch.cuda.is_available():
        raise ValueError("bench kernels needs a CUDA GPU")
    name = torch.cuda.get_device_name()
    out: dict = {"gpu": name, "torch": torch.__version__}
    if compression:
        from locoswarm.kernels.bench import bench_kernels

        out["compression"] = bench_kernels(sizes=tuple(int(s) for s in sizes))
    if inner:
        measured = matmul_rate()
        peak, source = peak_flops(name, measured)
        out["matmul_tflops"] = measured / 1e12
        out["peak_tflops"], out["peak_source"] = peak / 1e12, source
        total = torch.cuda.mem_get_info()[1]
        rows = [inner_step("base", batch=32, seq_len=1024),
                inner_step("base", batch=32, seq_len=1024, compile=True),
                inner_step("1b", batch=32, seq_len=1024),
                inner_step("1b", batch=32, seq_len=1024, compile=True)]
        fraction = min(1.0, cap_gib * 2**30 / total)
        for size in ("1b", "2b"):
            rows.append(inner_step(size, batch=16, seq_len=1024, steps=3, warmup=1, memory_fraction=fraction,
                                   checkpointing=True))
        for r in rows:
            if r.get("ok"):
                r["mfu"] = r["flops_per_s"] / peak
        out["inner"] = rows
        fitting = [r for r in rows if r["memory_cap_gib"] and r.get("ok")]
        out["largest_in_cap"] = max(fitting, key=lambda r: r["params"])["model"] if fitting else None
    return out


def format_kernels(r: dict) -> str:
    lines = [f"{r['gpu']} (torch {r['torch']})", ""]
    rows = r.get("compression") or []
    if rows:
        keys = list(rows[0])
        lines.append("  ".join(f"{k:>14}" for k in keys))
        for row in rows:
            lines.append("  ".join(f"{v:>14.4g}" if isinstance(v, float) else f"{str(v):>14}" for v in row.values()))
        lines.append("")
    if "inner" in r:
        lines.append(f"bf16 matmul {r['matmul_tflops']:.0f} TFLOP/s measured; MFU against {r['peak_tflops']:.0f} "
                     f"({r['peak_source']})")
        lines.append(f"{'model':>6} {'params':>8} {'batch':>5} {'micro':>5} {'ckpt':>5} {'compile':>7} {'cap':>6} "
                     f"{'tokens/s':>9} {'MFU':>6} {'peak GiB':>8}")
        for x in r["inner"]:
            cap = f"{x['memory_cap_gib']:.0f}G" if x["memory_cap_gib"] else "—"
            if x.get("ok"):
                lines.append(f"{x['model']:>6} {x['params'] / 1e6:>7.0f}M {x['batch']:>5} {x['micro_batch']:>5} "
                             f"{str(x['checkpointing']):>5} {str(x['compile']):>7} {cap:>6} {x['tokens_per_s']:>9.0f} "
                             f"{x['mfu']:>6.1%} {x['peak_reserved_gib']:>8.1f}")
            else:
                lines.append(f"{x['model']:>6} {'':>8} {x['batch']:>5} {'':>5} {str(x['checkpointing']):>5} "
                             f"{str(x['compile']):>7} {cap:>6} {x['error'][:60]}")
        lines.append(f"largest model trained within the cap: {r['largest_in_cap']}")
    return "\n".join(lines)

