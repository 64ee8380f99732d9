"""What checking contributions costs (optim/check.py), for `locoswarm bench checks`: a
preset's model and data (bench/convergence.py), N replicas trained from a shared start round
after round as the swarm trains them, and, in the last round, one peer's checks of the other
N − 1 deltas timed against its own inner phase of that round (H inner steps)."""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import replace

import torch

from locoswarm.bench import convergence as conv
from locoswarm.optim.check import SCALE, check_round
from locoswarm.optim.round import RoundStep


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(preset: str = "quick", *, replicas: int = 8, rounds: int = 3, repeats: int = 20,
            device: str | None = None) -> dict:
    """The figures of one run (ValueError for settings the benchmark cannot run)."""
    if preset not in conv.PRESETS:
        raise ValueError(f"unknown preset {preset!r}; one of {', '.join(conv.PRESETS)}")
    if replicas < 2 or rounds < 1 or repeats < 1:
        raise ValueError(f"replicas must be >= 2, rounds and repeats >= 1; got {replicas}, {rounds}, {repeats}")
    base = conv.PRESETS[preset]
    cfg = replace(base, replicas=replicas, total_steps=base.diloco.inner_steps * rounds, device=device or base.device)
    cfg.validate()
    w = conv.Workload(cfg)
    dl = cfg.diloco
    models, opts, samplers, outer = conv.start_replicas(w, dl)
    tokens = cfg.batch_size * cfg.data.seq_len * dl.inner_steps
    step = RoundStep(dl, w.shapes, run_id="bench", spec_hash=b"\0" * 32, max_tokens=tokens)
    comps = [step.compressor(outer.params[0].device) for _ in range(replicas)]
    train_s = []
    with conv.flush_denormals():
        for r in range(rounds):
            for i, (model, opt, sampler) in enumerate(zip(models, opts, samplers)):
                _sync(w.device)
                t0 = time.perf_counter()
                for s in range(dl.inner_steps):
                    w.train_step(model, opt, sampler.next_batch(cfg.batch_size), r * dl.inner_steps + s)
                _sync(w.device)
                if i == 0:
                    train_s.append(time.perf_counter() - t0)
            encoded = conv.encode_replicas(step, comps, lambda i: outer.params, models, r, tokens)
            wires, deltas = [blob for blob, _ in encoded], [d for _, d in encoded]
            if r < rounds - 1:
                conv.step_consensus(step, outer, deltas, comps, models)
        replica = [p.detach().to(outer.params[0].device, torch.float32) for p in models[0].parameters()]
        times, checks = [], []
        for _ in range(repeats + 1):  # the first call warms up
            _sync(w.device)
            t0 = time.perf_counter()
            checks = check_round(outer.params, replica, deltas[0], deltas, plan_tokens=tokens)
            _sync(w.device)
            times.append(time.perf_counter() - t0)
        exchange = _exchange_parts(step, outer, comps[0], replica, wires, tokens, w.device, repeats)
    check_s = statistics.median(times[1:])
    round_s = statistics.median(train_s)
    return {
        "preset": preset, "model": cfg.model, "params": w.params, "device": str(w.device),
        "device_name": torch.cuda.get_device_name(w.device) if w.device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(), "replicas": replicas, "inner_steps": dl.inner_steps,
        "rounds": rounds, "inner_phase_s": round_s, "check_s": check_s, "deltas_checked": len(checks),
        "check_share": check_s / (round_s + check_s),
        "agreements": [c.agreement / SCALE for c in checks],
        "exchange_s": exchange,
    }


def _exchange_parts(step: RoundStep, outer, compressor, replica: list[torch.Tensor], wires: list[bytes], tokens: int,
                    device: torch.device, repeats: int) -> dict:
    """Seconds of one peer's round exchange compute, median of `repeats` after a warm-up, by
    part, as the daemon runs them (node/roundloop.py): encode its own delta, decode the
    N − 1 others' and its own off the wire, screen, check, and aggregate with the outer
    step. What `bench scale` charges a round's exchange per delta pulled comes from these."""
    parts: dict[str, list[float]] = {"encode": [], "decode": [], "screen": [], "check": [], "apply": []}
    ledger = step.ledger(tokens)
    for _ in range(repeats + 1):
        trial = copy.deepcopy(outer)
        comp = copy.deepcopy(compressor)
        marks = [time.perf_counter()]

        def mark() -> None:
            _sync(device)
            marks.append(time.perf_counter())

        step.encode(comp, trial.params, replica, round_=0, sender="replica-0000", tokens=tokens)
        mark()
        deltas = [step.decode(blob) for blob in wires]
        mark()
        screened = step.screen(deltas, ledger)
        mark()
        step.check(trial.params, replica, deltas[0], deltas[1:], per_peer_tokens=tokens)
        mark()
        step.apply(trial, step.kept(screened), [comp])
        mark()
        for name, t0, t1 in zip(parts, marks, marks[1:]):
            parts[name].append(t1 - t0)
    return {name: statistics.median(times[1:]) for name, times in parts.items()}


def format_result(r: dict) -> str:
    agreements = r["agreements"]
    return "\n".join([
        f"checks of {r['deltas_checked']} deltas, {r['model']} ({r['params'] / 1e6:.1f}M parameters) on "
        f"{r['device_name']} ({r['torch_threads']} torch threads), round {r['rounds']} of {r['replicas']} replicas",
        f"  inner phase ({r['inner_steps']} steps)   {1e3 * r['inner_phase_s']:.1f} ms",
        f"  checks                 {1e3 * r['check_s']:.2f} ms ({1e3 * r['check_s'] / max(1, r['deltas_checked']):.2f}"
        f" ms a delta), {100 * r['check_share']:.2f} % of the round's compute",
        f"  honest agreements      {min(agreements):.3f} … {max(agreements):.3f}" if agreements else
        "  honest agreements      none (own round no measure)",
        "  the round's exchange   " + ", ".join(f"{name} {1e3 * s:.1f} ms" for name, s in r["exchange_s"].items())
        + f" ({len(r['agreements']) + 1} deltas decoded)",
    ])
