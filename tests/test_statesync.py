"""A joiner downloads the outer state from real donor processes on loopback: intact from
one donor, from the good one when another serves corrupted chunks, from the survivor when
a donor is SIGKILLed mid-download, and the newest round when donors disagree."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch
from hivemind.p2p import P2P, PeerID

from locoswarm.node.statesync import StateUnavailable, download_state

DONOR = os.path.join(os.path.dirname(__file__), "peers", "serve_state.py")
_spec = importlib.util.spec_from_file_location("serve_state", DONOR)
serve_state = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve_state)

pytestmark = pytest.mark.timeout(120)


@contextlib.contextmanager
def donors(*modes: str):
    procs = [subprocess.Popen([sys.executable, DONOR, m], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for m in modes]
    try:
        addrs = [_readline(p) for p in procs]
        yield procs, addrs
    finally:
        for p in procs:
            with contextlib.suppress(Exception):
                p.stdin.close()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)


def _readline(proc: subprocess.Popen, timeout_s: float = 60) -> str:
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout_s)
    if not out or "/p2p/" not in out[0]:
        proc.kill()
        raise AssertionError(f"donor did not start: {out!r}")
    return out[0].strip()


def _download(addrs: list[str], on_progress=None, timeout_s: float = 10.0):
    async def go():
        client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=addrs)
        try:
            peers = [PeerID.from_base58(a.split("/p2p/")[1]) for a in addrs]
            return await download_state(client, peers, serve_state.SPEC, timeout_s=timeout_s, on_progress=on_progress)
        finally:
            await client.shutdown()

    return asyncio.run(go())


def _assert_is_the_donors_state(tensors):
    want = serve_state.state()
    assert list(tensors) == list(want)
    assert all(torch.equal(tensors[n], want[n]) for n in want)


def test_joiner_receives_the_donors_exact_state_with_progress():
    seen = []
    with donors("good") as (_, addrs):
        round_, tensors = _download(addrs, on_progress=lambda done, total: seen.append((done, total)))
    assert round_ == serve_state.ROUND
    _assert_is_the_donors_state(tensors)
    assert seen[-1][0] == seen[-1][1] > 1


def test_corrupted_chunks_are_fetched_again_from_the_good_donor():
    with donors("corrupt", "good") as (_, addrs):
        round_, tensors = _download(addrs)
    _assert_is_the_donors_state(tensors)


def test_a_donor_killed_mid_download_is_replaced_by_the_survivor():
    with donors("good", "good") as (procs, addrs):
        killed = []

        def kill_first(done: int, total: int) -> None:
            if done == 2 and not killed:
                os.kill(procs[0].pid, signal.SIGKILL)
                killed.append(done)

        round_, tensors = _download(addrs, on_progress=kill_first, timeout_s=5.0)
    assert killed
    _assert_is_the_donors_state(tensors)


def test_the_newest_round_wins_when_donors_disagree():
    with donors("stale", "good") as (_, addrs):
        round_, tensors = _download(addrs)
    assert round_ == serve_state.ROUND


def test_no_valid_donor_is_a_clear_error():
    with donors("corrupt") as (_, addrs):
        with pytest.raises(StateUnavailable, match="chunk"):
            _download(addrs)
