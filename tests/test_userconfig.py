"""The daemon's settings: defaults < config file < LOCOSWARM_* environment < flags, each
value reporting its source; strict parsing that names the key and file (or variable) and
starts nothing."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from locoswarm.cli.main import app
from locoswarm.node.config import NOT_SETTINGS, SETTINGS, NodeConfig, config_from_settings
from locoswarm.node.userconfig import node_config, resolve

# A value other than the default for every setting, valid for NodeConfig.validate.
# The listen port is 0: a fixed one could be in use, which validate refuses.
PEER_ID = "QmTTdAbwF3hD2zzTUgSV9Mj2jvqNxt8w2p3v1xX3xVrTqE"
QM_A, QM_B, QM_C = ("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", "QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN",
                    "QmcJ4LBNh6gXscQq9DrrCpvLntLHJjEESStMBXQLstDs22")
OTHER = {"run": "r.toml", "invite": "locoswarm-invite:1:x", "organiser": PEER_ID, "state_dir": "/srv/locoswarm",
         "listen": ["/ip4/127.0.0.1/tcp/0"],
         "announce": ["/ip4/203.0.113.5/tcp/7"], "peers": [f"/ip4/127.0.0.1/tcp/8/p2p/{PEER_ID}"], "device": "cpu",
         "precision": "fp32", "allowed_hours": "22-8", "shard": 5, "eval_every": 3,
         "baseline": "/srv/alone.events.jsonl", "transport": "p2pd"}


def other(s) -> object:
    if s.name in OTHER:
        return OTHER[s.name]
    return (not s.default) if s.base is bool else s.default + (2 if s.base is float else 1)


def attribute(cfg, path: str):
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def field_paths(cls, prefix: str = "") -> set[str]:
    paths = set()
    for f in dataclasses.fields(cls):
        nested = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(nested):
            paths |= field_paths(type(nested), f"{prefix}{f.name}.")
        else:
            paths.add(prefix + f.name)
    return paths


def test_every_nodeconfig_field_is_a_setting_or_kept_internal_on_purpose():
    exposed = {s.to for s in SETTINGS if s.to is not None}
    assert exposed.isdisjoint(NOT_SETTINGS)
    assert exposed | set(NOT_SETTINGS) == field_paths(NodeConfig)


def test_the_settings_defaults_are_nodeconfigs_defaults():
    values = {s.name: s.default_value() for s in SETTINGS}
    assert config_from_settings({**values, "state_dir": "/s"}) == NodeConfig(state_dir="/s")


def test_names_flags_and_variables_agree():
    for s in SETTINGS:
        assert s.env == "LOCOSWARM_" + s.name.upper()
        singular = s.base is list and s.flag + "s" == s.name
        assert s.flag == s.name.replace("_", "-") or singular, s.name


@pytest.mark.parametrize("layer", ["file", "env", "flag"])
def test_every_setting_reaches_nodeconfig_from_every_layer(tmp_path, layer):
    wanted = {s.name: other(s) for s in SETTINGS}
    # JSON's numbers, strings, lists and booleans as written here are TOML's too.
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text("".join(f"{name} = {json.dumps(v)}\n" for name, v in wanted.items()) if layer == "file"
                        else "")
    env = {}
    if layer == "env":
        env = {s.env: ",".join(v) if isinstance(v, list) else str(v).lower() if isinstance(v, bool) else str(v)
               for s, v in zip(SETTINGS, wanted.values())}
    values, sources = resolve(wanted if layer == "flag" else {}, config_path=str(cfg_file), env=env)
    assert values == wanted
    assert all(source.startswith(layer) for source in sources.values())
    cfg = node_config(values, initial_peers=[])
    for s in SETTINGS:
        if s.to is not None:
            assert attribute(cfg, s.to) == wanted[s.name], s.name


@pytest.mark.parametrize(("var", "text", "value"), [
    ("LOCOSWARM_COMPILE", "yes", True), ("LOCOSWARM_PAUSE_ON_BATTERY", "0", False),
    ("LOCOSWARM_MAX_OTHER_CPU_PERCENT", "12.5", 12.5), ("LOCOSWARM_LISTEN", "", []),
])
def test_environment_values_parse_by_the_settings_type(var, text, value):
    values, _ = resolve({}, config_path=os.devnull, env={var: text})
    assert values[var.removeprefix("LOCOSWARM_").lower()] == value


def test_an_integer_in_the_file_is_a_number_for_a_float_setting(tmp_path):
    values, _ = resolve({}, config_path=write(tmp_path / "c.toml", "max_other_cpu_percent = 50\n"), env={})
    assert values["max_other_cpu_percent"] == 50.0 and isinstance(values["max_other_cpu_percent"], float)


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_each_layer_overrides_the_one_before_and_says_so(tmp_path):
    cfg = write(tmp_path / "c.toml", 'device = "cpu"\nfanout = 4\nmax_rounds = 7\n')
    env = {"LOCOSWARM_FANOUT": "8", "LOCOSWARM_PEERS": f"/ip4/127.0.0.1/tcp/1/p2p/{QM_A}, /ip4/127.0.0.1/tcp/2/p2p/{QM_B}"}
    values, sources = resolve({"max_rounds": 9, "shard": None}, config_path=cfg, env=env)
    assert values["device"] == "cpu" and sources["device"] == f"file {cfg}"
    assert values["fanout"] == 8 and sources["fanout"] == "env LOCOSWARM_FANOUT"
    assert values["max_rounds"] == 9 and sources["max_rounds"] == "flag --max-rounds"
    assert values["peers"] == [f"/ip4/127.0.0.1/tcp/1/p2p/{QM_A}", f"/ip4/127.0.0.1/tcp/2/p2p/{QM_B}"]
    assert values["min_peers"] == 1 and sources["min_peers"] == "default"
    built = node_config(values, initial_peers=[f"/ip4/10.0.0.1/tcp/3/p2p/{QM_C}"])
    assert built.fanout == 8 and built.net.peers == values["peers"]  # given peers win over the spec's


def test_the_specs_initial_peers_are_used_when_none_are_given(tmp_path):
    values, _ = resolve({}, config_path=write(tmp_path / "c.toml", ""), env={})
    assert node_config(values, [f"/ip4/10.0.0.1/tcp/3/p2p/{QM_C}"]).net.peers == [f"/ip4/10.0.0.1/tcp/3/p2p/{QM_C}"]


@pytest.mark.parametrize("body, message", [
    ("bogus = 1\n", "unknown key 'bogus'"),
    ('fanout = "many"\n', "fanout must be an integer"),
    ("auto_relay = 1\n", "auto_relay must be true or false"),
    ("listen = [1, 2]\n", "listen must be a list of strings"),
    ("shard = 1.5\n", "shard must be an integer"),
    ("max_rounds = true\n", "max_rounds must be an integer"),
    ("device = \n", "not valid TOML: Invalid value (at line 1"),
])
def test_a_bad_config_file_names_the_key_and_the_file(tmp_path, body, message):
    cfg = write(tmp_path / "bad.toml", body)
    with pytest.raises(ValueError) as e:
        resolve({}, config_path=cfg, env={})
    assert message in str(e.value) and cfg in str(e.value)


@pytest.mark.parametrize(("var", "text", "message"), [
    ("LOCOSWARM_MAX_ROUNDS", "ten", "max_rounds must be an integer"),
    ("LOCOSWARM_AUTO_RELAY", "maybe", "auto_relay must be 1/0, true/false or yes/no"),
    ("LOCOSWARM_RESUME_AFTER_IDLE_MIN", "soon", "resume_after_idle_min must be a number"),
])
def test_a_bad_environment_variable_is_named(var, text, message):
    with pytest.raises(ValueError) as e:
        resolve({}, config_path=None, env={var: text, "LOCOSWARM_CONFIG": os.devnull})
    assert f"{var}={text!r}" in str(e.value) and message in str(e.value)


def test_a_named_config_file_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        resolve({}, config_path=str(tmp_path / "nope.toml"), env={})


def test_config_show_prints_values_and_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    (tmp_path / "locoswarm").mkdir()
    write(tmp_path / "locoswarm" / "config.toml", "threads = 2\n")
    monkeypatch.setenv("LOCOSWARM_DEVICE", "cpu")
    out = CliRunner().invoke(app, ["config", "show", "--json"])
    assert out.exit_code == 0, out.output
    shown = json.loads(out.output)
    assert list(shown) == [s.name for s in SETTINGS]
    assert shown["threads"] == {"value": 2, "source": f"file {tmp_path / 'locoswarm' / 'config.toml'}",
                                "env": "LOCOSWARM_THREADS", "flag": "--threads"}
    assert shown["device"] == {"value": "cpu", "source": "env LOCOSWARM_DEVICE", "env": "LOCOSWARM_DEVICE",
                               "flag": "--device"}
    assert shown["peers"]["flag"] == "--peer"
    text = CliRunner().invoke(app, ["config", "show"]).output.splitlines()
    assert text[0] == f"# config file: {tmp_path / 'locoswarm' / 'config.toml'}"
    assert any(line.startswith("threads ") and "= 2 " in line and "set by LOCOSWARM_THREADS or --threads" in line
               for line in text)


def join_params() -> dict[str, object]:
    command = typer.main.get_command(app)
    return {opt: p for p in command.commands["node"].commands["join"].params for opt in p.opts}


def test_join_offers_every_setting_under_its_flag_and_hides_the_old_spellings():
    params = join_params()
    for s in SETTINGS:
        assert not params[f"--{s.flag}"].hidden
        if s.base is bool:
            assert f"--no-{s.flag}" in params[f"--{s.flag}"].secondary_opts
        for old in s.deprecated_flags:
            assert params[f"--{old}"].hidden
    assert {f"--{s.flag}" for s in SETTINGS}.isdisjoint({"--config", "--log-format", "--verbose", "--help"})


@pytest.fixture
def joined(monkeypatch, tmp_path):
    """Runs `node join ARGS` in this process up to the daemon, which is replaced by one
    that keeps the config it was given; no user config file or LOCOSWARM_* variable."""
    import locoswarm.node.daemon as daemon

    for var in [v for v in os.environ if v.startswith("LOCOSWARM_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("LOCOSWARM_CONFIG", os.devnull)
    seen = []
    monkeypatch.setattr(daemon, "run_daemon", lambda spec, cfg, **_: seen.append(cfg) or 0)

    def join(*args: str):
        out = CliRunner().invoke(app, ["node", "join", *args])
        return out, (seen.pop() if seen else None)

    return join


def test_join_maps_every_flag_onto_the_daemons_config(tmp_path, joined):
    from locoswarm.node.spec import RunSpec, write_spec

    write_spec(RunSpec(), str(tmp_path / "r.toml"))
    wanted = {s.name: other(s) for s in SETTINGS} | {"run": str(tmp_path / "r.toml"),
                                                     "state_dir": str(tmp_path / "state")}
    argv = []
    for s in SETTINGS:
        if s.name in ("invite", "organiser"):
            continue  # an invite and --run exclude each other (tests/test_invite.py)
        value = wanted[s.name]
        if s.base is bool:
            argv.append(f"--{s.flag}" if value else f"--no-{s.flag}")
        else:
            argv += [arg for v in (value if isinstance(value, list) else [value]) for arg in (f"--{s.flag}", str(v))]
    out, cfg = joined(*argv)
    assert out.exit_code == 0, out.output
    for s in SETTINGS:
        if s.to is not None:
            assert attribute(cfg, s.to) == wanted[s.name], s.name


def test_a_flag_left_out_lets_the_file_show_through(tmp_path, joined, monkeypatch):
    monkeypatch.setenv("LOCOSWARM_CONFIG", write(tmp_path / "c.toml", "fanout = 4\ncompile = true\n"))
    out, cfg = joined("--state-dir", str(tmp_path / "s"), "--device", "cpu", "--no-compile")
    assert out.exit_code == 0, out.output
    assert cfg.fanout == 4 and cfg.compile is False


@pytest.mark.parametrize(("old", "new", "attr"), [
    ("--max-gpu-memory", "--max-gpu-memory-percent", "max_gpu_memory_percent"),
    ("--keep-checkpoints", "--checkpoint-keep", "checkpoint_keep"),
    ("--max-other-cpu", "--max-other-cpu-percent", "idle.max_other_cpu_percent"),
])
def test_an_old_flag_spelling_still_works_with_a_warning(tmp_path, joined, old, new, attr):
    out, cfg = joined("--state-dir", str(tmp_path / "s"), "--device", "cpu", old, "7")
    assert out.exit_code == 0, out.output
    assert f"warning: {old} is deprecated; use {new}" in out.output
    assert attribute(cfg, attr) == 7
    out, cfg = joined("--state-dir", str(tmp_path / "s"), "--device", "cpu", old, "7", new, "9")
    assert attribute(cfg, attr) == 9


def test_a_bad_flag_value_exits_2_naming_the_setting_and_starts_nothing(tmp_path, joined):
    out, cfg = joined("--state-dir", str(tmp_path / "s"), "--fanout", "0")
    assert out.exit_code == 2 and cfg is None
    assert out.output.strip().splitlines() == ["error: --fanout 0: must be >= 1"]
    assert not (tmp_path / "s").exists()


def test_join_with_a_bad_config_exits_2_and_starts_nothing(tmp_path):
    cfg = write(tmp_path / "bad.toml", "fanout = -1\nbogus = true\n")
    state = tmp_path / "state"
    out = subprocess.run([sys.executable, "-m", "locoswarm", "node", "join", "--config", cfg, "--state-dir",
                          str(state)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "unknown key 'bogus'" in out.stderr and cfg in out.stderr
    assert not state.exists()


@pytest.mark.timeout(60)
def test_log_format_json_writes_one_parsable_object_per_line(tmp_path):
    nobody = "/ip4/127.0.0.1/tcp/9/p2p/QmcJ4LBNh6gXscQq9DrrCpvLntLHJjEESStMBXQLstDs22"
    proc = subprocess.Popen([sys.executable, "-m", "locoswarm", "node", "join", "--state-dir", str(tmp_path / "n"),
                             "--listen", "/ip4/127.0.0.1/tcp/0", "--peer", nobody, "--log-format", "json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            if line.startswith("{"):
                lines.append(json.loads(line))
                break
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert proc.returncode == 0
    (first,) = lines
    assert set(first) == {"time", "level", "logger", "message"}
    assert first["logger"] == "locoswarm.node.host" and "cannot reach any of the initial peers" in first["message"]


def test_an_unknown_log_format_is_refused():
    out = subprocess.run([sys.executable, "-m", "locoswarm", "node", "join", "--log-format", "xml"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--log-format" in out.stderr


def test_config_show_names_the_file_given_by_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCOSWARM_CONFIG", write(tmp_path / "mine.toml", "fanout = 2\n"))
    out = CliRunner().invoke(app, ["config", "show"])
    assert out.exit_code == 0, out.output
    assert out.output.splitlines()[0] == f"# config file: {tmp_path / 'mine.toml'}"
