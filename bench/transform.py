"""A study for issue 20 (more learning per byte): the compressed DiLoCo round with the top-k
taken in a transform's domain, after DeMo (Peng et al. 2024), which sends the largest
coefficients of a DCT of each tensor's chunks.

Every step is the default round's (optim/round.py), only on coefficients: a replica's
pseudo-gradient Δ (its residual already in it: the replica restarted at θ_outer − e) goes
through an orthonormal DCT-II, `c = T(Δ)`; the chunked top-k, the 2-bit quantization with a
(lo, hi) scale pair a chunk and the masked mean run on c exactly as on Δ by default
(kernels/, the same layout rule); the residual is T⁻¹(c − sent), dropped where the consensus
moved on a coefficient this replica did not send; the outer step takes T⁻¹ of the aggregate.
T orthonormal: the residual's norm is the same in both domains, and identity is the default.

  identity  T = I: the default round, as a check of this harness;
  dct1      a DCT over each run of `block` consecutive entries of a flattened tensor;
  dct2      a 2-D DCT over `block` × `block` tiles of each matrix (DeMo's), dct1 on vectors.

Bytes are the wire's: each tensor's packed positions (log2 chunk bits) and codes, 4 bytes of
scales a chunk and 40 of header, to the N − 1 others; a transform's padding to whole blocks
adds coefficients, and with them bytes.

Not shipped: `python -m locoswarm.bench.transform --transform dct2 --block 64 --json out.json`
runs one variant on the quick preset; docs/convergence.md has the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import torch
from torch import Tensor

from locoswarm.bench.convergence import PRESETS, Workload, run_study, start_replicas, trained_rounds
from locoswarm.kernels import ChunkLayout, chunked_topk, dequantize, packed_nbytes, quantize, scatter_chunks
from locoswarm.optim import pseudo_gradients
from locoswarm.optim.inner import load_params

TRANSFORMS = ("identity", "dct1", "dct2")
HEADER_BYTES = 40
"""Per tensor: name, shape and counts, about what the delta format spends on them."""


def dct_matrix(b: int) -> Tensor:
    """The orthonormal DCT-II of size b: row k is s_k cos(π (n + ½) k / b)."""
    n = torch.arange(b, dtype=torch.float64)
    m = torch.cos(math.pi * (n[None, :] + 0.5) * n[:, None] / b) * math.sqrt(2.0 / b)
    m[0] /= math.sqrt(2.0)
    return m.float()


class Transform:
    """T and T⁻¹ for one tensor's shape: flat (numel,) in, flat coefficients out (padded to
    whole blocks), and back."""

    def __init__(self, kind: str, shape: tuple[int, ...], block: int) -> None:
        self.kind, self.shape, self.b = kind, shape, block
        self.numel = math.prod(shape)
        self.two_d = kind == "dct2" and len(shape) == 2
        self.d = dct_matrix(block) if kind != "identity" else None
        if kind == "identity":
            self.size = self.numel
        elif self.two_d:
            r, c = shape
            self.rows, self.cols = -(-r // block) * block, -(-c // block) * block
            self.size = self.rows * self.cols
        else:
            self.size = -(-self.numel // block) * block

    def forward(self, x: Tensor) -> Tensor:
        if self.d is None:
            return x
        b, d = self.b, self.d
        if self.two_d:
            r, c = self.shape
            t = torch.zeros(self.rows, self.cols)
            t[:r, :c] = x.view(r, c)
            tiles = t.view(self.rows // b, b, self.cols // b, b).permute(0, 2, 1, 3)
            return (d @ tiles @ d.T).reshape(-1)
        flat = torch.cat([x, x.new_zeros(self.size - self.numel)])
        return (flat.view(-1, b) @ d.T).reshape(-1)

    def inverse(self, c: Tensor) -> Tensor:
        if self.d is None:
            return c
        b, d = self.b, self.d
        if self.two_d:
            r, cols = self.shape
            tiles = (d.T @ c.view(self.rows // b, self.cols // b, b, b) @ d).permute(0, 2, 1, 3)
            return tiles.reshape(self.rows, self.cols)[:r, :cols].reshape(-1)
        return (c.view(-1, b) @ d).reshape(-1)[: self.numel]


def tensor_bytes(lay: ChunkLayout, bits: int) -> int:
    """What one tensor's delta puts on the wire: positions, codes, scales and header."""
    return (packed_nbytes(lay.num_selected, lay.index_bits) + packed_nbytes(lay.num_selected, bits)
            + 4 * lay.num_chunks + HEADER_BYTES)


def budgets(names: list[str], sizes: list[int], density: float, shares: dict[str, float], *, bits: int, chunk: int,
            equal_bytes: bool) -> list[ChunkLayout]:
    """Each tensor's layout: `density` times the share of the first pattern of `shares` its
    name contains (1 without one, a density capped at 1). With `equal_bytes` the base density
    is scaled so that a round sends what the plain `density` sends (bisection)."""
    def layouts(base: float) -> list[ChunkLayout]:
        out = []
        for name, size in zip(names, sizes):
            share = next((v for k, v in shares.items() if k in name), 1.0)
            out.append(ChunkLayout.for_tensor(size, chunk, min(1.0, base * share)))
        return out

    if not equal_bytes or not shares:
        return layouts(density)
    target = sum(tensor_bytes(ChunkLayout.for_tensor(size, chunk, density), bits) for size in sizes)
    lo, hi = density / 64, density * 64
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if sum(tensor_bytes(x, bits) for x in layouts(mid)) < target else (lo, mid)
    return layouts(lo)


def run(w: Workload, *, transform: str, block: int, density: float, bits: int = 2, chunk: int = 4096,
        shares: dict[str, float] | None = None, equal_bytes: bool = True, outer_lr: float | None = None) -> dict:
    cfg, dl = w.cfg, w.cfg.diloco
    if outer_lr is not None:
        dl = dataclasses.replace(dl, outer=dataclasses.replace(dl.outer, lr=outer_lr))
    n = cfg.replicas
    t0 = time.perf_counter()
    models, opts, samplers, outer = start_replicas(w, dl)
    transforms = [Transform(transform, tuple(p.shape), block) for p in outer.params]
    names = [name for name, _ in models[0].named_parameters()]
    layouts = budgets(names, [t.size for t in transforms], density, shares or {}, bits=bits, chunk=chunk,
                      equal_bytes=equal_bytes)
    sent_bytes = sum(tensor_bytes(lay, bits) for lay in layouts)
    sent, curve, energy = 0.0, [], []
    residuals = [[torch.zeros(p.numel()) for p in outer.params] for _ in range(n)]
    for step, _ in trained_rounds(w, dl, models, opts, samplers):
        deltas = [[d.reshape(-1) for d in pseudo_gradients(outer.params, m)] for m in models]
        aggregate, kept = [], []
        for i, (p, tr, lay) in enumerate(zip(outer.params, transforms, layouts)):
            mean, errors, energies = masked_topk([tr.forward(deltas[r][i]) for r in range(n)], lay, bits)
            aggregate.append(tr.inverse(mean).view(p.shape))
            residuals_i = [tr.inverse(e) for e in errors]
            for r in range(n):
                residuals[r][i] = residuals_i[r]
            kept.extend(energies)
        sent += (n - 1) * sent_bytes
        energy.append(sum(k for k, _ in kept) / max(1e-30, sum(t for _, t in kept)))
        outer.step(aggregate)
        for r, model in enumerate(models):
            load_params(model, outer.params, residuals[r])
        curve.append((step, w.evaluate(models[0])))
    return {"transform": transform, "block": block, "density": density, "bits": bits, "chunk": chunk,
            "shares": shares or {}, "densities": {n: lay.k / lay.chunk for n, lay in zip(names, layouts)},
            **study_result(w, models, outer, sent=sent, curve=curve, energy=energy, t0=t0)}


def masked_topk(coeffs: list[Tensor], lay: ChunkLayout, bits: int) -> tuple[Tensor, list[Tensor], list[tuple[float, float]]]:
    """The default round on one tensor's replicas' `coeffs`: the chunked top-k, `bits`-bit codes
    with a (lo, hi) pair a chunk, the masked mean. (The mean; each replica's residual, dropped
    where the consensus moved on a coefficient it did not send; each replica's (energy sent,
    energy) for the energy figure.)"""
    size = coeffs[0].numel()
    total, count = torch.zeros_like(coeffs[0]), torch.zeros_like(coeffs[0])
    decoded, masks, energies = [], [], []
    for c in coeffs:
        idx, vals = chunked_topk(c, lay)
        codes, scales = quantize(vals, lay, bits)
        got = scatter_chunks(idx, dequantize(codes, scales, lay, bits), lay)
        mask = scatter_chunks(idx, torch.ones_like(idx, dtype=torch.bool), lay,
                              out=torch.zeros(size, dtype=torch.bool, device=c.device))
        decoded.append(got)
        masks.append(mask)
        total += got
        count += mask
        energies.append((float(vals.square().sum()), float(c.square().sum())))
    moved = count > 0
    mean = torch.where(moved, total / count.clamp(min=1), torch.zeros_like(total))
    errors = []
    for c, got, mask in zip(coeffs, decoded, masks):
        e = c - got
        e.masked_fill_(moved & ~mask, 0.0)  # the consensus holds the senders' average there
        errors.append(e)
    return mean, errors, energies


def study_result(w: Workload, models: list, outer, *, sent: float, curve: list, energy: list[float],
                 t0: float) -> dict:
    """What every study of the round reports: the replicas' mean eval loss, the first one's, the
    consensus's (models[0] is left holding it), bytes, rounds, energy sent, time and curve."""
    losses = [w.evaluate(m) for m in models]
    load_params(models[0], outer.params)
    return {"eval_loss": sum(losses) / len(models), "replica_eval_loss": losses[0],
            "consensus_eval_loss": w.evaluate(models[0]), "bytes_sent_per_replica": int(sent), "rounds": len(curve),
            "energy_sent_mean": sum(energy) / max(1, len(energy)), "wall_s": time.perf_counter() - t0, "curve": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transform", choices=TRANSFORMS, required=True)
    parser.add_argument("--block", type=int, default=64, help="DCT size (dct1) or tile side (dct2)")
    parser.add_argument("--density", type=float, default=0.00375, help="share of each chunk of coefficients sent")
    parser.add_argument("--bits", type=int, choices=(2, 4, 8), default=2)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--share", action="append", default=[], metavar="PATTERN=X",
                        help="tensors whose name contains PATTERN get X times the density (repeatable; the first "
                             "match counts); the others' density is scaled so that a round sends the same bytes")
    parser.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None,
                        help="genesis seed (weights, data order); the preset's by default")
    parser.add_argument("--outer-lr", type=float, default=None, help="outer learning rate; the preset's by default")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    shares = {k: float(v) for k, v in (item.split("=", 1) for item in args.share)}
    out = run_study(args.preset, lambda w: run(w, transform=args.transform, block=args.block, density=args.density,
                                                bits=args.bits, chunk=args.chunk, shares=shares,
                                                outer_lr=args.outer_lr),
                    steps=args.steps, seed=args.seed, json_path=args.json)
    print(f"{args.transform} block {args.block} density {args.density} shares {args.share}: "
          f"eval loss {out['eval_loss']:.4f} (consensus {out['consensus_eval_loss']:.4f}), "
          f"{out['bytes_sent_per_replica'] / 1e6:.2f} MB per replica, energy sent {out['energy_sent_mean']:.3f}, "
          f"{out['wall_s']:.0f} s")

if __name__ == "__main__":
    main()
