"""The convergence benchmark end to end on a very small configuration: every run trains,
the JSON carries the documented keys, and the traffic it reports is what was encoded."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from locoswarm.bench import convergence as conv
from locoswarm.bench.settings import apply_overrides
from locoswarm.workload.data import DataConfig
from locoswarm.optim import CompressionConfig, DiLoCoConfig


def _small(**kw) -> conv.BenchConfig:
    base = conv.BenchConfig(
        model="tiny",
        tokenizer="byte",
        data=DataConfig(source="builtin:shakespeare", seq_len=32),
        replicas=2,
        batch_size=2,
        total_steps=8,
        diloco=DiLoCoConfig(inner_steps=4, compression=CompressionConfig(density=0.02, bits=2, chunk=1024)),
        eval_sequences=4,
    )
    return replace(base, **kw)


def test_benchmark_json_has_every_run_with_loss_gap_and_traffic():
    summary = conv.run_benchmark(_small(), log=lambda _: None)
    for key in ("params", "tokens", "replicas"):
        assert summary[key] > 0
    assert summary["tokens"] == 8 * 2 * 32 * 2
    for name in conv.RUNS:
        r = summary[name]
        assert math.isfinite(r["eval_loss"]) and r["eval_loss"] > 0
        assert r["gap_pct"] is not None
    assert summary["ddp"]["gap_pct"] == 0
    assert summary["local"]["bytes_sent_per_replica"] == 0
    assert summary["local"]["reduction_vs_ddp"] is None
    # ring all-reduce of fp32 gradients every step: 2(N-1)/N · 4 · P per step
    assert summary["ddp"]["bytes_sent_per_replica"] == int(2 * 1 / 2 * 4 * summary["params"] * 8)
    assert summary["compressed"]["reduction_vs_ddp"] > summary["diloco"]["reduction_vs_ddp"] > 1
    assert summary["compressed"]["rounds"] == 2


def test_reported_bytes_equal_the_encoded_messages(encoded_lengths):
    lengths = encoded_lengths
    summary = conv.run_benchmark(_small(), runs=("compressed",), log=lambda _: None)
    n = 2
    assert len(lengths) == n * summary["compressed"]["rounds"]
    # each replica uploads its delta to the N-1 others; the figure is the mean over replicas
    assert summary["compressed"]["bytes_sent_per_replica"] == round((n - 1) * sum(lengths) / n)


def test_model_residual_keeps_each_replica_at_consensus_minus_its_residual():
    comp = CompressionConfig(density=0.02, bits=2, chunk=1024, residual="model", aggregation="masked")
    cfg = _small(diloco=DiLoCoConfig(inner_steps=4, compression=comp))
    keep: dict = {}
    with conv.flush_denormals():
        w = conv.Workload(cfg)
        result = conv.run_diloco(w, comp, keep=keep)
    outer, models, comps = keep["outer"], keep["models"], keep["compressors"]
    assert result.consensus_eval_loss is not None and math.isfinite(result.consensus_eval_loss)
    # after the last round replica 0 was loaded with the consensus for the consensus eval;
    # every other replica holds θ_outer − e, bit for bit
    for model, c in zip(models[1:], comps[1:]):
        for p, o, e in zip(model.parameters(), outer.params, c.model_offsets()):
            assert torch.equal(p.detach(), o - e.view(o.shape))
    # and the replicas differ: each kept its own unsent progress
    assert not all(torch.equal(a, b) for a, b in zip(models[1].parameters(), models[0].parameters()))


def test_uncompressed_replicas_are_identical_to_the_consensus_after_every_round():
    cfg = _small()
    keep: dict = {}
    with conv.flush_denormals():
        conv.run_diloco(conv.Workload(cfg), None, keep=keep)
    for model in keep["models"]:
        for p, o in zip(model.parameters(), keep["outer"].params):
            assert torch.equal(p.detach(), o)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"density": 0.0}, "density"),
        ({"density": 1.5}, "density"),
        ({"bits": 3}, "bits"),
        ({"chunk": 1000}, "chunk"),
        ({"model": "huge"}, "model"),
        ({"inner_steps": 0}, "inner_steps"),
        ({"replicas": 0}, "replicas"),
    ],
)
def test_invalid_setting_is_refused_naming_the_field(override, field):
    with pytest.raises(ValueError, match=field):
        apply_overrides(conv.PRESETS["quick"], **override)


def test_missing_data_folder_is_refused_naming_it(tmp_path):
    missing = tmp_path / "nope"
    cfg = _small(data=DataConfig(source=str(missing), seq_len=32))
    with pytest.raises(ValueError, match="nope"):
        conv.run_benchmark(cfg, log=lambda _: None)


def test_corpus_smaller_than_one_sequence_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("too short")
    cfg = _small(data=DataConfig(source=str(tmp_path), seq_len=32))
    with pytest.raises(ValueError, match="smaller than"):
        conv.run_benchmark(cfg, log=lambda _: None)


def test_the_checks_benchmark_times_real_checks_of_honest_deltas_against_a_round_of_training():
    """`locoswarm bench checks`: one replica's checks of the others' deltas of real training
    (all honest: every one agrees well above the threshold), and their cost against its inner phase."""
    from locoswarm.bench.check_cost import format_result, measure
    from locoswarm.optim.config import RobustConfig

    r = measure("quick", replicas=3, rounds=2, repeats=2)
    assert r["deltas_checked"] == 2 and len(r["agreements"]) == 2
    assert min(r["agreements"]) > 2 * RobustConfig().check_agreement
    assert 0 < r["check_s"] and 0 < r["check_share"] < 1 and r["inner_phase_s"] > 0
    assert "honest agreements" in format_result(r)
    # the whole exchange's compute, by part, each a real positive time
    assert set(r["exchange_s"]) == {"encode", "decode", "screen", "check", "apply"}
    assert all(t > 0 for t in r["exchange_s"].values()), r["exchange_s"]
    assert "the round's exchange" in format_result(r)
    with pytest.raises(ValueError, match="replicas must be >= 2"):
        measure("quick", replicas=1)
