"""`node join` checks every setting before anything starts (issue 21): a bad value, wherever
it was set, is one line naming the flag (or variable, or config key) and the value, exit 2,
with no state directory made and no p2pd started."""

from __future__ import annotations

import os
import socket

import pytest
from typer.testing import CliRunner

from locoswarm.cli.main import app
from locoswarm.node.checks import SettingError, bind_problem, check_bind, check_peer
from locoswarm.node.spec import RunSpec, write_spec

PEER = "/ip4/127.0.0.1/tcp/31337/p2p/QmTTdAbwF3hD2zzTUgSV9Mj2jvqNxt8w2p3v1xX3xVrTqE"


@pytest.fixture
def join(monkeypatch, tmp_path):
    """Runs `node join --state-dir <tmp>/state ARGS` in this process; reaching the daemon is
    recorded (it would create the state directory and start p2pd). No user config file and
    no LOCOSWARM_* variable but those a test sets."""
    import locoswarm.node.daemon as daemon

    for var in [v for v in os.environ if v.startswith("LOCOSWARM_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("LOCOSWARM_CONFIG", os.devnull)
    started = []
    monkeypatch.setattr(daemon, "run_daemon", lambda spec, cfg, **_: started.append(cfg) or 0)
    state = tmp_path / "state"

    def run(*args: str):
        out = CliRunner().invoke(app, ["node", "join", "--state-dir", str(state), "--device", "cpu", *args])
        return out, bool(started), state.exists()

    return run


def refused(result) -> str:
    """The one line a refused start prints; asserts exit 2, one line, nothing started."""
    out, started, state_made = result
    assert out.exit_code == 2, out.output
    assert not started and not state_made
    lines = out.output.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(("args", "line"), [
    (["--micro-batch", "3"], "error: --micro-batch 3: must divide the run's batch of 8 sequences per peer"),
    (["--shard", "99"], "error: --shard 99: the run has 16 shards, 0..15"),
    (["--shard", "-1"], "error: --shard -1: must be >= 0"),
    (["--device", "cudafoo"], "error: --device cudafoo: must be auto, cpu, mps, cuda or cuda:<index>"),
    (["--precision", "fp8"], "error: --precision fp8: must be one of auto, bf16, fp16, fp32"),
    (["--min-peers", "0"], "error: --min-peers 0: must be >= 1"),
    (["--max-rounds", "-1"], "error: --max-rounds -1: must be >= 0"),
    (["--until-round", "-5"], "error: --until-round -5: must be >= 0"),
    (["--threads", "-2"], "error: --threads -2: must be >= 0"),
    (["--eval-every", "-1"], "error: --eval-every -1: must be >= 0"),
    (["--checkpoint-every", "-1"], "error: --checkpoint-every -1: must be >= 0"),
    (["--checkpoint-keep", "0"], "error: --checkpoint-keep 0: must be >= 1"),
    (["--fanout", "0"], "error: --fanout 0: must be >= 1"),
    (["--max-gpu-memory-percent", "101"], "error: --max-gpu-memory-percent 101: must lie in [0, 100]"),
    (["--max-other-cpu-percent", "-3"], "error: --max-other-cpu-percent -3: must lie in [0, 100]"),
    (["--state-upload-mbit", "nan"], "error: --state-upload-mbit nan: must lie in [0, 1,000,000]"),
    (["--resume-after-idle-min", "-1"], "error: --resume-after-idle-min -1: must be >= 0"),
    (["--allowed-hours", "25-3"], "error: --allowed-hours 25-3: must be two local hours in 0..24 that differ"),
    (["--peer", "/ip4/10.0.0.1/tcp/1234"], "error: --peer /ip4/10.0.0.1/tcp/1234: names no peer"),
    (["--peer", "10.0.0.1:1234"], "error: --peer 10.0.0.1:1234: not a multiaddr"),
    (["--peer", "/ip4/10.0.0.1/tcp/1/p2p/QmXyz"],
     "error: --peer /ip4/10.0.0.1/tcp/1/p2p/QmXyz: 'QmXyz' is not a peer id"),
    (["--peer", "/ip4/10.0.0/tcp/1/p2p/QmXyz"], "error: --peer /ip4/10.0.0/tcp/1/p2p/QmXyz: not a valid multiaddr"),
    (["--peer", PEER, "--peer", "/ip4/10.0.0.1/tcp/70000"], "error: --peer /ip4/10.0.0.1/tcp/70000: tcp port 70000 "
                                                           "is not in 0..65535"),
    (["--listen", "/ip4/0.0.0.0/tcp/99999"], "error: --listen /ip4/0.0.0.0/tcp/99999: tcp port 99999 is not in"),
    (["--listen", PEER], f"error: --listen {PEER}: a listen address names no peer"),
    (["--listen", "/dns4/example.com/tcp/1"], "error: --listen /dns4/example.com/tcp/1: must be an IP address"),
    (["--listen", "/ip4/192.0.2.1/tcp/0"], "error: --listen /ip4/192.0.2.1/tcp/0: 192.0.2.1 is not an address of "
                                           "this machine"),
    (["--listen", "/ip4/0.0.0.0/udp/0"], "error: --listen /ip4/0.0.0.0/udp/0: must be an IP address"),
    (["--listen", "/ip4/0.0.0.0/udp/0/quic"], "error: --listen /ip4/0.0.0.0/udp/0/quic: must be an IP address"),
    (["--listen", "/ip4/0.0.0.0/tcp/0/p2p-circuit"], "error: --listen /ip4/0.0.0.0/tcp/0/p2p-circuit: must be an IP"),
    (["--announce", "public"], "error: --announce public: not a multiaddr"),
])
def test_a_bad_flag_is_one_line_naming_flag_and_value_and_nothing_starts(join, args, line):
    assert refused(join(*args)).startswith(line)


def test_a_state_dir_that_is_a_file_is_refused_naming_it(join, tmp_path):
    plain = tmp_path / "file"
    plain.write_text("x")
    assert refused(join("--state-dir", str(plain))) == f"error: --state-dir {plain}: exists and is not a folder"


def test_a_bad_value_from_the_environment_names_the_variable(join, monkeypatch):
    monkeypatch.setenv("LOCOSWARM_MICRO_BATCH", "3")
    assert refused(join()).startswith("error: LOCOSWARM_MICRO_BATCH=3: must divide the run's batch of 8")


def test_a_bad_value_from_the_config_file_names_the_file_and_key(join, monkeypatch, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('peers = ["/ip4/10.0.0.1/tcp/1234"]\n')
    monkeypatch.setenv("LOCOSWARM_CONFIG", str(config))
    assert refused(join()).startswith(f'error: {config}: peers = "/ip4/10.0.0.1/tcp/1234": names no peer')


def test_a_bad_initial_peer_of_the_run_spec_names_the_spec(join, tmp_path):
    spec = tmp_path / "run.toml"
    write_spec(RunSpec(initial_peers=["/ip4/10.0.0.1/tcp/1234"]), str(spec))
    assert refused(join("--run", str(spec))).startswith(f"error: {spec}: initial_peers /ip4/10.0.0.1/tcp/1234: names "
                                                        "no peer")


def test_micro_batch_is_checked_against_the_runs_own_batch(join, tmp_path):
    spec = tmp_path / "run.toml"
    write_spec(RunSpec(batch_size=6), str(spec))
    assert refused(join("--run", str(spec), "--micro-batch", "4")).startswith(
        "error: --micro-batch 4: must divide the run's batch of 6 sequences per peer (the spec's batch_size): "
        "one of 1, 2, 3, 6")
    out, started, _ = join("--run", str(spec), "--micro-batch", "3")
    assert out.exit_code == 0 and started, out.output


def test_a_port_held_by_a_reuseport_listener_is_refused(join):
    """go-libp2p listens with SO_REUSEPORT, so a second p2pd could bind the same port and share
    it; the check binds without it, so such a holder is found before anything starts."""
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        for host in ("127.0.0.1", "0.0.0.0"):  # the wildcard overlaps the held address too
            line = refused(join("--listen", f"/ip4/{host}/tcp/{port}"))
            assert line == (f"error: --listen /ip4/{host}/tcp/{port}: port {port} is in use (another locoswarm peer "
                            "or libp2p program?)")
    assert bind_problem(f"/ip4/127.0.0.1/tcp/{port}") is None, "the port is free once the holder closed it"


def test_a_port_held_by_a_udp_socket_is_refused_for_quic():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        with pytest.raises(SettingError, match=f"port {port} is in use"):
            check_bind("listen", f"/ip4/127.0.0.1/udp/{port}/quic-v1")


@pytest.mark.parametrize("maddr", [
    PEER, PEER.replace("/ip4/127.0.0.1/", "/dns4/boot.example.org/"),
    PEER.replace("/ip4/127.0.0.1/tcp/", "/ip6/::1/udp/").replace("/p2p/", "/quic-v1/p2p/")])
def test_a_whole_peer_address_passes(maddr):
    check_peer("peers", maddr)


def test_good_settings_reach_the_daemon(join):
    out, started, _ = join("--listen", "/ip4/127.0.0.1/tcp/0", "--listen", "/ip4/127.0.0.1/udp/0/quic-v1",
                           "--peer", PEER, "--micro-batch", "4", "--shard", "15")
    assert out.exit_code == 0 and started, out.output


def test_max_rounds_help_says_it_counts_this_processs_rounds_and_points_to_until_round():
    from locoswarm.node.config import BY_NAME

    text = BY_NAME["max_rounds"].help
    assert "this process" in text and "restart" in text and "--until-round" in text
    out = CliRunner().invoke(app, ["node", "join", "--help"])
    assert out.exit_code == 0 and "--max-rounds" in out.output


def test_doctor_reads_the_settings_without_refusing_a_port_the_daemon_holds(monkeypatch):
    """node_config (what `doctor` uses) checks the values but not the machine: a volunteer runs
    doctor beside the daemon, which holds the listen port."""
    from locoswarm.node.userconfig import node_config, resolve

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        listen = f"/ip4/127.0.0.1/tcp/{held.getsockname()[1]}"
        values, _ = resolve({"listen": [listen]}, config_path=os.devnull, env={})
        cfg = node_config(values, [])
        assert cfg.net.listen == [listen]
        with pytest.raises(SettingError, match="is in use"):
            cfg.check_listen_ports()
