"""A py-libp2p peer (locoswarm.net, no hivemind in its process) beside two training daemons.
On the progress streams (tests/peers/lp2p_progress.py): each daemon tells it its record back
when it told its own, and its progress in a round it told it gave up; a record it passes
off as another peer's is refused by name. Then, as a joiner (tests/peers/lp2p_state.py), it
downloads the outer state they serve: the very state a daemon reports serving (its digest,
body and earned weight), while they train on. The daemons go on with both deltas in every
round (a paused record and a round given up hold nobody). One pair of daemons for both:
each costs ~25 s."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

import torch

from harness import Swarm, assert_clean_exit, first_addr, libp2p_missing, peer_id, rounds, served_digests, wait_round
from locoswarm.node.spec import RunSpec
from locoswarm.node.statedir import IDENTITY_FILE, ensure_identity
from locoswarm.node.trainer import Trainer

LP2P = os.path.join(os.path.dirname(__file__), "peers", "lp2p_progress.py")
LP2P_STATE = os.path.join(os.path.dirname(__file__), "peers", "lp2p_state.py")
AFTER = 3
"""Rounds the daemons train after the py-libp2p peer's part, every one with both deltas."""


@pytest.mark.slow
@pytest.mark.timeout(300, method="signal")
def test_a_py_libp2p_peer_tells_and_hears_progress_and_downloads_the_state_of_two_daemons(swarm: Swarm, tmp_path):
    why = libp2p_missing()
    if why:
        pytest.skip(why)
    spec = RunSpec()
    # no --max-rounds: they train until told to stop, however fast the machine
    a = swarm.join("a", "--min-peers", "2", "--eval-every", "0")
    b = swarm.join("b", "--min-peers", "2", "--eval-every", "0", peer=a)
    wait_round(a, 1, 180)
    ensure_identity(str(tmp_path))
    out = subprocess.run([sys.executable, LP2P, str(tmp_path / IDENTITY_FILE), spec.hash().hex(), first_addr(a),
                          first_addr(b)], capture_output=True, text=True, timeout=150)
    assert out.returncode == 0, out.stderr[-4000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(seen))  # shown when an assertion fails
    ids = {peer_id(a), peer_id(b)}
    assert {seen["a"], seen["b"]} == ids and not seen["hivemind_loaded"]
    assert seen["runs"] == {p: [spec.run_id, spec.hash().hex()[:16]] for p in ids}  # "which run?" on py-libp2p
    assert seen["records_came"] and set(seen["records"]) == ids
    assert all(spec_hex == spec.hash().hex() and round_ >= 1 for round_, spec_hex in seen["records"].values())
    # each daemon told back its progress in a round we told it we gave up (its own count of that round)
    assert seen["told_back_after_s"] is not None and set(seen["progress"]) == ids, seen["progress"]
    for peer, reports in seen["progress"].items():  # in the rounds we gave up (its record moves on meanwhile)
        assert all(r in seen["gave_up"][peer] and tokens >= 0 for r, tokens, _ in reports), (peer, reports)
    assert a.wait_for(rf"progress stream of {seen['me']} dropped: progress stream: a record of {seen['b']}, "
                      rf"not of its sender", 30, stderr=True)
    # the state download, from the same daemons as they train on
    layout = Trainer(spec, spec.hash(), shard=0, device=torch.device("cpu")).state_spec
    state_json = json.dumps({"run_id": layout.run_id, "spec_hash": layout.spec_hash.hex(),
                             "tensors": [[n, list(s)] for n, s in layout.tensors]})
    out = subprocess.run([sys.executable, LP2P_STATE, str(tmp_path / IDENTITY_FILE), state_json,
                          f"{first_addr(a)},{first_addr(b)}"], capture_output=True, text=True, timeout=150)
    assert out.returncode == 0, out.stderr[-4000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(got))  # shown when an assertion fails
    assert "error" not in got and not got["hivemind_loaded"]
    # both donors, or the one a step ahead (they train on: the two manifests may show two rounds)
    assert got["round"] >= 1 and got["donors"] and set(got["donors"]) <= ids
    assert got["digest"] in served_digests([a, b], got["round"]), (got, served_digests([a, b], got["round"]))
    assert 0 < got["max_abs"] < 1e3 and got["ledger_len"] >= 1
    # they train on, each round with both deltas: nobody held or split them
    done = max(r for r, *_ in rounds(a))
    for p in (a, b):
        wait_round(p, done + AFTER, 120)
    for p in (a, b):
        p.proc.send_signal(signal.SIGTERM)
    for p in (a, b):
        assert_clean_exit(p, p.wait_exit(60))
        after = [(got, of) for r, got, of, _ in rounds(p) if r > done]
        assert len(after) >= AFTER and all(got == 2 for got, _ in after), (p.name, after)
