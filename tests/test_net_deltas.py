"""The node's delta puller (node/exchange.py, node/streams.py) on py-libp2p (net/bridge.py
TrioP2P, in a process with no hivemind: tests/peers/lp2p_delta.py) against p2pd peers that
answer badly (tests/peers/serve_delta.py): every bad answer is named as on p2pd
(tests/test_exchange.py), within its timeout, and the good peer pulled after them still gives
its delta. A py-libp2p daemon's pulls in a swarm: tests/test_net_daemon.py."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from harness import libp2p_missing
from locoswarm.node.statedir import IDENTITY_FILE, ensure_identity

PEERS = os.path.join(os.path.dirname(__file__), "peers")
sys.path.insert(0, PEERS)
from delta_fixture import ROUND, good_blob  # noqa: E402

LP2P = os.path.join(PEERS, "lp2p_delta.py")


def sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


@pytest.mark.slow
@pytest.mark.timeout(240, method="signal")
def test_the_py_libp2p_puller_names_every_bad_answer_and_carries_on(spawn_peers, tmp_path):
    """p2pd peers that answer garbage, a cut body, a length above the spec's limit, a delta
    of another round, or nothing: each pull fails with its named error within its timeout,
    and the good peer pulled after them still gives its delta."""
    why = libp2p_missing()
    if why:
        pytest.skip(why)
    ensure_identity(str(tmp_path))
    modes = ("good", "garbage", "truncated", "oversized", "wrong_round", "silent")
    _, maddrs = spawn_peers(os.path.join(PEERS, "serve_delta.py"), *modes)
    out = subprocess.run([sys.executable, LP2P, str(tmp_path / IDENTITY_FILE), ",".join(maddrs), "3"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    said = json.loads(out.stdout.strip().splitlines()[-1])
    pulled = said["pulled"]
    assert said["hivemind_loaded"] == [], said
    print(json.dumps(dict(zip(modes + ("good again",), pulled))))  # shown when an assertion fails
    good = ["ok", "server", ROUND, sha(good_blob())]
    assert pulled[0] == pulled[-1] == good
    errors = {mode: result[:2] for mode, result in zip(modes[1:], pulled[1:-1])}
    assert errors["garbage"][0] in ("MalformedMessage", "VersionMismatch", "SpecMismatch"), errors
    assert errors["truncated"][0] == "TruncatedBody" and "announced bytes" in errors["truncated"][1]
    assert errors["oversized"][0] == "OversizedMessage" and "above the spec's limit" in errors["oversized"][1]
    assert errors["wrong_round"][0] == "MalformedMessage" and "delta of round" in errors["wrong_round"][1]
    # silence: the timeout's own error (node/pull.py names the peer in its log), after the 3 s asked
    # for and not much later (a bound for a loaded machine, not a figure)
    assert errors["silent"][0] == "TimeoutError" and 3.0 <= pulled[-2][2] < 30.0, pulled[-2]
