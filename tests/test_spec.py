"""Run specs: TOML round trip, a hash that changes with every shared setting (not with
where to find peers), strict parsing that names the key and file, atomic init."""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from locoswarm.cli.main import app
from locoswarm.node.spec import RunSpec, load_spec, to_toml, write_spec


def test_written_spec_loads_back_equal_with_the_same_hash(tmp_path):
    spec = replace(RunSpec(), run_id="shakespeare-1", seed=7, initial_peers=["/ip4/127.0.0.1/tcp/4000/p2p/Qm"])
    path = tmp_path / "run.toml"
    write_spec(spec, str(path))
    loaded = load_spec(str(path))
    assert loaded == spec
    assert loaded.hash() == spec.hash()


def test_embedded_default_needs_no_file():
    assert load_spec(None) == RunSpec()


@pytest.mark.parametrize(
    "change",
    [
        lambda s: replace(s, run_id="other"),
        lambda s: replace(s, seed=1),
        lambda s: replace(s, model="small"),
        lambda s: replace(s, data=replace(s.data, seq_len=128)),
        lambda s: replace(s, diloco=replace(s.diloco, inner_steps=7)),
        lambda s: replace(s, diloco=replace(s.diloco, compression=replace(s.diloco.compression, bits=4))),
        lambda s: replace(s, diloco=replace(s.diloco, compression=None)),
        lambda s: replace(s, diloco=replace(s.diloco, outer=replace(s.diloco.outer, lr=1.0))),
    ],
)
def test_hash_changes_with_every_shared_setting(change):
    assert change(RunSpec()).hash() != RunSpec().hash()


def test_hash_ignores_initial_peers_and_where_outer_state_lives():
    base = RunSpec()
    other = replace(base, initial_peers=["/ip4/10.0.0.1/tcp/1"],
                    diloco=replace(base.diloco, outer=replace(base.diloco.outer, device="model")))
    assert other.hash() == base.hash()


def test_uncompressed_spec_round_trips(tmp_path):
    spec = replace(RunSpec(), diloco=replace(RunSpec().diloco, compression=None))
    path = tmp_path / "r.toml"
    write_spec(spec, str(path))
    assert load_spec(str(path)).diloco.compression is None


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("seed = 0\n", "seed = 0\nspeed = 3\n", 1), "unknown key 'speed'"),
        (lambda t: t.replace("bits = 2", "colour = 2"), "unknown key 'diloco.compression.colour'"),
        (lambda t: t.replace("batch_size = 8", 'batch_size = "eight"'), "batch_size must be an integer"),
        (lambda t: t.replace("density = 0.00375", "density = true"), "diloco.compression.density must be a number"),
        (lambda t: t.replace("bits = 2", "bits = 3"), "bits"),
        (lambda t: t.replace('model = "tiny"', 'model = "huge"'), "huge"),
        (lambda t: t.replace("[rounds]", "[rounds"), "not valid TOML"),
        (lambda t: t.replace("spec_version = 1", "spec_version = 9"), "spec_version"),
    ],
)
def test_bad_spec_is_refused_naming_the_key_and_the_file(tmp_path, edit, message):
    path = tmp_path / "bad.toml"
    path.write_text(edit(to_toml(RunSpec())))
    with pytest.raises(ValueError) as err:
        load_spec(str(path))
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_missing_spec_file_is_named():
    with pytest.raises(ValueError, match="nowhere.toml"):
        load_spec("/nonexistent/nowhere.toml")


def test_run_init_writes_a_spec_and_refuses_to_overwrite_it(tmp_path):
    path = tmp_path / "run.toml"
    runner = CliRunner()
    res = runner.invoke(app, ["run", "init", str(path), "--run-id", "r1", "--peer", "/ip4/127.0.0.1/tcp/9"])
    assert res.exit_code == 0, res.output
    spec = load_spec(str(path))
    assert spec.run_id == "r1" and spec.initial_peers == ["/ip4/127.0.0.1/tcp/9"]
    assert spec.hash().hex() in res.output
    before = path.read_text()
    res = runner.invoke(app, ["run", "init", str(path), "--run-id", "r2"])
    assert res.exit_code == 2 and "--force" in res.output
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.toml"]


def test_run_init_with_a_bad_value_writes_nothing(tmp_path):
    path = tmp_path / "run.toml"
    res = CliRunner().invoke(app, ["run", "init", str(path), "--model", "huge"])
    assert res.exit_code == 2 and "huge" in res.output
    assert list(tmp_path.iterdir()) == []


def test_run_show_prints_the_default_spec_and_its_hash():
    res = CliRunner().invoke(app, ["run", "show"])
    assert res.exit_code == 0
    assert RunSpec().hash().hex() in res.output


def test_an_access_policy_admits_members_and_names_why_it_refuses_others(tmp_path) -> None:
    from locoswarm.node.spec import AccessPolicy, load_spec, write_spec

    open_hash = RunSpec().hash()
    private = dataclasses.replace(RunSpec(), access=AccessPolicy(secret="s" * 20, allow_peers=["QmA", "QmB"]))
    assert private.hash() != open_hash  # the policy is part of the spec
    h = private.hash()
    pol = private.access
    assert pol.refuse(h, "QmA", pol.proof(h, "QmA")) is None
    assert "does not prove it holds the run's secret" in pol.refuse(h, "QmA", pol.proof(h, "QmB"))
    assert "not on the run's allow-list" in pol.refuse(h, "QmC", pol.proof(h, "QmC"))
    assert AccessPolicy().proof(h, "QmA") == b"" and not AccessPolicy().restricted
    write_spec(private, str(tmp_path / "p.toml"))
    assert load_spec(str(tmp_path / "p.toml")).hash() == h
    with pytest.raises(ValueError, match="at least 16 characters"):
        dataclasses.replace(RunSpec(), access=AccessPolicy(secret="short")).validate()
    with pytest.raises(ValueError, match="not a base58 peer id"):
        dataclasses.replace(RunSpec(), access=AccessPolicy(allow_peers=["no/slash"])).validate()


def test_trust_anchors_round_trip_through_toml_and_leave_the_hash_of_specs_without_them_alone(tmp_path):
    import dataclasses

    from locoswarm.node.spec import RunSpec, TrustPolicy, load_spec, write_spec

    spec = dataclasses.replace(RunSpec(), trust=TrustPolicy(anchors=["QmAnchorOne", "QmAnchorTwo"]))
    write_spec(spec, str(tmp_path / "run.toml"))
    assert load_spec(str(tmp_path / "run.toml")).trust.anchors == ["QmAnchorOne", "QmAnchorTwo"]
    assert spec.hash() != RunSpec().hash(), "anchors are part of the run"
    assert dataclasses.replace(RunSpec(), trust=TrustPolicy()).hash() == RunSpec().hash()
    (tmp_path / "bad.toml").write_text('[trust]\nanchors = ["not a peer id!"]\n')
    with pytest.raises(ValueError, match="trust.anchors: 'not a peer id!' is not a base58 peer id"):
        load_spec(str(tmp_path / "bad.toml"))
    (tmp_path / "twice.toml").write_text('[trust]\nanchors = ["QmA", "QmB", "QmA"]\n')
    with pytest.raises(ValueError, match="trust.anchors: a peer id is named twice"):
        load_spec(str(tmp_path / "twice.toml"))
    many = ", ".join(f'"Qm{i}"' for i in range(9))
    (tmp_path / "many.toml").write_text(f"[trust]\nanchors = [{many}]\n")
    with pytest.raises(ValueError, match="trust.anchors: 9 peers, at most 8"):
        load_spec(str(tmp_path / "many.toml"))


def test_run_init_names_anchors_by_peer_id_or_by_the_state_directory_of_the_node_that_will_be_one(tmp_path):
    from locoswarm.node.statedir import state_dir_peer_id

    known = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
    organiser = tmp_path / "organiser"
    res = CliRunner().invoke(app, ["run", "init", str(tmp_path / "run.toml"), "--anchor", str(organiser),
                                   "--anchor", known])
    assert res.exit_code == 0, res.output
    made = state_dir_peer_id(str(organiser))  # the identity the first call made there, read back
    assert load_spec(str(tmp_path / "run.toml")).trust.anchors == [made, known]
    assert (organiser / "identity.key").stat().st_mode & 0o777 == 0o600
    res = CliRunner().invoke(app, ["run", "init", str(tmp_path / "bad.toml"), "--anchor", "not-a-peer"])
    assert res.exit_code == 2 and "--anchor 'not-a-peer' is neither a peer id nor a state directory" in res.output
    assert not (tmp_path / "bad.toml").exists()
