"""The GPU is the volunteer's: a peer that trains on the CPU never initialises CUDA (no
context, no VRAM held, nothing in nvidia-smi) and never loads NVML, even on a machine with
an NVIDIA GPU. Proved here without a GPU: each process runs under tests/peers/no_cuda.py,
which makes torch say a CUDA GPU is present and records every call that would initialise
CUDA. The `gpu`-marked tests check the same on a real CUDA machine, and that the governor
of a CUDA peer pauses for a process on its GPU but not for another peer there.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import Swarm, node_status, wait_round

from locoswarm.node.events import EventTail, read_events
from locoswarm.node.localpeers import PeerListing

PEERS = Path(__file__).parent / "peers"
NO_CUDA, CPU_PEER = str(PEERS / "no_cuda.py"), str(PEERS / "cpu_peer.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def poisoned_run(tmp_path: Path, presence: str, *args: str, timeout_s: float = 120) -> tuple[str, str]:
    """Run `args` under no_cuda.py; returns (stdout, what touched CUDA or NVML, with stacks)."""
    record = tmp_path / "touched.txt"
    proc = subprocess.run([sys.executable, NO_CUDA, str(record), presence, "--", *args], capture_output=True,
                          text=True, env=ENV, timeout=timeout_s)
    touched = record.read_text() if record.exists() else ""
    assert proc.returncode == 0 or touched, proc.stderr[-3000:]
    return proc.stdout, touched


@pytest.mark.timeout(120)
@pytest.mark.parametrize("presence, device", [("present", "cpu"), ("absent", "auto")])
def test_a_cpu_peers_trainer_round_checkpoint_and_doctor_figures_never_initialise_cuda(tmp_path, presence, device):
    """Device picking, doctor's figures, the trainer under a GPU memory cap, an inner phase,
    encode/decode and the outer step, checkpoint write/read, a step with activation
    checkpointing, the kernels' choice and the governor's reading, with `--device cpu`
    beside a GPU, and with `auto` where CUDA is absent."""
    out, touched = poisoned_run(tmp_path, presence, CPU_PEER, device, str(tmp_path))
    assert touched == "", touched
    assert json.loads(out.splitlines()[-1]) == {"device": "cpu", "cuda_initialized": False}


SCRIPTS = {
    "a tensor on cuda": "import torch; torch.zeros(1, device='cuda')",
    "torch's AdamW step on cpu": "import torch\np = torch.nn.Parameter(torch.ones(2)); p.grad = torch.ones(2)\n"
                                 "torch.optim.AdamW([p], foreach=True).step()",
    "the governor of old, reading every GPU": "import pynvml; pynvml.nvmlInit()",
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what", list(SCRIPTS))
def test_the_poison_catches_what_would_touch_the_gpu(tmp_path, what):
    """The fake is faithful enough to catch the paths a CPU peer used to take: torch's own
    AdamW asks the accelerator for its current stream before each step (optim/inner.py's
    InnerAdamW skips that on the CPU), and the governor read NVML for every peer."""
    script = tmp_path / "touch.py"
    script.write_text(SCRIPTS[what] + "\n")
    _, touched = poisoned_run(tmp_path, "present", str(script))
    if what == "torch's AdamW step on cpu" and not touched:
        import torch

        # Seen with torch 2.13 (CPU build): not with 2.11 (CUDA build, an H100 machine).
        pytest.skip(f"torch {torch.__version__}'s AdamW step asks nothing of the accelerator: nothing to catch")
    assert touched, f"{what} went unnoticed"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_cpu_daemon_beside_a_gpu_trains_checkpoints_resumes_and_never_touches_cuda_or_nvml(tmp_path):
    """`node join --device cpu` (the governor on, as by default) trains two rounds writing
    checkpoints, a second life resumes from them and trains one more, and `doctor --device
    cpu` runs: nothing initialises CUDA or loads NVML."""
    events = tmp_path / "events.jsonl"
    join = ["locoswarm", "node", "join", "--device", "cpu", "--listen", "/ip4/127.0.0.1/tcp/0", "--state-dir",
            str(tmp_path / "node"), "--threads", "1", "--checkpoint-every", "1", "--eval-every", "0",
            "--events", str(events)]
    _, touched = poisoned_run(tmp_path, "present", *join, "--max-rounds", "2")
    assert touched == "", touched
    assert [e["round"] for e in read_events(events) if e["event"] == "round"] == [0, 1]
    events.unlink()
    _, touched = poisoned_run(tmp_path, "present", *join, "--max-rounds", "1")
    assert touched == "", touched
    reported = read_events(events)
    assert [e["round"] for e in reported if e["event"] == "resumed"] == [2]
    assert [e["round"] for e in reported if e["event"] == "round"] == [2]
    out, touched = poisoned_run(tmp_path, "present", "locoswarm", "doctor", "--device", "cpu", "--no-network")
    assert touched == "", touched
    assert "device      cpu" in out



def compute_pids() -> set[int] | None:
    """The pids NVML lists as holding a CUDA context on any GPU (pynvml, else nvidia-smi);
    None where neither can be read."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return {p.pid for i in range(pynvml.nvmlDeviceGetCount())
                    for p in pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(i))}
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no bindings or no driver: try the command
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {int(line) for line in out.split() if line.strip().isdigit()}


def nvml_sees_contexts_by_pid(tmp_path: Path) -> str | None:
    """None where NVML lists a process that holds a CUDA context under its pid here, else why
    not (no NVML; a container whose processes NVML shows by their host pids, or not at all)."""
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, torch; torch.zeros(1, device='cuda'); "
                               f"open({str(ready)!r}, 'w').close(); sys.stdin.read()"], stdin=subprocess.PIPE, env=ENV)
    try:
        for _ in range(600):
            if ready.exists() or holder.poll() is not None:
                break
            time.sleep(0.1)
        pids = compute_pids()
        if pids is None:
            return "neither pynvml nor nvidia-smi can list the GPUs' processes"
        if holder.pid not in pids:
            return f"NVML does not list a process holding a CUDA context by its pid here (it lists {sorted(pids)})"
        return None
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


@pytest.mark.gpu
@pytest.mark.timeout(240)
def test_on_a_cuda_machine_a_cpu_peer_and_a_cpu_daemon_hold_no_cuda_context(tmp_path):
    """In a fresh process (this one may have used CUDA for other tests): the CPU peer's code
    paths leave torch.cuda uninitialised, and neither it nor a `--device cpu` daemon that has
    trained rounds is among NVML's compute processes."""
    why_not = nvml_sees_contexts_by_pid(tmp_path)
    peer = subprocess.Popen([sys.executable, CPU_PEER, "cpu", str(tmp_path), "--wait"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert json.loads(peer.stdout.readline()) == {"device": "cpu", "cuda_initialized": False}
        if why_not is None:
            assert peer.pid not in compute_pids()
    finally:
        peer.stdin.close()
        assert peer.wait(timeout=60) == 0
    if why_not is not None:
        pytest.skip(f"the in-process check passed; the daemon's is not possible: {why_not}")
    events = tmp_path / "events.jsonl"
    daemon = subprocess.Popen([sys.executable, "-m", "locoswarm", "node", "join", "--device", "cpu", "--listen",
                               "/ip4/127.0.0.1/tcp/0", "--state-dir", str(tmp_path / "node"), "--threads", "1",
                               "--eval-every", "0", "--events", str(events)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    try:
        EventTail(events).wait_for(lambda e: e["event"] == "round" and e["round"] >= 2, 120,
                                   lambda: daemon.poll() is None)
        assert daemon.pid not in compute_pids()
    finally:
        daemon.terminate()
        assert daemon.wait(timeout=60) == 0


@pytest.mark.gpu
def test_the_governor_finds_the_gpu_it_trains_on_in_nvml_by_uuid_and_pci_bus():
    """hardware.gpu_id spells torch's UUID and bus id as gpuwatch reads NVML's."""
    import torch

    from locoswarm.node.gpuwatch import nvml_bus, nvml_uuid
    from locoswarm.node.hardware import gpu_id

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=uuid,pci.bus_id", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"nvidia-smi cannot list the GPUs: {e}")
    listed = [tuple(part.strip() for part in line.split(",")) for line in out.splitlines() if line.strip()]
    for index in range(torch.cuda.device_count()):
        gpu = gpu_id(torch.device(f"cuda:{index}"))
        print(f"cuda:{index} {gpu} of {listed}")
        assert gpu.uuid in {nvml_uuid(u) for u, _ in listed} or gpu.pci_bus_id in {nvml_bus(b) for _, b in listed}
        assert gpu.pci_bus_id in {nvml_bus(b) for _, b in listed}


def wait_status(state_dir: Path, where, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        status = node_status(state_dir)
        if where(status):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.5)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_on_a_cuda_machine_peers_sharing_a_gpu_never_pause_each_other_but_another_process_pauses_them(tmp_path):
    """Two CUDA peers on one card train rounds together without either pausing for the
    other's context (the machine's peer registry); a process that is not a peer taking a
    CUDA context on that card (a game) pauses them, and its end resumes them."""
    pytest.importorskip("pynvml", reason="the governor reads NVML through nvidia-ml-py ('locoswarm[nvml]')")
    why_not = nvml_sees_contexts_by_pid(tmp_path)
    if why_not is not None:
        pytest.skip(why_not)
    # The peers list themselves in a registry of this test's own. This process is listed
    # there too: earlier tests may have left it holding a CUDA context, and it is no game.
    env = {"XDG_RUNTIME_DIR": str(tmp_path / "run")}
    swarm, game = Swarm(tmp_path), None
    with PeerListing(tmp_path / "run" / "locoswarm" / "peers"):
        try:
            a = swarm.join("a", "--device", "cuda:0", "--min-peers", "2", "--eval-every", "0", env=env)
            b = swarm.join("b", "--device", "cuda:0", "--min-peers", "2", "--eval-every", "0", peer=a, env=env)
            for peer in (a, b):
                wait_round(peer, 2, 180)
            for name in ("a", "b"):
                status = node_status(tmp_path / name)
                assert status["device"] == "cuda" and status["paused"] is None, status
            # The game must not be a child of this process: a listed peer's children are its
            # p2pd, whose use is not the volunteer's. A shell starts it and leaves it orphaned.
            started = subprocess.run(["sh", "-c", f"{shlex.quote(sys.executable)} -c \"import time, torch; "
                                      "torch.zeros(1, device='cuda:0'); time.sleep(600)\" >/dev/null 2>&1 & echo $!"],
                                     capture_output=True, text=True, env=ENV, timeout=30, check=True)
            game = int(started.stdout.split()[-1])
            paused = wait_status(tmp_path / "a", lambda s: s["paused"] is not None, 60)
            assert paused["paused"].startswith("another process uses the GPU ("), paused
            os.kill(game, signal.SIGKILL)
            game = None
            wait_status(tmp_path / "a", lambda s: s["paused"] is None, 60)
        finally:
            if game is not None:
                try:
                    os.kill(game, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            swarm.reap()
