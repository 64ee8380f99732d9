"""The sweep: every grid point trains against one shared ddp and local run, and the
frontier keeps exactly the points no other point beats on both loss gap and traffic."""

from __future__ import annotations

from dataclasses import replace

from locoswarm.bench import convergence as conv
from locoswarm.bench.sweep import default_grid, format_frontier, pareto, run_sweep
from locoswarm.workload.data import DataConfig
from locoswarm.optim import CompressionConfig, DiLoCoConfig


def test_pareto_keeps_only_points_not_beaten_on_both_gap_and_reduction():
    pts = [
        {"label": "a", "gap_pct": 5.0, "reduction_vs_ddp": 100.0},
        {"label": "b", "gap_pct": 3.0, "reduction_vs_ddp": 50.0},
        {"label": "c", "gap_pct": 6.0, "reduction_vs_ddp": 90.0},  # beaten by a on both
        {"label": "d", "gap_pct": 9.0, "reduction_vs_ddp": 1000.0},
        {"label": "e", "gap_pct": 3.0, "reduction_vs_ddp": 40.0},  # beaten by b on reduction, tied gap
    ]
    assert [p["label"] for p in pareto(pts)] == ["a", "b", "d"]


def test_default_grid_varies_each_factor_and_includes_sparseloco_and_uncompressed():
    base = DiLoCoConfig(inner_steps=10, compression=CompressionConfig(density=0.01))
    grid = dict(default_grid(base))
    assert grid["default"] is base
    assert grid["uncompressed"].compression is None
    sparseloco = grid["residual=buffer mean (SparseLoCo)"].compression
    assert (sparseloco.residual, sparseloco.aggregation) == ("buffer", "mean")
    hs = {cfg.inner_steps for cfg in grid.values()}
    assert {5, 10, 20, 40} <= hs
    for label, cfg in grid.items():
        cfg.validate()


def test_sweep_reports_every_point_against_one_ddp_and_local_run():
    cfg = conv.BenchConfig(
        data=DataConfig(source="builtin:shakespeare", seq_len=32), replicas=2, batch_size=2, total_steps=4,
        diloco=DiLoCoConfig(inner_steps=2, compression=CompressionConfig(density=0.02, chunk=1024)),
        eval_sequences=4,
    )
    grid = [("default", cfg.diloco), ("bits=8", replace(cfg.diloco, compression=replace(cfg.diloco.compression, bits=8))),
            ("uncompressed", replace(cfg.diloco, compression=None))]
    result = run_sweep(cfg, log=lambda _: None, grid=grid)
    labels = [p["label"] for p in result["points"]]
    assert labels == ["default", "bits=8", "uncompressed"]
    by = {p["label"]: p for p in result["points"]}
    # more bits per value, same indices: more bytes, less reduction
    assert by["bits=8"]["bytes_sent_per_replica"] > by["default"]["bytes_sent_per_replica"]
    assert by["uncompressed"]["reduction_vs_ddp"] < by["default"]["reduction_vs_ddp"]
    for p in result["points"]:
        assert abs(p["gap_pct"] - 100 * (p["eval_loss"] - result["ddp_eval_loss"]) / result["ddp_eval_loss"]) < 1e-9
    assert any(p["frontier"] for p in result["points"])
    assert "default" in format_frontier(result)
