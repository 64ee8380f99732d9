"""`locoswarm bench convergence --sweep`: a grid over H, density, bits, the outer learning
rate and momentum, and the error-feedback rule, each point trained on the same tokens as
one shared ddp and one shared local run. Prints the frontier: eval-loss gap to ddp
against traffic reduction. The shipped defaults are read off it (docs/convergence.md)."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from locoswarm.bench.convergence import (
    BenchConfig,
    Workload,
    flush_denormals,
    run_diloco,
    run_single,
)
from locoswarm.bench.convergence_report import summarize
from locoswarm.optim import CompressionConfig, DiLoCoConfig


def default_grid(base: DiLoCoConfig) -> list[tuple[str, DiLoCoConfig]]:
    """One factor at a time around `base`: H at equal traffic (density scaled with H), H
    and density at other traffic, bits, the paper's outer Nesterov settings, and the
    error-feedback rules (SparseLoCo's residual buffer with the plain mean, with decay,
    and ours); plus uncompressed DiLoCo at the same H."""
    comp = base.compression or CompressionConfig()
    h0, d0 = base.inner_steps, comp.density
    pts: list[tuple[str, DiLoCoConfig]] = [("default", base)]

    def add(label: str, *, inner_steps: int | None = None, outer: dict | None = None, **c: object) -> None:
        cfg = replace(base, compression=replace(comp, **c))
        if inner_steps is not None:
            cfg = replace(cfg, inner_steps=inner_steps)
        if outer is not None:
            cfg = replace(cfg, outer=replace(base.outer, **outer))
        pts.append((label, cfg))

    for h in (h0 // 2, 2 * h0, 4 * h0):
        add(f"H={h} density={d0 * h / h0:g}", inner_steps=h, density=d0 * h / h0)
    for d in (d0 / 2, 2 * d0, 4 * d0):
        add(f"density={d:g}", density=d)
    for b in (4, 8):
        add(f"bits={b}", bits=b)
    add("outer lr 0.7 nesterov 0.9", outer={"lr": 0.7, "momentum": 0.9})
    add("outer lr 0.7 nesterov 0.5", outer={"lr": 0.7, "momentum": 0.5})
    add("residual=buffer mean (SparseLoCo)", residual="buffer", aggregation="mean")
    add("residual=buffer mean ef_decay=0.95", residual="buffer", aggregation="mean", ef_decay=0.95)
    add("residual=model mean", residual="model", aggregation="mean")
    add("residual=buffer masked", residual="buffer", aggregation="masked")
    pts.append(("uncompressed", replace(base, compression=None)))
    return pts


def run_sweep(cfg: BenchConfig, log: Callable[[str], None] = print,
              grid: list[tuple[str, DiLoCoConfig]] | None = None) -> dict:
    with flush_denormals():
        return _run_sweep(cfg, log, grid)


def _run_sweep(cfg: BenchConfig, log: Callable[[str], None], grid: list[tuple[str, DiLoCoConfig]] | None) -> dict:
    w = Workload(cfg)
    log(f"sweep: model {cfg.model} ({w.params:,} params), {cfg.total_steps} steps, {cfg.replicas} replicas")
    ddp = run_single(w, data_parallel=True)
    local = run_single(w, data_parallel=False)
    log(f"  ddp   {ddp.eval_loss:.4f}\n  local {local.eval_loss:.4f}")
    points = []
    for label, dl in grid or default_grid(cfg.diloco):
        dl.validate()
        r = run_diloco(w, dl.compression, dl)
        s = summarize(w, {"ddp": ddp, "run": r})["runs"]["run"]
        point = {
            "label": label,
            "inner_steps": dl.inner_steps,
            "outer_lr": dl.outer.lr,
            "outer_momentum": dl.outer.momentum,
            "compression": None if dl.compression is None else {
                "density": dl.compression.density, "bits": dl.compression.bits,
                "ef_decay": dl.compression.ef_decay, "residual": dl.compression.residual,
            },
            "eval_loss": r.eval_loss,
            "consensus_eval_loss": r.consensus_eval_loss,
            "gap_pct": s["gap_pct"],
            "vs_local_pct": 100.0 * (r.eval_loss - local.eval_loss) / local.eval_loss,
            "reduction_vs_ddp": s["reduction_vs_ddp"],
            "bytes_sent_per_replica": r.bytes_sent_per_replica,
            "wall_s": r.wall_s,
        }
        points.append(point)
        log(f"  {label:<34} loss {r.eval_loss:.4f}  gap {point['gap_pct']:+6.1f} %  "
            f"vs local {point['vs_local_pct']:+6.1f} %  reduction {point['reduction_vs_ddp']:,.0f}×")
    frontier = pareto(points)
    for p in points:
        p["frontier"] = p in frontier
    return {
        "preset": cfg.preset, "params": w.params, "replicas": cfg.replicas, "total_steps": cfg.total_steps,
        "ddp_eval_loss": ddp.eval_loss, "local_eval_loss": local.eval_loss, "points": points,
    }


def pareto(points: list[dict]) -> list[dict]:
    """Points no other point beats on both eval-loss gap (lower) and reduction (higher)."""
    out = []
    for p in points:
        dominated = any(
            q is not p and q["gap_pct"] <= p["gap_pct"] and q["reduction_vs_ddp"] >= p["reduction_vs_ddp"]
            and (q["gap_pct"] < p["gap_pct"] or q["reduction_vs_ddp"] > p["reduction_vs_ddp"])
            for q in points
        )
        if not dominated:
            out.append(p)
    return out


def format_frontier(result: dict) -> str:
    lines = [f"ddp {result['ddp_eval_loss']:.4f}   local {result['local_eval_loss']:.4f}",
             f"{'setting':<36}{'eval loss':>10}{'gap vs ddp':>12}{'vs local':>10}{'reduction':>12}  frontier"]
    for p in sorted(result["points"], key=lambda p: -p["reduction_vs_ddp"]):
        lines.append(f"{p['label']:<36}{p['eval_loss']:>10.4f}{p['gap_pct']:>+11.1f}%{p['vs_local_pct']:>+9.1f}%"
                     f"{p['reduction_vs_ddp']:>11,.0f}×  {'*' if p['frontier'] else ''}")
    return "\n".join(lines)
