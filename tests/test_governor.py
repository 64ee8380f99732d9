"""The idle governor's decisions from recorded readings, and a live daemon that pauses
outside its allowed hours: reachable (status answers, says why), training nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from locoswarm.node.governor import Governor, IdlePolicy, Reading, in_hours, parse_hours


def reading(t: float, *, cpu: float = 5.0, battery: bool | None = False, gpu: tuple[str, ...] = (),
            hour: int = 12) -> Reading:
    return Reading(time_s=t, local_hour=hour, other_cpu_percent=cpu, on_battery=battery, gpu_processes=gpu)


def test_a_game_on_the_gpu_pauses_and_its_end_resumes_after_the_idle_minutes():
    g = Governor(IdlePolicy(resume_after_idle_min=5))
    assert g.decide(reading(0)) is None
    assert "another process uses the GPU (game.exe)" in g.decide(reading(10, gpu=("game.exe",)))
    assert "idle for 1.0 of the 5 minutes" in g.decide(reading(70))
    assert g.decide(reading(10 + 5 * 60)) is None


def test_busy_cpu_battery_and_hours_each_pause_with_their_reason():
    g = Governor(IdlePolicy(max_other_cpu_percent=50, allowed_hours="22-8"))
    assert "other processes use 80 % of the CPUs (limit 50 %)" in g.decide(reading(0, cpu=80, hour=23))
    assert g.decide(reading(1, cpu=20, hour=23)) is None
    assert g.decide(reading(2, battery=True, hour=3)) == "on battery"
    assert g.decide(reading(3, hour=12)) == "outside the allowed hours 22-8"
    assert g.decide(reading(4, battery=None, hour=7)) is None  # no battery: never "on battery"


def test_policies_that_are_off_never_pause():
    g = Governor(IdlePolicy(pause_on_gpu_use=False, pause_on_battery=False))
    assert g.decide(reading(0, cpu=100, battery=True, gpu=("game",))) is None


@pytest.mark.parametrize("text, hour, inside", [("22-8", 23, True), ("22-8", 7, True), ("22-8", 8, False),
                                                ("9-17", 9, True), ("9-17", 17, False), ("", 3, True)])
def test_hour_windows_wrap_midnight(text, hour, inside):
    assert in_hours(hour, parse_hours(text)) is inside


@pytest.mark.parametrize("text", ["22", "a-b", "25-3", "5-5"])
def test_a_bad_hour_window_is_named(text):
    with pytest.raises(ValueError, match="allowed_hours"):
        IdlePolicy(allowed_hours=text).validate()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_paused_daemon_stays_reachable_says_why_and_trains_nothing(tmp_path):
    hour = time.localtime().tm_hour
    closed = f"{(hour + 1) % 24}-{(hour + 2) % 24}"  # a window that excludes now
    state = tmp_path / "node"
    events = tmp_path / "events.jsonl"
    proc = subprocess.Popen([sys.executable, "-u", "-m", "locoswarm", "node", "join", "--listen",
                             "/ip4/127.0.0.1/tcp/0", "--state-dir", str(state), "--threads", "1",
                             "--allowed-hours", closed, "--events", str(events)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        from locoswarm.node.control import read_status

        deadline = time.monotonic() + 60
        while True:
            try:
                st = read_status(str(state))
                if st["state"] == "paused":
                    break
            except RuntimeError:
                pass
            assert time.monotonic() < deadline, "never paused"
            time.sleep(0.3)
        assert st["paused"] == f"outside the allowed hours {closed}"
        time.sleep(3)
        st = read_status(str(state))
        assert st["state"] == "paused" and st["rounds_completed"] == 0
        import jsonschema

        from locoswarm.node.control import STATUS_SCHEMA

        jsonschema.validate(st, STATUS_SCHEMA)  # a paused daemon's answer fits the documented schema
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    from locoswarm.node.events import read_events

    reported = [e["event"] for e in read_events(events)]
    assert "listening" in reported and "round" not in reported, reported
