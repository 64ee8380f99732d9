"""Screening a round's deltas (optim/screen.py) on real encoded-and-decoded deltas: a
1000× norm is clipped to κ × the median (or rejected), a NaN delta refused naming why, an
inflated token claim cut, honest deltas untouched, the decisions independent of order."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from locoswarm.optim import CompressionConfig, ErrorFeedbackCompressor, delta_spec
from locoswarm.optim.config import RobustConfig
from locoswarm.optim.screen import apply_screen, delta_norm, median, screen
from locoswarm.protocol import DeltaMessage, decode_delta, encode_delta

SHAPES = [("w", (16, 64)), ("v", (300,))]
CFG = CompressionConfig(density=0.05, bits=4, chunk=256)
SPEC = delta_spec(SHAPES, CFG, run_id="r", spec_hash=b"h" * 32, max_tokens=1 << 30)


def _delta(gen, sender: str, tokens: int = 1000, times: float = 1.0):
    comp = ErrorFeedbackCompressor(SPEC.tensors, CFG, "cpu")
    packed, _ = comp.compress([times * torch.randn(shape, generator=gen) for _, shape in SHAPES])
    msg = DeltaMessage(run_id="r", spec_hash=b"h" * 32, round=0, sender=sender, num_tokens=tokens,
                       tensors=tuple(packed))
    return decode_delta(encode_delta(msg), SPEC)


def test_a_huge_delta_is_clipped_to_the_median_and_those_below_it_are_untouched(gen):
    honest = [_delta(gen, f"p{i}") for i in range(4)]
    evil = _delta(gen, "evil", times=1000.0)
    out = screen(honest + [evil], RobustConfig())
    mid = median([delta_norm(d) for d in honest + [evil]])
    assert [d.sender for d in out.deltas] == ["evil", "p0", "p1", "p2", "p3"] and not out.rejected
    below = [d for d in honest if delta_norm(d) <= mid]
    assert below and all(out.scales[d.sender] == 1.0 for d in below)
    clipped = {d.sender: d for d in apply_screen(out)}["evil"]
    assert delta_norm(clipped) == pytest.approx(mid, rel=1e-5)
    assert out.notes[0].startswith("evil: norm") and "the round's median" in out.notes[0] and "(limit 1×)" in out.notes[0]


def test_reject_rule_leaves_the_huge_delta_out_naming_the_figures(gen):
    deltas = [_delta(gen, f"p{i}") for i in range(3)] + [_delta(gen, "evil", times=1000.0)]
    out = screen(deltas, RobustConfig(norm_rule="reject", norm_factor=4.0))
    assert [r.sender for r in out.rejected] == ["evil"]
    assert "the round's median" in out.rejected[0].reason and "limit 4×" in out.rejected[0].reason


def test_a_non_finite_delta_is_refused(gen):
    good = [_delta(gen, f"p{i}") for i in range(3)]
    bad = good[1]
    t0 = bad.tensors[0]
    poisoned = dataclasses.replace(bad, sender="nan", tensors=(dataclasses.replace(
        t0, scales=torch.full_like(t0.scales, math.nan)),) + bad.tensors[1:])
    out = screen(good + [poisoned], RobustConfig())
    assert [(r.sender, r.reason) for r in out.rejected] == [("nan", "non-finite values in its delta")]


def test_an_inflated_token_claim_is_cut_to_the_cap(gen):
    deltas = [_delta(gen, f"p{i}", tokens=1000 + i) for i in range(3)] + [_delta(gen, "greedy", tokens=10**8)]
    out = screen(deltas, RobustConfig())
    weights = {d.sender: d.num_tokens for d in apply_screen(out)}
    assert weights["greedy"] == 2003 and weights["p1"] == 1001  # 2 × the median claim 1001.5
    assert any("claims 100000000 tokens" in n for n in out.notes)


def test_decisions_do_not_depend_on_arrival_order(gen):
    deltas = [_delta(gen, f"p{i}", tokens=900 + 50 * i) for i in range(4)] + [_delta(gen, "evil", 10**7, 500.0)]
    first = screen(deltas, RobustConfig())
    shuffled = deltas[:]
    random.Random(1).shuffle(shuffled)
    second = screen(shuffled, RobustConfig())
    assert [d.sender for d in first.deltas] == [d.sender for d in second.deltas]
    assert first.scales == second.scales and first.tokens == second.tokens


def test_with_fewer_than_three_deltas_only_non_finite_ones_are_refused(gen):
    out = screen([_delta(gen, "a"), _delta(gen, "b", tokens=10**6, times=1e3)], RobustConfig())
    assert out.scales == {"a": 1.0, "b": 1.0} and out.tokens == {"a": 1000, "b": 10**6}


def test_every_peer_screening_the_same_deltas_decides_the_same(gen):
    """No exemption for a peer's own delta: whichever peer screens, the weights and
    multipliers are identical (an exemption split three honest peers' outer states)."""
    deltas = [_delta(gen, f"p{i}", tokens=500 + 700 * i, times=1.0 + i) for i in range(3)]
    views = [screen(deltas[i:] + deltas[:i], RobustConfig()) for i in range(3)]
    assert all(v.scales == views[0].scales and v.tokens == views[0].tokens for v in views)
    assert any(k < 1.0 for k in views[0].scales.values())  # the largest honest delta is clipped too
