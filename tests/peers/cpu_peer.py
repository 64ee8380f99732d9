"""A CPU peer's code paths in one process, in the order a daemon takes them: the device
picked from DEVICE (`cpu`, or `auto` where CUDA is absent), doctor's figures, the trainer
built with a GPU memory cap (which a CPU peer must ignore), an inner phase, the round's
encode, decode and outer step, a checkpoint written, read back and restored into a fresh
trainer, a step of that trainer recomputing activations (activation checkpointing), the
final model saved, the kernels chosen for the device, and the governor's reading. Prints
one JSON line, {"device": ..., "cuda_initialized": ...}; with --wait it then waits for its
stdin to close, so that a test can look for it in NVML's process list.

usage: python cpu_peer.py DEVICE FOLDER [--wait]
"""

from __future__ import annotations

import json
import os
import sys
import threading
from dataclasses import replace

import torch

from locoswarm.kernels.dispatch import fused_kernels
from locoswarm.node import replica_state
from locoswarm.node.checkpoint import load_latest, save_checkpoint
from locoswarm.node.governor import read_machine
from locoswarm.node.gpuwatch import GpuWatch
from locoswarm.node.hardware import gpu_id, pick_device, report
from locoswarm.node.spec import RunSpec
from locoswarm.node.trainer import Trainer


def main() -> None:
    name, folder = sys.argv[1], sys.argv[2]
    device = pick_device(name)
    assert device.type == "cpu", device
    spec = replace(RunSpec(), num_shards=2, batch_size=2)
    figures = report(spec, name, memory_fraction=0.5)
    assert figures["device"]["kind"] == "cpu", figures
    stop = threading.Event()
    a = Trainer(spec, spec.hash(), shard=0, device=device, memory_fraction=0.5)
    a.train_until(stop, lambda n: n >= 2 * a.tokens_per_step)
    work = a.end_round()
    a.apply(work, [a.decode(a.encode(work, "me"))], overlapped=False)
    save_checkpoint(folder, a.round, *replica_state.checkpoint_state(a), spec_hash=spec.hash())
    _, tensors, meta = load_latest(folder, spec.hash())
    b = Trainer(spec, spec.hash(), shard=0, device=device, memory_fraction=0.5, activation_checkpointing=True)
    replica_state.restore(b, tensors, meta)
    assert b.state_digest() == a.state_digest()
    b.train_until(stop, lambda n: n >= b.tokens_per_step)  # with activation checkpointing
    b.save_model(os.path.join(folder, "final-model.safetensors"))
    b.evaluate()
    assert fused_kernels(device) is None
    gpu = gpu_id(device)
    assert gpu is None
    read_machine({os.getpid()}, None if gpu is None else GpuWatch(gpu))
    print(json.dumps({"device": str(device), "cuda_initialized": torch.cuda.is_initialized()}), flush=True)
    if "--wait" in sys.argv:
        sys.stdin.read()


if __name__ == "__main__":
    main()
