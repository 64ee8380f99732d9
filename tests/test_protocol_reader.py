"""docs/protocol.md is enough to read a live swarm: a plain hivemind client that imports
nothing of locoswarm (tests/peers/read_swarm.py) finds every daemon's peer record, with the
fields the document gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness import Swarm, first_addr, peer_id, wait_round
from locoswarm.node.spec import RunSpec

READER = os.path.join(os.path.dirname(__file__), "peers", "read_swarm.py")
RECORD_FIELDS = {"v", "peer", "addrs", "device", "tokens_per_s", "round", "spec", "paused", "proof", "diverged",
                 "chain", "prev_chain", "inc", "anchors", "seq", "work"}



@pytest.mark.slow
@pytest.mark.timeout(300, method="signal")
def test_a_plain_hivemind_client_reads_the_swarms_records_from_the_documented_keys(swarm: Swarm):
    spec = RunSpec()
    a = swarm.join("a")
    b = swarm.join("b", peer=a)
    for p in (a, b):
        wait_round(p, 2, 180)
    out = subprocess.run([sys.executable, READER, first_addr(a), spec.run_id], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["modules"] == [], "the reader needs nothing of locoswarm"
    ids = {peer_id(a), peer_id(b)}
    assert ids <= set(seen["peers"]), seen["peers"].keys()
    for peer in ids:
        record = seen["peers"][peer]
        assert set(record) == RECORD_FIELDS and record["v"] == 10
        assert record["peer"] == peer and record["spec"] == spec.hash().hex() and record["device"] == "cpu"
        assert record["round"] >= 2 and record["inc"] > 0 and record["addrs"][0].startswith("/ip4/127.0.0.1/tcp/")
