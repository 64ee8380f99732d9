"""`locoswarm demo` and `locoswarm bench swarm` end to end: real daemon processes on
loopback, driven through the CLI as a user would, each bounded in time."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run_cli(*args: str, timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "locoswarm", *args], capture_output=True, text=True,
                          timeout=timeout_s, env=ENV)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_demo_shows_the_swarm_and_the_lone_peer_losses_falling_round_by_round_and_both_finals():
    out = run_cli("demo", "--peers", "2", "--rounds", "4", "--threads", "1", timeout_s=200)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [(float(swarm), float(alone)) for swarm, alone in
            re.findall(r"^round +\d+ +eval loss (\S+) \| alone (\S+) ", out.stdout, re.M)]
    assert len(rows) == 4, out.stdout
    for curve in zip(*rows):
        assert curve[-1] < curve[0] - 0.3, rows
    assert "outer states are identical" in out.stdout, out.stdout
    final = re.search(r"^swarm eval loss (\d+\.\d+) vs alone (\d+\.\d+) \((\d+\.\d) % (lower|higher); "
                      r"each peer trained ([\d,]+) tokens\)$", out.stdout, re.M)
    assert final, out.stdout
    swarm, alone, percent, sign = float(final[1]), float(final[2]), float(final[3]), final[4]
    assert 0 < swarm < 10 and 0 < alone < 10
    assert abs((1 - swarm / alone) * 100 * (1 if sign == "lower" else -1) - percent) < 0.2
    assert int(final[5].replace(",", "")) == 4 * 2560  # the lone peer trained one swarm peer's tokens
    assert re.search(r"^dashboard of peer 0 \(while it runs\): http://127\.0\.0\.1:\d+/$", out.stdout, re.M)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_bench_swarm_writes_the_documented_json(tmp_path):
    path = tmp_path / "swarm.json"
    out = run_cli("bench", "swarm", "--peers", "2", "--rounds", "3", "--no-simulate", "--json", str(path),
                  timeout_s=200)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(path.read_text())
    for key in ("peers", "rounds", "eval_loss", "train_time_share", "bytes_per_peer_per_round", "tokens",
                "rounds_per_minute", "replica_spread", "consensus_equal"):
        assert key in result, key
    assert result["peers"] == 2 and result["rounds"] == 3
    assert 0 < result["train_time_share"] <= 1
    assert result["consensus_equal"] is True
    # Two peers trading ≈11 KB deltas plus DHT traffic: far from zero, far from megabytes.
    assert 10_000 < result["bytes_per_peer_per_round"] < 2_000_000
    assert result["transport_bytes_unavailable"] is None and result["transport_peers_counted"] == 2
    # The daemons' own count: each sent its delta a round and took the other's, below the transport's.
    assert 0 < result["delta_bytes_per_peer_per_round"] < result["app_bytes_per_peer_per_round"]
    assert result["app_bytes_per_peer_per_round"] < result["bytes_per_peer_per_round"]
    assert result["delta_bytes_received_per_peer_per_round"] > 0
    assert "sent by the daemons' code" in out.stdout and "sent over p2pd's TCP sockets" in out.stdout
    assert result["tokens"] >= 3 * 2 * 2560 * 0.5
    # What bench scale --validate takes: the control bytes and what the daemons' code wrote of them.
    assert 0 < result["progress_bytes_per_peer_per_round"] < result["control_bytes_per_peer_per_round"]
    assert result["progress_writes_per_peer_per_round"] <= result["progress_messages_per_peer_per_round"]
    assert result["delta_requests_per_peer_per_round"] >= 1  # the other peer's delta, once a round at least
    assert (result["inner_steps"], result["batch_size"], result["seq_len"]) == (5, 8, 64)  # the default spec's
    # The exchange's phases as the daemons timed them: each took time, together less than the run.
    phases = result["exchange_s_per_round"]
    assert set(phases) == {"send", "pull", "step"} and all(v > 0 for v in phases.values()), phases
    assert sum(phases.values()) < result["wall_s"], phases
    # Of the rest, the screening and checks; no rows in a full round; the other peer's delta
    # served at most a round after ours (one clock: both ran here).
    detail = result["exchange_detail_s_per_round"]
    assert 0 < detail["screen"] < phases["step"] and detail["rows"] == 0, detail
    assert 0 <= detail["last_delta_after_ours"] < result["wall_s"] / 3, detail
    assert detail["mean_total"] > 0, detail


def test_bench_swarm_refuses_bad_counts_without_starting_anything():
    out = run_cli("bench", "swarm", "--peers", "0", timeout_s=60)
    assert out.returncode == 2
    assert "--peers" in out.stderr


@pytest.mark.parametrize("value", ["-1", "often", ""])
def test_bench_swarm_refuses_a_bad_eval_interval_without_starting_anything(value):
    out = run_cli("bench", "swarm", "--peers", "2", "--eval-every", value, timeout_s=60)
    assert out.returncode == 2
    assert f"--eval-every must be auto or a count >= 0, got {value!r}" in out.stderr
