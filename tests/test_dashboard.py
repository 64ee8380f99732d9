"""The dashboard page of a live daemon, rendered by headless Chromium (Debian's `chromium`
package): its loss chart holds data points and the page shows the daemon's state. The
screenshot is kept as a test artifact (printed path; copied to $LOCOSWARM_TEST_ARTIFACTS
when set)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from locoswarm.node.events import EventTail

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (apt-get install chromium)")
def test_the_dashboard_of_a_live_daemon_shows_a_loss_chart_with_data_points(tmp_path):
    state = tmp_path / "node"
    events = tmp_path / "events.jsonl"
    daemon = subprocess.Popen([sys.executable, "-u", "-m", "locoswarm", "node", "join", "--listen",
                               "/ip4/127.0.0.1/tcp/0", "--state-dir", str(state), "--threads", "1",
                               "--events", str(events)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        EventTail(events).wait_for(lambda e: e["event"] == "round" and e["round"] >= 3, 150,
                                   lambda: daemon.poll() is None)
        port = json.loads((state / "control.json").read_text())["port"]
        url = f"http://127.0.0.1:{port}/"
        common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=900,800",
                  "--virtual-time-budget=4000", f"--user-data-dir={tmp_path / 'chrome'}"]
        dom = subprocess.run(common + ["--dump-dom", url], capture_output=True, text=True, timeout=90).stdout
        shot = tmp_path / "dashboard.png"
        subprocess.run(common + [f"--screenshot={shot}", url], capture_output=True, timeout=90)
    finally:
        daemon.terminate()
        daemon.communicate(timeout=30)
    points = re.findall(r'<circle class="(train|eval) point"', dom)
    assert points.count("train") >= 3 and points.count("eval") >= 3, dom[-3000:]
    assert re.search(r'<span id="state">(training|exchanging|waiting)</span>', dom), dom[:2000]
    assert shot.exists() and shot.stat().st_size > 10_000
    artifacts = os.environ.get("LOCOSWARM_TEST_ARTIFACTS")
    if artifacts:
        os.makedirs(artifacts, exist_ok=True)
        shutil.copy(shot, os.path.join(artifacts, "dashboard.png"))
    print(f"dashboard screenshot: {shot}")
