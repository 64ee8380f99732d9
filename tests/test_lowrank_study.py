"""bench/lowrank.py, issue 20's low-rank study: a matrix's rank is the largest whose factors fit
the bytes the default round spends on it, the factors' quantization keeps each column within
half a step, and one power iteration from a warm start recovers a low-rank delta, so what the
study sends is what a PowerSGD-style encoding would."""

from __future__ import annotations

import pytest
import torch

from locoswarm.bench.lowrank import factor_bytes, low_rank, quantized, rank_for


def test_a_rank_is_the_largest_that_fits_the_budget_and_at_least_one():
    shape = (2304, 768)
    budget = 11_700.0  # about what the default round sends for this matrix
    r = rank_for(shape, budget, 4)
    assert factor_bytes(shape, r, 4) <= budget < factor_bytes(shape, r + 1, 4)
    assert rank_for((128, 128), 10.0, 8) == 1, "a budget below rank 1 still sends rank 1"
    assert rank_for((3, 2), 1e9, 8) == 2, "never above the matrix's own rank"


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantized_factors_are_within_half_a_step_of_each_column(bits):
    x = torch.randn(300, 3, generator=torch.Generator().manual_seed(1)) * torch.tensor([1e-3, 1.0, 50.0])
    step = x.abs().amax(dim=0) / (2 ** (bits - 1) - 1)
    err = (quantized(x, bits) - x).abs()
    assert bool((err <= step / 2 + 1e-7 * step).all())


def test_warm_power_iterations_approach_the_best_low_rank_approximation():
    gen = torch.Generator().manual_seed(2)
    delta = (torch.randn(200, 2, generator=gen) * torch.tensor([3.0, 1.0])) @ torch.randn(2, 120, generator=gen)
    delta += 0.05 * torch.randn(200, 120, generator=gen)
    u, s, v = torch.linalg.svd(delta, full_matrices=False)
    best = float((delta - (u[:, :2] * s[:2]) @ v[:2]).norm() / delta.norm())
    q = torch.randn(120, 2, generator=gen)
    errors = []
    for _ in range(3):  # one iteration a round, each warm-started from the round before's Q
        approx, q = low_rank(delta, q, 8)
        errors.append(float((delta - approx).norm() / delta.norm()))
    assert errors[-1] < best + 0.01, (best, errors)  # 8-bit factors cost about a per cent
