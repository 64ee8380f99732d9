"""The idle governor's decisions from recorded readings; which GPU it watches (a fake NVML:
only the one the peer trains on, matched by UUID or PCI bus, never by index) and whose use
it ignores (the machine's other peers); and a live daemon that pauses outside its allowed
hours: reachable (status answers, says why), training nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from locoswarm.node.governor import (Governor, IdlePolicy, IdleWatch, Reading, in_hours, parse_hours,
                                     peer_processes, read_machine)
from locoswarm.node.gpuwatch import GpuWatch
from locoswarm.node.hardware import GpuId
from locoswarm.node.localpeers import PeerListing, local_peer_pids


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


class FakeNvml:
    """NVML's calls the governor makes, over a list of GPUs (uuid, bus id, pids on it)."""

    def __init__(self, gpus: list[tuple[str, str, list[int]]]) -> None:
        self.gpus = gpus
        self.calls = 0

    def nvmlInit(self):
        self.calls += 1

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUUID(self, h):
        return self.gpus[h][0].encode()  # older bindings answer bytes

    def nvmlDeviceGetPciInfo(self, h):
        return SimpleNamespace(busId=self.gpus[h][1])

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [SimpleNamespace(pid=pid) for pid in self.gpus[h][2]]

    def nvmlDeviceGetGraphicsRunningProcesses(self, h):
        return []


def detached_sleep() -> int:
    """A process that is not a child of this one (its parent shell is gone): a game's pid."""
    out = subprocess.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True,
                         check=True).stdout
    return int(out)


@pytest.fixture
def box():
    """A box of two GPUs: a process on the first, a game and another peer on the second
    (live processes: a pid that names no process here is left out, as a container's are)."""
    elsewhere, game, other_peer = pids = [detached_sleep() for _ in range(3)]
    yield SimpleNamespace(gpus=[("GPU-aaaa-0000", "00000000:17:00.0", [elsewhere]),
                                ("GPU-bbbb-1111", "00000000:65:00.0", [game, other_peer, 2**31 - 1, 2**40])],
                          elsewhere=elsewhere, game=game, other_peer=other_peer)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("gpu", [GpuId(uuid="bbbb-1111", pci_bus_id=""), GpuId(uuid="", pci_bus_id="0000:65:00.0"),
                                 GpuId(uuid="mig-slice-not-listed", pci_bus_id="0000:65:00.0")])
def test_the_governor_watches_only_the_gpu_it_trains_on_found_by_uuid_or_pci_bus(box, gpu):
    """Torch's cuda:0 under CUDA_VISIBLE_DEVICES=1 is NVML's device 1: matched by UUID or bus, never by index."""
    watch = GpuWatch(gpu, FakeNvml(box.gpus))
    assert watch.pids(ignore=set()) == {box.game, box.other_peer}
    assert watch.others(ignore=set()) == ("sleep",)


def test_other_locoswarm_peers_and_this_daemons_processes_do_not_count_as_gpu_use(box):
    watch = GpuWatch(GpuId(uuid="bbbb-1111", pci_bus_id=""), FakeNvml(box.gpus))
    assert watch.pids(ignore={box.other_peer}) == {box.game}
    assert watch.others(ignore={box.other_peer, box.game}) == ()
    g = Governor(IdlePolicy())
    assert g.decide(reading(0, gpu=watch.others(ignore={box.other_peer, box.game}))) is None


def test_a_gpu_nvml_does_not_list_makes_the_governor_watch_every_gpu(box):
    watch = GpuWatch(GpuId(uuid="cccc", pci_bus_id="0000:99:00.0"), FakeNvml(box.gpus))
    assert watch.pids(ignore=set()) == {box.game, box.other_peer, box.elsewhere}


def test_a_cpu_peer_reads_no_gpu_and_a_peer_with_the_policy_off_does_not_either(tmp_path, monkeypatch):
    """read_machine without a GpuWatch never loads NVML; IdleWatch passes none when pause_on_gpu_use is off."""
    from locoswarm.node import governor

    monkeypatch.setitem(sys.modules, "pynvml", None)  # an import of pynvml would raise
    assert read_machine({os.getpid()}, None).gpu_processes == ()
    gpu = GpuWatch(GpuId(uuid="bbbb-1111", pci_bus_id=""), FakeNvml([]))
    passed = []
    monkeypatch.setattr(governor, "read_machine", lambda own, gpu: passed.append(gpu) or reading(0))
    for on in (True, False):
        watch = IdleWatch(Governor(IdlePolicy(pause_on_gpu_use=on)), 1.0, on_pause=lambda: None, peers_dir=tmp_path)
        watch.gpu = gpu
        asyncio.run(watch.check())
    assert passed == [gpu, None]


def test_a_peer_listed_on_this_machine_is_recognised_and_a_stale_listing_is_dropped(tmp_path):
    with PeerListing(tmp_path):
        assert os.getpid() in local_peer_pids(tmp_path)
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        (tmp_path / str(dead.pid)).write_text("1.0\n")  # a peer killed with SIGKILL left its file
        (tmp_path / str(os.getppid())).write_text("1.0\n")  # a live pid listed with another start time: reused
        assert local_peer_pids(tmp_path) == {os.getpid()}
        assert sorted(p.name for p in tmp_path.iterdir()) == [str(os.getpid())]
    assert local_peer_pids(tmp_path) == set() and not any(tmp_path.iterdir())
    assert local_peer_pids(tmp_path / "missing") == set()


def test_the_machines_peers_and_their_children_count_as_neither_cpu_nor_gpu_use(tmp_path, box):
    import psutil

    nvml = FakeNvml([("GPU-bbbb-1111", "00000000:65:00.0", [os.getpid(), box.other_peer, box.game])])
    started = psutil.Process(box.other_peer).create_time()
    (tmp_path / str(box.other_peer)).write_text(f"{started!r}\n")  # listed as a peer, as its daemon would
    with PeerListing(tmp_path):
        child = subprocess.Popen(["sleep", "60"])  # this daemon's p2pd
        try:
            peers = peer_processes(tmp_path)
        finally:
            child.kill()
            child.wait()
    # Other children of this process (a test's leftovers) count too: only these are named.
    assert {os.getpid(), box.other_peer, child.pid} <= peers and not {box.game, box.elsewhere} & peers
    r = read_machine(peers, GpuWatch(GpuId(uuid="bbbb-1111", pci_bus_id=""), nvml))
    assert r.gpu_processes == ("sleep",)
    (tmp_path / str(box.game)).write_text(f"{psutil.Process(box.game).create_time()!r}\n")
    assert read_machine(peer_processes(tmp_path), GpuWatch(GpuId(uuid="bbbb-1111", pci_bus_id=""), nvml)
                        ).gpu_processes == ()


FAKE_GPU_NODE = os.path.join(os.path.dirname(__file__), "peers", "fake_gpu_node.py")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_daemons_on_one_gpu_never_pause_for_each_other_but_pause_for_a_game_until_it_ends(tmp_path):
    """Both daemons believe they train on one GPU whose process list (a fake NVML) shows them
    both: each finds the other in the machine's peer registry and trains on; a game's pid on
    that list pauses both, with its name, and its end resumes them."""
    from harness import Swarm, node_status, wait_round

    on_gpu = tmp_path / "gpu-pids"
    env = {"XDG_RUNTIME_DIR": str(tmp_path / "run")}  # a peer registry of this test's own
    wrap = lambda argv: [argv[0], "-u", FAKE_GPU_NODE, str(on_gpu), "--", *argv[4:]]  # noqa: E731
    swarm = Swarm(tmp_path)
    game = None
    try:
        a = swarm.join("a", "--min-peers", "2", "--eval-every", "0", env=env, wrap=wrap)
        b = swarm.join("b", "--min-peers", "2", "--eval-every", "0", peer=a, env=env, wrap=wrap)
        start = max(wait_round(p, 0, 90)["round"] for p in (a, b))
        on_gpu.write_text(f"{a.pid}\n{b.pid}\n")
        for p in (a, b):
            wait_round(p, start + 3, 60)
        for name in ("a", "b"):
            assert node_status(tmp_path / name)["paused"] is None
        assert not [line for p in (a, b) for line in p.err if "pausing" in line]
        game = detached_sleep()
        on_gpu.write_text(f"{a.pid}\n{b.pid}\n{game}\n")
        for name in ("a", "b"):
            deadline = time.monotonic() + 30
            while (paused := node_status(tmp_path / name)["paused"]) is None:
                assert time.monotonic() < deadline, f"{name} never paused for the game"
                time.sleep(0.3)
            assert paused == "another process uses the GPU (sleep)"
        on_gpu.write_text(f"{a.pid}\n{b.pid}\n")
        for name in ("a", "b"):
            deadline = time.monotonic() + 30
            while node_status(tmp_path / name)["paused"] is not None:
                assert time.monotonic() < deadline, f"{name} never resumed after the game"
                time.sleep(0.3)
    finally:
        if game is not None:
            os.kill(game, signal.SIGKILL)
        swarm.reap()
