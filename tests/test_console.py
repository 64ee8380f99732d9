"""The round bar: drawn on a terminal (a real pseudo-terminal around a real daemon), absent
when output goes to a pipe, where the plain round lines are all there is."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest

from locoswarm.node.console import RoundBar


def test_the_bar_draws_the_rounds_tokens_on_a_terminal_console():
    from rich.console import Console

    out = io.StringIO()
    bar = RoundBar(Console(file=out, force_terminal=True, width=100))
    bar.start()
    bar.update(3, 1500.0, 4096, 2, "training")
    bar._bar.refresh()
    bar.stop()
    text = out.getvalue()
    assert "round 3 · 2 peers · training" in text and "1,500/4,096 tokens" in text


def test_no_bar_when_stderr_is_not_a_terminal():
    bar = RoundBar()  # pytest captures stderr: not a terminal
    bar.start()
    bar.update(0, 1.0, 2, 1, "training")
    assert bar.enabled is False and bar._bar is None


@pytest.mark.timeout(120)
def test_a_daemon_on_a_terminal_draws_the_bar_and_still_prints_its_round_lines(tmp_path):
    master, slave = pty.openpty()
    argv = [sys.executable, "-u", "-m", "locoswarm", "node", "join", "--listen", "/ip4/127.0.0.1/tcp/0",
            "--state-dir", str(tmp_path / "node"), "--threads", "1", "--max-rounds", "3", "--eval-every", "0",
            "--checkpoint-every", "0"]
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"})
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 100
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the daemon closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r", "\n")
    assert proc.returncode == 0, plain[-2000:]
    assert re.search(r"round 1 · 1 peer · training", plain), plain[-2000:]
    assert re.search(r"[\d,]+/[\d,]+ tokens", plain)
    assert len(re.findall(r"^round \d+ deltas ", plain, re.M)) == 3
