"""The optional Hugging Face model: built from a config with no download, the same shape
as our decoder, and trainable through the same `loss` interface."""

from __future__ import annotations

import pytest
import torch

from locoswarm.workload.model import build_model, num_params

pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")


def test_hf_llama_builds_offline_with_the_tiny_decoders_parameter_count_and_trains():
    hf = build_model("hf:llama", 257, 64, seed=0)
    ours = build_model("tiny", 257, 64, seed=0)
    assert num_params(hf) == num_params(ours)
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(0, 257, (2, 33), generator=gen)
    opt = torch.optim.SGD(hf.parameters(), lr=0.5)
    first = hf.loss(x[:, :-1], x[:, 1:])
    first.backward()
    opt.step()
    again = hf.loss(x[:, :-1], x[:, 1:])
    assert torch.isfinite(first) and float(again.detach()) < float(first.detach())


def test_hf_same_seed_gives_identical_weights():
    a = build_model("hf:llama", 257, 64, seed=3)
    b = build_model("hf:llama", 257, 64, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_unknown_hf_architecture_is_refused_by_name():
    with pytest.raises(ValueError, match="gpt9"):
        build_model("hf:gpt9", 257, 64, seed=0)
