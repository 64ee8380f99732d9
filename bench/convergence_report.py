"""What `locoswarm bench convergence` reports of its runs: the JSON summary (eval loss, gap
to ddp, traffic, the share of ddp's gain kept) and the table printed from it."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from locoswarm.bench.convergence import RunResult, Workload


def summarize(w: Workload, results: dict[str, RunResult]) -> dict:
    """The benchmark's JSON: per run eval loss, gap to ddp, traffic and reduction."""
    cfg = w.cfg
    ddp = results.get("ddp")
    local = results.get("local")
    runs = {}
    for name, r in results.items():
        gap = None if ddp is None else 100.0 * (r.eval_loss - ddp.eval_loss) / ddp.eval_loss
        reduction = None
        if ddp is not None and r.bytes_sent_per_replica > 0:
            reduction = ddp.bytes_sent_per_replica / r.bytes_sent_per_replica
        runs[name] = {
            "eval_loss": r.eval_loss,
            "gap_pct": gap,
            "bytes_sent_per_replica": r.bytes_sent_per_replica,
            "bytes_sent_per_replica_per_round": (r.bytes_sent_per_replica / r.rounds) if r.rounds else None,
            "reduction_vs_ddp": reduction,
            "rounds": r.rounds,
            "consensus_eval_loss": r.consensus_eval_loss,
            "replica_eval_loss": r.replica_eval_loss,
            "spread": r.spread,
            "gain_kept": gain_kept(r.eval_loss, local and local.eval_loss, ddp and ddp.eval_loss),
            "mix_bytes_per_replica": r.mix_bytes_per_replica,
            "group": r.group,
            "wall_s": r.wall_s,
            "curve": r.curve,
            "spread_curve": r.spread_curve,
        }
    out = {
        "preset": cfg.preset,
        "params": w.params,
        "tokens": cfg.total_steps * cfg.batch_size * cfg.data.seq_len * cfg.replicas,
        "replicas": cfg.replicas,
        "corpus_tokens": w.corpus.num_tokens,
        "config": asdict(cfg),
        "runs": runs,
    }
    out.update(runs)  # the flat keys: out["ddp"]["eval_loss"] …
    return out


def gain_kept(loss: float, local: float | None, ddp: float | None) -> float | None:
    """(local − loss) / (local − ddp): the share of data-parallel training's gain over a lone
    peer that a run keeps (1: all of it, 0: none; None without both references)."""
    if local is None or ddp is None or local == ddp:
        return None
    return (local - loss) / (local - ddp)


def format_table(summary: dict) -> str:
    lines = [f"{'run':<11}{'eval loss':>10}{'gap vs ddp':>12}{'sent/replica':>15}{'reduction':>12}{'wall s':>8}"]
    for name, r in summary["runs"].items():
        gap = "—" if r["gap_pct"] is None else f"{r['gap_pct']:+.1f} %"
        red = "—" if r["reduction_vs_ddp"] is None else f"{r['reduction_vs_ddp']:,.0f}×"
        lines.append(f"{name:<11}{r['eval_loss']:>10.4f}{gap:>12}{_human(r['bytes_sent_per_replica']):>15}{red:>12}"
                     f"{r['wall_s']:>8.0f}")
    for name, r in summary["runs"].items():
        if r["replica_eval_loss"] is None:
            continue
        group = r["group"]
        if group is None:
            where = "full exchange"
        elif group.get("scheme") == "tree":
            where = f"tree: groups of {group['group_size']} aggregated up {group['dims']} levels"
        else:
            where = (f"groups of {group['group_size']} on {group['dims']} dims, mix {group['mix']}"
                     f" every {group['mix_every']} ({_human(r['mix_bytes_per_replica'])} of it mixing)")
        kept = "" if r["gain_kept"] is None else f", gain kept {r['gain_kept']:.2f}"
        lines.append(f"{name}: {where}; replica 0 {r['replica_eval_loss']:.4f}, "
                     f"consensus {r['consensus_eval_loss']:.4f}, spread {r['spread']:.2e}{kept}")
    return "\n".join(lines)


def _human(n: float) -> str:
    if n == 0:
        return "0 B"
    units = ["B", "KB", "MB", "GB", "TB"]
    e = min(len(units) - 1, int(math.log(n, 1000)))
    return f"{n / 1000**e:.2f} {units[e]}"
