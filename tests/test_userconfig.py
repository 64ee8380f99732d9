"""The daemon's settings: defaults < config file < LOCOSWARM_* environment < flags, each
value reporting its source; strict parsing that names the key and file (or variable) and
starts nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from locoswarm.cli.main import app
from locoswarm.node.userconfig import node_config, resolve


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_each_layer_overrides_the_one_before_and_says_so(tmp_path):
    cfg = write(tmp_path / "c.toml", 'device = "cpu"\nfanout = 4\nmax_rounds = 7\n')
    env = {"LOCOSWARM_FANOUT": "8", "LOCOSWARM_PEERS": "/ip4/127.0.0.1/tcp/1/p2p/QmA, /ip4/127.0.0.1/tcp/2/p2p/QmB"}
    values, sources = resolve({"max_rounds": 9, "shard": None}, config_path=cfg, env=env)
    assert values["device"] == "cpu" and sources["device"] == f"file {cfg}"
    assert values["fanout"] == 8 and sources["fanout"] == "env LOCOSWARM_FANOUT"
    assert values["max_rounds"] == 9 and sources["max_rounds"] == "flag --max-rounds"
    assert values["peers"] == ["/ip4/127.0.0.1/tcp/1/p2p/QmA", "/ip4/127.0.0.1/tcp/2/p2p/QmB"]
    assert values["min_peers"] == 1 and sources["min_peers"] == "default"
    built = node_config(values, initial_peers=["/ip4/10.0.0.1/tcp/3/p2p/QmC"])
    assert built.fanout == 8 and built.net.peers == values["peers"]  # given peers win over the spec's


def test_the_specs_initial_peers_are_used_when_none_are_given(tmp_path):
    values, _ = resolve({}, config_path=write(tmp_path / "c.toml", ""), env={})
    assert node_config(values, ["/ip4/10.0.0.1/tcp/3/p2p/QmC"]).net.peers == ["/ip4/10.0.0.1/tcp/3/p2p/QmC"]


@pytest.mark.parametrize("body, message", [
    ("bogus = 1\n", "unknown key 'bogus'"),
    ('fanout = "many"\n', "fanout must be an integer"),
    ("auto_relay = 1\n", "auto_relay must be true or false"),
    ("listen = [1, 2]\n", "listen must be a list of strings"),
    ("device = \n", "not valid TOML"),
])
def test_a_bad_config_file_names_the_key_and_the_file(tmp_path, body, message):
    cfg = write(tmp_path / "bad.toml", body)
    with pytest.raises(ValueError) as e:
        resolve({}, config_path=cfg, env={})
    assert message in str(e.value) and cfg in str(e.value)


def test_a_bad_environment_variable_is_named():
    with pytest.raises(ValueError, match="LOCOSWARM_MAX_ROUNDS='ten'"):
        resolve({}, config_path=None, env={"LOCOSWARM_MAX_ROUNDS": "ten", "LOCOSWARM_CONFIG": os.devnull})


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
    assert shown["threads"] == {"value": 2, "source": f"file {tmp_path / 'locoswarm' / 'config.toml'}"}
    assert shown["device"] == {"value": "cpu", "source": "env LOCOSWARM_DEVICE"}


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
