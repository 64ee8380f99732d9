"""The GPU is the volunteer's: a peer that trains on the CPU never initialises CUDA (no
context, no VRAM held, nothing in nvidia-smi) and never loads NVML, even on a machine with
an NVIDIA GPU. Proved here without a GPU: each process runs under tests/peers/no_cuda.py,
which makes torch say a CUDA GPU is present and records every call that would initialise
CUDA. The `gpu`-marked test checks the same on a real CUDA machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from locoswarm.node.events import read_events

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
    encode/decode and the outer step, checkpoint write/read, the kernels' choice and the
    governor's reading, with `--device cpu` beside a GPU, and with `auto` where CUDA is absent."""
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

