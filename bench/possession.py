"""A study: does a "data-possession" check (Templar's Gauntlet) tell an honest delta from a
copy, noise or a replay?

A delta D from sender S that trained on batches B_S this round should lower the loss on B_S
clearly more than on other data of the same distribution. For the round's outer parameters
θ (the shared round start) and θ' = θ − D (for the uncompressed pseudo-gradient this is the
replica's own end point):

    drop(D, X) = loss(θ, X) − loss(θ', X)          (mean per-token cross-entropy, nats)
    raw        = drop(D, B_S) − drop(D, B_other)
    held       = raw / |drop(D, B_heldout)|
    t          = raw / sqrt((var_S + var_O) / n)   (Welch's t over the n sequences' drops)
    pair       = a paired t on B_S alone against the round's other deltas (`paired`)

B_S: the H × batch sequences S trained on this round; B_other: as many that replica k ≠ S
trained on this round; B_heldout: the first H × batch sequences of the preset's eval split.

Cases, every (round, claimed sender i, other k ≠ i):

  honest    replica i's delta (decoded compressed, or the uncompressed pseudo-gradient);
  copy      replica j's delta (j ≠ i) claimed by i: row "copy" has k ∉ {i, j}, row
            "copy, other=src" has k = j (the receiver holds the source's batches);
  noise     random signs on i's delta (its support and magnitudes) + 0.25 × replica
            j = i + 2 (mod N)'s delta, claimed by i; rows split the same way by k;
  replay    replica i's delta of 5 rounds before, judged on this round's batches.

The run is the compressed DiLoCo of bench/convergence.py (RoundStep, encode_replicas,
step_consensus); the measurements never touch its state. Not shipped:

    python -m locoswarm.bench.possession --rounds 64 --every 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections import deque
from dataclasses import replace

import torch
import torch.nn.functional as F

from locoswarm.bench.convergence import (PRESETS, Workload, encode_replicas, flush_denormals, start_replicas,
                                        step_consensus)
from locoswarm.optim import pseudo_gradients
from locoswarm.optim.compress import densify
from locoswarm.optim.round import RoundStep

REPLAY_LAG = 5
NOISE_SHARE = 0.25
SCORES = ("raw", "held", "t")
PHASES = ((0, 7), (8, 15), (16, 31), (32, 63), (0, 10_000))


class RecordingSampler:
    """A replica's sampler that keeps the batches of the current round."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def next_batch(self, batch_size: int):
        b = self.inner.next_batch(batch_size)
        self.batches.append(b)
        return b

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([b[0] for b in self.batches])
        y = torch.cat([b[1] for b in self.batches])
        self.batches = []
        return x, y


@torch.no_grad()
def seq_losses(model, x: torch.Tensor, y: torch.Tensor, chunk: int = 40) -> torch.Tensor:
    """Per-sequence mean next-token cross-entropy, (B,)."""
    out = []
    for s in range(0, x.shape[0], chunk):
        logits = model(x[s:s + chunk]).float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[s:s + chunk].reshape(-1), reduction="none")
        out.append(ce.view(logits.shape[0], -1).mean(1))
    return torch.cat(out)


@torch.no_grad()
def load(model, params: list[torch.Tensor]) -> None:
    for p, src in zip(model.parameters(), params):
        p.copy_(src)


def dense(decoded, shapes) -> list[torch.Tensor]:
    """A decoded delta as dense tensors (what aggregate's densify gives a receiver)."""
    return [densify(t).view(s) for t, s in zip(decoded.tensors, shapes)]


def noise_like(delta: list[torch.Tensor], other: list[torch.Tensor], gen: torch.Generator) -> list[torch.Tensor]:
    """Random signs on `delta`'s support and magnitudes, plus NOISE_SHARE × `other`."""
    out = []
    for d, o in zip(delta, other):
        signs = torch.randint(0, 2, d.shape, generator=gen).float() * 2 - 1
        out.append(d.abs() * signs + NOISE_SHARE * o)
    return out


class Judge:
    """Per-sequence drops of candidate deltas on the round's batch sets."""

    def __init__(self, model, theta: list[torch.Tensor], sets: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.model, self.theta, self.sets = model, theta, sets
        load(model, theta)
        self.base = [seq_losses(model, x, y) for x, y in sets]

    def drops(self, delta: list[torch.Tensor]) -> list[torch.Tensor]:
        load(self.model, [t - d for t, d in zip(self.theta, delta)])
        return [b - seq_losses(self.model, x, y) for b, (x, y) in zip(self.base, self.sets)]


def scores(d_s: torch.Tensor, d_o: torch.Tensor, d_h: torch.Tensor) -> dict[str, float]:
    raw = float(d_s.mean() - d_o.mean())
    se = math.sqrt((float(d_s.var()) + float(d_o.var())) / d_s.numel())
    held = float(d_h.mean())
    return {"raw": raw, "held": raw / abs(held) if held != 0 else math.nan, "t": raw / se if se > 0 else math.nan,
            "drop_s": float(d_s.mean()), "drop_o": float(d_o.mean()), "drop_h": held}


def run(rounds: int, every: int, steps: int, seed: int, log=print) -> dict:
    base = PRESETS["quick"]
    cfg = replace(base, total_steps=steps or base.total_steps, seed=seed)
    cfg.validate()
    torch.manual_seed(cfg.seed)
    w = Workload(cfg)
    dl = cfg.diloco
    n, H = cfg.replicas, dl.inner_steps
    rounds = min(rounds, math.ceil(cfg.total_steps / H))
    models, opts, samplers, outer = start_replicas(w, dl)
    samplers = [RecordingSampler(s) for s in samplers]
    tokens = cfg.batch_size * cfg.data.seq_len * H
    round_step = RoundStep(dl, w.shapes, run_id="bench", spec_hash=b"\0" * 32, max_tokens=tokens)
    compressors = [round_step.compressor(outer.params[0].device) for _ in range(n)]
    shapes = [s for _, s in w.shapes]
    judge_model = w.new_model()
    ex = torch.cat([x for x, _ in w.eval])[: H * cfg.batch_size]
    ey = torch.cat([y for _, y in w.eval])[: H * cfg.batch_size]
    gen = torch.Generator().manual_seed(12345)
    history: deque = deque(maxlen=REPLAY_LAG + 1)  # (compressed, uncompressed) deltas per round
    records: list[dict] = []
    train_s, check_s, judge_s, base_s = [], [], [], []
    curve = []
    log(f"quick preset, {w.params:,} parameters, {n} replicas, H {H}, {rounds} rounds of a {cfg.total_steps}-step "
        f"schedule, measured every {every}")
    t_start = time.perf_counter()
    step = 0
    for rnd in range(rounds):
        h = min(H, cfg.total_steps - step)
        for r in range(n):  # one replica at a time, to time a peer's round of training
            t0 = time.perf_counter()
            w.train_inner([models[r]], [opts[r]], [samplers[r]], step, h)
            train_s.append(time.perf_counter() - t0)
        step += h
        batches = [s.take() for s in samplers]
        theta = [p.clone() for p in outer.params]
        plain = [pseudo_gradients(outer.params, m) for m in models]
        encoded = encode_replicas(round_step, compressors, lambda r: outer.params, models, rnd, h * tokens // H)
        decoded = [d for _, d in encoded]
        comp = [dense(d, shapes) for d in decoded]
        history.append((comp, plain))
        if rnd % every == 0:
            t0 = time.perf_counter()
            judge = Judge(judge_model, theta, batches + [(ex, ey)])
            t_base = time.perf_counter() - t0
            rec = {"round": rnd, "loss": None, "cases": [], "drops": {}}
            for kind, deltas in (("comp", comp), ("plain", plain)):
                t0 = time.perf_counter()
                drops = [judge.drops(d) for d in deltas]
                if kind == "comp":
                    judge_s.append((time.perf_counter() - t0) / n)
                noisy = [judge.drops(noise_like(deltas[i], deltas[(i + 2) % n], gen)) for i in range(n)]
                old = history[0][0 if kind == "comp" else 1] if len(history) > REPLAY_LAG else None
                replays = [judge.drops(d) for d in old] if old is not None else None
                # Per-sequence drops [delta][set][sequence] (sets: the replicas' batches, then held-out).
                rec["drops"][kind] = {c: [[[round(float(v), 7) for v in s] for s in dr] for dr in ds]
                                      for c, ds in (("honest", drops), ("noise", noisy), ("replay", replays)) if ds}
                for i in range(n):
                    for k in range(n):
                        if k == i:
                            continue
                        def add(case, dr, src):
                            rec["cases"].append({"kind": kind, "case": case, "i": i, "k": k, "src": src,
                                                 **scores(dr[i], dr[k], dr[n])})
                        add("honest", drops[i], i)
                        for j in range(n):
                            if j != i:
                                add("copy, other=src" if k == j else "copy", drops[j], j)
                        j = (i + 2) % n
                        add("noise, other=src" if k == j else "noise", noisy[i], j)
                        if replays is not None:
                            add("replay", replays[i], i)
            base_s.append(t_base)
            records.append(rec)
            # One receiver's check of one sender, as a peer would run it: decode the delta, load θ − D,
            # forwards at θ on B_S and at θ' on B_S, B_other and B_heldout (θ's losses on B_other and
            # B_heldout are the receiver's own, once a round).
            t0 = time.perf_counter()
            d = dense(decoded[1], shapes)
            load(judge_model, theta)
            _ = seq_losses(judge_model, *batches[1])
            load(judge_model, [t - x for t, x in zip(theta, d)])
            _ = [seq_losses(judge_model, *s) for s in (batches[1], batches[0], (ex, ey))]
            check_s.append(time.perf_counter() - t0)
        step_consensus(round_step, outer, decoded, compressors, models)
        if rnd % every == 0:
            load(judge_model, outer.params)
            records[-1]["loss"] = w.evaluate(judge_model)
            curve.append((rnd, records[-1]["loss"]))
            log(f"round {rnd:3d}: eval loss {records[-1]['loss']:.3f}  ({time.perf_counter() - t_start:.0f} s)")
    return {"records": records, "train_s": train_s, "check_s": check_s, "judge_s": judge_s, "base_s": base_s,
            "rounds": rounds, "every": every, "steps": cfg.total_steps, "wall_s": time.perf_counter() - t_start}


CASES = ("honest", "copy", "copy, other=src", "noise", "noise, other=src", "replay")
ATTACKS = ("copy", "noise", "replay")
"""The attack rows a threshold must clear: the receiver's B_other not the source's batches
(the harder case for the check)."""


def paired(rec: dict, kind: str) -> list[dict]:
    """Score "pair" (computed here from the stored per-sequence drops, no B_other): on the
    claimed sender i's own sequences x ∈ B_i, z(x) = drop(D, x)/|drop(D, B_heldout)| − the mean
    over the round's honest deltas of the other senders j ≠ i of drop(D_j, x)/|drop(D_j, B_heldout)|;
    the score is z's one-sample t (mean / standard error over the n sequences). Comparing
    deltas on the same sequences takes out how much each sequence moves under any update of
    the round, which dominates drop(D, B_S) − drop(D, B_other)."""
    dr = rec["drops"][kind]
    hon = [torch.tensor(d) for d in dr["honest"]]
    n = len(hon)

    def norm(d: list[torch.Tensor], i: int) -> torch.Tensor:
        return d[i] / abs(float(d[n].mean()))

    def t(d: list[torch.Tensor], i: int) -> float:
        z = norm(d, i) - sum(norm(hon[j], i) for j in range(n) if j != i) / (n - 1)
        return float(z.mean() / (z.std() / math.sqrt(z.numel())))

    out = []
    for i in range(n):
        out.append({"case": "honest", "pair": t(hon[i], i)})
        out += [{"case": "copy", "pair": t(hon[j], i)} for j in range(n) if j != i]
        out.append({"case": "noise", "pair": t([torch.tensor(x) for x in dr["noise"][i]], i)})
        if "replay" in dr:
            out.append({"case": "replay", "pair": t([torch.tensor(x) for x in dr["replay"][i]], i)})
    return out


def values(out: dict, kind: str, score: str) -> list[tuple[int, str, float]]:
    """(round, case, score) of every judged delta."""
    got = []
    for r in out["records"]:
        cases = paired(r, kind) if score == "pair" else [c for c in r["cases"] if c["kind"] == kind]
        got += [(r["round"], c["case"], c[score]) for c in cases if math.isfinite(c[score])]
    return got


def table(out: dict, kind: str, score: str) -> list[str]:
    vals = values(out, kind, score)
    lines = [f"{kind}  score {score}", f"  {'case':<30}" + "".join(f"{f'rounds {a}-{b}' if b < 10_000 else 'all':>28}"
                                                                    for a, b in PHASES)]
    for case in CASES:
        cells = []
        for a, b in PHASES:
            v = [x for rnd, c, x in vals if a <= rnd <= b and c == case]
            cells.append(f"{min(v):+8.3g} {statistics.median(v):+8.3g} {max(v):+8.3g}" if v else "-")
        if any(c != "-" for c in cells):
            lines.append(f"  {case:<30}" + "".join(f"{c:>28}" for c in cells))
    for label, cases in (("overlap vs copy/noise/replay", ATTACKS), ("overlap vs copy", ("copy",)),
                         ("overlap vs noise", ("noise",)), ("overlap vs replay", ("replay",))):
        cells = []
        for a, b in PHASES:
            hon = [x for rnd, c, x in vals if a <= rnd <= b and c == "honest"]
            att = [x for rnd, c, x in vals if a <= rnd <= b and c in cases]
            if not hon or not att:
                cells.append("-")
                continue
            top = max(att)
            cells.append(f"{sum(x <= top for x in hon) / len(hon):6.1%} gap {min(hon) - top:+8.3g}")
        lines.append(f"  {label:<30}" + "".join(f"{c:>28}" for c in cells))
    return lines


def report(out: dict) -> str:
    lines = ["min / median / max over (round, claimed sender[, other]) of each case; overlap: share of honest "
             "scores <= the largest attack score; gap: least honest − largest attack"]
    for kind in ("comp", "plain"):
        for score in SCORES + ("pair",):
            lines += table(out, kind, score)
            lines.append("")
    recs = out["records"]
    for kind in ("comp", "plain"):
        lines.append(f"{kind}: median drops (nats) of honest deltas, per phase: "
                     "drop(B_S), drop(B_other), drop(heldout)")
        for a, b in PHASES:
            v = [c for r in recs if a <= r["round"] <= b
                 for c in r["cases"] if c["kind"] == kind and c["case"] == "honest"]
            if v:
                lines.append(f"  rounds {a}-{b}: " + ", ".join(f"{statistics.median(c[f] for c in v):+.4f}"
                                                             for f in ("drop_s", "drop_o", "drop_h")))
    lines.append("eval loss of the consensus: " + ", ".join(f"r{r['round']} {r['loss']:.3f}" for r in recs[::4]))
    tr = statistics.median(out["train_s"])
    ck = statistics.median(out["check_s"])
    lines.append(f"one replica's round of training (H steps): median {tr:.3f} s; one check (decode, θ on B_S, θ' on "
                 f"B_S, B_other, B_heldout): median {ck:.3f} s = {ck / tr:.2f} × a round; per-round θ baseline "
                 f"(5 sets): median {statistics.median(out['base_s']):.3f} s; wall {out['wall_s']:.0f} s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=32)
    parser.add_argument("--every", type=int, default=1, help="measure every n-th round")
    parser.add_argument("--steps", type=int, default=0,
                        help="the LR schedule's total steps (0: the preset's; rounds stop at --rounds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="")
    parser.add_argument("--report", default="", help="print the tables of a --json file, run nothing")
    args = parser.parse_args()
    if args.report:
        with open(args.report) as fh:
            print(report(json.load(fh)))
        return
    with flush_denormals():
        out = run(args.rounds, args.every, args.steps, args.seed)
    print(report(out))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh)


if __name__ == "__main__":
    main()
