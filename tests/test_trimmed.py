"""The coordinate-wise trimmed mean (optim/trimmed.py) on real encoded-and-decoded deltas:
it removes a 1000× outlier coordinate that clipping to the median norm lets partly
through, it is bitwise the same over repeated runs and any input order, with β = 0 it is
the plain rule of aggregate.py, and the spec setting is validated and keeps the default
spec hash."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from locoswarm.optim import CompressionConfig, ErrorFeedbackCompressor, delta_spec
from locoswarm.optim.aggregate import aggregate, coverage
from locoswarm.optim.config import RobustConfig
from locoswarm.optim.screen import apply_screen, screen
from locoswarm.optim.trimmed import trimmed_mean
from locoswarm.protocol import DeltaMessage, decode_delta, encode_delta

SHAPES = [("w", (16, 64)), ("v", (300,))]
CFG = CompressionConfig(density=0.05, bits=8, chunk=256)
SPEC = delta_spec(SHAPES, CFG, run_id="r", spec_hash=b"h" * 32, max_tokens=1 << 30)
DIMS = [s for _, s in SHAPES]


def _delta(sender: str, tensors: list[torch.Tensor], tokens: int = 1000):
    comp = ErrorFeedbackCompressor(SPEC.tensors, CFG, "cpu")
    packed, _ = comp.compress(tensors)
    msg = DeltaMessage(run_id="r", spec_hash=b"h" * 32, round=0, sender=sender, num_tokens=tokens,
                       tensors=tuple(packed))
    return decode_delta(encode_delta(msg), SPEC)


def _honest(gen, n: int, base: list[torch.Tensor], tokens=None):
    """Peers training one model: a shared direction plus their own noise, so their top-k
    picks overlap on the large coordinates (as real peers' do)."""
    return [_delta(f"p{i}", [b + 0.05 * torch.randn(b.shape, generator=gen) for b in base],
                   tokens=1000 if tokens is None else tokens[i]) for i in range(n)]


@pytest.fixture
def base(gen):
    return [torch.randn(s, generator=gen) for s in DIMS]


def test_a_1000x_outlier_coordinate_is_trimmed_away_where_the_median_clip_lets_it_partly_through(gen, base):
    honest = _honest(gen, 4, base)
    at = int(base[0].abs().argmax())  # the largest coordinate: every peer sends it
    bad = [b.clone() for b in base]
    bad[0].view(-1)[at] *= 1000.0
    evil = _delta("evil", bad)
    values = [float(aggregate([d], DIMS, "cpu", rule="masked", shares=coverage([d], "cpu"))[0].view(-1)[at])
              for d in honest]
    lo, hi = min(values), max(values)
    kept = apply_screen(screen(honest + [evil], RobustConfig()))
    clipped = float(aggregate(kept, DIMS, "cpu", rule="masked", shares=coverage(kept, "cpu"))[0].view(-1)[at])
    trimmed = float(trimmed_mean(kept, DIMS, "cpu", trim=0.2, masked=True)[0].view(-1)[at])
    spread = hi - lo
    print(f"honest {lo:.4f}..{hi:.4f}; clipped to the median norm {clipped:.4f}; trimmed (β 0.2) {trimmed:.4f}")
    assert abs(clipped - (lo + hi) / 2) > 10 * spread, "the clip alone should let part of the outlier through"
    assert lo <= trimmed <= hi


def test_the_trimmed_mean_is_bitwise_the_same_over_runs_and_input_orders(gen, base):
    deltas = _honest(gen, 6, base, tokens=[700, 1000, 1000, 1300, 900, 1000])
    first = trimmed_mean(deltas, DIMS, "cpu", trim=0.25, masked=True)
    rng = random.Random(1)
    for _ in range(5):
        shuffled = deltas[:]
        rng.shuffle(shuffled)
        again = trimmed_mean(shuffled, DIMS, "cpu", trim=0.25, masked=True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(torch.isfinite(t).all() for t in first)


@pytest.mark.parametrize("rule", ["masked", "mean"])
def test_with_no_trim_it_is_the_plain_token_weighted_rule(gen, base, rule):
    deltas = _honest(gen, 5, base, tokens=[500, 1000, 1500, 800, 1200])
    shares = coverage(deltas, "cpu") if rule == "masked" else None
    plain = aggregate(deltas, DIMS, "cpu", rule=rule, shares=shares)
    ours = trimmed_mean(deltas, DIMS, "cpu", trim=0.0, masked=rule == "masked")
    for a, b in zip(plain, ours):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
        assert torch.equal(a == 0, b == 0)  # the same coordinates moved


def test_a_coordinate_sent_by_fewer_than_one_over_beta_peers_keeps_every_value(gen, base):
    deltas = _honest(gen, 3, base)  # β 0.25 × 3 peers: nothing cut anywhere
    plain = aggregate(deltas, DIMS, "cpu", rule="masked", shares=coverage(deltas, "cpu"))
    for a, b in zip(plain, trimmed_mean(deltas, DIMS, "cpu", trim=0.25, masked=True)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_a_trim_out_of_range_is_refused_naming_the_field_and_the_default_keeps_the_spec_hash(tmp_path):
    import hashlib
    import json

    from locoswarm.node.spec import SPEC_VERSION, RunSpec, load_spec, to_dict

    for bad in (-0.1, 0.5, 2.0):
        with pytest.raises(ValueError, match=r"diloco\.robust\.trim"):
            RobustConfig(trim=bad).validate()
    spec = RunSpec()
    body = to_dict(spec)
    body.pop("initial_peers")
    body["diloco"]["outer"].pop("device")
    body.pop("access")
    body.pop("trust")
    del body["diloco"]["robust"]["trim"]  # the spec as it was before the setting existed
    del body["rounds"]["exchange"], body["rounds"]["row_size"]  # and before tree rounds
    before = hashlib.sha256(json.dumps({"spec_version": SPEC_VERSION, **body}, sort_keys=True,
                                       separators=(",", ":")).encode()).digest()
    assert spec.hash() == before
    (tmp_path / "t.toml").write_text("[diloco.robust]\ntrim = 0.25\n")
    trimmed = load_spec(str(tmp_path / "t.toml"))
    assert trimmed.diloco.robust.trim == 0.25 and trimmed.hash() != spec.hash()
    assert dataclasses.replace(spec).hash() == spec.hash()
