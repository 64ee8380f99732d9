"""bench/transform.py, issue 20's transform study: its DCTs are orthonormal and invert exactly
(padding included), so a residual keeps its norm in either domain; and a smooth tensor's
energy lands in few coefficients, which is what taking the top-k there is for."""

from __future__ import annotations

import math

import pytest
import torch

from locoswarm.bench.transform import Transform, dct_matrix


@pytest.mark.parametrize("b", [8, 32, 64])
def test_the_dct_is_orthonormal(b):
    d = dct_matrix(b)
    assert torch.allclose(d @ d.T, torch.eye(b), atol=1e-5)


@pytest.mark.parametrize("kind, shape", [("dct1", (1000,)), ("dct1", (257, 128)), ("dct2", (257, 128)),
                                         ("dct2", (100, 70)), ("dct2", (128,)), ("identity", (5, 5))])
def test_a_transform_inverts_exactly_and_keeps_the_norm(kind, shape):
    gen = torch.Generator().manual_seed(3)
    t = Transform(kind, shape, 32)
    x = torch.randn(math.prod(shape), generator=gen)
    c = t.forward(x)
    assert c.numel() == t.size >= x.numel()
    assert torch.allclose(t.inverse(c), x, atol=1e-5)
    assert float(c.norm()) == pytest.approx(float(x.norm()), rel=1e-5)


def test_a_smooth_matrix_has_its_energy_in_few_coefficients():
    i = torch.arange(64, dtype=torch.float32)
    smooth = (torch.sin(i / 20)[:, None] * torch.cos(i / 15)[None, :]).reshape(-1)
    c = Transform("dct2", (64, 64), 32).forward(smooth)
    top = c.square().sort(descending=True).values
    assert float(top[:40].sum() / top.sum()) > 0.99  # 1 % of the coefficients
    raw = smooth.square().sort(descending=True).values
    assert float(raw[:40].sum() / raw.sum()) < 0.05


def test_budgets_give_a_kind_its_share_and_keep_a_rounds_bytes_at_most_the_defaults():
    from locoswarm.bench.transform import budgets, tensor_bytes

    names = ["embed.weight", "blocks.0.qkv.weight", "blocks.0.down.weight", "norm.weight"]
    sizes = [257 * 128, 384 * 128, 128 * 352, 128]
    plain = budgets(names, sizes, 0.00375, {}, bits=2, chunk=4096, equal_bytes=True)
    shared = budgets(names, sizes, 0.00375, {"embed": 4}, bits=2, chunk=4096, equal_bytes=True)
    spent = sum(tensor_bytes(x, 2) for x in shared)
    target = sum(tensor_bytes(x, 2) for x in plain)
    assert target * 0.9 < spent <= target
    assert shared[0].k >= 3 * shared[1].k and shared[1].k < plain[1].k, "the embedding's share came from the others"
