"""`locoswarm bench …`: benchmarks. Thin: parse flags, build the config, call locoswarm.bench."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="Benchmarks (their figures are in docs/).", no_args_is_help=True)


def _emit(text: str, result: dict, json_path: Optional[Path]) -> None:
    """Print a benchmark's figures and, with --json, write them (atomically)."""
    typer.echo(text)
    _write_json(result, json_path)


def _write_json(result: object, json_path: Optional[Path]) -> None:
    if json_path is not None:
        from locoswarm.node.files import write_atomic

        json_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(json_path, json.dumps(result, indent=1))
        typer.echo(f"wrote {json_path}")


@app.command()
def convergence(
    preset: str = typer.Option("quick", help="quick (tiny model, 2 CPU cores, ≤5 min) or gpu (≥100M params, one H100)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the full results here."),
    sweep: bool = typer.Option(False, help="Run the grid over H, density, bits, outer lr/momentum and error feedback."),
    runs: str = typer.Option("ddp,diloco,compressed,local", help="Comma-separated runs to train."),
    replicas: Optional[int] = typer.Option(None, help="Simulated peers N."),
    steps: Optional[int] = typer.Option(None, help="Inner steps per run."),
    inner_steps: Optional[int] = typer.Option(None, "--inner-steps", "-H", help="H: inner steps per round."),
    density: Optional[float] = typer.Option(None, help="Top-k density in (0, 1]."),
    bits: Optional[int] = typer.Option(None, help="Bits per sent value: 2, 4 or 8."),
    chunk: Optional[int] = typer.Option(None, help="Top-k chunk size, a power of two."),
    outer_lr: Optional[float] = typer.Option(None, "--outer-lr", help="Outer learning rate."),
    outer_momentum: Optional[float] = typer.Option(None, "--outer-momentum", help="Outer Nesterov momentum."),
    ef_decay: Optional[float] = typer.Option(None, "--ef-decay", help="Error-feedback decay β."),
    residual: Optional[str] = typer.Option(None, help="Where the unsent residual lives: buffer or model."),
    model: Optional[str] = typer.Option(None, help="Model size: tiny, small, base or hf:llama."),
    data: Optional[str] = typer.Option(None, help="builtin:shakespeare, builtin:kjv, a folder of .txt/.jsonl, or several joined by '+'."),
    tokenizer: Optional[str] = typer.Option(None, help="gpt2 or byte."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or mps."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="G: the compressed run exchanges in "
                                             "rotating grid groups of G (replicas must be G^d); 0: full exchange."),
    group_scheme: Optional[str] = typer.Option(None, "--group-scheme", help="With --group-size: grid (each replica "
                                               "steps its own state with its group's aggregate) or tree (rows "
                                               "aggregate, then groups of G rows' aggregates, up the grid's d "
                                               "dimensions: one state)."),
    tree_rows: Optional[str] = typer.Option(None, "--tree-rows", help="With --group-scheme tree: fixed (the same "
                                            "groups every round) or rotating (drawn afresh each round)."),
    row_error: Optional[str] = typer.Option(None, "--row-error", help="With --group-scheme tree, a group's "
                                            "recompression error: group (its own error feedback; fixed rows), "
                                            "members (into the residuals of the replicas below it) or dropped."),
    mix: Optional[str] = typer.Option(None, help="With --group-size, the restoring force between replicas' outer "
                                      "states: none, average (group mean state), sparse (the same, compressed) "
                                      "or sync (swarm mean state)."),
    mix_every: Optional[int] = typer.Option(None, "--mix-every", help="K: mix after every K-th round."),
    mix_density: Optional[float] = typer.Option(None, "--mix-density", help="Top-k density of --mix sparse "
                                                "(unset: the deltas' density)."),
) -> None:
    """Train ddp, DiLoCo, compressed DiLoCo and a lone replica on the same tokens; compare."""
    from locoswarm.bench import convergence as conv
    from locoswarm.bench.convergence_report import format_table
    from locoswarm.bench.settings import apply_overrides
    from locoswarm.bench.sweep import format_frontier, run_sweep

    try:
        if preset not in conv.PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known: {sorted(conv.PRESETS)}")
        cfg = apply_overrides(
            conv.PRESETS[preset],
            replicas=replicas, total_steps=steps, inner_steps=inner_steps, density=density, bits=bits,
            chunk=chunk, outer_lr=outer_lr, outer_momentum=outer_momentum, ef_decay=ef_decay, residual=residual,
            model=model, device=device, data=data, tokenizer=tokenizer,
            group_size=group_size, scheme=group_scheme, rows=tree_rows, row_error=row_error, mix=mix, mix_every=mix_every,
            mix_density=mix_density,
        )
        run_names = tuple(r.strip() for r in runs.split(",") if r.strip())
        for name in run_names:
            if name not in conv.RUNS:
                raise ValueError(f"--runs: unknown run {name!r}; known: {', '.join(conv.RUNS)}")
        cfg.validate()
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    try:
        if sweep:
            result = run_sweep(cfg, log=typer.echo)
            typer.echo(format_frontier(result))
        else:
            result = conv.run_benchmark(cfg, run_names, log=typer.echo)
            typer.echo(format_table(result))
    except ValueError as e:  # data or tokenizer refused while loading: nothing was written
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    _write_json(result, json_path)


@app.command()
def swarm(
    peers: int = typer.Option(4, help="Daemons to start on loopback."),
    rounds: int = typer.Option(64, help="Rounds every peer trains (64 = the quick preset's tokens with 4 peers)."),
    threads: int = typer.Option(1, help="Torch CPU threads per peer."),
    simulate: bool = typer.Option(True, help="Also train the in-process simulation with the same settings."),
    fanout: int = typer.Option(16, help="F: deltas each peer pulls per round (below peers-1: partial gossip)."),
    overlap: bool = typer.Option(True, help="Overlap each round's exchange with the next round's training "
                                 "(the shipped default); --no-overlap: synchronous rounds."),
    churn: float = typer.Option(0.0, help="Kill a random peer (SIGKILL) every SECONDS on average, restarting it at "
                                "once on its state directory, in the middle half of the rounds; report the rate "
                                "clean and under churn (0: off; needs --rounds >= 8)."),
    seed: int = typer.Option(0, help="Seed of the churn's kill times and victims."),
    fakes: int = typer.Option(0, help="Fake identities that keep signed records (copying the swarm's round) but "
                              "serve nothing, in the middle half of the rounds; report the rate clean and with "
                              "them (0: off; needs --rounds >= 8)."),
    fake_mode: str = typer.Option("record", "--fake-mode", help="What the --fakes do: record (a signed record "
                                  "only), stall (they also claim every round done and answer every delta "
                                  "request \"not yet\"), keys (one process signs all K records, K - 1 of "
                                  "them with keys that have no host), ahead (records 20 rounds ahead of the "
                                  "swarm, told to every peer, no state served), chain (records showing an "
                                  "invented round chain) or loud (they claim every round done and serve deltas "
                                  "ten times an honest one's)."),
    flood: int = typer.Option(0, help="Identities that ask every peer for its state over and over, in the middle "
                              "half of the rounds; report the rate clean and under the flood, and the bytes it "
                              "took (0: off; needs --rounds >= 8)."),
    earn_rounds: Optional[int] = typer.Option(None, "--earn-rounds", help="The run spec's diloco.robust.earn_rounds "
                                              "(unset: the default; 0: earned weight off, to compare)."),
    check_agreement: Optional[float] = typer.Option(None, "--check-agreement", help="The run spec's "
                                                    "diloco.robust.check_agreement (unset: the default; 0: no "
                                                    "checks of contributions, to compare)."),
    row_size: int = typer.Option(0, "--row-size", help="Tree rounds (the spec's rounds.exchange = \"tree\") with rows "
                                 "of this many peers; 0: full rounds (the default)."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every",
                                                   help="The peers' --checkpoint-every (unset: the daemon's default)."),
    eval_every: str = typer.Option("0", "--eval-every", help="The peers' --eval-every: 0 (the default) evaluates "
                                   "only at the end, so that the figures are training and the exchange; auto: the "
                                   "daemon's default (after the first round, then within 5 % of the time)."),
    keep_dir: Optional[Path] = typer.Option(None, "--keep-dir", help="Keep the peers' state directories, logs and "
                                            "event files here (unset: a temporary directory, removed at the end)."),
    libp2p: int = typer.Option(0, "--libp2p", help="The last N peers run on py-libp2p (--transport libp2p), the "
                               "others on p2pd: the mixed swarm of docs/windows.md, with each transport's round "
                               "overhead."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the results here."),
) -> None:
    """Real peer processes on loopback: rounds/min, train time share, bytes, eval loss vs simulation."""
    from locoswarm.bench.churn import PhaseTooShort
    from locoswarm.bench.swarmbench import FAKE_MODES, disturbance_phases, format_swarm, run_swarm_bench

    if peers < 1 or rounds < 1 or threads < 1 or fanout < 1:
        typer.echo("error: --peers, --rounds, --threads and --fanout must be >= 1", err=True)
        raise typer.Exit(2)
    try:
        disturbance_phases(rounds, churn_s=churn, fakes=fakes, flood=flood)
        if churn and peers < 2:
            raise ValueError("--churn needs --peers >= 2 (a peer restarts from the others' state)")
        if fake_mode not in FAKE_MODES:
            raise ValueError(f"--fake-mode must be one of {', '.join(FAKE_MODES)}, got {fake_mode!r}")
        if row_size and not 2 <= row_size <= 256:
            raise ValueError(f"--row-size must be 0 or lie in [2, 256], got {row_size}")
        evals = None if eval_every == "auto" else int(eval_every) if eval_every.isdigit() else -1
        if evals is not None and evals < 0:
            raise ValueError(f"--eval-every must be auto or a count >= 0, got {eval_every!r}")
        if checkpoint_every is not None and checkpoint_every < 0:
            raise ValueError(f"--checkpoint-every must be >= 0, got {checkpoint_every}")
        if earn_rounds is not None and not 0 <= earn_rounds <= 10_000:
            raise ValueError(f"--earn-rounds must lie in [0, 10000], got {earn_rounds}")
        if check_agreement is not None and not 0 <= check_agreement < 1:
            raise ValueError(f"--check-agreement must lie in [0, 1), got {check_agreement}")
        from locoswarm.node.portable import transport_problem

        if not 0 <= libp2p < peers:
            raise ValueError(f"--libp2p must lie in [0, {peers - 1}]: peer 0 starts the swarm on p2pd")
        problem = (transport_problem("p2pd") or transport_problem("libp2p")) if libp2p else transport_problem()
        if problem:
            raise ValueError(problem)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    # SIGTERM (a supervisor, a test's timeout) stops the peers as Ctrl-C does: the bench's
    # cleanup runs, and the daemons, each in its own session, are not left behind.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        result = run_swarm_bench(peers, rounds, threads=threads, simulate=simulate, fanout=fanout, overlap=overlap,
                                 log=typer.echo, churn_s=churn, seed=seed, checkpoint_every=checkpoint_every,
                                 fakes=fakes, flood=flood, earn_rounds=earn_rounds, check_agreement=check_agreement,
                                 fake_mode=fake_mode, row_size=row_size, eval_every=evals, libp2p=libp2p,
                                 keep_dir=None if keep_dir is None else str(keep_dir))
    except KeyboardInterrupt:
        typer.echo("interrupted: every peer was stopped", err=True)
        raise typer.Exit(130) from None
    except PhaseTooShort as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    _emit(format_swarm(result), result, json_path)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@app.command()
def kernels(
    sizes: str = typer.Option("1e7,1e8,1e9", help="Buffer sizes (elements) for the compression kernels."),
    inner: bool = typer.Option(True, "--inner/--no-inner", help="The inner step: tokens/s, MFU, peak memory."),
    compression: bool = typer.Option(True, "--compression/--no-compression", help="The compression kernels."),
    cap_gib: float = typer.Option(24.0, "--cap-gib", help="GPU memory cap for the largest-model test."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the results here."),
) -> None:
    """Needs CUDA: fused vs reference compression (time, GB/s against a device copy, extra
    memory) and the inner step (tokens/s, MFU, peak memory; the largest model in a cap)."""
    from locoswarm.bench.kernelbench import format_kernels, run

    try:
        parsed = tuple(float(s) for s in sizes.split(","))
        result = run(sizes=parsed, inner=inner, compression=compression, cap_gib=cap_gib)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    _emit(format_kernels(result), result, json_path)


@app.command()
def checks(
    preset: str = typer.Option("quick", help="The convergence preset whose model and data to use: quick (tiny, "
                               "CPU) or gpu (124M, CUDA)."),
    replicas: int = typer.Option(8, help="Replicas trained; one checks the other replicas' deltas."),
    rounds: int = typer.Option(3, help="Rounds trained; the last one's deltas are checked."),
    repeats: int = typer.Option(20, help="Timed repetitions of the checks (the median is reported)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or mps (unset: the preset's)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the results here."),
) -> None:
    """What checking contributions costs (docs/trust.md): one peer's checks of a round's
    deltas against its own work, timed against its inner phase of that round."""
    from locoswarm.bench.check_cost import format_result, measure

    try:
        result = measure(preset, replicas=replicas, rounds=rounds, repeats=repeats, device=device)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    _emit(format_result(result), result, json_path)


@app.command()
def identity(
    bits: str = typer.Option("8,10,12", help="Difficulties to mine at (bits, comma-separated), 5 times each."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the results here."),
) -> None:
    """What a proof of work on an identity costs (a run's `access.work_bits`): one scrypt
    evaluation, mining at small difficulties, and what larger ones cost one peer and a
    thousand identities."""
    from locoswarm.bench.identity import format_result, measure
    from locoswarm.protocol.work import MAX_WORK_BITS

    try:
        parsed = tuple(int(b) if b.strip().isdigit() else -1 for b in bits.split(","))
        if not all(1 <= b <= min(MAX_WORK_BITS, 16) for b in parsed):
            raise ValueError(f"--bits: comma-separated integers in [1, 16] to be mined here, got {bits!r}")
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    result = measure(parsed)
    _emit(format_result(result), result, json_path)


@app.command()
def scale(
    peers: str = typer.Option("10,100,1000,10000", help="Swarm sizes to simulate, comma-separated."),
    design: str = typer.Option("both", help="current (the first daemon's: one registry key, progress read from the "
                               "DHT), bounded (the daemon's since 2026-12-05, with groups above their size) or both; "
                               "with --validate, both means the one the run's daemons ran."),
    duration_s: float = typer.Option(300.0, "--duration-s", help="Simulated seconds per swarm size and design."),
    seed: int = typer.Option(0, help="Seed of the simulation."),
    session_min: float = typer.Option(60.0, "--session-min", help="Mean peer session (exponential), minutes."),
    churn_s: Optional[float] = typer.Option(None, "--churn-s", help="Instead: one peer killed every this many "
                                            "seconds on average, whatever N (as bench swarm --churn)."),
    loopback: bool = typer.Option(False, help="Links as on one machine: RTT 0.1 ms, no bandwidth cap."),
    settings: list[str] = typer.Option([], "--set", help="Any model field, SECTION.FIELD=VALUE, e.g. "
                                       "bounded.group_size=8, workload.delta_bytes=11000 (docs/scale.md lists them)."),
    calibrate: bool = typer.Option(False, help="Measure message sizes and CPU costs on this machine first (≈5 s)."),
    validate: list[Path] = typer.Option([], "--validate", help="Compare the model with this `bench swarm "
                                        "--no-simulate --json` result instead of simulating (repeatable)."),
    measure_dht: str = typer.Option("", "--measure-dht", help="Run real DHTNodes (e.g. 3,6,10) through today's "
                                    "progress loop and compare bytes and CPU per cycle with the model."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the results here."),
) -> None:
    """Simulate the control plane for N peers: bytes, DHT operations, signature checks, CPU,
    DHT value sizes, rounds/min and compute share, for today's design and the bounded one."""
    from locoswarm.bench import scale as sc
    from locoswarm.bench.scale_model import Churn, Links

    try:
        cfg = sc.ScaleConfig(peers=sc.parse_peers(peers), seed=seed,
                             designs=sc.DESIGNS if design == "both" else (design,), duration_s=duration_s,
                             churn=Churn(session_min=session_min, churn_s=churn_s),
                             links=Links.loopback() if loopback else Links())
        sc.apply_settings(cfg, settings)
        cfg.validate()
        measure = sc.parse_peers(measure_dht) if measure_dht else ()
        if validate:
            from locoswarm.bench.scale_validate import load_swarm
        swarms = [(path, load_swarm(str(path))) for path in validate]
    except (ValueError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if calibrate:
        from locoswarm.bench.scale_model import calibrate as measure_costs

        cfg.costs = measure_costs(cfg.costs)
        typer.echo(f"calibrated: {cfg.costs}")
    if swarms or measure:
        from locoswarm.bench.scale_validate import (compare_dht_cycle, compare_with_swarm, format_comparison,
                                                    format_dht_cycle, measure_dht_cycle)

        result: object = {"swarm_comparisons": [], "dht_cycles": []}
        for n in measure:
            row = compare_dht_cycle(measure_dht_cycle(n), cfg.costs)
            result["dht_cycles"].append(row)
            typer.echo(format_dht_cycle(row))
        for path, swarm in swarms:
            row = {"path": str(path), **compare_with_swarm(swarm, seed=seed, costs=cfg.costs, bounded=cfg.bounded,
                                                           design=None if design == "both" else design)}
            result["swarm_comparisons"].append(row)
            typer.echo(format_comparison(row))
    else:
        result = sc.run_scale(cfg, log=typer.echo)
        typer.echo(sc.format_table(result))
    _write_json(result, json_path)
