"""A study for issue 19 (work that looks like work): does a delta made only of what every
peer already holds pass the contribution check (optim/check.py)?

A sybil that trains nothing but wants earned weight must send deltas that agree with the
checkers' own pseudo-gradients (`check_agreement`, 0.15 by default). docs/trust.md measured
copies of a round's honest deltas (they pass), noise with a part of one (median 0.18) and a
sender's own delta of 5 rounds before (median 0.05). Those need an honest delta of the round,
or work done once. Cheaper still is what is public: the consensus every peer holds. Here N
replicas train as the swarm does (bench/convergence.py: the default round, the one outer
state) and each round, from the second on, every replica checks, beside the others' honest
deltas, the deltas a lazy sybil would encode from the outer state alone:

  last_step  the outer state's last step, θ(r−1) − θ(r): where the consensus moved last round;
  momentum   the outer optimizer's momentum buffer (every peer holds the same one);
  steps_4    the outer state's move over the last 4 rounds, θ(r−4) − θ(r).

Each is encoded by the round's compressor (its own error feedback, as a real sender's) at the
scale of an honest delta. Agreements are printed per kind (min, median, max, and the share
that would pass the default threshold).

`python -m locoswarm.bench.lazy_sybil [--rounds 64] [--json out.json]` (quick preset);
docs/trust.md has the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace

import torch

from locoswarm.bench import convergence as conv
from locoswarm.optim.check import SCALE, check_round
from locoswarm.optim.round import RoundStep

KINDS = ("honest", "last_step", "momentum", "steps_4")
THRESHOLD = 0.15
"""`[diloco.robust] check_agreement`'s default: a delta below it fails."""
LATE = 10
"""From this round on ("late"): past the first rounds, in which an identity earns its weight
(`earn_rounds`, 8 by default)."""


def _scaled_like(direction: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
    """`direction` scaled to the norm of `like` (an honest pseudo-gradient)."""
    norm = torch.sqrt(sum(d.square().sum() for d in direction))
    target = torch.sqrt(sum(x.square().sum() for x in like))
    return [d * (target / norm.clamp(min=1e-30)) for d in direction]


def measure(preset: str = "quick", *, replicas: int = 4, rounds: int = 64, seed: int | None = None) -> dict:
    base = conv.PRESETS[preset]
    cfg = replace(base, replicas=replicas, total_steps=base.diloco.inner_steps * rounds,
                  seed=base.seed if seed is None else seed)
    cfg.validate()
    torch.manual_seed(cfg.seed)
    w = conv.Workload(cfg)
    dl = cfg.diloco
    models, opts, samplers, outer = conv.start_replicas(w, dl)
    tokens = cfg.batch_size * cfg.data.seq_len * dl.inner_steps
    step = RoundStep(dl, w.shapes, run_id="study", spec_hash=b"\0" * 32, max_tokens=tokens)
    device = outer.params[0].device
    comps = [step.compressor(device) for _ in range(replicas)]
    lazy = {kind: step.compressor(device) for kind in KINDS[1:]}
    history = [[p.clone() for p in outer.params]]
    agreements: dict[str, list[tuple[int, float]]] = {kind: [] for kind in KINDS}
    with conv.flush_denormals():
        for r in range(rounds):
            for model, opt, sampler in zip(models, opts, samplers):
                for s in range(dl.inner_steps):
                    w.train_step(model, opt, sampler.next_batch(cfg.batch_size), r * dl.inner_steps + s)
            encoded = conv.encode_replicas(step, comps, lambda i: outer.params, models, r, tokens)
            deltas = [d for _, d in encoded]
            if r >= 1:
                honest_g = [o - p.detach().to(device, torch.float32) for o, p in zip(outer.params, models[0].parameters())]
                directions = {
                    "last_step": [a - b for a, b in zip(history[-2], history[-1])],
                    "momentum": [m.clone() for m in outer.momentum] if outer.momentum else None,
                    "steps_4": [a - b for a, b in zip(history[max(0, len(history) - 5)], history[-1])],
                }
                sybils = []
                for kind, direction in directions.items():
                    if direction is None or not any(bool(d.any()) for d in direction):
                        continue
                    fake_replica = [o - d for o, d in zip(outer.params, _scaled_like(direction, honest_g))]
                    blob = step.encode(lazy[kind], outer.params, fake_replica, round_=r, sender=f"lazy-{kind}",
                                       tokens=tokens)
                    sybils.append(step.decode(blob))
                for i, model in enumerate(models):
                    replica = [p.detach().to(device, torch.float32) for p in model.parameters()]
                    for c in check_round(outer.params, replica, deltas[i], deltas + sybils, plan_tokens=tokens):
                        kind = c.sender[len("lazy-"):] if c.sender.startswith("lazy-") else "honest"
                        agreements[kind].append((r, c.agreement / SCALE))
            conv.step_consensus(step, outer, deltas, comps, models)
            history.append([p.clone() for p in outer.params])
    out = {"preset": preset, "replicas": replicas, "rounds": rounds, "seed": cfg.seed, "threshold": THRESHOLD}
    for kind, seen in agreements.items():
        values = [v for _, v in seen]
        late = [v for r, v in seen if r >= LATE]
        out[kind] = ({"checks": len(values), "min": min(values), "median": statistics.median(values),
                      "max": max(values), "pass_share": sum(v >= THRESHOLD for v in values) / len(values),
                      "last_round_passed": max((r for r, v in seen if v >= THRESHOLD), default=None),
                      "pass_share_late": sum(v >= THRESHOLD for v in late) / len(late) if late else None,
                      "max_late": max(late, default=None)}
                     if values else {"checks": 0})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="quick", choices=sorted(conv.PRESETS))
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=64)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    out = measure(args.preset, replicas=args.replicas, rounds=args.rounds, seed=args.seed)
    for kind in KINDS:
        r = out[kind]
        if r["checks"]:
            print(f"{kind:10s} {r['checks']:5d} checks  agreement {r['min']:+.3f} … {r['max']:+.3f} "
                  f"(median {r['median']:+.3f}), {100 * r['pass_share']:.0f} % pass {THRESHOLD}, the last in round "
                  f"{r['last_round_passed']}; from round {LATE}: {100 * (r['pass_share_late'] or 0):.0f} % pass, "
                  f"at most {r['max_late']:+.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
