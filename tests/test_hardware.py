"""`locoswarm doctor`: the device found, an exact parameter count and a memory estimate that
bounds what training really allocates, and a verdict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from locoswarm.node.hardware import detect, estimate_bytes, gpu_id, pick_device
from locoswarm.node.spec import RunSpec
from locoswarm.workload.model import build_model, num_params


@pytest.mark.parametrize("size, vocab", [("tiny", 257), ("small", 50257)])
def test_the_estimate_counts_the_models_parameters_exactly(size, vocab):
    spec = replace(RunSpec(), model=size)
    assert estimate_bytes(spec, vocab)["params"] == num_params(build_model(size, vocab, spec.data.seq_len, 0))


def test_the_cpu_is_found_with_its_memory_and_fp32():
    d = detect("cpu")
    assert d.kind == "cpu" and d.precision == "fp32" and 0 < d.free_bytes <= d.total_bytes


def test_the_estimate_covers_every_tensor_a_trainer_keeps():
    """After a round, sum the bytes of what a real trainer holds (replica and its gradients'
    size, AdamW state, outer parameters and momentum, residual, sent mask, snapshot): the
    estimate must cover it, with activations on top but not wildly more."""
    import threading

    import torch

    from locoswarm.node.trainer import Trainer

    spec = RunSpec()
    t = Trainer(spec, spec.hash(), shard=0, device=torch.device("cpu"))
    t.train_until(threading.Event(), lambda n: n >= 2 * t.tokens_per_step)
    work = t.end_round()
    t.apply(work, [t.decode(t.encode(work, "me"))], overlapped=False)
    size = lambda ts: sum(x.numel() * x.element_size() for x in ts)  # noqa: E731
    model = size(t.model.parameters())
    held = (2 * model  # the replica and, during a step, its gradients
            + size(v for st in t.inner.state.values() for v in st.values())
            + size(t.outer.state_tensors().values()) + size(t.compressor.errors) + size(t.compressor.sent_masks)
            + size(work.snapshot))
    need = estimate_bytes(spec, 257)
    estimate = need["training"] + need["outer"]
    print(f"tensors held {held / 1e6:.1f} MB; estimate {estimate / 1e6:.1f} MB")
    assert held <= estimate <= 2 * held + (64 << 20)


def test_doctor_prints_a_json_verdict():
    out = subprocess.run([sys.executable, "-m", "locoswarm", "doctor", "--device", "cpu", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["device"]["kind"] == "cpu" and r["fits"] is True and r["params"] == 1_238_784
    assert r["listen"] and r["network"]["addresses"]


def test_doctor_reports_its_addresses_and_dials_the_initial_peers():
    """A live libp2p peer on loopback is reached (with its round-trip time); a dead address
    is reported with the dial error; the visible addresses are classed."""
    import asyncio

    from hivemind.p2p import P2P

    async def main():
        peer = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        try:
            live = f"{(await peer.get_visible_maddrs())[0]}"
            dead = "/ip4/127.0.0.1/tcp/1/p2p/QmcpczcLxHrBmrsop4BFzjrf7e1DAuDZukrSRxmVAoAGYs"  # nobody
            env = {**os.environ, "LOCOSWARM_LISTEN": "/ip4/127.0.0.1/tcp/0", "LOCOSWARM_PEERS": f"{live},{dead}"}
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "locoswarm", "doctor", "--device", "cpu", "--json", env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 120)
            return proc.returncode, out.decode(), err.decode()
        finally:
            await peer.shutdown()

    code, out, err = asyncio.run(main())
    assert code == 0, err
    net = json.loads(out)["network"]
    assert {a["class"] for a in net["addresses"]} == {"loopback"} and "loopback only" in net["verdict"]
    reached, refused = net["peers"]
    assert reached["reached"] is True and reached["ms"] >= 0
    assert refused["reached"] is False and "connection refused" in refused["error"]


def test_a_batch_too_big_for_free_memory_is_split_into_micro_batches():
    """A batch whose activations exceed free memory still fits at a smaller micro-batch (a
    divisor of the batch): doctor says so instead of refusing the run."""
    from locoswarm.node.hardware import activation_bytes_per_sequence, report

    free = detect("cpu").free_bytes
    spec = RunSpec()
    per_sequence = activation_bytes_per_sequence(spec, 257)
    batch = 1 << max(1, (2 * free // per_sequence).bit_length())  # a power of two, more than twice what fits
    r = report(replace(spec, batch_size=batch), "cpu")
    assert r["fits"] is True and r["batch_size"] == batch
    assert 1 <= r["micro_batch"] < batch and batch % r["micro_batch"] == 0
    assert r["micro_batch"] * per_sequence <= r["usable_bytes"]


@pytest.mark.parametrize("name, message", [("cuda:1", "sees CUDA devices cuda:0..cuda:0"),
                                           ("cuda:x", "must be auto, cpu, mps, cuda or cuda:<index>"),
                                           ("gpu", "must be auto, cpu, mps, cuda or cuda:<index>")])
def test_a_cuda_device_this_process_does_not_see_is_named(monkeypatch, name, message):
    """Under CUDA_VISIBLE_DEVICES=3 the one GPU a peer sees is cuda:0, whatever NVML calls it."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=message):
        pick_device(name)
    assert pick_device("cuda:0").type == "cuda" and pick_device("cpu").type == "cpu"


def test_a_cpu_or_mps_device_names_no_gpu_to_watch():
    import torch

    assert gpu_id(torch.device("cpu")) is None and gpu_id(torch.device("mps")) is None
