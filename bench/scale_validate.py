"""`locoswarm bench scale --validate swarm.json`: the scale model against a run of real
daemons on loopback (`bench swarm --no-simulate --json`), on control bytes per peer per
round and rounds per minute.

The model is given what it cannot know about that machine: the peers' training throughput
in the run, how long one DHT request takes there (`measure_rpc_s`), and the cores. Each
daemon's control loop then gets what a fair scheduler leaves it (`fair_share`) beside N
training threads that always want a core and N p2pd, at the demands the model computes. That last one matters: today's progress loop awaits a store and a get
back to back, each a few sequential waves of requests, so on a machine where N training
threads fill the cores every hop of a request (client → its p2pd → the other p2pd → the
answering loop, and back) waits to be scheduled, and the loop comes round less often than
every 0.1 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace

from locoswarm.bench.scale import ScaleConfig, run_scale
from locoswarm.bench.scale_designs import BoundedDesign
from locoswarm.bench.scale_model import Churn, Costs, Links, Workload, message_sizes

_DAEMON = r"""
import asyncio, os, sys, threading, time
import torch
torch.set_num_threads(1)
role, port, out_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def train():  # a tiny model's steps, as a CPU peer's training thread (GIL and cores)
    model = torch.nn.Sequential(torch.nn.Linear(128, 512), torch.nn.ReLU(), torch.nn.Linear(512, 128))
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(64, 128)
    while True:
        loss = model(x).square().mean(); opt.zero_grad(); loss.backward(); opt.step()

if role != "relay":  # the relays stand for the p2pd (Go, no training thread)
    threading.Thread(target=train, daemon=True).start()

async def relay(reader, writer):  # p2pd's hop: forward each message to the next hop and back
    r2, w2 = await asyncio.open_connection("127.0.0.1", out_port)
    while True:
        head = await reader.readexactly(4); body = await reader.readexactly(int.from_bytes(head, "big"))
        w2.write(head + body); await w2.drain()
        head = await r2.readexactly(4); body = await r2.readexactly(int.from_bytes(head, "big"))
        writer.write(head + body); await writer.drain()

async def serve(reader, writer):  # the answering node: a 5 KB answer
    while True:
        head = await reader.readexactly(4); await reader.readexactly(int.from_bytes(head, "big"))
        writer.write((5000).to_bytes(4, "big") + b"x" * 5000); await writer.drain()

async def client():
    await asyncio.sleep(3.0)  # let every process start training
    r, w = await asyncio.open_connection("127.0.0.1", out_port)
    took, end = [], time.monotonic() + float(sys.argv[4])
    while time.monotonic() < end:
        t0 = time.perf_counter()
        w.write((64).to_bytes(4, "big") + b"q" * 64); await w.drain()
        head = await r.readexactly(4); await r.readexactly(int.from_bytes(head, "big"))
        took.append(time.perf_counter() - t0)
        await asyncio.sleep(0.01)
    print(sorted(took)[len(took) // 2], sum(took) / len(took), flush=True)
    os._exit(0)  # a torch thread still running at interpreter exit aborts it

async def main():
    if role == "client":
        await client()
    else:
        await asyncio.start_server(relay if role == "relay" else serve, "127.0.0.1", port)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


def measure_rpc_s(num_daemons: int, *, seconds: float = 4.0) -> float:
    """Median round trip of one small request and a 5 KB answer through two relay hops (the
    two p2pd) between two of `num_daemons` processes that each train a small torch model in
    a thread beside their asyncio loop, as `num_daemons` CPU peers on this machine do."""
    import socket

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    server, relay_b, relay_a = free_port(), free_port(), free_port()
    cmd = [sys.executable, "-c", _DAEMON]
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [subprocess.Popen(cmd + ["server", str(server), "0", "0"], **quiet),
             subprocess.Popen(cmd + ["relay", str(relay_b), str(server), "0"], **quiet),
             subprocess.Popen(cmd + ["relay", str(relay_a), str(relay_b), "0"], **quiet)]
    procs += [subprocess.Popen(cmd + ["idle", str(free_port()), "0", "0"], **quiet)
              for _ in range(max(0, num_daemons - 2))]
    try:
        time.sleep(1.0)
        done = subprocess.run(cmd + ["client", "0", str(relay_a), str(seconds)], capture_output=True, text=True,
                              timeout=60 + seconds)
        if done.returncode != 0:
            raise RuntimeError(f"the request-latency probe failed: {done.stderr[-500:]}")
        return float(done.stdout.split()[0])
    finally:
        for p in procs:
            p.kill()
            p.wait()


def fair_share(cores: float, demands: list[float]) -> float:
    """The level a fair scheduler gives every thread that wants more (max-min fairness):
    s with Σ min(demand, s) = cores; inf when everything fits."""
    if sum(demands) <= cores:
        return float("inf")
    left, wanting = cores, sorted(demands)
    while wanting and wanting[0] * len(wanting) <= left:
        left -= wanting.pop(0)
    return left / len(wanting)


def exchange_share(swarm: dict, workload: Workload, cores: float, others: list[float]) -> float:
    """The share of a core a round's exchange compute got in the run `swarm`.

    Where the run timed its exchange's phases (`exchange_s_per_round`), from its compute
    phases as the training throughput comes from its training: encoding our delta (send)
    and screening to the outer step (step) took `workload.apply_s` and the pulled deltas'
    `per_delta_s − decode_s` of a whole core; what they took of the wall clock gives the
    share, and the model predicts the rest (the pull: decoding and waiting for the deltas).
    On a machine that daemons oversubscribe, a thread's share is not the scheduler's alone:
    a process's training and exchange threads hold one GIL, and a holder descheduled
    stalls the other (one core, the exchange beside training in one process and two
    spinning processes: 1.5 s where a fair share of four threads gives 1.0 s, 2026-12-07).

    Otherwise what a fair scheduler gives 2N threads: the rounds end together, so every
    peer's exchange computes at once, each beside its own next round's training."""
    phases = swarm.get("exchange_s_per_round") or {}
    wall = phases.get("send", 0.0) + phases.get("step", 0.0)
    pulled = min(workload.fanout, swarm["peers"] - 1)
    compute = workload.apply_s + pulled * (workload.per_delta_s - workload.decode_s)
    if wall > 0:
        return min(1.0, compute / wall)
    return min(1.0, fair_share(cores, [1.0] * (2 * swarm["peers"]) + others))


def run_design(swarm: dict) -> str:
    """The design the daemons of a `bench swarm --json` run ran: "bounded" where they told
    their progress over streams (the run counts those bytes), "current" before."""
    return "bounded" if swarm.get("progress_bytes_per_peer_per_round") is not None else "current"


def compare_with_swarm(swarm: dict, *, cores: int | None = None, rpc_s: float | None = None, seed: int = 0,
                       duration_s: float = 120.0, costs: Costs | None = None, design: str | None = None,
                       bounded: BoundedDesign | None = None) -> dict:
    """Simulate the run `bench swarm --json` wrote (loopback, no churn) in `design` (None:
    the one its daemons ran, `run_design`) and compare. `rpc_s`: one request's round trip on
    that machine (None: measure it now with the run's number of daemons, ≈10 s). The
    bounded design is simulated as the daemon runs it below its view's size: one group of
    every peer (`bounded` for its other fields)."""
    n, rounds = swarm["peers"], swarm["rounds"]
    design = design or run_design(swarm)
    cores = cores or os.cpu_count() or 1
    rpc_s = measure_rpc_s(n) if rpc_s is None else rpc_s
    round_s = 60.0 / swarm["rounds_per_minute"]
    tokens_per_round = swarm["tokens"] / (n * rounds)
    tps = tokens_per_round / (round_s * swarm["train_time_share"])
    links = Links.loopback()
    links.rpc_s = rpc_s
    costs = replace(costs or Costs(), **message_sizes(("/ip4/127.0.0.1/tcp/40000",)))
    cfg = ScaleConfig(peers=(n,), designs=(design,), duration_s=duration_s, seed=seed, sample_peers=n,
                      churn=Churn(churn_s=1e12), links=links, costs=costs,
                      bounded=replace(bounded or BoundedDesign(), group_size=max(2, n)),
                      workload=Workload(tokens_per_s_median=tps, tokens_per_s_sigma=0.0,
                                        fanout=swarm.get("fanout") or Workload().fanout,
                                        # runs before 2026-12-05 07:50 did not say: the tiny spec's
                                        **{k: swarm[k] for k in ("inner_steps", "batch_size", "seq_len") if swarm.get(k)}))
    unbound = run_scale(cfg)[0]
    others = [unbound["control_cpu_cores"]] * n + [unbound["p2pd_cpu_cores"]] * n
    links.cpu_share = min(1.0, fair_share(cores, [1.0] * n + others))
    links.exchange_share = exchange_share(swarm, cfg.workload, cores, others)
    model = run_scale(cfg)[0]
    model_bytes = model["achieved_control_bytes_per_peer_per_s"] * model["seconds_per_round"]
    real_bytes = swarm["control_bytes_per_peer_per_round"]
    return {
        "design": design, "peers": n, "cores": cores, "tokens_per_s": tps, "cpu_share": links.cpu_share,
        "exchange_share": links.exchange_share, "rpc_s": rpc_s,
        "real_control_bytes_per_peer_per_round": real_bytes, "model_control_bytes_per_peer_per_round": model_bytes,
        "control_bytes_gap": model_bytes / real_bytes - 1,
        "real_rounds_per_minute": swarm["rounds_per_minute"], "model_rounds_per_minute": model["rounds_per_minute"],
        "rounds_per_minute_gap": model["rounds_per_minute"] / swarm["rounds_per_minute"] - 1,
        # A round's exchange, from its end to its outer step, on average (runs before 2026-12-07
        # 07:00 gave only the phases' medians, whose sum misses the slow rounds).
        "real_exchange_s": ((swarm.get("exchange_detail_s_per_round") or {}).get("mean_total")
                            or sum((swarm.get("exchange_s_per_round") or {}).values()) or None),
        "model_exchange_s": model["exchange_s_per_round"],
        "real_tokens_per_round": tokens_per_round, "model_tokens_per_round": cfg.workload.round_tokens,
        "model_offered_control_bytes_per_peer_per_s": model["control_bytes_per_peer_per_s"],
        "model_achieved_control_bytes_per_peer_per_s": model["achieved_control_bytes_per_peer_per_s"],
        # Where the model's bytes go, per peer per round (offered), beside the run's own counts.
        "model_control_bytes_per_round_by_operation": {
            op: b * model["seconds_per_round"] for op, b in model["control_bytes_by_operation"].items()},
    }


def load_swarm(path: str) -> dict:
    with open(path) as fh:
        swarm = json.load(fh)
    missing = [k for k in ("peers", "rounds", "rounds_per_minute", "tokens", "train_time_share",
                           "control_bytes_per_peer_per_round") if swarm.get(k) is None]
    if missing:
        why = swarm.get("transport_bytes_unavailable")
        raise ValueError(f"{path}: not a `bench swarm --json` result with control bytes (missing {', '.join(missing)})"
                         + (f"; its transport bytes were not counted: {why}" if why else ""))
    return swarm


def format_comparison(c: dict) -> str:
    return (f"{c['peers']} real daemons on {c['cores']} cores vs the {c['design']} design's model (loop share {c['cpu_share']:.2f} core, "
            f"request round trip {1000 * c['rpc_s']:.1f} ms, {c['tokens_per_s']:,.0f} tokens/s per peer):\n"
            f"  control bytes/peer/round  real {c['real_control_bytes_per_peer_per_round']:,.0f}  "
            f"model {c['model_control_bytes_per_peer_per_round']:,.0f}  ({100 * c['control_bytes_gap']:+.0f} %)\n"
            f"  rounds/min                real {c['real_rounds_per_minute']:.1f}  "
            f"model {c['model_rounds_per_minute']:.1f}  ({100 * c['rounds_per_minute_gap']:+.0f} %)"
            + (f"\n  exchange s/round          real {c['real_exchange_s']:.2f}  model {c['model_exchange_s']:.2f}  "
               f"(the exchange's compute at {c['exchange_share']:.2f} of a core)" if c.get("real_exchange_s") else ""))


def measure_dht_cycle(num_nodes: int, *, seconds: float = 8.0, interval_s: float = 0.1) -> dict:
    """`num_nodes` real hivemind DHTNodes in this process (each with its own p2pd and
    RSASignatureValidator) run today's progress loop — store a signed progress entry, then
    get(latest=True) the round's dictionary, every `interval_s` — for `seconds` after a
    warm-up as long; returns per store + get cycle: bytes the p2pd sent (ss), and the CPU of
    this process and of the p2pd. What scale_designs.current_cycle predicts, measured."""
    import asyncio

    import psutil

    from locoswarm.bench.tcpio import TcpMeter

    async def run() -> dict:
        from hivemind.dht.crypto import RSASignatureValidator
        from hivemind.dht.node import DHTNode
        from hivemind.p2p import P2P
        from hivemind.utils import get_dht_time
        from hivemind.utils.crypto import RSAPrivateKey

        from locoswarm.protocol.records import Progress, encode_progress

        nodes, p2ps, first = [], [], None
        for _ in range(num_nodes):
            validator = RSASignatureValidator(RSAPrivateKey())
            p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=first or [])
            node = await DHTNode.create(p2p=p2p, initial_peers=first, record_validator=validator)
            first = first or [str(a) for a in await p2p.get_visible_maddrs()]
            nodes.append((node, validator))
            p2ps.append(p2p)
        p2pds = [c for c in psutil.Process().children() if c.name() == "p2pd"]
        cycles = [0]

        async def loop(node, validator, until: float) -> None:
            subkey = node.peer_id.to_base58().encode() + validator.local_public_key
            tokens = 0
            while time.monotonic() < until:
                tokens += 512
                value = encode_progress(Progress(tokens=tokens, tokens_per_s=1000.0, done=False))
                await node.store("locoswarm:scale:progress:0", value, get_dht_time() + 60, subkey=subkey)
                await node.get("locoswarm:scale:progress:0", latest=True)
                cycles[0] += 1
                await asyncio.sleep(interval_s)

        try:
            await asyncio.gather(*(loop(n, v, time.monotonic() + seconds) for n, v in nodes))  # warm the caches
            cycles[0] = 0
            meter = TcpMeter()
            meter.read({p.pid for p in p2pds})
            cpu0 = time.process_time()
            p2pd0 = sum(sum(p.cpu_times()[:2]) for p in p2pds)
            await asyncio.gather(*(loop(n, v, time.monotonic() + seconds) for n, v in nodes))
            sent, cpu1 = meter.read({p.pid for p in p2pds})[0], time.process_time()
            p2pd1 = sum(sum(p.cpu_times()[:2]) for p in p2pds)
        finally:
            for node, _ in nodes:
                await node.shutdown()
            for p2p in p2ps:
                await p2p.shutdown()
        k = max(1, cycles[0])
        return {"nodes": num_nodes, "cycles_per_node_per_s": k / num_nodes / seconds,
                "bytes_per_cycle": sent / k, "python_cpu_s_per_cycle": (cpu1 - cpu0) / k,
                "p2pd_cpu_s_per_cycle": (p2pd1 - p2pd0) / k}

    return asyncio.run(run())


def compare_dht_cycle(measured: dict, costs: Costs | None = None) -> dict:
    """`measure_dht_cycle`'s result beside what the model predicts for one such cycle."""
    from locoswarm.bench.scale_designs import CurrentDesign, Dht, current_cycle

    costs = costs or Costs()
    design = CurrentDesign()
    n = measured["nodes"]
    dht = Dht(costs, n, num_replicas=design.num_replicas, beam_size=design.beam_size, num_workers=design.num_workers)
    cycle = current_cycle(dht, design, n, costs.progress_entry_bytes, period_s=design.report_interval_s,
                          refresh_s=design.report_interval_s)
    model_cpu = cycle.cpu_s + cycle.checks * costs.signature_check_s
    return {**measured, "model_bytes_per_cycle": cycle.bytes,
            "bytes_gap": cycle.bytes / measured["bytes_per_cycle"] - 1,
            "model_python_cpu_s_per_cycle": model_cpu,
            "python_cpu_gap": model_cpu / measured["python_cpu_s_per_cycle"] - 1,
            "model_p2pd_cpu_s_per_cycle": cycle.rpcs * costs.p2pd_cpu_s}


def format_dht_cycle(c: dict) -> str:
    return (f"{c['nodes']} real DHTNodes, store + get(latest) cycle: bytes real {c['bytes_per_cycle']:,.0f} "
            f"model {c['model_bytes_per_cycle']:,.0f} ({100 * c['bytes_gap']:+.0f} %); Python CPU real "
            f"{1000 * c['python_cpu_s_per_cycle']:.1f} ms model {1000 * c['model_python_cpu_s_per_cycle']:.1f} ms "
            f"({100 * c['python_cpu_gap']:+.0f} %); p2pd CPU real {1000 * c['p2pd_cpu_s_per_cycle']:.1f} ms "
            f"model {1000 * c['model_p2pd_cpu_s_per_cycle']:.1f} ms")
