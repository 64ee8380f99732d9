"""Fitting the hardware: the precision chosen per device, the micro-batch fitted to free
memory with gradient accumulation that keeps the spec's batch per step, the fallback to a
smaller micro-batch when a step runs out of memory, and fp16 with a loss scaler (what
pre-Ampere CUDA gets), exercised here through the CPU's fp16 autocast."""

from __future__ import annotations

import threading

import pytest
import torch

from locoswarm.node.hardware import choose_precision, fit_micro_batch, next_micro_batch
from locoswarm.node.spec import RunSpec
from locoswarm.node.trainer import Trainer

CPU = torch.device("cpu")


def _train(t: Trainer, steps: int) -> None:
    t.train_until(threading.Event(), lambda n: n >= steps * t.tokens_per_step)


def test_precision_by_device_and_request():
    assert choose_precision(CPU) == "fp32"
    assert choose_precision(torch.device("mps")) == "fp32"
    assert choose_precision(CPU, "bf16") == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        choose_precision(CPU, "fp8")


def test_the_micro_batch_is_the_largest_divisor_that_fits():
    assert fit_micro_batch(8, 100, 10_000) == 8
    assert fit_micro_batch(8, 100, 500) == 4  # 0.8 · 500 = 400 holds 4, not 5 (no divisor anyway)
    assert fit_micro_batch(12, 100, 800) == 6  # 640 fits 6 sequences; 6 divides 12
    assert fit_micro_batch(8, 100, 10) == 1  # nothing fits: one at a time, and the step will say so
    assert fit_micro_batch(8, 100, -5) == 1
    assert next_micro_batch(12, 6) == 4 and next_micro_batch(12, 4) == 3 and next_micro_batch(12, 1) is None


def test_accumulated_micro_batches_train_like_the_whole_batch():
    """Micro-batches of 2 over a batch of 8 take the same steps as the whole batch: the
    gradients agree up to float summation order."""
    spec = RunSpec()
    whole = Trainer(spec, spec.hash(), shard=0, device=CPU, micro_batch=spec.batch_size)
    parts = Trainer(spec, spec.hash(), shard=0, device=CPU, micro_batch=2)
    _train(whole, 3)
    _train(parts, 3)
    assert parts.micro_batch == 2
    assert whole.losses == pytest.approx(parts.losses, rel=1e-6)
    for a, b in zip(whole.model.parameters(), parts.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_micro_batch_that_does_not_divide_the_batch_is_refused():
    spec = RunSpec()
    with pytest.raises(ValueError, match="must divide the spec's batch size 8"):
        Trainer(spec, spec.hash(), shard=0, device=CPU, micro_batch=3)


def test_out_of_memory_retries_the_step_at_a_smaller_micro_batch(caplog):
    """A forward pass of more than 2 sequences raises the out-of-memory error CUDA raises:
    the step is retried at 4, then 2, and lands where whole-batch training lands."""
    spec = RunSpec()
    ref = Trainer(spec, spec.hash(), shard=0, device=CPU, micro_batch=spec.batch_size)
    t = Trainer(spec, spec.hash(), shard=0, device=CPU, micro_batch=spec.batch_size)
    real_loss = t.model.loss
    sizes = []

    def loss(x, y):
        sizes.append(x.shape[0])
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_loss(x, y)

    t.model.loss = loss
    with caplog.at_level("WARNING"):
        _train(t, 2)
    _train(ref, 2)
    assert t.micro_batch == 2 and sizes[:2] == [8, 4] and set(sizes[2:]) == {2}
    assert "retrying the step at 4" in caplog.text and "retrying the step at 2" in caplog.text
    assert all(p.grad is None for p in t.model.parameters())
    for a, b in zip(ref.model.parameters(), t.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_out_of_memory_at_one_sequence_is_raised():
    spec = RunSpec()
    t = Trainer(spec, spec.hash(), shard=0, device=CPU, micro_batch=1)

    def loss(x, y):
        raise torch.OutOfMemoryError("CUDA out of memory")

    t.model.loss = loss
    with pytest.raises(torch.OutOfMemoryError):
        _train(t, 1)


def test_fp16_with_a_loss_scaler_trains_and_skips_overflowing_steps():
    """fp16 autocast (pre-Ampere CUDA's precision; here the CPU's) with the scaler: the loss
    falls like fp32's; a step whose scaled gradients overflow is skipped (parameters
    unchanged) and the scale backs off."""
    spec = RunSpec()
    t = Trainer(spec, spec.hash(), shard=0, device=CPU, precision="fp16")
    ref = Trainer(spec, spec.hash(), shard=0, device=CPU)
    assert t.precision == "fp16" and t.scaler is not None and ref.scaler is None
    _train(t, 6)
    _train(ref, 6)
    assert t.losses[-1] < t.losses[0] - 0.1
    assert t.losses == pytest.approx(ref.losses, rel=1e-2)
    before = [p.detach().clone() for p in t.model.parameters()]
    scale = t.scaler.get_scale()
    real_loss = t.model.loss
    t.model.loss = lambda x, y: real_loss(x, y) * float("inf")
    _train(t, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, t.model.parameters()))
    assert t.scaler.get_scale() < scale


def test_activation_checkpointing_trains_the_same_steps():
    spec = RunSpec()
    plain = Trainer(spec, spec.hash(), shard=0, device=CPU)
    ckpt = Trainer(spec, spec.hash(), shard=0, device=CPU, activation_checkpointing=True)
    assert ckpt.model.checkpoint_activations and not plain.model.checkpoint_activations
    _train(plain, 2)
    _train(ckpt, 2)
    for a, b in zip(plain.model.parameters(), ckpt.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
