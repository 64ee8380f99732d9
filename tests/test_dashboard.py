"""The dashboard: what feeds it (node/dashboard.py: each peer's contribution, a lone-peer
baseline read from its events file) and the page itself rendered by headless Chromium
(Debian's `chromium` package), once on a control server answering a realistic history and
once on a live daemon. Screenshots are kept under the test's tmp dir (path printed; copied
to $LOCOSWARM_TEST_ARTIFACTS when set)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from locoswarm.node.control import ControlServer
from locoswarm.node.dashboard import Baseline, Contributions
from locoswarm.node.events import EventSink, EventTail, Final, Listening, RoundEnded

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (apt-get install "
                                    "chromium); no chromium binary found")


def test_contributions_count_each_peers_accepted_refused_and_missing_deltas():
    c = Contributions()
    c.round(0, accepted={"A": 2560, "B": 2560}, refused={"C"}, missing={"C", "D"})
    c.round(1, accepted={"A": 2560, "C": 1000}, refused=set(), missing={"B"})
    rows = {r["peer_id"]: r for r in c.rows(own="A")}
    assert rows["A"] == {"peer_id": "A", "self": True, "tokens": 5120, "accepted": 2, "refused": 0, "missing": 0,
                         "last_round": 1}
    assert (rows["B"]["accepted"], rows["B"]["missing"], rows["B"]["last_round"]) == (1, 1, 1)
    # A refused delta is not also counted missing, though the pull lists it among the failed.
    assert (rows["C"]["accepted"], rows["C"]["refused"], rows["C"]["missing"], rows["C"]["tokens"]) == (1, 1, 0, 1000)
    assert (rows["D"]["missing"], rows["D"]["self"]) == (1, False)
    assert [r["peer_id"] for r in c.rows(own="A")][:2] == ["A", "B"]  # most tokens first


def test_contributions_keep_at_most_max_peers_dropping_the_one_seen_longest_ago():
    c = Contributions(max_peers=3)
    for r, peer in enumerate("ABCD"):
        c.round(r, accepted={peer: 1}, refused=set(), missing=set())
    assert sorted(c.by_peer) == ["B", "C", "D"]


def _round(r: int, eval_loss: float | None, tokens: int = 2560) -> RoundEnded:
    return RoundEnded(round=r, deltas=1, participants=1, tokens=tokens, loss=eval_loss, eval_loss=eval_loss,
                      train_s=1.0, round_s=1.2, wait_s=0.1, boundary_s=0.05, sent=0, received=0)


def test_the_baseline_is_read_from_a_growing_events_file_round_by_round(tmp_path):
    path = tmp_path / "alone.events.jsonl"
    baseline = Baseline(str(path))
    assert baseline.read()["rounds"] == []  # not written yet: nothing, no error
    sink = EventSink.open(lambda line: None, str(path))
    sink(Listening("QmAlone", ("/ip4/127.0.0.1/tcp/1",)))
    sink(_round(0, 5.0))
    sink(_round(1, None))  # not evaluated this round
    first = baseline.read()
    assert [(r["round"], r["eval_loss"], r["tokens_total"]) for r in first["rounds"]] == [(0, 5.0, 2560),
                                                                                         (1, None, 5120)]
    assert first["started_unix_s"] is not None and first["error"] is None and first["final_eval_loss"] is None
    sink(_round(2, 4.5))
    sink(Final(round=3, eval_loss=4.4, digest="d"))
    sink.close()
    later = baseline.read()
    assert [r["round"] for r in later["rounds"]] == [0, 1, 2] and later["rounds"][2]["tokens_total"] == 7680
    assert later["final_eval_loss"] == 4.4


def test_a_baseline_file_that_is_not_an_events_file_is_reported_not_raised(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello\n")
    got = Baseline(str(path)).read()
    assert got["rounds"] == [] and "not JSON" in got["error"]


# ---------------------------------------------------------------- the page in a browser

STATUS = {"state": "training", "round": 30, "loss": 2.9, "eval_loss": 2.75, "num_peers": 2, "peers_estimate": 3.0, "peers_found_gone": 1,
          "bytes_sent": 412_000, "bytes_received": 830_000, "peer_id": "12D3KooWDemoPeerAAAA", "addrs": [], "transport": "libp2p",
          "device": "cpu", "tokens_per_s": 2100.0, "rounds_completed": 30, "rounds_discarded": 0, "shard": 0,
          "deltas_rejected": 1, "checkpoint_round": 30, "checkpoint_error": None, "paused": None,
          "precision": "fp32", "micro_batch": 8, "requests_refused": 0, "established_peers": 3, "earned_rounds": 30.0,
          "checks": 58, "checks_failed": 0, "least_agreement": 0.41, "excluded_peers": 0}


def realistic_history(*, baseline: bool) -> dict:
    """30 rounds of a 3-peer swarm as a daemon reports them, and a lone peer that learns slower."""
    start, rounds, alone, total = 1_700_000_000.0, [], [], 0
    for r in range(30):
        total += 2560
        swarm_loss, alone_loss = 2.7 + 2.8 * 0.88 ** r, 3.0 + 2.5 * 0.91 ** r
        rounds.append({"round": r, "loss": swarm_loss + 0.1, "eval_loss": swarm_loss, "deltas": 3, "participants": 3,
                       "tokens": 2560, "tokens_total": total, "time": start + 1.6 * (r + 1), "train_s": 1.2,
                       "wait_s": 0.2 if r % 5 else 0.6, "boundary_s": 0.05, "round_s": 1.6 if r % 5 else 2.0})
        alone.append({"round": r, "loss": alone_loss, "eval_loss": alone_loss, "tokens": 2560, "tokens_total": total,
                      "time": start + 1.3 * (r + 1)})
    contributions = [{"peer_id": p, "self": p == STATUS["peer_id"], "tokens": 76_800 - 2560 * i, "accepted": 30 - i,
                      "refused": i // 2, "missing": i, "last_round": 29}
                     for i, p in enumerate([STATUS["peer_id"], "12D3KooWDemoPeerBBBB", "12D3KooWDemoPeerCCCC"])]
    return {"rounds": rounds, "started_unix_s": start,
            "peers": [{"peer_id": p, "device": "cpu", "tokens_per_s": 2000.0, "round": 30, "paused": False}
                      for p in ("12D3KooWDemoPeerBBBB", "12D3KooWDemoPeerCCCC")],
            "contributions": contributions,
            "baseline": {"path": "/tmp/alone.events.jsonl", "rounds": alone, "started_unix_s": start,
                         "final_eval_loss": None, "error": None} if baseline else None}


def render(url: str, tmp_path, name: str, timeout_s: float = 60.0) -> tuple[str, str]:
    """The page's DOM after its scripts ran, and the path of a screenshot of it, from headless
    Chromium; each browser runs in its own process group, killed whole when it is done."""
    shot = str(tmp_path / f"{name}.png")
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--window-size=1280,1300", "--virtual-time-budget=5000", "--hide-scrollbars"]
    outputs = []
    for i, action in enumerate(["--dump-dom", f"--screenshot={shot}"]):
        proc = subprocess.Popen(common + [f"--user-data-dir={tmp_path / f'chrome-{name}-{i}'}", action, url],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        try:
            outputs.append(proc.communicate(timeout=timeout_s)[0])
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its zygote and renderers too
            except ProcessLookupError:
                pass
            proc.wait()
    print(f"dashboard screenshot: {shot}")
    artifacts = os.environ.get("LOCOSWARM_TEST_ARTIFACTS")
    if artifacts:
        os.makedirs(artifacts, exist_ok=True)
        shutil.copy(shot, os.path.join(artifacts, f"{name}.png"))
    return outputs[0], shot


class ServedControl:
    """A ControlServer on its own event loop thread, answering `status` and `history`."""

    def __init__(self, state_dir: str, status: dict, history: dict) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = ControlServer(state_dir, lambda: status, lambda: history)
        self.port = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def svg(dom: str, svg_id: str) -> str:
    m = re.search(rf'<svg id="{svg_id}".*?</svg>', dom, re.S)
    assert m, f"no svg {svg_id} in the page: {dom[-2000:]}"
    return m.group(0)


@needs_chromium
@pytest.mark.timeout(150)
@pytest.mark.parametrize("with_baseline", [True, False], ids=["baseline", "no-baseline"])
def test_the_page_draws_labelled_loss_charts_the_baseline_when_known_contributions_and_round_time(
        tmp_path, with_baseline):
    served = ServedControl(str(tmp_path), STATUS, realistic_history(baseline=with_baseline))
    try:
        name = "dashboard-with-baseline" if with_baseline else "dashboard-without-baseline"
        dom, shot = render(f"http://127.0.0.1:{served.port}/", tmp_path, name)
    finally:
        served.close()
    tokens, time_chart, split = svg(dom, "by-tokens"), svg(dom, "by-time"), svg(dom, "round-time")
    for chart, xlabel in ((tokens, "tokens trained by this peer"), (time_chart, "seconds since start")):
        assert re.search(rf'class="axis-label x-label"[^>]*>{xlabel}</text>', chart), chart[:600]
        assert re.search(r'class="axis-label y-label"[^>]*>loss</text>', chart)
        assert len(re.findall(r'class="tick"', chart)) >= 6  # numbered ticks on both axes
        assert len(re.findall(r'<circle class="eval point"', chart)) == 30
        assert ('<path class="series baseline"' in chart) == with_baseline
        assert len(re.findall(r'<circle class="baseline point"', chart)) == (30 if with_baseline else 0)
    assert '>round</text>' in split and '>seconds</text>' in split
    for part in ("k-train", "k-wait", "k-boundary"):
        assert len(re.findall(rf'<rect class="bar {part}"', split)) == 30, part
    assert "training 71 %, waiting for the exchange 17 %" in dom  # of 50.4 s: 36 s training, 8.4 s waiting
    rows = re.findall(r"<tr class=\"(self|)\"><td>([^<]*)</td>", dom)
    assert len(rows) == 3 and rows[0] == ("self", "DemoPeerAAAA (this peer)"), rows
    verdict = re.search(r'<p id="verdict">([^<]*)</p>', dom).group(1)
    if with_baseline:
        swarm, alone = 2.7 + 2.8 * 0.88 ** 29, 3.0 + 2.5 * 0.91 ** 29
        assert f"eval loss {swarm:.4f} with the swarm vs {alone:.4f} alone" in verdict, verdict
        assert f"({100 * (1 - swarm / alone):.1f} % lower)" in verdict
    else:
        assert "no lone-peer baseline given" in verdict, verdict
    assert os.path.getsize(shot) > 20_000


@pytest.mark.slow
@pytest.mark.timeout(200)
@needs_chromium
def test_the_dashboard_of_a_live_daemon_shows_its_rounds_its_contribution_and_the_baseline(tmp_path):
    state = tmp_path / "node"
    events, alone = tmp_path / "events.jsonl", tmp_path / "alone.events.jsonl"
    sink = EventSink.open(lambda line: None, str(alone))
    for r in range(40):
        sink(_round(r, 5.5 - 0.02 * r))
    sink.close()
    daemon = subprocess.Popen([sys.executable, "-u", "-m", "locoswarm", "node", "join", "--listen",
                               "/ip4/127.0.0.1/tcp/0", "--state-dir", str(state), "--threads", "1",
                               "--events", str(events), "--baseline", str(alone)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        EventTail(events).wait_for(lambda e: e["event"] == "round" and e["round"] >= 3, 150,
                                   lambda: daemon.poll() is None)
        port = json.loads((state / "control.json").read_text())["port"]
        dom, shot = render(f"http://127.0.0.1:{port}/", tmp_path, "dashboard-live")
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=30)
        finally:
            try:
                os.killpg(daemon.pid, signal.SIGKILL)  # its p2pd too
            except ProcessLookupError:
                pass
    tokens = svg(dom, "by-tokens")
    assert len(re.findall(r'<circle class="eval point"', tokens)) >= 3
    assert len(re.findall(r'<circle class="baseline point"', tokens)) == 40
    assert re.search(r'class="axis-label x-label"[^>]*>tokens trained by this peer</text>', tokens)
    assert len(re.findall(r'<rect class="bar k-train"', svg(dom, "round-time"))) >= 3
    # A swarm of one: its own deltas are all it took.
    assert re.search(r'<tr class="self"><td>[^<]* \(this peer\)</td><td class="n">[\d.]+k?</td>'
                     r'<td class="n">([3-9]|\d\d+)</td>', dom), dom[-3000:]
    assert re.search(r'<span id="state">(training|exchanging|waiting)</span>', dom), dom[:2000]
    assert os.path.getsize(shot) > 20_000
