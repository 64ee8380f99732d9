"""`locoswarm bench swarm`: N real daemons on loopback against the in-process simulation.
Reports rounds per minute, the share of wall time the peers spent training, bytes per peer
per round (the daemons' own counts and, where it can be read, the transport's: swarmbytes.py),
and the final eval loss of the swarm (mean over the peers' replicas, as the simulation
reports it) against the simulation's with the same spec, shards, seeds and number of rounds.
With `churn_s` > 0 the same swarm runs a clean phase and a churn phase (peers SIGKILLed and
restarted, bench/churn.py) and the bench reports the rate of each.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import replace
from typing import Callable

from locoswarm.node.leaving import FINAL_MODEL
from locoswarm.bench.churn import Churn, Fakes, Phases, first_completed, rate_per_minute
from locoswarm.bench.swarm import LocalSwarm
from locoswarm.bench.swarmpeer import RoundLine
from locoswarm.bench.swarmbytes import BYTE_KEYS, byte_figures, format_bytes
from locoswarm.node.spec import RunSpec, write_spec


def bench_spec(num_peers: int, rounds: int, base: RunSpec | None = None) -> RunSpec:
    """The default spec, with one data shard per peer (as the simulation's replicas) and the
    learning-rate schedule planned for exactly `rounds` rounds."""
    spec = base or RunSpec()
    return replace(spec, run_id=f"bench-swarm-{num_peers}", num_shards=num_peers,
                   total_steps=rounds * spec.diloco.inner_steps)


def replica_spread(paths: list[str]) -> float:
    """max over pairs of peers of ‖θ_i − θ_j‖ / ‖θ_i‖ over all parameters of their replicas."""
    import torch
    from safetensors.torch import load_file

    flats = [torch.cat([t.reshape(-1) for _, t in sorted(load_file(p).items())]) for p in paths]
    return max((float((a - b).norm() / a.norm()) for i, a in enumerate(flats) for b in flats[i + 1:]), default=0.0)


FAKE_MODES = {"record": "", "stall": "stall", "keys": "keys", "ahead": "ahead:20", "chain": "chain", "loud": "loud"}
"""`bench swarm --fake-mode` → bench/fake_peer.py's mode ("keys": one process holds all K
identities, `keys:K`; "ahead" and "chain": issue 19's identities that show a state ahead of
the swarm or an invented round chain, to draw the honest peers after them; "loud": a sybil
group serving deltas ten times an honest one's)."""


def last_delta_after_ours(lines: list[RoundLine]) -> float:
    """Median over the peers' rounds of how long after a peer served its delta the round's
    last delta was served (the peers share one clock: all run on this machine)."""
    last: dict[int, float] = {}
    for x in lines:
        if x.sent_at:
            last[x.round] = max(last.get(x.round, 0.0), x.sent_at)
    lags = [last[x.round] - x.sent_at for x in lines if x.sent_at]
    return statistics.median(lags) if lags else 0.0


def disturbance_phases(rounds: int, *, churn_s: float, fakes: int, flood: int) -> Phases | None:
    """The phases of a run with one disturbance (None: none asked); ValueError naming the
    flag when the disturbances asked cannot be measured."""
    if churn_s < 0:
        raise ValueError(f"--churn must be >= 0 seconds, got {churn_s}")
    if fakes < 0 or flood < 0:
        raise ValueError(f"--fakes and --flood must be >= 0, got {fakes} and {flood}")
    if sum(map(bool, (churn_s, fakes, flood))) > 1:
        raise ValueError("--churn, --fakes and --flood measure one disturbance at a time: give one of them")
    return Phases.of(rounds) if churn_s or fakes or flood else None


def transport_figures(swarm: LocalSwarm, overlap: bool) -> dict:
    """A mixed swarm's figures by transport: each peer's round overhead (time not training,
    mean over its steady rounds), the median over the peers of each transport, and the
    py-libp2p peers' over the p2pd peers' (issue 22's target: within 1.5×)."""
    by: dict[str, list[float]] = {"p2pd": [], "libp2p": []}
    exchange: dict[str, list[float]] = {"p2pd": [], "libp2p": []}
    for p in swarm.peers:
        steady = p.rounds[:-1] if overlap and len(p.rounds) > 1 else p.rounds
        if steady:
            transport = "libp2p" if swarm.on_libp2p(p.index) else "p2pd"
            by[transport].append(statistics.fmean(x.round_s - x.train_s for x in steady))
            exchange[transport].append(statistics.fmean(sum(x.exchange) for x in steady))
    medians = {t: statistics.median(v) for t, v in by.items() if v}
    out = {"libp2p_peers": swarm.libp2p, "overhead_s_by_transport": medians,
           "peer_overheads_s": {t: [round(v, 4) for v in vs] for t, vs in by.items()},
           # With overlapped rounds the exchange runs beside the next round's training: its
           # length (send, pull, outer step) is what a transport could slow, overhead or not.
           "exchange_s_by_transport": {t: statistics.median(v) for t, v in exchange.items() if v}}
    if len(medians) == 2 and medians["p2pd"] > 0:
        out["overhead_ratio_libp2p"] = medians["libp2p"] / medians["p2pd"]
    return out


def run_swarm_bench(num_peers: int, rounds: int, *, threads: int = 1, simulate: bool = True, fanout: int = 16,
                    overlap: bool = True, log: Callable[[str], None] = print, keep_dir: str | None = None,
                    churn_s: float = 0.0, seed: int = 0, checkpoint_every: int | None = None,
                    fakes: int = 0, flood: int = 0, earn_rounds: int | None = None,
                    check_agreement: float | None = None, fake_mode: str = "record", row_size: int = 0,
                    eval_every: int | None = 0, libp2p: int = 0) -> dict:
    """`churn_s` > 0: kill and restart a random peer every `churn_s` seconds on average (a
    Poisson process drawn from `seed`) during the middle half of the rounds; the peers then
    end at the swarm's round `rounds` (`--until-round`). `checkpoint_every`: the peers'
    `--checkpoint-every` (None: the daemon's default). `fakes` > 0 instead: that many fake
    identities keep records in the registry during the middle half (bench/fake_peer.py;
    `fake_mode` "stall": they also claim the rounds done and answer "not yet" to every request);
    `flood` > 0: that many identities ask every peer for its state over and over during the
    middle half (bench/state_flood.py). `earn_rounds`: the spec's diloco.robust.earn_rounds
    (None: the default; 0 turns earned weight off, to compare); `check_agreement` its
    diloco.robust.check_agreement likewise (0: no checks). `row_size` > 0: tree rounds
    (rounds.exchange "tree", node/tree.py) with rows of that size. `eval_every`: the peers'
    --eval-every (0: only at the end, so that the figures are training and the exchange;
    None: the daemon's default). `libp2p`: the last that many peers run on py-libp2p
    (`--transport libp2p`, issue 22's mixed swarm); their round overhead is reported beside the
    p2pd peers' (`overhead_s_by_transport`)."""
    phases = disturbance_phases(rounds, churn_s=churn_s, fakes=fakes, flood=flood)  # ValueError before anything starts
    spec = bench_spec(num_peers, rounds)
    spec = replace(spec, rounds=replace(spec.rounds, overlap=overlap))
    if row_size:
        spec = replace(spec, rounds=replace(spec.rounds, exchange="tree", row_size=row_size))
    robust = {k: v for k, v in (("earn_rounds", earn_rounds), ("check_agreement", check_agreement)) if v is not None}
    if robust:
        spec = replace(spec, diloco=replace(spec.diloco, robust=replace(spec.diloco.robust, **robust)))
        spec.validate()
    extra = ["--fanout", str(fanout)]
    if checkpoint_every is not None:
        extra += ["--checkpoint-every", str(checkpoint_every)]
    with tempfile.TemporaryDirectory(prefix="locoswarm-bench-") as tmp:
        spec_path = os.path.join(tmp, "run.toml")
        write_spec(spec, spec_path)
        swarm = LocalSwarm(num_peers, spec_path=spec_path, max_rounds=rounds, threads=threads, eval_every=eval_every,
                           keep_dir=keep_dir, extra=extra, until_round=phases is not None, libp2p=libp2p)
        churn = Churn(swarm, phases, churn_s, seed, log=log) if churn_s else None
        fake = (Fakes(swarm, phases, fakes, log=log, mode=FAKE_MODES[fake_mode]) if fakes else
                Fakes(swarm, phases, flood, log=log, kind="flood") if flood else None)
        disturbance = churn or fake
        t0 = time.perf_counter()
        try:
            swarm.start()

            def on_round(r: int, lines: list[RoundLine]) -> None:
                if r % 8 == 0 or r == rounds - 1:
                    log(f"  round {r:>3}: {statistics.fmean(x.deltas for x in lines):.1f} deltas per peer, "
                        f"train loss {statistics.fmean(x.loss for x in lines):.4f}")

            swarm.follow(on_round, on_poll=None if disturbance is None else disturbance.poll)
            spread = replica_spread([os.path.join(p.state_dir, FINAL_MODEL) for p in swarm.peers])
        finally:
            if fake is not None:
                fake.stop()
            swarm.stop()
        wall_s = time.perf_counter() - t0
    peers = swarm.peers
    # Steady state: with overlap a round's exchange runs while the next round trains, but a
    # peer's last round has no next round, so its whole exchange would count as overhead.
    steady = [x for p in peers for x in (p.rounds[:-1] if spec.rounds.overlap and len(p.rounds) > 1 else p.rounds)]
    train_s = sum(x.train_s for x in steady)
    round_s = sum(x.round_s for x in steady)
    digests = {p.final["digest"] for p in peers}
    out = {
        "peers": num_peers,
        "rounds": rounds,
        "eval_loss": statistics.fmean(p.final["eval_loss"] for p in peers),
        "peer_eval_losses": [p.final["eval_loss"] for p in peers],
        "consensus_equal": len(digests) == 1,
        "tokens": sum(x.tokens for p in peers for x in p.rounds),
        "train_time_share": train_s / round_s if round_s else 0.0,
        # Where a round's time outside training went, per round (node/events.py RoundEnded).
        "overhead_s_per_round": {
            "wait_for_exchange": statistics.fmean(x.wait_s for x in steady) if steady else 0.0,
            "boundary": statistics.fmean(x.boundary_s for x in steady) if steady else 0.0,
            "total": (round_s - train_s) / max(1, len(steady))},
        # A round's exchange (with overlap, beside the next round's training), median seconds
        # of each phase: what a wait for it is made of.
        "exchange_s_per_round": {phase: statistics.median(x.exchange[i] for x in steady) if steady else 0.0
                                 for i, phase in enumerate(("send", "pull", "step"))},
        # Parts of those: the rest's screening and checks and a tree round's rows, and how much
        # later than our own delta the round's last one was served (a pull cannot end sooner).
        "exchange_detail_s_per_round": {
            "screen": statistics.median(x.exchange_detail[0] for x in steady) if steady else 0.0,
            "rows": statistics.median(x.exchange_detail[1] for x in steady) if steady else 0.0,
            "last_delta_after_ours": last_delta_after_ours(steady),
            # the phases' medians miss a tail: what the boundary waits for on average
            "mean_total": statistics.fmean(sum(x.exchange) for x in steady) if steady else 0.0},
        "rounds_per_minute": 60.0 * rounds / statistics.fmean(sum(x.round_s for x in p.rounds) for p in peers),
        "replica_spread": spread,
        "fanout": fanout,
        # The round's shape, for bench scale --validate: a count is told once a step.
        "inner_steps": spec.diloco.inner_steps, "batch_size": spec.batch_size, "seq_len": spec.data.seq_len,
        "overlap": spec.rounds.overlap, "earn_rounds": spec.diloco.robust.earn_rounds,
        # Of full rounds: a tree round's participants are its row's, its deltas every row's.
        "deltas_missing": sum(x.participants - x.deltas for p in peers for x in p.rounds if x.rows == 1),
        # Checked contributions (optim/check.py): how close the honest deltas came to failing,
        # and what the checks cost (on the exchange thread; with overlap, beside training).
        "least_agreement": min((x.least_agreement for p in peers for x in p.rounds if x.least_agreement is not None),
                               default=None),
        "check_threshold": spec.diloco.robust.check_agreement,
        "check_share": sum(x.check_s for x in steady) / round_s if round_s else 0.0,
        "wall_s": wall_s,
        "spec_hash": spec.hash().hex(),
        "exchange": spec.rounds.exchange,
        "row_size": spec.rounds.row_size if row_size else 0,
        "eval_every": "auto" if eval_every is None else eval_every,
        # Rounds a peer took as a tree round (rows > 1), on average.
        "tree_rounds": sum(x.rows > 1 for p in peers for x in p.rounds) / max(1, len(peers)),
        **byte_figures(peers, swarm.io_unavailable),
    }
    if libp2p:
        out.update(transport_figures(swarm, spec.rounds.overlap))
    if churn is not None:
        churn.check()
        # A restarted peer counts rounds and bytes afresh: no per-process figure applies.
        for key in ("rounds_per_minute", *BYTE_KEYS):
            del out[key]
        out.update(_churn_figures(churn))
    if fake is not None:
        a, b = fake.phase()
        out.update({"clean_rounds": [0, phases.clean_end], "rounds_per_minute_clean": rate_per_minute(peers, 0, phases.clean_end),
                    "final_rounds": sorted({p.final["round"] for p in peers})})
        if fakes:
            out.update({"fakes": fakes, "fake_mode": fake_mode, "fake_rounds": [a, b],
                        "rounds_per_minute_fakes": rate_per_minute(peers, a, b), "fakes_dropped": fake.dropped})
        else:
            seconds = fake.stopped_unix_s - fake.started_unix_s
            out.update({"flood": flood, "flood_rounds": [a, b], "rounds_per_minute_flood": rate_per_minute(peers, a, b),
                        "flood_bytes_received": sum(fake.received), "flood_seconds": seconds,
                        "flood_bytes_per_s_per_peer": sum(fake.received) / seconds / num_peers if seconds > 0 else None})
    if simulate:
        out.update(_simulate(spec, num_peers, rounds, log, threads))
        out["gap_pct"] = 100.0 * (out["eval_loss"] - out["sim_eval_loss"]) / out["sim_eval_loss"]
    return out


def _churn_figures(churn: Churn) -> dict:
    """The churn run's own keys (docs/swarm.md); rates as bench/churn.py defines them."""
    peers, phases = churn.swarm.peers, churn.phases
    return {
        "churn_s": churn.mean_interval_s,
        "churn_seed": churn.seed,
        "restarts": churn.restarts,
        "resumed": sum(len(p.resumed) for p in peers),
        "states_taken": sum(len(p.synced) for p in peers),
        "caught_up": sum(len(p.caught_up) for p in peers),
        "caught_up_rounds": sum(to - start for p in peers for start, to, _ in p.caught_up),
        "caught_up_bytes": sum(n for p in peers for *_, n in p.caught_up),
        "clean_rounds": [0, phases.clean_end],
        "churn_rounds": [phases.clean_end, phases.churn_end],
        "rounds_per_minute_clean": rate_per_minute(peers, 0, phases.clean_end),
        "rounds_per_minute_churn": rate_per_minute(peers, phases.clean_end, phases.churn_end),
        # Kills wait while the last victim catches up, so restarts may fall short of this / churn_s.
        "churn_phase_s": first_completed(peers, phases.churn_end) - first_completed(peers, phases.clean_end),
        "final_rounds": sorted({p.final["round"] for p in peers}),
    }


def _simulate(spec: RunSpec, num_peers: int, rounds: int, log: Callable[[str], None], threads: int) -> dict:
    import torch

    from locoswarm.bench.convergence import BenchConfig, Workload, flush_denormals, run_diloco

    cfg = BenchConfig(preset="swarm", model=spec.model, tokenizer=spec.tokenizer, data=spec.data,
                      replicas=num_peers, batch_size=spec.batch_size, total_steps=rounds * spec.diloco.inner_steps,
                      diloco=spec.diloco, eval_sequences=64, seed=spec.seed)
    log(f"simulating {num_peers} replicas × {rounds} rounds in-process")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # as many as one peer had: OpenMP's spinning threads collapse under contention
    try:
        with flush_denormals():
            result = run_diloco(Workload(cfg), spec.diloco.compression)
    finally:
        torch.set_num_threads(before)
    return {"sim_eval_loss": result.eval_loss, "sim_tokens": cfg.total_steps * cfg.batch_size * cfg.data.seq_len
            * num_peers, "sim_wall_s": result.wall_s}


def format_swarm(r: dict) -> str:
    mode = "overlapped" if r["overlap"] else "synchronous"
    lines = [f"{r['peers']} peers × {r['rounds']} {mode} rounds on loopback, {r['wall_s']:.0f} s"]
    if "churn_s" in r:
        lines += _format_churn(r)
    elif "fakes" in r:
        clean, faked = r["rounds_per_minute_clean"], r["rounds_per_minute_fakes"]
        kind = {"stall": "staller", "loud": "loud"}.get(r.get("fake_mode"), "fake")
        lines.append(f"  rounds per minute      {clean:.1f} clean, {faked:.1f} with {r['fakes']} {kind} identities "
                     f"(rounds {r['fake_rounds'][0]}→{r['fake_rounds'][1]}): {faked / clean:.2f}× the clean rate")
        lines.append(f"  fakes dropped          {r['fakes_dropped']} of {r['fakes']} by an honest peer at most "
                     "(found gone: no progress stream opens to them)")
        lines.append(f"  consensus              {'one digest' if r['consensus_equal'] else 'DIFFERENT digests'}")
    elif "flood" in r:
        clean, flooded = r["rounds_per_minute_clean"], r["rounds_per_minute_flood"]
        lines.append(f"  rounds per minute      {clean:.1f} clean, {flooded:.1f} with {r['flood']} identities flooding "
                     f"state requests (rounds {r['flood_rounds'][0]}→{r['flood_rounds'][1]}): "
                     f"{flooded / clean:.2f}× the clean rate")
        lines.append(f"  the flood took         {r['flood_bytes_received'] / 1e6:,.1f} MB in {r['flood_seconds']:.0f} s, "
                     f"{(r['flood_bytes_per_s_per_peer'] or 0) / 1e6:.2f} MB/s off each peer")
        lines.append(f"  consensus              {'one digest' if r['consensus_equal'] else 'DIFFERENT digests'}")
    else:
        lines.append(f"  rounds per minute      {r['rounds_per_minute']:.1f}")
    lines.append(f"  train time share       {100 * r['train_time_share']:.1f} %")
    if "overhead_s_per_round" in r:
        o = r["overhead_s_per_round"]
        lines.append(f"  outside training       {1e3 * o['total']:.0f} ms a round: {1e3 * o['wait_for_exchange']:.0f} ms "
                     f"waiting for the last exchange, {1e3 * o['boundary']:.0f} ms at the boundary")
    if "libp2p_peers" in r:
        o = r["overhead_s_by_transport"]
        ratio = r.get("overhead_ratio_libp2p")
        lines.append(f"  by transport           {r['libp2p_peers']} of {r['peers']} on py-libp2p: outside training "
                     + ", ".join(f"{1e3 * v:.0f} ms ({t})" for t, v in o.items())
                     + (f", {ratio:.2f}× on py-libp2p" if ratio is not None else "")
                     + "; exchange " + ", ".join(f"{1e3 * v:.0f} ms ({t})"
                                                 for t, v in r["exchange_s_by_transport"].items()))
        lines.append(f"  consensus              {'one digest' if r['consensus_equal'] else 'DIFFERENT digests'}")
    if "exchange_s_per_round" in r:
        e = r["exchange_s_per_round"]
        lines.append(f"  exchange (median)      {1e3 * e['send']:.0f} ms sending our delta, {1e3 * e['pull']:.0f} ms "
                     f"pulling the others', {1e3 * e['step']:.0f} ms for the rest (checks, outer step, state)")
    if "exchange_detail_s_per_round" in r:
        d = r["exchange_detail_s_per_round"]
        lines.append(f"  of which (median)      {1e3 * d['screen']:.0f} ms screening and checking, {1e3 * d['rows']:.0f} ms "
                     f"in rows; the round's last delta served {1e3 * d['last_delta_after_ours']:.0f} ms after ours; "
                     f"{1e3 * d['mean_total']:.0f} ms in all on average")
    lines += format_bytes(r)
    if r.get("least_agreement") is not None:
        lines.append(f"  checks                 least agreement {r['least_agreement']:.3f} (fails below "
                     f"{r['check_threshold']:g}), {100 * r['check_share']:.2f} % of round time")
    if r.get("row_size"):
        lines.append(f"  tree rounds            {r['tree_rounds']:.1f} of {r['rounds']} a peer (rows of {r['row_size']}), "
                     f"consensus {'one digest' if r['consensus_equal'] else 'DIFFERENT digests'}")
    lines += [f"  missing deltas         {r['deltas_missing']}",
              f"  replica spread         {r['replica_spread']:.2e} (max ‖θi − θj‖/‖θi‖, fanout {r['fanout']})",
              f"  eval loss (swarm)      {r['eval_loss']:.4f}  ({r['tokens']:,} tokens)"]
    if "sim_eval_loss" in r:
        lines.append(f"  eval loss (simulation) {r['sim_eval_loss']:.4f}  ({r['sim_tokens']:,} tokens), "
                     f"gap {r['gap_pct']:+.2f} %")
    return "\n".join(lines)


def _format_churn(r: dict) -> list[str]:
    clean, churned = r["rounds_per_minute_clean"], r["rounds_per_minute_churn"]
    (c0, c1), (k0, k1) = r["clean_rounds"], r["churn_rounds"]
    return [f"  rounds per minute      {clean:.1f} clean (rounds {c0}→{c1}), {churned:.1f} under churn "
            f"(rounds {k0}→{k1}): {churned / clean:.2f}× the clean rate",
            f"  churn                  a peer SIGKILLed every {r['churn_s']:g} s on average (seed {r['churn_seed']}): "
            f"{r['restarts']} restarts in {r['churn_phase_s']:.0f} s, {r['resumed']} resumed from a checkpoint",
            f"  catching up            {r['states_taken']} states taken, {r['caught_up']} catch-ups by the rounds' "
            f"deltas ({r['caught_up_rounds']} rounds, {r['caught_up_bytes']:,} bytes)",
            f"  consensus              {'one digest' if r['consensus_equal'] else 'DIFFERENT digests'} at round "
            f"{', '.join(map(str, r['final_rounds']))}"]
