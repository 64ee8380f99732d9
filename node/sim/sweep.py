"""`locoswarm bench convergence --sweep`: a grid over H, density, bits, the outer learning
rate and momentum, and the error-feedback rule, each point trained on the same tokens as
one shared ddp and one shared local run. Prints the frontier: eval-loss gap to ddp
against traffic reduction. The shipped defaults are read off it (README)."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from locoswarm.node.sim.convergence import (
    BenchConfig,
    Workload,
    flush_denormals,
    run_diloco,
    run_single,
    summarize,
)
from locoswarm.optim import CompressionConfig, DiLoCoConfig


def default_grid(base: DiLoCoConfig) -> list[tuple[str, DiLoCoConfig]]:
    """One factor at a time around `base`, plus the paper's outer settings."""
    comp = base.compression or CompressionConfig()
    pts: list[tuple[str, DiLoCoConfig]] = [("default", base)]

    def add(label: str, *, inner_steps: int | None = None, outer: dict | None = None, **c: object) -> None:
        cfg = replace(base, compression=replace(comp, **c))
        if inner_steps is not None:
            cfg = replace(cfg, inner_steps=inner_steps)
        if outer is not None:
            cfg = replace(cfg, outer=replace(base.outer, **outer))
        pts.append((label, cfg))

    for h in (10, 40):
        add(f"H={h}", inner_steps=h)
    for d in (0.005, 0.03, 0.1):
        add(f"density={d}", density=d)
    for b in (4, 8):
        add(f"bits={b}", bits=b)
    add("outer lr 0.7 nesterov 0.9", outer={"lr": 0.7, "momentum": 0.9})
    add("outer lr 0.7 nesterov 0.5", outer={"lr": 0.7, "momentum": 0.5})
    add("outer lr 1.0 nesterov 0.5", outer={"lr": 1.0, "momentum": 0.5})
    other = "buffer" if comp.residual == "model" else "model"
    add(f"residual={other}", residual=other)
    add("ef_decay=0.9", ef_decay=0.9)
    add(f"residual={other} ef_decay=0.95", residual=other, ef_decay=0.95)
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
