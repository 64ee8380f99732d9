"""What `bench scale` reports of a finished simulation (bench/scale_sim.py): per-peer means
over the sampled peers of what their timers and rounds cost, the largest DHT value, the
busiest node, what the bounded design's sampling tells each peer, and whether the design
broke (a value over hivemind's RPC limit, records expiring before their refresh)."""

from __future__ import annotations

from collections import Counter

from locoswarm.bench.scale_designs import OpCost, bounded_hot_node, current_hot_node
from locoswarm.bench.scale_sim import Simulation


def summarize(sim: Simulation, duration_s: float) -> dict:
    """Per-peer means over the sampled peers (see the module docstring)."""
    c, d = sim.costs, (sim.bnd if sim.design == "bounded" else sim.cur)
    offered, achieved, by_op = OpCost(), OpCost(), Counter()
    for s in sim.sampled:
        per_timer: dict[str, OpCost] = {}
        fired = Counter()
        for key, count in s.fired.items():
            per_timer[key[0]] = per_timer.get(key[0], OpCost()) + sim.memo[key].scaled(count)
            fired[key[0]] += count
        for name, total in per_timer.items():
            offered = offered + total.scaled(1.0 / (fired[name] * sim.timers[name]))
            by_op[name] += total.bytes / (fired[name] * sim.timers[name]) / len(sim.sampled)
            achieved = achieved + total.scaled(1.0 / duration_s)
        if s.rounds and s.last_round_end > 0:
            per_s = s.round_cost.scaled(1.0 / s.last_round_end)
            offered, achieved = offered + per_s, achieved + per_s
            by_op["round"] += per_s.bytes / len(sim.sampled)
    k = len(sim.sampled)
    offered, achieved = offered.scaled(1 / k), achieved.scaled(1 / k)
    stretch = sum(s.stretch for s in sim.sampled) / k
    value = max_value(sim)
    rounds = sum(s.rounds for s in sim.sampled)
    wall = sum(s.last_round_end for s in sim.sampled)
    out = {
        "design": sim.design, "peers": sim.n,
        "control_bytes_per_peer_per_s": offered.bytes,
        "control_bytes_by_operation": dict(by_op),
        "dht_ops_per_peer_per_s": offered.dht_calls,
        "dht_rpcs_per_peer_per_s": offered.rpcs,
        "stream_msgs_per_peer_per_s": offered.stream_msgs,
        "signature_checks_per_peer_per_s": offered.checks,
        "signature_checks_cached_per_peer_per_s": offered.checks_cached,
        "signature_cache": d.signature_cache,
        "control_cpu_cores": sim.cpu_s(offered),
        "p2pd_cpu_cores": offered.rpcs * c.p2pd_cpu_s,
        "loop_stretch": stretch,
        "achieved_control_bytes_per_peer_per_s": achieved.bytes,
        "max_dht_value_bytes": value[0], "max_dht_value_key": value[1],
        "rounds_per_minute": 60.0 * rounds / wall if wall else 0.0,
        "compute_share": sum(s.compute_s for s in sim.sampled) / wall if wall else 0.0,
        "seconds_per_round": wall / rounds if rounds else None,
        "exchange_s_per_round": sum(s.exchange_s for s in sim.sampled) / rounds if rounds else None,
        **hot_node(sim),
    }
    if sim.design == "bounded":
        out.update(bucket_view(sim))
    out["broken"], out["broken_reason"] = broken(sim, value[0], stretch)
    if value[0] > c.max_dht_value_bytes:
        out["rounds_per_minute"] = out["compute_share"] = 0.0  # the key is unreadable: no swarm forms
    return out


def max_value(sim: Simulation) -> tuple[int, str]:
    """The largest DHT value seen, and which key it was."""
    c = sim.costs
    if sim.design == "current":
        return max((round(c.dict_bytes(sim.max_entries, c.registry_entry_bytes)), "registry"),
                   (round(c.dict_bytes(sim.n, c.progress_entry_bytes)), "progress"))
    found = [(round(c.dict_bytes(sim.max_entries, c.registry_entry_bytes)), "registry bucket"),
             (round(c.dict_bytes(sim.group, c.group_entry_bytes)), "group")]
    if sim.bnd.progress_via == "group_key":
        found.append((round(c.dict_bytes(sim.group, c.progress_entry_bytes)), "group progress"))
    return max(found)


def broken(sim: Simulation, value_bytes: int, stretch: float) -> tuple[bool, str | None]:
    c = sim.costs
    if value_bytes > c.max_dht_value_bytes:
        return True, (f"a {value_bytes / 2**20:.1f} MiB DHT value is above hivemind's 4 MiB RPC limit: "
                      "no answer comes back and the key is unreadable for everyone")
    refresh = sim.refresh_s * stretch
    if refresh > sim.ttl_s:
        return True, (f"records expire before they are refreshed: the loop is {stretch:.0f}× behind "
                      f"(refresh every {refresh:.0f} s, TTL {sim.ttl_s:.0f} s), peers drop out of each other's view")
    return False, None


def hot_node(sim: Simulation) -> dict:
    """The busiest node: the one nearest a key, which every traversal of it reaches."""
    if sim.design == "current":
        out_bytes, cpu = current_hot_node(sim.dht, sim.cur, sim.n)
    else:
        out_bytes, cpu = bounded_hot_node(sim.costs, sim.bnd, sim.n, sim.bits, sim.buckets_per_read())
    return {"hot_node_bytes_per_s": out_bytes, "hot_node_cpu_cores": cpu}


def bucket_view(sim: Simulation) -> dict:
    """What the bounded design's sampling tells each peer: its estimate of N from the
    occupancy of the buckets it read in the last TTL, and its partial view."""
    errors, views, other_bits = [], [], 0
    for s in sim.sampled:
        latest = {b: e for _, b, e in s.reads}
        if not latest:
            continue
        estimate = sum(latest.values()) / len(latest) * 2 ** sim.bits
        errors.append(abs(estimate - sim.n) / sim.n)
        views.append(min(sim.bnd.view_max, sum(latest.values()) - 1))
        other_bits += sim.bnd.bucket_bits(estimate) != sim.bits
    k = max(1, len(errors))
    return {"bucket_bits": sim.bits, "buckets": 2 ** sim.bits, "buckets_read_per_period": sim.buckets_per_read(),
            "peers_estimate_error": sum(errors) / k, "peers_estimate_other_bits": other_bits / k,
            "view_size": sum(views) / k}
