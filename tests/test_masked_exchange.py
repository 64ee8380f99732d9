"""The "masked" aggregation and the "model" residual: a coordinate moves to the average
of the peers that sent it, and a peer that did not send it blends its own unsent value
with that consensus instead of counting the others' progress twice."""

from __future__ import annotations

import pytest
import torch

from locoswarm.optim import (
    CompressionConfig,
    ErrorFeedbackCompressor,
    aggregate,
    coverage,
    delta_spec,
    densify,
)
from locoswarm.protocol import DeltaMessage, decode_delta, encode_delta

SHAPES = [("w", (16, 64)), ("v", (300,))]
CFG = CompressionConfig(density=0.05, bits=8, chunk=256, residual="model", aggregation="masked")


def _exchange(gen: torch.Generator, peers: list[tuple[str, int]]):
    spec = delta_spec(SHAPES, CFG, run_id="r", spec_hash=b"h" * 32, max_tokens=1 << 20)
    comps, decoded, sent, deltas = [], [], [], []
    for sender, tokens in peers:
        comp = ErrorFeedbackCompressor(spec.tensors, CFG, "cpu")
        delta = [torch.randn(shape, generator=gen) for _, shape in SHAPES]
        packed, own = comp.compress(delta)
        msg = DeltaMessage(run_id="r", spec_hash=b"h" * 32, round=0, sender=sender, num_tokens=tokens,
                           tensors=tuple(packed))
        comps.append(comp)
        decoded.append(decode_delta(encode_delta(msg), spec))
        sent.append(own)
        deltas.append(delta)
    return comps, decoded, sent, deltas


def test_masked_average_at_each_coordinate_is_the_mean_over_its_senders_only(gen):
    peers = [("a", 100), ("b", 300), ("c", 600)]
    _, decoded, _, _ = _exchange(gen, peers)
    shapes = [s for _, s in SHAPES]
    result = aggregate(decoded, shapes, "cpu", rule="masked")
    for i in range(len(SHAPES)):
        vals = torch.stack([densify(d.tensors[i]) for d in decoded]).double()
        sent = torch.stack([_mask(d.tensors[i]) for d in decoded])
        w = torch.tensor([t for _, t in peers], dtype=torch.float64)[:, None] * sent
        want = torch.where(w.sum(0) > 0, (w * vals).sum(0) / w.sum(0).clamp_min(1e-30), torch.zeros(()).double())
        torch.testing.assert_close(result[i].reshape(-1).double(), want, rtol=1e-6, atol=1e-7)
        # where exactly one peer sent a coordinate, the average is that peer's value, not a fraction of it
        single = sent.sum(0) == 1
        assert single.any()
        only = (vals * sent).sum(0)
        torch.testing.assert_close(result[i].reshape(-1)[single].double(), only[single], rtol=1e-6, atol=0)


def _mask(t) -> torch.Tensor:
    from locoswarm.kernels import scatter_chunks

    return scatter_chunks(t.indices, torch.ones(t.layout.num_selected, dtype=torch.float64), t.layout)


def test_coverage_is_the_token_share_of_the_senders_of_each_coordinate(gen):
    peers = [("a", 1), ("b", 3)]
    _, decoded, _, _ = _exchange(gen, peers)
    shares = coverage(decoded, "cpu")
    for i in range(len(SHAPES)):
        want = 0.25 * _mask(decoded[0].tensors[i]) + 0.75 * _mask(decoded[1].tensors[i])
        torch.testing.assert_close(shares[i].double(), want, rtol=1e-6, atol=0)


def test_masked_rule_is_bitwise_repeatable_and_order_independent(gen):
    _, decoded, _, _ = _exchange(gen, [("p1", 5), ("p0", 7), ("p2", 9)])
    shapes = [s for _, s in SHAPES]
    first = aggregate(decoded, shapes, "cpu", rule="masked")
    again = aggregate(decoded[::-1], shapes, "cpu", rule="masked")
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_forget_drops_the_residual_only_where_others_moved_the_consensus_and_we_sent_nothing(gen):
    comps, decoded, sent, _ = _exchange(gen, [("a", 1), ("b", 1), ("c", 1)])
    moved = [share > 0 for share in coverage(decoded, "cpu")]
    comp = comps[0]
    before = [e.clone() for e in comp.errors]
    comp.forget(moved)
    for i in range(len(SHAPES)):
        own = _mask(decoded[0].tensors[i]).bool()
        assert torch.equal(own, comp.sent_masks[i])
        others_only = moved[i] & ~own
        assert others_only.any() and bool((before[i][others_only] != 0).any())
        assert bool((comp.errors[i][others_only] == 0).all())
        assert torch.equal(comp.errors[i][~others_only], before[i][~others_only])


def test_model_residual_compresses_the_delta_alone_since_the_model_already_holds_the_residual(gen):
    cfg = CompressionConfig(density=0.05, bits=4, chunk=256, residual="model")
    spec = delta_spec(SHAPES, cfg, run_id="r", spec_hash=b"h" * 32, max_tokens=1)
    comp = ErrorFeedbackCompressor(spec.tensors, cfg, "cpu")
    d1 = [torch.randn(s, generator=gen) for _, s in SHAPES]
    _, sent1 = comp.compress(d1)
    offsets = comp.model_offsets()
    for e, d, t in zip(offsets, d1, sent1):
        assert torch.equal(e, d.reshape(-1) - t)
    # next round's Δ (θ_outer − θ_local with θ_local started at θ_outer − e) already holds e
    d2 = [e.view(s) + torch.randn(s, generator=gen) for e, (_, s) in zip(offsets, SHAPES)]
    _, sent2 = comp.compress(d2)
    for e, d, t in zip(comp.errors, d2, sent2):
        assert torch.equal(e, d.reshape(-1) - t)


def test_unknown_aggregation_rule_is_refused():
    with pytest.raises(ValueError, match="aggregation"):
        CompressionConfig(aggregation="median").validate()
    with pytest.raises(ValueError, match="rule"):
        aggregate([], [], "cpu", rule="median")
