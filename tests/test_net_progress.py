"""A py-libp2p peer (locoswarm.net, no hivemind in its process: tests/peers/lp2p_progress.py)
on the progress streams of two training daemons: each daemon tells it its record back when it
told its own, and its progress in a round it told it gave up; the daemons train on to one
consensus (a paused record and a round given up hold nobody), and a record the py-libp2p peer
passes off as another peer's is refused by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness import Swarm, final, first_addr, libp2p_missing, peer_id, wait_round
from locoswarm.node.spec import RunSpec
from locoswarm.node.statedir import IDENTITY_FILE, ensure_identity

LP2P = os.path.join(os.path.dirname(__file__), "peers", "lp2p_progress.py")
ROUNDS = 12


@pytest.mark.slow
@pytest.mark.timeout(300, method="signal")
def test_a_py_libp2p_peer_tells_and_hears_progress_and_records_with_two_daemons(swarm: Swarm, tmp_path):
    why = libp2p_missing()
    if why:
        pytest.skip(why)
    spec = RunSpec()
    a = swarm.join("a", "--min-peers", "2", "--max-rounds", str(ROUNDS), "--eval-every", "0")
    b = swarm.join("b", "--min-peers", "2", "--max-rounds", str(ROUNDS), "--eval-every", "0", peer=a)
    wait_round(a, 1, 180)
    ensure_identity(str(tmp_path))
    out = subprocess.run([sys.executable, LP2P, str(tmp_path / IDENTITY_FILE), spec.hash().hex(), first_addr(a),
                          first_addr(b)], capture_output=True, text=True, timeout=150)
    assert out.returncode == 0, out.stderr[-4000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(seen))  # shown when an assertion fails
    ids = {peer_id(a), peer_id(b)}
    assert {seen["a"], seen["b"]} == ids and not seen["hivemind_loaded"]
    assert seen["records_came"] and set(seen["records"]) == ids
    assert all(spec_hex == spec.hash().hex() and round_ >= 1 for round_, spec_hex in seen["records"].values())
    # each daemon told back its progress in a round we told it we gave up (its own count of that round)
    assert seen["told_back_after_s"] is not None and set(seen["progress"]) == ids, seen["progress"]
    for peer, reports in seen["progress"].items():
        shown = seen["records"][peer][0]
        assert all(shown <= r <= shown + 1 and tokens >= 0 for r, tokens, _ in reports), (peer, reports)
    assert a.wait_for(rf"progress stream of {seen['me']} dropped: progress stream: a record of {seen['b']}, "
                      rf"not of its sender", 30, stderr=True)
    for p in (a, b):
        assert p.wait_exit(120) == 0, p.tail()
    finals = [final(p) for p in (a, b)]
    assert {r for r, _, _ in finals} == {ROUNDS} and len({d for *_, d in finals}) == 1, finals
