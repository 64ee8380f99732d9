"""`locoswarm doctor`: the device found, an exact parameter count and a memory estimate that
bounds what training really allocates, and a verdict."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from dataclasses import replace

import pytest

from locoswarm.node.hardware import detect, estimate_bytes
from locoswarm.node.spec import RunSpec
from locoswarm.node.workload.model import build_model, num_params


@pytest.mark.parametrize("size, vocab", [("tiny", 257), ("small", 50257)])
def test_the_estimate_counts_the_models_parameters_exactly(size, vocab):
    spec = replace(RunSpec(), model=size)
    assert estimate_bytes(spec, vocab)["params"] == num_params(build_model(size, vocab, spec.data.seq_len, 0))


def test_the_cpu_is_found_with_its_memory_and_fp32():
    d = detect("cpu")
    assert d.kind == "cpu" and d.precision == "fp32" and 0 < d.free_bytes <= d.total_bytes


def test_the_estimate_covers_what_a_training_process_really_allocates():
    """Train the default spec for a few steps in a fresh process and compare its peak RSS
    growth with the estimate (which must not be below it, nor absurdly above)."""
    code = (
        "import resource, threading, torch\n"
        "from locoswarm.node.spec import RunSpec\n"
        "from locoswarm.node.trainer import Trainer\n"
        "s = RunSpec(); before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "t = Trainer(s, s.hash(), shard=0, device=torch.device('cpu'))\n"
        "loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "t.train_until(threading.Event(), lambda n: n >= 5 * t.tokens_per_step)\n"
        "w = t.end_round(); t.apply(w, [t.decode(t.encode(w, 'me'))], overlapped=False)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - loaded) * 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    grown = int(out.stdout.split()[-1])
    need = estimate_bytes(RunSpec(), 257)
    estimate = need["training"] + need["outer"]
    print(f"training grew the peak RSS by {grown / 1e6:.1f} MB; estimate {estimate / 1e6:.1f} MB")
    assert estimate >= 0.8 * grown  # measured here: 55.3 MB estimated, 47.1 MB grown
    assert estimate <= 5 * max(grown, 1 << 20)


def test_doctor_prints_a_json_verdict():
    out = subprocess.run([sys.executable, "-m", "locoswarm", "doctor", "--device", "cpu", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["device"]["kind"] == "cpu" and r["fits"] is True and r["params"] == 1_238_784
    assert r["listen"] and "reachability" in r
