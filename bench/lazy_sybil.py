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

Copies pass the agreement: a sybil that holds the round's honest deltas can send one of them
again. What optim/check.py holds a newcomer's delta to besides (its novelty, 1.5 times) was
chosen here. `--copies` adds what such a sybil sends, each encoded the same way (replica 0's and 1's
deltas are the sources, so one checker holds its own delta as a source):

  copy        replica 0's delta of the round, re-encoded;
  copy_noise  the same plus noise of COPY_NOISE times its norm (its entries with random signs,
              so that it agrees with its source about as well as two honest deltas agree);
  mix_noise   the mean of replica 0's and 1's deltas plus noise of MIX_NOISE times its norm;
  quarter     a quarter of replica 0's delta plus three quarters of noise (its entries with
              random signs): the noisiest delta that still passes the agreement (docs/trust.md);
  joiner      no sybil: an honest peer that joined at round JOIN by taking replica 0's state and
              residual (as node/statesync.py serves them) and trains on from there on data of
              its own, outside the aggregate: is its work new enough for the novelty rule?

and measures each delta D (honest or not) a second way, its novelty: the part of D that the
other deltas the checker holds do not already span (D's least-squares residual r against them,
dense), measured as the check measures D: (r·g / ‖r‖) / (D_own·g / ‖D_own‖). `novelty` takes the
span of the other senders' deltas; `novelty_own` adds the checker's own delta to it. A copy's
residual is its noise; an honest delta's is what its own data taught it.

`python -m locoswarm.bench.lazy_sybil [--rounds 64] [--json out.json]` (quick preset);
docs/trust.md has the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
from dataclasses import replace

import torch

from locoswarm.bench import convergence as conv
from locoswarm.optim.check import SCALE, _layout, check_round
from locoswarm.optim.round import RoundStep

KINDS = ("honest", "last_step", "momentum", "steps_4")
COPY_KINDS = ("copy", "copy_noise", "mix_noise", "quarter", "joiner")
COPY_NOISE = 1.5
"""cos(copy, source) = 1 / √(1 + 1.5²) ≈ 0.55: the median agreement of two honest deltas."""
MIX_NOISE = 1.0
MAJORITY_AT = (0.05, 0.075, 0.1, 0.15)
"""Novelty thresholds at which the study counts the deltas most of their checkers find below."""
JOIN = 16
"""The round the `joiner` takes replica 0's state and residual."""
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


def _dense(deltas: list, layout, total: int) -> torch.Tensor:
    """(len(deltas), total): each decoded delta as a dense flat vector over all tensors."""
    values, positions = layout.values(deltas)
    return torch.zeros(len(deltas), total, device=values.device).scatter_(1, positions, values)


def _random_signs(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    signs = torch.randint(0, 2, x.shape, generator=gen, device=x.device).mul_(2).sub_(1)
    return x * signs


def _novelty(gram: torch.Tensor, dots: torch.Tensor, d: int, span: list[int], own_rate: float) -> float:
    """(r·g / ‖r‖) / own_rate, r the part of vector `d` outside the span of vectors `span`
    (least squares), from the vectors' Gram matrix and their dot products with g (float64)."""
    b = gram[span, d]
    coef = torch.linalg.lstsq(gram[span][:, span], b.unsqueeze(1)).solution.squeeze(1)
    norm2 = float(gram[d, d] - b @ coef)
    if norm2 <= 1e-12 * float(gram[d, d]):
        return 0.0
    return float(dots[d] - dots[span] @ coef) / math.sqrt(norm2) / own_rate


def _summary(seen: list[tuple[int, float]]) -> dict:
    values = [v for _, v in seen]
    if not values:
        return {"checks": 0}
    late = [v for r, v in seen if r >= LATE]
    return {"checks": len(values), "min": min(values), "median": statistics.median(values),
            "max": max(values), "pass_share": sum(v >= THRESHOLD for v in values) / len(values),
            "last_round_passed": max((r for r, v in seen if v >= THRESHOLD), default=None),
            "pass_share_late": sum(v >= THRESHOLD for v in late) / len(late) if late else None,
            "max_late": max(late, default=None)}


def measure(preset: str = "quick", *, replicas: int = 4, rounds: int = 64, seed: int | None = None,
            copies: bool = False) -> dict:
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
    kinds = KINDS + (COPY_KINDS if copies else ())
    lazy = {kind: step.compressor(device) for kind in kinds[1:]}
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    history = [[p.clone() for p in outer.params]]
    agreements: dict[str, list[tuple[int, float]]] = {kind: [] for kind in kinds}
    novelty: dict[str, list[tuple[int, float]]] = {kind: [] for kind in kinds}
    novelty_own: dict[str, list[tuple[int, float]]] = {kind: [] for kind in kinds}
    judged: dict[tuple[str, int, int], list[float]] = {}
    """(kind, round, sender) → every checker's novelty of that delta (own delta in the span)."""
    total = sum(p.numel() for p in outer.params)
    joiner: tuple | None = None
    with conv.flush_denormals():
        for r in range(rounds):
            if copies and r == JOIN:
                model = copy.deepcopy(models[0])
                joined = step.compressor(device)
                for mine, theirs in zip(joined.errors, comps[0].errors):
                    mine.copy_(theirs)
                joiner = (model, conv.make_inner_optimizer(model, dl.inner),
                          w.corpus.sampler(0, 1, seed=cfg.seed * 1000 + replicas), joined)
            for model, opt, sampler, *_ in zip(models, opts, samplers) if joiner is None else \
                    [*zip(models, opts, samplers), joiner]:
                for s in range(dl.inner_steps):
                    w.train_step(model, opt, sampler.next_batch(cfg.batch_size), r * dl.inner_steps + s)
            encoded = conv.encode_replicas(step, comps, lambda i: outer.params, models, r, tokens)
            deltas = [d for _, d in encoded]
            if r >= 1:
                layout = _layout(tuple((t.layout, t.bits) for t in deltas[0].tensors), device)
                honest_dense = _dense(deltas, layout, total)
                honest_g = [o - p.detach().to(device, torch.float32) for o, p in zip(outer.params, models[0].parameters())]
                directions = {
                    "last_step": [a - b for a, b in zip(history[-2], history[-1])],
                    "momentum": [m.clone() for m in outer.momentum] if outer.momentum else None,
                    "steps_4": [a - b for a, b in zip(history[max(0, len(history) - 5)], history[-1])],
                }
                if copies:
                    mixed = (honest_dense[0] + honest_dense[1]) / 2
                    flat = {"copy": honest_dense[0],
                            "copy_noise": honest_dense[0] + COPY_NOISE * _random_signs(honest_dense[0], gen),
                            "mix_noise": mixed + MIX_NOISE * _random_signs(mixed, gen),
                            "quarter": 0.25 * honest_dense[0] + 0.75 * _random_signs(honest_dense[0], gen)}
                    for kind, vector in flat.items():
                        directions[kind] = [piece.view(p.shape) for piece, p in
                                            zip(vector.split([p.numel() for p in outer.params]), outer.params)]
                sybils = []
                if joiner is not None:
                    sybils.append(step.decode(step.encode(joiner[3], outer.params, list(joiner[0].parameters()),
                                                          round_=r, sender="lazy-joiner", tokens=tokens)))
                for kind, direction in directions.items():
                    if direction is None or not any(bool(d.any()) for d in direction):
                        continue
                    fake_replica = [o - d for o, d in zip(outer.params, _scaled_like(direction, honest_g))]
                    blob = step.encode(lazy[kind], outer.params, fake_replica, round_=r, sender=f"lazy-{kind}",
                                       tokens=tokens)
                    sybils.append(step.decode(blob))
                vectors = torch.cat([honest_dense] + ([_dense(sybils, layout, total)] if sybils else [])).double()
                gram = vectors @ vectors.T
                for i, model in enumerate(models):
                    replica = [p.detach().to(device, torch.float32) for p in model.parameters()]
                    for c in check_round(outer.params, replica, deltas[i], deltas + sybils, plan_tokens=tokens):
                        kind = c.sender[len("lazy-"):] if c.sender.startswith("lazy-") else "honest"
                        agreements[kind].append((r, c.agreement / SCALE))
                    if not copies:
                        continue
                    g = torch.cat([(o - q).reshape(-1) for o, q in zip(outer.params, replica)]).double()
                    dots = vectors @ g
                    own_rate = float(dots[i]) / math.sqrt(float(gram[i, i]))
                    if not own_rate > 0:
                        continue
                    candidates = [("honest", j) for j in range(replicas) if j != i]
                    candidates += [(d.sender[len("lazy-"):], replicas + k) for k, d in enumerate(sybils)]
                    for kind, j in candidates:
                        others = [k for k in range(replicas) if k not in (i, j)]
                        if others:
                            novelty[kind].append((r, _novelty(gram, dots, j, others, own_rate)))
                        value = _novelty(gram, dots, j, others + [i], own_rate)
                        novelty_own[kind].append((r, value))
                        judged.setdefault((kind, r, j), []).append(value)
            if joiner is None:
                conv.step_consensus(step, outer, deltas, comps, models)
            else:  # outside the aggregate, restarting from the consensus as every replica does
                conv.step_consensus(step, outer, deltas, comps + [joiner[3]], models + [joiner[0]])
            history.append([p.clone() for p in outer.params])
    out = {"preset": preset, "replicas": replicas, "rounds": rounds, "seed": cfg.seed, "threshold": THRESHOLD}
    for kind in kinds:
        out[kind] = _summary(agreements[kind])
        if copies:
            out[kind]["novelty"] = _summary(novelty[kind])
            out[kind]["novelty_own"] = _summary(novelty_own[kind])
            verdicts = [v for (k, _, _), v in judged.items() if k == kind]
            out[kind]["majority_below"] = {str(t): sum(2 * sum(x < t for x in v) > len(v) for v in verdicts) / len(verdicts)
                                           for t in MAJORITY_AT} if verdicts else {}
    if copies and novelty_own["joiner"]:
        by_round: dict[int, list[float]] = {}
        for r, v in novelty_own["joiner"]:
            by_round.setdefault(r, []).append(v)
        out["joiner"]["novelty_own_by_round"] = {r: (min(v), statistics.median(v)) for r, v in by_round.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="quick", choices=sorted(conv.PRESETS))
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=64)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--copies", action="store_true", help="add the copies' kinds and the novelty measure")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    out = measure(args.preset, replicas=args.replicas, rounds=args.rounds, seed=args.seed, copies=args.copies)
    if "novelty_own_by_round" in out.get("joiner", {}):
        print("joiner's novelty (with the checker's own delta in the span) by round, min and median:",
              ", ".join(f"{r}: {lo:+.2f}/{mid:+.2f}" for r, (lo, mid) in out["joiner"]["novelty_own_by_round"].items()))
    for kind in COPY_KINDS[:-1] + ("honest", "joiner") if args.copies else ():
        print(f"{kind:10s} share of deltas most checkers find below a novelty of",
              ", ".join(f"{t}: {100 * share:.1f} %" for t, share in out[kind].get("majority_below", {}).items()))
    for kind in KINDS + (COPY_KINDS if args.copies else ()):
        for label, r in (("agreement", out[kind]), ("novelty", out[kind].get("novelty")),
                         ("novelty+own", out[kind].get("novelty_own"))):
            if r and r["checks"]:
                print(f"{kind:10s} {label:11s} {r['checks']:5d}  {r['min']:+.3f} … {r['max']:+.3f} "
                      f"(median {r['median']:+.3f}), {100 * r['pass_share']:.0f} % pass {THRESHOLD}, the last in "
                      f"round {r['last_round_passed']}; from round {LATE}: {100 * (r['pass_share_late'] or 0):.0f} % "
                      f"pass, at most {r['max_late'] if r['max_late'] is None else round(r['max_late'], 3)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
