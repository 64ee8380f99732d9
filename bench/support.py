"""A study for issue 20 (more learning per byte): the compressed DiLoCo run with a support
every peer computes without being told, so that a delta carries values only.

The default encoding sends, per 4096-entry chunk, the top-k entries' 12-bit positions and
2-bit codes: 12 of every 14 bits say where. Here every replica sends values on the same
coordinates, chosen from what all peers share bit for bit:

  random     k entries per chunk drawn from a generator seeded by the round and tensor;
  aggregate  the k largest |last round's aggregate| entries of each chunk (the consensus
             moved there: it may move there again), random in the first round;
  momentum   the same on |outer momentum|;
  mixed      half the k from the momentum rule, half random among the rest.

A value is quantized as a sign and a level with one bf16 scale per chunk (`quantize`). Since every replica sends every coordinate of the support, the
aggregate there is the plain mean, and each replica keeps what it did not send in its model
(residual "model", as the default). Bytes are counted as a peer would send them: values,
scales and a fixed header per tensor, to the N − 1 others.

Not shipped: `python -m locoswarm.bench.support --support mixed --bits 1 --json out.json`
runs one variant on the quick preset; docs/convergence.md has the table.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from locoswarm.bench.convergence import PRESETS, Workload, run_study, start_replicas, trained_rounds
from locoswarm.kernels import ChunkLayout
from locoswarm.optim import pseudo_gradients
from locoswarm.optim.inner import load_params

SUPPORTS = ("random", "aggregate", "momentum", "mixed")
HEADER_BYTES = 40
"""Per tensor: name, shape and counts, about what the delta format spends on them."""


def choose(rule: str, chunks: torch.Tensor, k: int, shared: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    """(m, k) chunk-relative positions, ascending: the support of one tensor, from its (m, c)
    `chunks` shape and the shared state `shared` ((m, c), or None before any)."""
    m, c = chunks.shape
    noise = torch.rand(m, c, generator=gen)
    if rule == "random" or shared is None:
        return noise.topk(k, dim=1).indices.sort(dim=1).values
    if rule in ("aggregate", "momentum"):
        return shared.abs().topk(k, dim=1).indices.sort(dim=1).values
    half = k // 2
    top = shared.abs().topk(half, dim=1).indices
    noise.scatter_(1, top, -1.0)  # the rest drawn among the others
    rest = noise.topk(k - half, dim=1).indices
    return torch.cat([top, rest], dim=1).sort(dim=1).values


def quantize(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(m, k) values → what a receiver decodes, per chunk row with one bf16 scale, the mean
    magnitude μ: 1 bit, the sign times μ (signSGD with error feedback); b bits, the sign and
    the midpoint of one of 2^(b−1) equal bins of [0, 2μ] (larger magnitudes land in the last)."""
    mags = values.abs()
    mean = mags.mean(dim=1, keepdim=True).to(torch.bfloat16).float()
    if bits == 1:
        return torch.sign(values) * mean
    bins = 1 << (bits - 1)
    width = torch.where(mean > 0, 2 * mean / bins, torch.ones_like(mean))
    q = torch.floor(mags / width).clamp_(0, bins - 1)
    return torch.sign(values) * (q + 0.5) * width


def run_shared(w: Workload, *, support: str, bits: int, density: float, chunk: int = 4096) -> dict:
    cfg, dl = w.cfg, w.cfg.diloco
    n = cfg.replicas
    t0 = time.perf_counter()
    models, opts, samplers, outer = start_replicas(w, dl)
    layouts = [ChunkLayout.for_tensor(p.numel(), chunk, density) for p in outer.params]
    residuals = [[torch.zeros(p.numel()) for p in outer.params] for _ in range(n)]
    last_aggregate: list[torch.Tensor] | None = None
    sent = 0.0
    curve = []
    for round_, (step, _) in enumerate(trained_rounds(w, dl, models, opts, samplers)):
        gen = torch.Generator().manual_seed(1_000_003 * round_ + 17)
        deltas = [[d.reshape(-1) for d in pseudo_gradients(outer.params, m)] for m in models]
        aggregate = []
        for i, (p, lay) in enumerate(zip(outer.params, layouts)):
            m, c = lay.num_chunks, lay.chunk
            pad = m * c - lay.numel
            shared = None
            if support in ("aggregate",) and last_aggregate is not None:
                shared = last_aggregate[i]
            elif support in ("momentum", "mixed") and outer.num_steps > 0:
                shared = outer.momentum[i].reshape(-1)
            if shared is not None:
                shared = torch.cat([shared, shared.new_full((pad,), 0.0)]).view(m, c) if pad else shared.view(m, c)
            pos = choose(support, torch.empty(m, c), min(lay.k, c), shared, gen)
            flat_pos = (torch.arange(m).unsqueeze(1) * c + pos).reshape(-1)
            flat_pos = flat_pos[flat_pos < lay.numel]  # the last chunk's padding is never sent
            total = torch.zeros(lay.numel)
            for r in range(n):
                d = deltas[r][i]
                vals = d[flat_pos]
                rows = torch.zeros(m * pos.shape[1])
                rows[: vals.numel()] = vals
                decoded = quantize(rows.view(m, -1), bits).reshape(-1)[: vals.numel()]
                total[flat_pos] += decoded
                e = d.clone()
                e[flat_pos] -= decoded
                residuals[r][i] = e
            aggregate.append((total / n).view(p.shape))
            sent_bytes = math.ceil(flat_pos.numel() * bits / 8) + 2 * m + HEADER_BYTES
            sent += (n - 1) * sent_bytes  # each replica sends its values to the n − 1 others
        outer.step(aggregate)
        last_aggregate = [a.reshape(-1) for a in aggregate]
        for r, model in enumerate(models):
            load_params(model, outer.params, residuals[r])
        curve.append((step, w.evaluate(models[0])))
    losses = [w.evaluate(m) for m in models]
    load_params(models[0], outer.params)
    return {"support": support, "bits": bits, "density": density, "eval_loss": sum(losses) / n,
            "replica_eval_loss": losses[0], "consensus_eval_loss": w.evaluate(models[0]),
            "bytes_sent_per_replica": int(sent), "rounds": len(curve), "wall_s": time.perf_counter() - t0,
            "curve": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--support", choices=SUPPORTS, required=True)
    parser.add_argument("--bits", type=int, choices=(1, 2, 3, 4), default=1)
    parser.add_argument("--density", type=float, required=True, help="share of each chunk sent")
    parser.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--device", default="")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    out = run_study(args.preset, lambda w: run_shared(w, support=args.support, bits=args.bits, density=args.density),
                    steps=args.steps, device=args.device, json_path=args.json)
    print(f"{args.support} bits {args.bits} density {args.density}: eval loss {out['eval_loss']:.4f}, "
          f"{out['bytes_sent_per_replica'] / 1e6:.2f} MB per replica, {out['wall_s']:.0f} s")

if __name__ == "__main__":
    main()
