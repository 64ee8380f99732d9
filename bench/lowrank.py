"""A study for issue 20 (more learning per byte): the compressed DiLoCo round with each
matrix's pseudo-gradient sent as a low-rank product instead of its top-k entries, after
PowerSGD (Vogels et al. 2019), which needs no positions at all.

A replica's pseudo-gradient Δ of an m × n matrix (its residual already in it: the replica
restarted at θ_outer − e) is approximated as P Qᵀ, P m × r and Q n × r, by one power
iteration warm-started from the replica's Q of the round before (P = orth(Δ Q), Q = Δᵀ P);
P and Q are quantized to `bits` with one scale a column (symmetric, round to nearest) and
sent. The aggregate is the plain mean of the replicas' decoded products (every replica moves
every entry: there is no mask), the residual is Δ − P̂ Q̂ᵀ (error feedback). Vectors (norms)
go as in the default round (chunked top-k, 2 bits, masked mean).

The rank of each matrix is the largest whose factors fit the bytes the default round sends
for it (positions, codes, scales and header: bench/transform.py `tensor_bytes`), at least 1;
`--rank-scale X` multiplies that budget. Bytes are the wire's: the factors' codes, 4 bytes a
column of scales, 40 of header, to the N − 1 others.

Not shipped: `python -m locoswarm.bench.lowrank --bits 8 --json out.json` runs one variant on
the quick preset; docs/convergence.md has the table.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor

from locoswarm.bench.convergence import PRESETS, Workload, run_study, start_replicas, trained_rounds
from locoswarm.bench.transform import HEADER_BYTES, masked_topk, study_result, tensor_bytes
from locoswarm.kernels import ChunkLayout
from locoswarm.optim import pseudo_gradients
from locoswarm.optim.inner import load_params


def quantized(x: Tensor, bits: int) -> Tensor:
    """`x` (rows × r) rounded to `bits`-bit signed codes with one scale a column, decoded."""
    levels = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=0).clamp(min=1e-30) / levels
    return torch.round(x / scale).clamp(-levels, levels) * scale


def factor_bytes(shape: tuple[int, int], rank: int, bits: int) -> int:
    """What one matrix's factors put on the wire: codes, a 4-byte scale a column, header."""
    m, n = shape
    return -(-(m + n) * rank * bits // 8) + 4 * 2 * rank + HEADER_BYTES


def rank_for(shape: tuple[int, int], budget: float, bits: int) -> int:
    """The largest rank whose factors fit `budget` bytes, at least 1, at most min(shape)."""
    r = 1
    while r < min(shape) and factor_bytes(shape, r + 1, bits) <= budget:
        r += 1
    return r


def low_rank(delta: Tensor, q: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """One power iteration from `q` (n × r): the decoded product P̂ Q̂ᵀ and the new Q."""
    p = delta @ q
    p, _ = torch.linalg.qr(p)
    q = delta.T @ p
    return quantized(p, bits) @ quantized(q, bits).T, q


def run(w: Workload, *, bits: int = 8, density: float = 0.00375, chunk: int = 4096, rank_scale: float = 1.0) -> dict:
    cfg, dl = w.cfg, w.cfg.diloco
    n = cfg.replicas
    t0 = time.perf_counter()
    models, opts, samplers, outer = start_replicas(w, dl)
    names = [name for name, _ in models[0].named_parameters()]
    shapes = [tuple(p.shape) for p in outer.params]
    layouts = [ChunkLayout.for_tensor(p.numel(), chunk, density) for p in outer.params]
    ranks = [rank_for(s, rank_scale * tensor_bytes(lay, 2), bits) if len(s) == 2 else 0
             for s, lay in zip(shapes, layouts)]
    sent_bytes = sum(factor_bytes(s, r, bits) if r else tensor_bytes(lay, 2)
                     for s, r, lay in zip(shapes, ranks, layouts))
    default_bytes = sum(tensor_bytes(lay, 2) for lay in layouts)
    gen = torch.Generator().manual_seed(cfg.seed)
    dev = outer.params[0].device
    qs = [[torch.randn(s[1], r, generator=gen).to(dev) if r else None for s, r in zip(shapes, ranks)]
          for _ in range(n)]
    residuals = [[torch.zeros(p.numel(), device=dev) for p in outer.params] for _ in range(n)]
    sent, curve, energy = 0.0, [], []
    for step, _ in trained_rounds(w, dl, models, opts, samplers):
        deltas = [[d.reshape(-1) for d in pseudo_gradients(outer.params, m)] for m in models]
        aggregate, kept, total_energy = [], 0.0, 0.0
        for i, (p, shape, rank, lay) in enumerate(zip(outer.params, shapes, ranks, layouts)):
            if rank:
                got = []
                for r in range(n):
                    d = deltas[r][i].view(shape)
                    approx, qs[r][i] = low_rank(d, qs[r][i], bits)
                    got.append(approx.reshape(-1))
                    residuals[r][i] = deltas[r][i] - got[-1]
                    kept += float(got[-1].square().sum())
                    total_energy += float(deltas[r][i].square().sum())
                aggregate.append((sum(got) / n).view(shape))
                continue
            mean, errors, _ = masked_topk([deltas[r][i] for r in range(n)], lay, 2)
            aggregate.append(mean.view(shape))
            for r in range(n):
                residuals[r][i] = errors[r]
        sent += (n - 1) * sent_bytes
        energy.append(kept / max(1e-30, total_energy))
        outer.step(aggregate)
        for r, model in enumerate(models):
            load_params(model, outer.params, residuals[r])
        curve.append((step, w.evaluate(models[0])))
    return {"bits": bits, "rank_scale": rank_scale, "ranks": dict(zip(names, ranks)),
            "bytes_per_round_vs_default": sent_bytes / default_bytes,
            **study_result(w, models, outer, sent=sent, curve=curve, energy=energy, t0=t0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, choices=(2, 4, 8), default=8, help="bits per factor entry")
    parser.add_argument("--rank-scale", type=float, default=1.0,
                        help="times the default round's bytes each matrix's factors may take")
    parser.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None, help="genesis seed (weights, data order); the preset's")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    out = run_study(args.preset, lambda w: run(w, bits=args.bits, rank_scale=args.rank_scale),
                    steps=args.steps, seed=args.seed, json_path=args.json)
    print(f"low rank, {args.bits}-bit factors, rank scale {args.rank_scale}: eval loss {out['eval_loss']:.4f} "
          f"(consensus {out['consensus_eval_loss']:.4f}), {out['bytes_sent_per_replica'] / 1e6:.2f} MB per replica "
          f"({out['bytes_per_round_vs_default']:.2f}x the default's), energy sent {out['energy_sent_mean']:.3f}, "
          f"ranks {sorted(set(out['ranks'].values()))}, {out['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
