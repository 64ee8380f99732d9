"""The round step (optim/round.py) that the daemon's peers and the convergence simulation
both run: what a replica sends, the outer step it leads to, where the replica restarts and
the token carry, without processes."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from locoswarm.optim import CompressionConfig, DiLoCoConfig, OuterConfig, densify
from locoswarm.optim.outer import OuterOptimizer
from locoswarm.optim.round import RoundStep

SHAPES = [("w", (64, 32)), ("b", (32,))]


def make(residual: str = "model", aggregation: str = "masked", lr: float = 1.0, momentum: float = 0.0,
         density: float = 0.05):
    cfg = DiLoCoConfig(outer=OuterConfig(lr=lr, momentum=momentum),
                       compression=CompressionConfig(density=density, bits=8, chunk=256, residual=residual,
                                                     aggregation=aggregation))
    step = RoundStep(cfg, SHAPES, run_id="t", spec_hash=b"s" * 32, max_tokens=10**6)
    params = [torch.zeros(s) for _, s in SHAPES]
    return step, OuterOptimizer(params, cfg.outer)


def replica(gen: torch.Generator, outer: OuterOptimizer, scale: float = 0.01) -> list[torch.Tensor]:
    return [o - scale * torch.randn(o.shape, generator=gen) for o in outer.params]


def test_one_replica_alone_moves_the_outer_state_by_exactly_what_it_sent(gen):
    step, outer = make(aggregation="mean")
    comp = step.compressor("cpu")
    before = [p.clone() for p in outer.params]
    blob = step.encode(comp, outer.params, replica(gen, outer), round_=0, sender="a", tokens=100)
    sent = step.decode(blob)
    assert (sent.sender, sent.round, sent.num_tokens) == ("a", 0, 100)
    step.apply(outer, [sent], [comp])
    for b, a, t in zip(before, outer.params, sent.tensors):
        assert torch.equal(a.view(-1), b.view(-1) - densify(t)), "lr 1, no momentum: θ ← θ − Δ̄"
    assert outer.num_steps == 1


def test_a_non_finite_pseudo_gradient_is_refused_with_nothing_committed(gen):
    step, outer = make()
    comp = step.compressor("cpu")
    step.encode(comp, outer.params, replica(gen, outer), round_=0, sender="a", tokens=1)
    residual = [e.clone() for e in comp.errors]
    bad = replica(gen, outer)
    bad[1][3] = math.nan
    with pytest.raises(ValueError, match="not finite"):
        step.encode(comp, outer.params, bad, round_=1, sender="a", tokens=1)
    assert all(torch.equal(a, b) for a, b in zip(residual, comp.errors))


def test_restart_is_the_consensus_minus_the_residual_only_when_the_residual_lives_in_the_model(gen):
    for residual in ("model", "buffer"):
        step, outer = make(residual=residual)
        comp = step.compressor("cpu")
        blob = step.encode(comp, outer.params, replica(gen, outer), round_=0, sender="a", tokens=1)
        step.apply(outer, [step.decode(blob)], [comp])
        start = step.restart(outer, comp)
        assert any(bool(e.abs().sum() > 0) for e in comp.errors), "top-k left a residual"
        for s, o, e in zip(start, outer.params, comp.errors):
            expect = o - e.view(o.shape) if residual == "model" else o
            assert torch.equal(s, expect)


def test_after_a_masked_round_each_replica_forgets_its_residual_where_the_consensus_moved_without_it(gen):
    step, outer = make(aggregation="masked")
    comps = [step.compressor("cpu") for _ in range(2)]
    blobs = [step.encode(c, outer.params, replica(gen, outer), round_=0, sender=n, tokens=10)
             for c, n in zip(comps, "ab")]
    deltas = [step.decode(b) for b in blobs]
    sent = [[m.clone() for m in c.sent_masks] for c in comps]
    step.apply(outer, deltas, comps)
    moved = [(o != 0).view(-1) for o in outer.params]
    for comp, masks in zip(comps, sent):
        for err, mask, mv in zip(comp.errors, masks, moved):
            assert not bool(err[mv & ~mask].any()), "residual kept where the others' average now holds it"
            assert bool(err[~mv].abs().sum() > 0), "untouched coordinates keep their residual"


def test_screening_clips_an_outsized_delta_before_the_outer_step(gen):
    step, outer = make(aggregation="mean")
    comps = [step.compressor("cpu") for _ in range(3)]
    scales = (0.01, 0.01, 10.0)
    deltas = [step.decode(step.encode(c, outer.params, replica(gen, outer, s), round_=0, sender=n, tokens=10))
              for c, n, s in zip(comps, "abc", scales)]
    screened = step.screen(deltas)
    assert screened.scales["c"] < 0.01 and screened.notes, "the 1000× delta is clipped to the median norm"
    kept = step.kept(screened)
    assert [d.sender for d in kept] == ["a", "b", "c"]
    step.apply(outer, kept, comps)
    assert all(bool(torch.isfinite(p).all()) for p in outer.params)


def test_token_carry_integrates_the_overshoot_and_is_bounded_by_half_a_round():
    def d(tokens: int) -> SimpleNamespace:  # carry reads only the token counts
        return SimpleNamespace(num_tokens=tokens)

    assert RoundStep.carry(0, [d(110), d(100)], 100) == 10
    assert RoundStep.carry(10, [d(110), d(100)], 100) == 20, "a steady bias accumulates"
    assert RoundStep.carry(0, [d(1000), d(100)], 100) == 100, "bounded by half the round's plan"
    assert RoundStep.carry(0, [d(0), d(0)], 100) == -100
    # Four newcomers pooled into one share beside two established peers: 3 shares planned.
    assert RoundStep.carry(0, [d(100), d(100)] + [d(25)] * 4, 100, shares=3) == 0


def test_a_round_with_no_delta_leaves_the_outer_state_and_the_ledger_untouched():
    """A peer that held its own delta and got no other (node/roundloop.py): nothing to
    aggregate is a ValueError, under either rule, and nothing moved."""
    for rule in ("masked", "mean"):
        step, outer = make(aggregation=rule)
        ledger = step.ledger(100)
        before = [p.clone() for p in outer.params]
        with pytest.raises(ValueError, match="no pseudo-gradient"):
            step.apply(outer, [], [step.compressor("cpu")], ledger)
        assert outer.num_steps == 0 and ledger.pairs() == ()
        assert all(torch.equal(a, b) for a, b in zip(before, outer.params))
