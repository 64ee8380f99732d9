"""`locoswarm bench scale`: what the swarm's control plane costs each peer at N = 10 …
10,000, for the first daemon's design ("current": one registry key, progress read from the
DHT) and the bounded one the daemon runs now ("bounded": registry buckets, progress and
records over streams; grid groups above a group's size, not built in the daemon yet), from a discrete-event simulation (bench/scale_sim.py) built on measured
message sizes and CPU costs (bench/scale_model.py) and hivemind's traversal rules
(bench/scale_dht.py), and checks the bounded design against its targets; the comparisons
with real DHT nodes and real daemons are in bench/scale_validate.py. Figures: docs/scale.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Callable

from locoswarm.bench.scale_designs import BoundedDesign, CurrentDesign
from locoswarm.bench.scale_model import Churn, Costs, Links, Workload
from locoswarm.bench.scale_results import summarize
from locoswarm.bench.scale_sim import Simulation

DESIGNS = ("current", "bounded")
MAX_PEERS = 100_000


@dataclass(kw_only=True, slots=True)
class ScaleConfig:
    peers: tuple[int, ...] = (10, 100, 1000, 10000)
    """Swarm sizes to simulate."""
    designs: tuple[str, ...] = DESIGNS
    duration_s: float = 300.0
    """Simulated time per swarm size and design."""
    seed: int = 0
    sample_peers: int = 16
    """Peers whose loops and rounds run event by event (the rest by symmetry)."""
    churn: Churn = field(default_factory=Churn)
    links: Links = field(default_factory=Links)
    workload: Workload = field(default_factory=Workload)
    current: CurrentDesign = field(default_factory=CurrentDesign)
    bounded: BoundedDesign = field(default_factory=BoundedDesign)
    costs: Costs = field(default_factory=Costs)

    def validate(self) -> None:
        if not self.peers or any(not 2 <= n <= MAX_PEERS for n in self.peers):
            raise ValueError(f"--peers: each swarm size must be in 2..{MAX_PEERS}, got {list(self.peers)}")
        for d in self.designs:
            if d not in DESIGNS:
                raise ValueError(f"--design: unknown design {d!r}; known: {', '.join(DESIGNS)}")
        if not self.duration_s >= 10:
            raise ValueError(f"--duration-s must be >= 10, got {self.duration_s}")
        if self.sample_peers < 1:
            raise ValueError(f"sample_peers must be >= 1, got {self.sample_peers}")
        c = self.churn
        if not c.session_min > 0 or (c.churn_s is not None and not c.churn_s > 0) or not 0 <= c.withdraw_fraction <= 1:
            raise ValueError("--session-min and --churn-s must be > 0, withdraw_fraction in [0, 1]")
        self.links.validate()
        self.workload.validate()
        self.bounded.validate()


def parse_peers(text: str) -> tuple[int, ...]:
    """'10,100,1000' → (10, 100, 1000); ValueError naming --peers otherwise."""
    try:
        out = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ValueError(f"--peers: expected comma-separated integers, got {text!r}") from None
    if not out:
        raise ValueError("--peers: no swarm size given")
    return out


SECTIONS = ("current", "bounded", "workload", "links", "costs", "churn")


def apply_settings(cfg: ScaleConfig, settings: list[str]) -> None:
    """Set model fields from `section.field=value` strings (`--set`), converted to the
    field's type (a pair as `lo:hi`); ValueError naming what is wrong."""
    for item in settings:
        name, eq, text = item.partition("=")
        section, _, attr = name.strip().partition(".")
        if not eq or section not in SECTIONS or not attr:
            raise ValueError(f"--set {item!r}: expected SECTION.FIELD=VALUE, SECTION one of {', '.join(SECTIONS)}")
        target = getattr(cfg, section)
        if attr not in {f.name for f in fields(target)}:
            known = ", ".join(f.name for f in fields(target))
            raise ValueError(f"--set {item!r}: {section} has no field {attr!r}; known: {known}")
        old = getattr(target, attr)
        text = text.strip()
        try:
            if isinstance(old, bool):
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                value = text.lower() in ("true", "1")
            elif isinstance(old, tuple):
                value = tuple(float(x) for x in text.split(":"))
                if len(value) != len(old):
                    raise ValueError(text)
            elif old is None or isinstance(old, float):
                value = float(text)
            else:
                value = type(old)(text)
        except ValueError:
            raise ValueError(f"--set {item!r}: {text!r} is not a valid {type(old).__name__}") from None
        setattr(target, attr, value)


def run_scale(cfg: ScaleConfig, log: Callable[[str], None] = lambda _: None) -> list[dict]:
    """One result per (swarm size, design), sizes in the order asked."""
    cfg.validate()
    out = []
    for n in cfg.peers:
        for design in cfg.designs:
            t0 = time.perf_counter()
            sim = Simulation(design, n, current=cfg.current, bounded=cfg.bounded, costs=cfg.costs, links=cfg.links,
                             workload=cfg.workload, churn=cfg.churn, sample_peers=cfg.sample_peers, seed=cfg.seed)
            sim.run(cfg.duration_s)
            result = summarize(sim, cfg.duration_s)
            result["simulated_s"] = cfg.duration_s
            result["wall_s"] = time.perf_counter() - t0
            log(f"  {design:>7} N={n:>6}: simulated {cfg.duration_s:.0f} s in {result['wall_s']:.2f} s")
            out.append(result)
    targets = check_targets(out, cfg.costs)
    saturation = saturation_peers(cfg) if "current" in cfg.designs else None
    for r in out:
        if r["design"] == "bounded":
            r["targets"] = targets
        else:
            r["one_core_at_peers"] = saturation
    return out


def check_targets(results: list[dict], costs: Costs) -> list[dict]:
    """The bounded design's targets, for the sizes that were simulated."""
    by_n = {r["peers"]: r for r in results if r["design"] == "bounded"}
    out = []

    def target(name: str, value: float, limit: float, met: bool) -> None:
        out.append({"target": name, "value": value, "limit": limit, "met": bool(met)})

    for n in (1000, 10000):
        if n in by_n:
            v = by_n[n]["control_bytes_per_peer_per_s"]
            target(f"control bytes/s per peer at N={n} <= 20 KB/s", v, 20_000, v <= 20_000)
    if 1000 in by_n and 10000 in by_n:
        a, b = by_n[1000]["control_bytes_per_peer_per_s"], by_n[10000]["control_bytes_per_peer_per_s"]
        ratio = max(a, b) / min(a, b)
        target("control bytes/s at N=10000 and N=1000 at most 1.2x apart", ratio, 1.2, ratio <= 1.2)
    if by_n:
        v = max(r["max_dht_value_bytes"] for r in by_n.values())
        target("no DHT value above 100 KB", v, costs.target_value_bytes, v <= costs.target_value_bytes)
    small, large = min(by_n, default=None), max(by_n, default=None)
    if small is not None and large is not None and large >= 10 * small:
        ratio = by_n[large]["rounds_per_minute"] / by_n[small]["rounds_per_minute"]
        target(f"rounds/min at N={large} >= 80% of N={small}", ratio, 0.8, ratio >= 0.8)
    return out


def saturation_peers(cfg: ScaleConfig, *, max_peers: int = 500) -> dict:
    """The smallest swarm at which today's control loop wants a whole core, counting the
    signature checks alone and counting all its CPU (at the configured periods)."""
    from locoswarm.bench.scale_designs import Dht, current_cycle

    c, d = cfg.costs, cfg.current
    out: dict[str, int | None] = {"signature_checks": None, "all_control_cpu": None}
    for n in range(2, max_peers + 1):
        dht = Dht(c, n, num_replicas=d.num_replicas, beam_size=d.beam_size, num_workers=d.num_workers, seed=cfg.seed)
        total = (current_cycle(dht, d, n, c.registry_entry_bytes, period_s=d.record_refresh_s,
                               refresh_s=d.record_refresh_s).scaled(1 / d.record_refresh_s)
                 + current_cycle(dht, d, n, c.progress_entry_bytes, period_s=d.report_interval_s,
                                 refresh_s=d.report_interval_s).scaled(1 / d.report_interval_s))
        checks = (total.checks_cached if d.signature_cache else total.checks) * c.signature_check_s
        if out["signature_checks"] is None and checks >= 1:
            out["signature_checks"] = n
        if out["all_control_cpu"] is None and checks + total.cpu_s >= 1:
            out["all_control_cpu"] = n
        if None not in out.values():
            break
    return out


def _si(x: float | None, unit: str = "") -> str:
    if x is None:
        return "—"
    for div, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g} {prefix}{unit}".rstrip()
    return f"{x:.3g} {unit}".rstrip()


def format_table(results: list[dict]) -> str:
    head = ("design", "peers", "ctrl B/s", "DHT ops/s", "sig/s", "sig/s cached", "CPU cores", "max value",
            "rounds/min", "compute", "broken")
    rows = [head]
    for r in results:
        rows.append((r["design"], f"{r['peers']:,}", _si(r["control_bytes_per_peer_per_s"], "B"),
                     f"{r['dht_ops_per_peer_per_s']:.3g}", _si(r["signature_checks_per_peer_per_s"]),
                     _si(r["signature_checks_cached_per_peer_per_s"]), f"{r['control_cpu_cores']:.3g}",
                     _si(r["max_dht_value_bytes"], "B"), f"{r['rounds_per_minute']:.1f}",
                     f"{100 * r['compute_share']:.0f} %", "yes" if r["broken"] else "no"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    for r in results:
        if r["broken"]:
            lines.append(f"{r['design']} at {r['peers']:,} peers: {r['broken_reason']}")
    saturation = next((r["one_core_at_peers"] for r in results if r.get("one_core_at_peers")), None)
    if saturation:
        lines.append(f"current: the control loop wants a whole core from {saturation['all_control_cpu']} peers "
                     f"(its signature checks alone from {saturation['signature_checks']})")
    targets = next((r["targets"] for r in results if r.get("targets")), [])
    for t in targets:
        lines.append(f"target {'met   ' if t['met'] else 'MISSED'} {t['target']}: {t['value']:,.3g}")
    return "\n".join(lines)
