"""Unit tests of locoswarm.optim: error feedback, the outer optimizer, aggregation, the
inner learning-rate schedule and config validation."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
import torch

from locoswarm.optim import (
    CompressionConfig,
    DiLoCoConfig,
    ErrorFeedbackCompressor,
    InnerConfig,
    OuterConfig,
    OuterOptimizer,
    aggregate,
    delta_spec,
    densify,
    lr_at,
    tensor_specs,
)
from locoswarm.protocol import DecodedDelta, DeltaMessage, decode_delta, encode_delta

F32_EPS = torch.finfo(torch.float32).eps
SHAPES = [("w", (32, 40)), ("b", (7,)), ("e", (1000,))]


# --------------------------------------------------------------------------- error feedback


@pytest.mark.parametrize("ef_decay", [1.0, 0.9])
@pytest.mark.parametrize("bits", [2, 8])
def test_error_feedback_conserves_decayed_residual_plus_delta_as_sent_plus_new_residual(
    ef_decay: float, bits: int, gen: torch.Generator
) -> None:
    cfg = CompressionConfig(density=0.05, bits=bits, chunk=256, ef_decay=ef_decay, residual="buffer")
    comp = ErrorFeedbackCompressor(tensor_specs(SHAPES, cfg), cfg, "cpu")
    for round_ in range(3):
        e_old = [e.clone() for e in comp.errors]
        deltas = [torch.randn(shape, generator=gen) for _, shape in SHAPES]
        _, sent = comp.compress(deltas)
        for (name, _), eo, d, s, en in zip(SHAPES, e_old, deltas, sent, comp.errors):
            d = d.reshape(-1)
            assert s.shape == en.shape == d.shape
            # b = β·e_old + Δ in fp32, in the compressor's order of operations
            decayed = eo * ef_decay if ef_decay != 1.0 else eo
            b = decayed + d
            unsent = s == 0
            assert int((~unsent).sum()) > 0, f"{name}: nothing was sent"
            assert torch.equal(en[unsent], b[unsent]), f"{name} round {round_}: residual lost where nothing was sent"
            # Where a value was sent: one fp32 rounding of e_new = b − sent.
            sent_pos = ~unsent
            lhs = en[sent_pos].double() + s[sent_pos].double()
            rhs = b[sent_pos].double()
            tol = F32_EPS * torch.maximum(b[sent_pos].abs(), en[sent_pos].abs()).double()
            assert bool(((lhs - rhs).abs() <= tol).all()), f"{name} round {round_}"
            # The same identity against β·e_old + Δ in exact (float64) arithmetic, up to the
            # roundings of β·e_old, of the addition and of the subtraction.
            exact = ef_decay * eo.double() + d.double()
            tol64 = F32_EPS * (ef_decay * eo.double().abs() + b.double().abs() + en.double().abs())
            assert bool(((en.double() + s.double() - exact).abs() <= tol64).all()), f"{name} round {round_}"
        if round_ > 0:
            assert any(float(e.abs().max()) > 0 for e in comp.errors)


@pytest.mark.parametrize("residual", ["buffer", "model"])
def test_a_held_round_keeps_the_whole_pseudo_gradient_in_the_residual_and_sends_nothing(
    residual: str, gen: torch.Generator
) -> None:
    cfg = CompressionConfig(density=0.05, bits=4, chunk=256, ef_decay=0.9, residual=residual)
    comp = ErrorFeedbackCompressor(tensor_specs(SHAPES, cfg), cfg, "cpu")
    comp.compress([torch.randn(shape, generator=gen) for _, shape in SHAPES])
    e_old = [e.clone() for e in comp.errors]
    assert all(bool(m.any()) for m in comp.sent_masks)
    deltas = [torch.randn(shape, generator=gen) for _, shape in SHAPES]
    comp.hold(deltas)
    for eo, d, en, mask in zip(e_old, deltas, comp.errors, comp.sent_masks):
        # residual "model": the replica started at θ_outer − β·e, so Δ already holds β·e
        want = 0.9 * eo + d.reshape(-1) if residual == "buffer" else d.reshape(-1)
        assert torch.allclose(en, want, atol=1e-6) and not bool(mask.any())
    kept = [e.clone() for e in comp.errors]
    with pytest.raises(ValueError, match="not finite"):
        comp.hold([torch.full(shape, math.nan) for _, shape in SHAPES])
    assert all(torch.equal(a, b) for a, b in zip(kept, comp.errors)), "a refused hold commits nothing"


def test_error_feedback_sends_what_the_receiver_decodes(gen: torch.Generator) -> None:
    cfg = CompressionConfig(density=0.05, bits=4, chunk=256)
    spec = delta_spec(SHAPES, cfg, run_id="r", spec_hash=b"h", max_tokens=100)
    comp = ErrorFeedbackCompressor(spec.tensors, cfg, "cpu")
    packed, sent = comp.compress([torch.randn(shape, generator=gen) for _, shape in SHAPES])
    msg = DeltaMessage(run_id="r", spec_hash=b"h", round=0, sender="p", num_tokens=1, tensors=tuple(packed))
    decoded = decode_delta(encode_delta(msg), spec)
    for t, s in zip(decoded.tensors, sent):
        assert torch.equal(densify(t), s)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_compress_rejects_a_non_finite_delta(bad: float, gen: torch.Generator) -> None:
    cfg = CompressionConfig(density=0.05, bits=4, chunk=256)
    comp = ErrorFeedbackCompressor(tensor_specs(SHAPES, cfg), cfg, "cpu")
    deltas = [torch.randn(shape, generator=gen) for _, shape in SHAPES]
    deltas[1][3] = bad
    with pytest.raises(ValueError, match="'b' is not finite"):
        comp.compress(deltas)


# --------------------------------------------------------------------------- outer optimizer

OUTER_SHAPES = [(8, 5), (7,), (3, 4, 2)]


@pytest.mark.parametrize(("lr", "momentum", "nesterov"), [(0.7, 0.9, True), (0.5, 0.8, False)])
def test_outer_optimizer_matches_torch_sgd_over_five_steps(
    gen: torch.Generator, lr: float, momentum: float, nesterov: bool
) -> None:
    init = [torch.randn(s, generator=gen) for s in OUTER_SHAPES]
    outer = OuterOptimizer(init, OuterConfig(lr=lr, momentum=momentum, nesterov=nesterov))
    ref = [p.clone().requires_grad_(True) for p in init]
    sgd = torch.optim.SGD(ref, lr=lr, momentum=momentum, nesterov=nesterov, dampening=0)
    for _ in range(5):
        grads = [torch.randn(s, generator=gen) for s in OUTER_SHAPES]
        outer.step(grads)
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        sgd.step()
        for mine, theirs in zip(outer.params, ref):
            assert mine.dtype == torch.float32
            torch.testing.assert_close(mine, theirs.detach(), rtol=1e-6, atol=1e-7)
    assert outer.num_steps == 5
    assert not any(torch.equal(p, q) for p, q in zip(outer.params, init))


def test_outer_optimizer_with_lr_one_and_no_momentum_applies_the_average_exactly(gen: torch.Generator) -> None:
    init = [torch.randn(s, generator=gen) for s in OUTER_SHAPES]
    outer = OuterOptimizer(init, OuterConfig(lr=1.0, momentum=0.0))
    expected = [p.clone() for p in init]
    for _ in range(3):
        grads = [torch.randn(s, generator=gen) for s in OUTER_SHAPES]
        outer.step(grads)
        expected = [p - g for p, g in zip(expected, grads)]
        for mine, want in zip(outer.params, expected):
            assert torch.equal(mine, want)
    assert outer.momentum == []


def test_outer_optimizer_keeps_its_own_copy_of_the_parameters(gen: torch.Generator) -> None:
    init = [torch.randn(s, generator=gen) for s in OUTER_SHAPES]
    outer = OuterOptimizer(init, OuterConfig(lr=1.0))
    before = [p.clone() for p in outer.params]
    for p in init:
        p.add_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(outer.params, before))


# --------------------------------------------------------------------------- aggregation

AGG_CFG = CompressionConfig(density=0.05, bits=4, chunk=256)


def _decoded_deltas(gen: torch.Generator, senders_tokens: list[tuple[str, int]]) -> list[DecodedDelta]:
    spec = delta_spec(SHAPES, AGG_CFG, run_id="r", spec_hash=b"h" * 8, max_tokens=1 << 30)
    out = []
    for sender, tokens in senders_tokens:
        comp = ErrorFeedbackCompressor(spec.tensors, AGG_CFG, "cpu")
        packed, _ = comp.compress([torch.randn(shape, generator=gen) * 3 for _, shape in SHAPES])
        msg = DeltaMessage(run_id="r", spec_hash=b"h" * 8, round=1, sender=sender, num_tokens=tokens, tensors=tuple(packed))
        out.append(decode_delta(encode_delta(msg), spec))
    return out


PEERS = [("peer-3", 1500), ("peer-0", 4096), ("peer-7", 333), ("peer-1", 2048), ("peer-5", 1)]


def test_aggregate_is_bitwise_repeatable_and_independent_of_input_order(gen: torch.Generator) -> None:
    deltas = _decoded_deltas(gen, PEERS)
    shapes = [shape for _, shape in SHAPES]
    first = aggregate(deltas, shapes, "cpu")
    again = aggregate(deltas, shapes, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    rnd = random.Random(7)
    for _ in range(5):
        shuffled = deltas[:]
        rnd.shuffle(shuffled)
        result = aggregate(shuffled, shapes, "cpu")
        assert all(torch.equal(a, b) for a, b in zip(first, result))


def test_aggregate_equals_the_token_weighted_average_of_the_densified_deltas(gen: torch.Generator) -> None:
    deltas = _decoded_deltas(gen, PEERS)
    shapes = [shape for _, shape in SHAPES]
    result = aggregate(deltas, shapes, "cpu")
    total = sum(t for _, t in PEERS)
    for i, shape in enumerate(shapes):
        want = sum(d.num_tokens * densify(d.tensors[i]).double() for d in deltas) / total
        assert result[i].shape == shape and result[i].dtype == torch.float32
        torch.testing.assert_close(result[i].double(), want.view(shape), rtol=0, atol=1e-6)
        assert float(result[i].abs().max()) > 0


def test_aggregate_of_one_delta_is_that_delta(gen: torch.Generator) -> None:
    (delta,) = _decoded_deltas(gen, [("solo", 77)])
    result = aggregate([delta], [shape for _, shape in SHAPES], "cpu")
    for r, t in zip(result, delta.tensors):
        assert torch.equal(r.reshape(-1), densify(t))


def test_aggregate_rejects_an_empty_list() -> None:
    with pytest.raises(ValueError, match="positive token count"):
        aggregate([], [shape for _, shape in SHAPES], "cpu")


def test_aggregate_rejects_deltas_without_tokens(gen: torch.Generator) -> None:
    deltas = _decoded_deltas(gen, [("a", 0), ("b", 0)])
    with pytest.raises(ValueError, match="positive token count"):
        aggregate(deltas, [shape for _, shape in SHAPES], "cpu")


# --------------------------------------------------------------------------- schedule

SCHED = InnerConfig(lr=3e-3, warmup_steps=10, min_lr_ratio=0.1)
TOTAL = 100


def test_lr_at_warms_up_linearly_to_the_peak_lr() -> None:
    values = [lr_at(s, TOTAL, SCHED) for s in range(SCHED.warmup_steps)]
    assert values[-1] == pytest.approx(SCHED.lr, rel=1e-12)
    assert values[0] == pytest.approx(SCHED.lr / SCHED.warmup_steps, rel=1e-12)
    steps = [b - a for a, b in zip(values, values[1:])]
    assert all(s == pytest.approx(SCHED.lr / SCHED.warmup_steps, rel=1e-9) for s in steps)
    assert lr_at(SCHED.warmup_steps, TOTAL, SCHED) == pytest.approx(SCHED.lr, rel=1e-12)


def test_lr_at_ends_at_min_lr_ratio_times_lr() -> None:
    floor = SCHED.min_lr_ratio * SCHED.lr
    assert lr_at(TOTAL, TOTAL, SCHED) == pytest.approx(floor, rel=1e-12)
    assert lr_at(TOTAL + 50, TOTAL, SCHED) == pytest.approx(floor, rel=1e-12)
    assert lr_at(10 * TOTAL, TOTAL, SCHED) == pytest.approx(floor, rel=1e-12)


def test_lr_at_is_non_increasing_after_warmup() -> None:
    steps = [SCHED.warmup_steps + 0.25 * i for i in range(4 * (TOTAL + 20))]
    values = [lr_at(s, TOTAL, SCHED) for s in steps]
    assert all(b <= a for a, b in zip(values, values[1:]))
    assert values[0] > values[-1]


def test_lr_at_never_exceeds_the_peak_lr_for_fractional_global_steps() -> None:
    # The global step is global tokens / tokens per step, a float: the warm-up must not
    # overshoot the peak between its last integer step and its end.
    steps = [0.1 * i for i in range(10 * (TOTAL + 10))]
    worst = max(steps, key=lambda s: lr_at(s, TOTAL, SCHED))
    assert lr_at(worst, TOTAL, SCHED) <= SCHED.lr * (1 + 1e-12), (worst, lr_at(worst, TOTAL, SCHED))


def test_lr_at_without_warmup_starts_at_the_peak_lr() -> None:
    cfg = InnerConfig(lr=1e-3, warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(0, 50, cfg) == pytest.approx(1e-3, rel=1e-12)
    assert lr_at(25, 50, cfg) == pytest.approx(0.5e-3, rel=1e-9)
    assert lr_at(50, 50, cfg) == pytest.approx(0.0, abs=1e-15)
    assert not math.isnan(lr_at(0, 0, cfg))


# --------------------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "cfg, field",
    [
        (CompressionConfig(density=0), "compression.density"),
        (CompressionConfig(density=1.5), "compression.density"),
        (CompressionConfig(density=-0.1), "compression.density"),
        (CompressionConfig(bits=3), "compression.bits"),
        (CompressionConfig(bits=16), "compression.bits"),
        (CompressionConfig(chunk=1000), "compression.chunk"),
        (CompressionConfig(chunk=1), "compression.chunk"),
        (CompressionConfig(chunk=1 << 21), "compression.chunk"),
        (CompressionConfig(ef_decay=1.5), "compression.ef_decay"),
        (CompressionConfig(residual="x"), "compression.residual"),
        (InnerConfig(lr=0), "inner.lr"),
        (InnerConfig(lr=-1e-3), "inner.lr"),
        (InnerConfig(betas=(0.9, 1.0)), "inner.betas"),
        (InnerConfig(weight_decay=-0.1), "inner.weight_decay"),
        (InnerConfig(grad_clip=-1.0), "inner.grad_clip"),
        (InnerConfig(warmup_steps=-1), "inner.warmup_steps"),
        (InnerConfig(min_lr_ratio=1.5), "inner.min_lr_ratio"),
        (OuterConfig(momentum=1.0), "outer.momentum"),
        (OuterConfig(momentum=-0.1), "outer.momentum"),
        (OuterConfig(lr=0), "outer.lr"),
        (OuterConfig(device="cuda"), "outer.device"),
        (DiLoCoConfig(inner_steps=0), "inner_steps"),
        (DiLoCoConfig(inner=InnerConfig(lr=0)), "inner.lr"),
        (DiLoCoConfig(compression=CompressionConfig(bits=5)), "compression.bits"),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_config_validate_rejects_a_bad_value_naming_its_field(cfg: Any, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        cfg.validate()


@pytest.mark.parametrize("cfg", [CompressionConfig(), InnerConfig(), OuterConfig(), DiLoCoConfig(compression=None)])
def test_config_validate_accepts_the_defaults(cfg: Any) -> None:
    cfg.validate()  # raises on failure
    assert DiLoCoConfig().compression is not None


def test_compressor_validates_its_config() -> None:
    cfg = CompressionConfig(bits=3)
    with pytest.raises(ValueError, match="compression.bits"):
        ErrorFeedbackCompressor((), cfg, "cpu")
