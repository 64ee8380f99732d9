"""The convergence benchmark's rotating-group exchange (bench/grid.py, bench/groups.py): the
grid partitions every round correctly and connects every pair within d rounds, one group of
everyone is the full exchange bit for bit, group size 0 is the full exchange's own path, and
the bytes reported are the group's messages plus the mixing's states."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from locoswarm.bench import convergence as conv
from locoswarm.bench import convergence_report as report
from locoswarm.bench import groups as grouped
from locoswarm.bench.grid import GroupConfig, grid_dims, round_groups
from locoswarm.bench.settings import apply_overrides
from locoswarm.optim import CompressionConfig, DiLoCoConfig
from locoswarm.workload.data import DataConfig


def _small(replicas: int = 4, **groups) -> conv.BenchConfig:
    return conv.BenchConfig(
        model="tiny",
        tokenizer="byte",
        data=DataConfig(source="builtin:shakespeare", seq_len=32),
        replicas=replicas,
        batch_size=2,
        total_steps=8,
        diloco=DiLoCoConfig(inner_steps=2, compression=CompressionConfig(density=0.02, bits=2, chunk=1024)),
        eval_sequences=4,
        groups=GroupConfig(**groups),
    )


def _run(cfg: conv.BenchConfig, keep: dict | None = None) -> conv.RunResult:
    with conv.flush_denormals():
        return conv.run_diloco(conv.Workload(cfg), cfg.diloco.compression, keep=keep)


@pytest.mark.parametrize(("replicas", "g"), [(4, 2), (8, 2), (16, 4), (27, 3), (16, 2), (5, 5)])
def test_every_round_partitions_the_replicas_into_groups_of_g_and_d_rounds_connect_every_pair(replicas, g):
    d = grid_dims(replicas, g)
    assert g**d == replicas
    parent = list(range(replicas))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for r in range(d):
        groups = round_groups(replicas, g, r)
        members = sorted(i for group in groups for i in group)
        assert members == list(range(replicas))  # each replica in exactly one group
        assert all(len(group) == g for group in groups)
        for group in groups:
            for i in group[1:]:
                parent[root(i)] = root(group[0])
        # one dimension per round: the rounds d apart repeat the same groups
        assert round_groups(replicas, g, r + d) == groups
    assert len({root(i) for i in range(replicas)}) == 1
    if d > 1:  # and no fewer rounds do it
        parent = list(range(replicas))
        for r in range(d - 1):
            for group in round_groups(replicas, g, r):
                for i in group[1:]:
                    parent[root(i)] = root(group[0])
        assert len({root(i) for i in range(replicas)}) > 1


@pytest.mark.parametrize(("replicas", "g"), [(6, 2), (8, 4), (3, 2), (4, 3)])
def test_a_replica_count_that_is_not_a_power_of_the_group_size_is_refused_before_training(replicas, g):
    with pytest.raises(ValueError, match="group_size"):
        apply_overrides(conv.PRESETS["quick"], replicas=replicas, group_size=g)


@pytest.mark.parametrize("groups", [{"group_size": 1}, {"mix": "average"}, {"group_size": 2, "mix": "blend"},
                                    {"group_size": 2, "mix_every": 0}, {"group_size": 2, "mix_density": 0.1},
                                    {"group_size": 2, "mix": "sparse", "mix_density": 2.0},
                                    {"scheme": "tree"}, {"group_size": 2, "scheme": "ring"},
                                    {"group_size": 2, "scheme": "tree", "mix": "average"},
                                    {"group_size": 2, "rows": "rotating"},
                                    {"group_size": 2, "scheme": "tree", "rows": "shuffled"},
                                    {"group_size": 2, "row_error": "members"},
                                    {"group_size": 2, "scheme": "tree", "row_error": "kept"},
                                    {"group_size": 2, "scheme": "tree", "rows": "rotating"}])
def test_invalid_group_settings_are_refused_naming_the_field(groups):
    with pytest.raises(ValueError, match="group"):
        _small(**groups).validate()


def test_one_group_of_every_replica_reproduces_the_full_exchange_bit_for_bit():
    full = _run(_small(replicas=4))
    one = _run(_small(replicas=4, group_size=4))
    assert one.group == {"group_size": 4, "dims": 1, "scheme": "grid", "mix": "none", "mix_every": 1,
                         "mix_density": 0.0}
    assert one.eval_loss == full.eval_loss
    assert one.replica_eval_loss == full.replica_eval_loss
    assert one.curve == full.curve
    assert one.bytes_sent_per_replica == full.bytes_sent_per_replica
    assert one.spread == 0.0
    # the mean of four equal states may round in its last bit
    assert one.consensus_eval_loss == pytest.approx(full.consensus_eval_loss, rel=1e-6)


def test_group_size_zero_is_the_full_exchange_path(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("group size 0 must not take the grouped path")

    monkeypatch.setattr(grouped, "run_grouped", refuse)
    result = _run(_small(replicas=4, group_size=0))
    assert result.group is None and result.spread == 0.0 and result.mix_bytes_per_replica == 0
    assert math.isfinite(result.eval_loss)


def test_groups_smaller_than_the_swarm_let_the_outer_states_drift_apart():
    keep: dict = {}
    result = _run(_small(replicas=4, group_size=2), keep)
    assert result.spread > 0
    states = [o.params for o in keep["outers"]]
    assert not all(torch.equal(a, b) for a, b in zip(states[0], states[3]))
    assert math.isfinite(result.eval_loss) and math.isfinite(result.consensus_eval_loss)


def test_group_average_leaves_the_last_rounds_groups_on_one_state_each():
    keep: dict = {}
    result = _run(_small(replicas=4, group_size=2, mix="average"), keep)
    states = [o.params for o in keep["outers"]]
    for group in round_groups(4, 2, result.rounds - 1):
        for i in group[1:]:
            assert all(torch.equal(a, b) for a, b in zip(states[group[0]], states[i]))
    assert result.spread > 0  # the two groups of the last round still differ


def test_swarm_sync_leaves_every_replica_on_one_state():
    keep: dict = {}
    result = _run(_small(replicas=4, group_size=2, mix="sync", mix_every=2), keep)
    assert result.rounds % 2 == 0  # the last round synced
    states = [o.params for o in keep["outers"]]
    for s in states[1:]:
        assert all(torch.equal(a, b) for a, b in zip(states[0], s))
    assert result.spread == 0.0


@pytest.mark.parametrize(("mix", "every"), [("none", 1), ("average", 1), ("sync", 2), ("sparse", 1)])
def test_reported_bytes_are_the_group_messages_plus_the_mixed_states(encoded_lengths, mix, every):
    lengths = encoded_lengths
    n, g = 4, 2
    cfg = _small(replicas=n, group_size=g, mix=mix, mix_every=every)
    with conv.flush_denormals():
        w = conv.Workload(cfg)
        result = conv.run_diloco(w, cfg.diloco.compression)
    if mix == "sparse":  # one more compressed message a round, to the same G−1
        assert len(lengths) == 2 * n * result.rounds
        assert result.bytes_sent_per_replica == round((g - 1) * sum(lengths) / n)
        assert 0 < result.mix_bytes_per_replica < result.bytes_sent_per_replica
        return
    assert len(lengths) == n * result.rounds
    mixes = result.rounds // every
    per_mix = {"none": 0, "average": (g - 1) * 4 * w.params, "sync": 2 * (n - 1) / n * 4 * w.params}[mix]
    assert result.mix_bytes_per_replica == round(mixes * per_mix)
    # each replica sends its delta to the G−1 others of its group; the mean over replicas
    assert result.bytes_sent_per_replica == round((g - 1) * sum(lengths) / n + mixes * per_mix)


@pytest.mark.parametrize(("n", "g", "rows", "row_error"), [(4, 2, "fixed", "group"), (8, 2, "fixed", "group"),
                                                          (4, 2, "rotating", "members"), (8, 2, "rotating", "dropped")])
def test_tree_rounds_keep_one_state_and_count_every_level(encoded_lengths, n, g, rows, row_error):
    """Per round: n deltas, then at each level below the top one aggregate per group (n/G
    rows, n/G² groups of rows, …), each compressed again; a replica fetches G − 1 messages of
    every level; one outer state for all, which every replica restarts from. Rotating rows
    cost the same messages."""
    keep: dict = {}
    result = _run(_small(replicas=n, group_size=g, scheme="tree", rows=rows, row_error=row_error), keep)
    assert (result.group["rows"], result.group["row_error"]) == (rows, row_error)
    d = grid_dims(n, g)
    assert result.group["scheme"] == "tree" and result.group["dims"] == d and result.spread == 0.0
    per_level = [n // g ** k for k in range(d)]  # messages encoded at levels 0 … d − 1
    assert len(encoded_lengths) == sum(per_level) * result.rounds
    fetched = 0.0
    for r in range(result.rounds):
        at = r * sum(per_level)
        for k, count in enumerate(per_level):
            fetched += sum((g - 1) * g ** k * x for x in encoded_lengths[at:at + count]) / n
            at += count
    assert result.bytes_sent_per_replica == round(fetched)
    assert [len(level) for level in keep["group_compressors"]] == per_level[1:]
    # the groups' residuals hold what their aggregates did not send
    assert all(any(e.abs().sum() > 0 for e in c.errors) for level in keep["group_compressors"] for c in level)
    assert math.isfinite(result.eval_loss) and result.consensus_eval_loss < 6.0


def test_summary_reports_the_gain_kept_between_local_and_ddp():
    assert report.gain_kept(2.0, 2.2, 1.8) == pytest.approx(0.5)
    assert report.gain_kept(2.0, None, 1.8) is None
    summary = conv.run_benchmark(replace(_small(replicas=4, group_size=2), total_steps=4),
                                 runs=("ddp", "local", "compressed"), log=lambda _: None)
    c = summary["compressed"]
    assert c["gain_kept"] == pytest.approx(report.gain_kept(c["eval_loss"], summary["local"]["eval_loss"],
                                                          summary["ddp"]["eval_loss"]))
    assert c["spread"] > 0 and c["replica_eval_loss"] is not None and c["group"]["dims"] == 2
    assert "groups of 2 on 2 dims" in report.format_table(summary)


def test_a_sparse_mix_keeps_the_group_mean_and_leaves_members_apart_only_by_what_they_did_not_send():
    from locoswarm.optim import OuterConfig, OuterOptimizer

    torch.manual_seed(0)
    shapes = [("w", (64, 32)), ("b", (32,))]
    comp = CompressionConfig(density=0.05, bits=4, chunk=256)
    dl = DiLoCoConfig(compression=comp)
    genesis = [torch.randn(s) for _, s in shapes]
    outers = [OuterOptimizer(genesis, OuterConfig()) for _ in range(4)]
    mix = grouped.SparseMix(dl, comp, shapes, outers, dims=2)
    for o in outers:  # each replica moved on its own since the genesis
        for p in o.params:
            p.add_(0.01 * torch.randn_like(p))
    groups = round_groups(4, 2, 0)
    before = [[o.params[t].clone() for o in outers] for t in range(2)]
    sent = mix.mix(outers, groups, 0)
    assert sent > 0
    for group in groups:
        for t in range(2):
            mean_before = sum(before[t][i] for i in group) / 2
            mean_after = sum(outers[i].params[t] for i in group) / 2
            assert torch.allclose(mean_after, mean_before, atol=1e-6)
        a, b = group
        for t in range(2):
            ea = mix.compressors[a].errors[t].view(outers[a].params[t].shape)
            eb = mix.compressors[b].errors[t].view(outers[b].params[t].shape)
            assert torch.allclose(outers[a].params[t] - outers[b].params[t], eb - ea, atol=1e-6)
            # and the mix brought them closer than they were
            assert (outers[a].params[t] - outers[b].params[t]).norm() < (before[t][a] - before[t][b]).norm()
        # both members now hold the group's new reference for dimension 0, and only for it
        assert mix.refs[a][0] is mix.refs[b][0]
        assert mix.refs[a][1] is not mix.refs[a][0]


def test_rotating_rows_are_a_permutation_drawn_anew_each_round_and_alike_for_every_peer():
    rounds = [grouped._places(16, 0, r) for r in range(8)]
    assert all(sorted(p) == list(range(16)) for p in rounds)
    assert len({tuple(p) for p in rounds}) == 8
    assert rounds == [grouped._places(16, 0, r) for r in range(8)]  # the seed and round decide it
    assert grouped._places(16, 1, 0) != rounds[0]


def test_a_groups_error_owed_by_its_members_lands_in_their_residuals():
    """With row_error "members" the last round's group errors are in every replica's residual:
    against the same run with the errors dropped, each replica's residual differs by exactly
    the errors of the groups above it (the replicas' own parts are alike: one outer state,
    the same deltas)."""
    runs = {}
    for row_error in ("members", "dropped"):
        keep: dict = {}
        _run(replace(_small(replicas=4, group_size=2, scheme="tree", row_error=row_error), total_steps=2), keep)
        runs[row_error] = keep
    owed, dropped = runs["members"], runs["dropped"]
    rows = owed["group_compressors"][0]
    for r in range(4):
        row = rows[r // 2]  # fixed rows: replicas 2j and 2j + 1 are row j
        for mine, theirs, err in zip(owed["compressors"][r].errors, dropped["compressors"][r].errors, row.errors):
            assert torch.allclose(mine - theirs, err, atol=1e-6)
    assert any(e.abs().sum() > 0 for c in rows for e in c.errors)
