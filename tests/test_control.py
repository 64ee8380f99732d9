"""The control API on 127.0.0.1: /status JSON (what `node status` reads, via control.json),
/metrics in Prometheus text format, 404 for anything else, and a clear error when no daemon
owns the state directory."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from locoswarm.node.control import ControlServer, read_status

STATUS = {"state": "training", "round": 3, "loss": 2.5, "eval_loss": None, "num_peers": 2, "peers_estimate": 3.0, "peers_found_gone": 1, "bytes_sent": 1234,
          "bytes_received": 5678, "peer_id": "QmX", "addrs": [], "transport": "p2pd", "device": "cpu", "tokens_per_s": 900.0,
          "rounds_completed": 3, "rounds_discarded": 0, "shard": 1, "deltas_rejected": 4, "checkpoint_round": None,
          "checkpoint_error": None, "paused": None, "precision": "fp32", "micro_batch": 8,
          "requests_refused": 0, "established_peers": 2, "earned_rounds": 9.5,
          "checks": 6, "checks_failed": 1, "least_agreement": 0.04, "excluded_peers": 1,
          "dialling_since": None, "dial_attempts": 0, "last_round_at": 1796537976.5,
          "warnings": ["06:20:36 round 2: no delta from QmY: timed out"]}


async def _get(port: int, path: str) -> tuple[str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
    await writer.drain()
    raw = (await reader.read()).decode()
    writer.close()
    head, _, body = raw.partition("\r\n\r\n")
    return head.split("\r\n")[0], body


def test_status_metrics_and_not_found_are_served_on_loopback(tmp_path):
    async def go():
        server = ControlServer(str(tmp_path), lambda: STATUS)
        port = await server.start()
        try:
            status = await _get(port, "/status")
            metrics = await _get(port, "/metrics")
            missing = await _get(port, "/admin")
            read = await asyncio.to_thread(read_status, str(tmp_path))
        finally:
            await server.stop()
        return status, metrics, missing, read

    status, metrics, missing, read = asyncio.run(go())
    assert status[0].endswith("200 OK") and json.loads(status[1]) == STATUS == read
    assert metrics[0].endswith("200 OK")
    lines = set(metrics[1].splitlines())
    assert {"locoswarm_round 3.0", "locoswarm_peers 2.0", "locoswarm_bytes_sent_total 1234.0",
            "locoswarm_deltas_rejected_total 4.0", 'locoswarm_state{state="training"} 1.0'} <= lines
    assert not any(line.startswith("locoswarm_eval_loss ") for line in lines)  # unknown yet: not exported
    assert missing[0].endswith("404 Not Found")
    assert not (tmp_path / "control.json").exists()  # removed on stop


def test_the_dashboard_page_and_its_history_are_served(tmp_path):
    history = {"rounds": [{"round": 0, "loss": 5.1, "eval_loss": 4.9, "deltas": 3, "tokens": 2560}],
               "peers": [{"peer_id": "QmPeer", "device": "cuda", "tokens_per_s": 1e4, "round": 1, "paused": False}]}

    async def go():
        server = ControlServer(str(tmp_path), lambda: STATUS, lambda: history)
        port = await server.start()
        try:
            return await _get(port, "/"), await _get(port, "/history")
        finally:
            await server.stop()

    page, hist = asyncio.run(go())
    assert page[0].endswith("200 OK")
    assert '<svg id="by-tokens"' in page[1] and 'fetch("/history")' in page[1] and 'fetch("/status")' in page[1]
    assert json.loads(hist[1]) == history


def test_status_without_a_daemon_says_so(tmp_path):
    with pytest.raises(RuntimeError, match="no daemon is running"):
        read_status(str(tmp_path))


def test_status_tells_a_held_state_dir_not_answering_yet_from_one_no_daemon_runs_on(tmp_path):
    """A daemon holds its state directory's lock from its first moment; before its control
    API answers (or after a SIGKILL left control.json behind) `node status` says which."""
    from locoswarm.node.statedir import lock_state_dir

    fd = lock_state_dir(str(tmp_path))
    try:
        with pytest.raises(RuntimeError, match=rf"a daemon \(pid {os.getpid()}\) holds state directory .* not "
                                               "answering yet"):
            read_status(str(tmp_path))
    finally:
        os.close(fd)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "lock").write_text(gone.stdout.strip())  # the pid of a process that ended
    with pytest.raises(RuntimeError, match="no daemon is running"):
        read_status(str(tmp_path))
    (tmp_path / "control.json").write_text(json.dumps({"port": 9, "pid": int(gone.stdout)}))  # left by a SIGKILL
    with pytest.raises(RuntimeError, match=rf"no daemon is running .*pid {gone.stdout.strip()}, which wrote"):
        read_status(str(tmp_path))


def test_text_status_shows_what_the_json_tells_a_volunteer(tmp_path):
    """Plain `node status` prints why training is paused, a checkpoint error, the dialling
    of the initial peers, the last round's time and the warnings: once only --json did."""
    from typer.testing import CliRunner

    from locoswarm.cli.main import app

    status = {**STATUS, "state": "dialling", "paused": "the owner is gaming (gpu busy)",
              "checkpoint_error": "No space left on device", "checkpoint_round": 40,
              "dialling_since": 1796537000.0, "dial_attempts": 3, "peer_id": None}

    async def go():
        server = ControlServer(str(tmp_path), lambda: status)
        await server.start()
        try:
            return await asyncio.to_thread(CliRunner().invoke, app, ["node", "status", "--state-dir", str(tmp_path)])
        finally:
            await server.stop()

    out = asyncio.run(go())
    assert out.exit_code == 0, out.output
    text = out.output
    for shown in ("dialling: round 3", "paused: the owner is gaming (gpu busy)",
                  "checkpoint error: No space left on device (the last written is of round 40)",
                  "dialling the initial peers since", "3 attempts", "rounds: 3 completed, 0 discarded, the last ended",
                  "warning: 06:20:36 round 2: no delta from QmY: timed out", "peer — (not listening yet)", "on p2pd",
                  "4 deltas rejected", "1 failed"):
        assert shown in text, (shown, text)


def test_the_status_schema_is_printed_and_refuses_what_it_should():
    import jsonschema

    from locoswarm.node.control import STATUS_SCHEMA

    out = subprocess.run([sys.executable, "-m", "locoswarm", "node", "status", "--schema"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and json.loads(out.stdout) == STATUS_SCHEMA
    jsonschema.Draft202012Validator.check_schema(STATUS_SCHEMA)
    good = dict(STATUS)
    jsonschema.validate(good, STATUS_SCHEMA)
    for bad in ({k: v for k, v in good.items() if k != "round"}, {**good, "state": "dancing"},
                {**good, "bytes_sent": -1}, {**good, "surprise": 1}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, STATUS_SCHEMA)


def test_node_status_answers_from_a_live_daemon_without_importing_torch_or_hivemind(tmp_path):
    """`node status` is the Docker healthcheck: it reads settings and asks the control API,
    and importing hivemind (torch with it) made every call take 2.3 s on 2 CPU cores."""
    code = (
        "import sys, runpy; sys.argv = ['locoswarm'] + sys.argv[1:]\n"
        "try:\n    runpy.run_module('locoswarm', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "heavy = {m for m in sys.modules if m == 'torch' or m.startswith('hivemind.')}\n"
        "if 'hivemind' in sys.modules and '__getattr__' not in vars(sys.modules['hivemind']):\n"
        "    heavy.add('hivemind')  # its __init__ ran (node/_hivemind.py defers it)\n"
        "assert not heavy, f'imported {sorted(heavy)}'\n"
    )

    async def go():
        server = ControlServer(str(tmp_path), lambda: STATUS)
        await server.start()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", code, "node", "status", "--state-dir", str(tmp_path), "--json",
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            await server.stop()
        return proc.returncode, out.decode(), err.decode()

    code_, out, err = asyncio.run(go())
    assert code_ == 0, err
    assert json.loads(out) == STATUS
