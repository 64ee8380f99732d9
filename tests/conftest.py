"""Shared fixtures for the unit tests: seeded random generators, so that every test draws
fresh random inputs that are still reproducible from the test's name."""

from __future__ import annotations

import os
import sys
import tempfile
import zlib

import numpy as np
import pytest
import torch
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

# The suite's shared helpers (harness.py, protocol_cases.py) import by name from this folder;
# the repository root stays off sys.path (its folders shadow real packages: test_layout.py).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Keep hypothesis from writing its caches and example database into the repository root.
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "locoswarm-hypothesis"))
settings.register_profile("locoswarm-unit", database=None)
settings.load_profile("locoswarm-unit")


def _seed_of(request: pytest.FixtureRequest) -> int:
    # A seed derived from the test id: different tests get different inputs, a rerun the same.
    return zlib.crc32(request.node.nodeid.encode())


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    """A torch CPU generator seeded from the test id."""
    return torch.Generator().manual_seed(_seed_of(request))


@pytest.fixture
def np_rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A numpy generator seeded from the test id."""
    return np.random.default_rng(_seed_of(request))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` skip, naming the reason, where no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def reap_child_processes():
    """Kill whatever child processes a test left behind (peer processes, p2pd daemons)."""
    yield
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=10)


@pytest.fixture
def spawn_peers():
    """Start real peer processes (`python SCRIPT MODE`) that print their multiaddr and run
    until stdin closes; yields `spawn(script, *modes) -> (procs, addrs)`. Every process is
    stopped at teardown: stdin closed, then killed if it lingers."""
    import subprocess
    import sys
    import threading

    procs: list[subprocess.Popen] = []

    def readline(proc: subprocess.Popen, timeout_s: float = 60) -> str:
        out: list[str] = []
        t = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout_s)
        if not out or "/p2p/" not in out[0]:
            proc.kill()
            raise AssertionError(f"peer process did not start: {out!r}")
        return out[0].strip()

    def spawn(script: str, *modes: str):
        new = [subprocess.Popen([sys.executable, script, m], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True) for m in modes]
        procs.extend(new)
        return new, [readline(p) for p in new]

    yield spawn
    for p in procs:
        try:
            p.stdin.close()
        except OSError:
            pass
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


@pytest.fixture
def encoded_lengths(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of every delta RoundStep.encode produces in this test, in order."""
    from locoswarm.optim.round import RoundStep

    lengths: list[int] = []
    real = RoundStep.encode

    def recording(self, *args, **kwargs):
        blob = real(self, *args, **kwargs)
        lengths.append(len(blob))
        return blob

    monkeypatch.setattr(RoundStep, "encode", recording)
    return lengths


@pytest.fixture(scope="session")
def clean_three_peers(tmp_path_factory):
    """Three daemons on loopback, the default run spec, no fault, harness.CLEAN_ROUNDS rounds,
    all exited: `(swarm, [a, b, c])`, their events, logs and final models still readable.
    One run for the session: test_daemon.py checks what it did and test_faults.py takes its
    loss as the clean reference (each started its own, identical to the other's)."""
    from harness import CLEAN_ROUNDS, Swarm, assert_clean_exit, three_peers

    s = Swarm(tmp_path_factory.mktemp("clean"))
    try:
        peers = three_peers(s, "--max-rounds", str(CLEAN_ROUNDS))
        for p in peers:
            assert_clean_exit(p, p.wait_exit(150))
        return s, peers
    finally:
        s.reap()


@pytest.fixture
def swarm(tmp_path):
    """The daemons one test starts (harness.Swarm), all reaped at its end; the last lines of
    each are printed, which pytest shows only when the test failed."""
    from harness import Swarm

    s = Swarm(tmp_path)
    yield s
    s.reap()
    for child in s.children:
        print(child.tail(60))
