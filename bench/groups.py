"""The compressed DiLoCo run with rotating-group exchange (bench/grid.py; issue 18, item 2):
every replica keeps its own outer optimizer and compressor, and in each round aggregates
only its group's deltas.

Per round: every replica encodes Δᵢ = θᵢ − model (its own outer state; the same round step
as the peers, optim/round.py), sends it to the G−1 others of its group, and each member
applies the group's aggregate to its own θᵢ. The mixing rule of `GroupConfig.mix` then
pulls the states together (or not), and each replica restarts from its own θᵢ.

Mechanics of the mixing rules, and why they are there: the group aggregate is the same
for every member of a group, so two members that start a round with the same θ end it
with the same θ; but members of different groups apply different aggregates, and since
the next round's deltas are relative to each replica's own θ, nothing ever pulls θᵢ and
θⱼ back together: their difference is a sum of per-round differences of group means.
"average" replaces each member's θ by the group's mean θ after the step (Moshpit's
parameter averaging: with no new updates the states would reach the swarm's mean in d
rounds). "sparse" does that averaging on a compressed message (`SparseMix`). "sync" sets every θ to the swarm's mean every K rounds (a periodic all-reduce).
"average" and "sync" send fp32 states; their bytes are counted uncompressed.

With G = N there is one group of everyone and each replica's outer state computes what
the shared one of the full exchange computes, bit for bit (tests/test_convergence_groups.py).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

import torch

from locoswarm.bench.convergence import (RunResult, Workload, _ring_allreduce_bytes, encode_replicas, start_replicas,
                                        step_consensus, trained_rounds)
from locoswarm.bench.grid import grid_dims, mean_state, round_groups, spread
from locoswarm.optim import CompressionConfig, DiLoCoConfig, OuterOptimizer, make_inner_optimizer
from locoswarm.optim.aggregate import aggregate, coverage
from locoswarm.optim.inner import load_params
from locoswarm.optim.round import RoundStep


def run_grouped(w: Workload, compression: CompressionConfig, dl: DiLoCoConfig,
                on_round: Callable[[int, float], None] | None = None, keep: dict | None = None) -> RunResult:
    if w.cfg.groups.scheme == "tree":
        return run_tree(w, compression, dl, on_round, keep)
    cfg = w.cfg
    grp = cfg.groups
    n, g = cfg.replicas, grp.group_size
    d = grid_dims(n, g)
    t0 = time.perf_counter()
    models = [w.new_model() for _ in range(n)]
    opts = [make_inner_optimizer(m, dl.inner) for m in models]
    samplers = w.samplers(n)
    outers = [OuterOptimizer(list(models[0].parameters()), dl.outer, device=w.device) for _ in range(n)]
    tokens_per_step = cfg.batch_size * cfg.data.seq_len
    round_step = RoundStep(replace(dl, compression=compression), w.shapes, run_id="bench",
                           spec_hash=b"\0" * 32, max_tokens=tokens_per_step * dl.inner_steps)
    compressors = [round_step.compressor(outers[0].params[0].device) for _ in range(n)]
    state_bytes = 4 * w.params
    if grp.mix == "sparse":
        density = grp.mix_density or compression.density
        sparse = SparseMix(dl, replace(compression, density=density), w.shapes, outers, d)
    sent = mixed = 0.0
    curve, spread_curve = [], []
    rounds = 0
    for step, tokens in trained_rounds(w, dl, models, opts, samplers):
        encoded = encode_replicas(round_step, compressors, lambda r: outers[r].params, models, rounds, tokens)
        sent += sum((g - 1) * len(blob) / n for blob, _ in encoded)  # to the G−1 others of its group
        received = [delta for _, delta in encoded]
        groups = round_groups(n, g, rounds)
        for group in groups:
            deltas = [received[j] for j in group]
            # No screening: the simulated replicas are honest (optim/round.py says why).
            for i in group:
                round_step.apply(outers[i], deltas, [compressors[i]])
        if grp.mix != "none" and (rounds + 1) % grp.mix_every == 0:
            if grp.mix == "sparse":
                mixed += sparse.mix(outers, groups, rounds)
            elif grp.mix == "average":
                for group in groups:
                    avg = mean_state([outers[i].params for i in group])
                    for i in group:
                        _set_state(outers[i], avg)
                mixed += (g - 1) * state_bytes  # its fp32 state to the G−1 others
            else:
                avg = mean_state([o.params for o in outers])
                for o in outers:
                    _set_state(o, avg)
                mixed += _ring_allreduce_bytes(w.params, n)
        for r, m in enumerate(models):
            load_params(m, round_step.restart(outers[r], compressors[r]))
        rounds += 1
        loss = w.evaluate(models[0])
        curve.append((step, loss))
        spread_curve.append((step, spread([o.params for o in outers])))
        if on_round is not None:
            on_round(rounds, loss)
    losses = [w.evaluate(m) for m in models]
    result = RunResult(sum(losses) / n, int(round(sent + mixed)), time.perf_counter() - t0, curve, rounds)
    result.replica_eval_loss = losses[0]
    result.spread = spread_curve[-1][1]
    result.spread_curve = spread_curve
    result.mix_bytes_per_replica = int(round(mixed))
    result.group = {"group_size": g, "dims": d, "scheme": "grid", "mix": grp.mix, "mix_every": grp.mix_every,
                    "mix_density": grp.mix_density}
    if keep is not None:
        keep.update(models=models, outers=outers, compressors=compressors)
    load_params(models[0], mean_state([o.params for o in outers]))
    result.consensus_eval_loss = w.evaluate(models[0])
    return result


def run_tree(w: Workload, compression: CompressionConfig, dl: DiLoCoConfig,
             on_round: Callable[[int, float], None] | None = None, keep: dict | None = None) -> RunResult:
    """One consensus from d exchanges of G − 1 messages each, up the grid's d dimensions
    (N = G^d, the grid fixed). A round: every replica encodes its delta against the one
    outer state, as in the full exchange. Level 1: the G replicas of a row (consecutive
    ids) fetch each other's deltas and aggregate them alike (the run's rule, token-weighted).
    Level k: the G level-(k − 1) groups that share every coordinate from k on fetch each
    other's aggregates and aggregate those alike. Below the top, an aggregate is compressed
    again (top-k + b bits at the deltas' density) by an error-feedback compressor whose
    residual every member of that group holds alike, so any member can serve it. The top
    level's aggregate (the whole grid) steps the one outer state. Bytes: G − 1 messages of
    each level a replica a round. With d = 2 this is the two-level exchange: rows, then the
    rows' aggregates. With `groups.rows` "rotating" the grid's places are drawn afresh each
    round (a permutation seeded by the run's seed and the round). With `groups.row_error`
    other than "group" a group's compressor lives one round: its recompression error is
    added to the residual of every replica below it ("members"; they send it again with
    their next deltas, whose mean then carries the whole error) or lost ("dropped")."""
    cfg = w.cfg
    n, g = cfg.replicas, cfg.groups.group_size
    d = grid_dims(n, g)
    t0 = time.perf_counter()
    models, opts, samplers, outer = start_replicas(w, dl)
    device = outer.params[0].device
    tokens_per_step = cfg.batch_size * cfg.data.seq_len
    round_step = RoundStep(replace(dl, compression=compression), w.shapes, run_id="bench",
                           spec_hash=b"\0" * 32, max_tokens=tokens_per_step * dl.inner_steps)
    compressors = [round_step.compressor(device) for _ in range(n)]
    # The groups' compressors keep their residual aside ("buffer"): an aggregate is no
    # replica's model, so there is nowhere else to keep what it did not send.
    group_step = RoundStep(replace(dl, compression=replace(compression, residual="buffer")), w.shapes, run_id="bench",
                           spec_hash=b"\0" * 32, max_tokens=tokens_per_step * dl.inner_steps * n)
    rotating = cfg.groups.rows == "rotating"
    fresh = cfg.groups.row_error != "group"
    """A group's compressor lives one round."""
    group_compressors = [[group_step.compressor(device) for _ in range(n // g ** k)] for k in range(1, d)]
    """group_compressors[k − 1][j]: level k's group j (the replicas at places j·G^k … (j + 1)·G^k − 1)."""
    shapes = [tuple(p.shape) for p in outer.params]
    sent = 0.0
    curve = []
    rounds = 0
    for step, tokens in trained_rounds(w, dl, models, opts, samplers):
        encoded = encode_replicas(round_step, compressors, lambda r: outer.params, models, rounds, tokens)
        sent += sum((g - 1) * len(blob) / n for blob, _ in encoded)  # to the G − 1 others of its row
        places = _places(n, cfg.seed, rounds) if rotating else list(range(n))
        """places[i]: the replica at the grid's place i this round."""
        items = [encoded[r][1] for r in places]
        owed = []
        """(replicas, error): what a group did not send, owed by every replica below it."""
        with torch.no_grad():
            for k in range(1, d):
                if fresh:
                    group_compressors[k - 1] = [group_step.compressor(device) for _ in range(n // g ** k)]
                below, items = items, []
                for j in range(n // g ** k):
                    members = below[j * g:(j + 1) * g]
                    shares = coverage(members, device) if compression.aggregation == "masked" else None
                    mean = aggregate(members, shapes, device, rule=compression.aggregation, shares=shares)
                    # encode takes θ_outer − θ: hand it θ_outer − mean to send the group's mean
                    blob = group_step.encode(group_compressors[k - 1][j], outer.params,
                                             [o - a for o, a in zip(outer.params, mean)], round_=rounds,
                                             sender=f"level-{k}-{j:04d}", tokens=sum(x.num_tokens for x in members))
                    # fetched once by every replica of its parent group outside it
                    sent += (g - 1) * g ** k * len(blob) / n
                    items.append(group_step.decode(blob))
                    if cfg.groups.row_error == "members":
                        owed.append((places[j * g ** k:(j + 1) * g ** k], group_compressors[k - 1][j].errors))
        # The top level: the whole grid's aggregate steps the one outer state; under
        # "masked" each replica drops its residual where the consensus moved, as in the
        # full exchange; then the replicas' residuals take on what their groups owe.
        step_consensus(round_step, outer, items, compressors, models, owed)
        rounds += 1
        loss = w.evaluate(models[0])
        curve.append((step, loss))
        if on_round is not None:
            on_round(rounds, loss)
    losses = [w.evaluate(m) for m in models]
    result = RunResult(sum(losses) / n, int(round(sent)), time.perf_counter() - t0, curve, rounds)
    result.replica_eval_loss = losses[0]
    result.spread = 0.0  # one outer state
    result.spread_curve = [(s, 0.0) for s, _ in curve]
    result.mix_bytes_per_replica = 0
    result.group = {"group_size": g, "dims": d, "scheme": "tree", "rows": cfg.groups.rows,
                    "row_error": cfg.groups.row_error, "mix": "none",
                    "mix_every": 1, "mix_density": 0.0}
    if keep is not None:
        keep.update(models=models, outer=outer, compressors=compressors, group_compressors=group_compressors)
    load_params(models[0], outer.params)
    result.consensus_eval_loss = w.evaluate(models[0])
    return result


def _places(n: int, seed: int, round_: int) -> list[int]:
    """The replicas in grid order for round `round_`: a permutation drawn from the run's
    seed and the round (every peer of a real swarm could draw it alike)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + round_)
    return torch.randperm(n, generator=gen).tolist()


@torch.no_grad()
def _set_state(outer: OuterOptimizer, state: list[torch.Tensor]) -> None:
    for p, s in zip(outer.params, state):
        p.copy_(s)


class SparseMix:
    """Group averaging of the outer states at the price of one more compressed message.

    A grid group meets again every d rounds with the same members (it is the same line of
    the grid), and when it last met its members agreed on a reference state ρ (at the start:
    the genesis, which everyone holds). What a member's state moved since then, uᵢ = θᵢ − ρ,
    is d rounds of outer steps: sparse-ish, and compressed like a delta (top-k + b bits, same
    layout). Each member sends its compressed uᵢ to the group; all take ρ' = ρ + mean ŝⱼ as
    the new reference (the same bits for every member), and each keeps what it did not send:
    θᵢ ← ρ' + (uᵢ − ŝᵢ). The group's mean state is unchanged (the "mean" rule counts an unsent
    entry as 0, and the sender keeps it), and members now differ only by their unsent parts,
    which they send when the group meets again. With density 1 and exact values this is
    "average"."""

    def __init__(self, dl: DiLoCoConfig, compression: CompressionConfig,
                 named_shapes: list[tuple[str, tuple[int, ...]]], outers: list[OuterOptimizer], dims: int) -> None:
        comp = replace(compression, residual="model", aggregation="mean")
        self.step = RoundStep(replace(dl, compression=comp), named_shapes, run_id="bench-mix",
                              spec_hash=b"\1" * 32, max_tokens=1)
        device = outers[0].params[0].device
        self.compressors = [self.step.compressor(device) for _ in outers]
        self.dims = dims
        self.shapes = [tuple(p.shape) for p in outers[0].params]
        genesis = [p.clone() for p in outers[0].params]
        self.refs = [[genesis] * dims for _ in outers]
        """refs[i][k]: the state replica i's group along dimension k agreed on when it last met."""

    @torch.no_grad()
    def mix(self, outers: list[OuterOptimizer], groups: list[list[int]], round_: int) -> float:
        """Mix every group of this round; returns the bytes each replica sent, on average."""
        k = round_ % self.dims
        n = len(outers)
        sent = 0.0
        for group in groups:
            ref = self.refs[group[0]][k]
            assert all(self.refs[i][k] is ref for i in group), "a group's members share its reference"
            moved = []
            for i in group:
                blob = self.step.encode(self.compressors[i], ref, outers[i].params, round_=round_,
                                        sender=f"replica-{i:04d}", tokens=1)
                sent += (len(group) - 1) * len(blob) / n
                moved.append(self.step.decode(blob))
            # the decoded ŝᵢ approximate ρ − θᵢ; their mean moves the reference
            mean = aggregate(moved, self.shapes, ref[0].device, rule="mean")
            new_ref = [r - m for r, m in zip(ref, mean)]
            for i in group:
                # the residual e = (ρ − θᵢ) − ŝᵢ is what it did not send: θᵢ ← ρ' − e
                for p, r, e in zip(outers[i].params, new_ref, self.compressors[i].errors):
                    p.copy_(r - e.view(r.shape))
                self.refs[i][k] = new_ref
        return sent
