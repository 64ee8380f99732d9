"""The progress teller on py-libp2p (net/progress.py, protocol/outbox.py's book) between two
py-libp2p hosts, in a subprocess (tests/peers/lp2p_outbox.py: py-libp2p may not be imported
beside hivemind). What a daemon's outbox does on p2pd (node/outbox.py), the same book on trio:
each round's latest message, the record first and then as an update, everything told again on
a new stream after the receiver reset its stream, and the peer reported gone when no stream
opens. (A receiver restarted on the same port in the same process is not tried: under load
py-libp2p kept the stopped host's connection, and the new one was found gone too.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness import libp2p_missing

SCRIPT = os.path.join(os.path.dirname(__file__), "peers", "lp2p_outbox.py")
RECORD, UPDATE, PROGRESS = [2, None], [3, None], 1


@pytest.mark.timeout(200)
def test_the_py_libp2p_teller_tells_each_rounds_latest_again_on_a_new_stream_and_finds_a_peer_gone():
    why = libp2p_missing()
    if why:
        pytest.skip(why)
    out = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=150)
    assert out.returncode == 0, out.stderr[-4000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(seen))  # shown when an assertion fails
    assert not seen["hivemind_loaded"]
    for step in ("first_came", "update_came", "second_came", "gone_came"):
        assert seen[step], step
    first, second = seen["streams"][:2]
    # 1-2: the record whole first, each round's latest count (round 3 was told 100, then 200,
    # before the teller ran: 100 never goes), then the new record as an update on the same stream
    told = [m for m in first if m[0] != "ended"]  # the reset may end the reader with an error, logged last
    assert told == [RECORD + [1], [PROGRESS, 3, 200], [PROGRESS, 4, 50], UPDATE + [2]]
    # 3: after the reset, a new stream carries everything again: the latest record whole, then the rounds
    assert second[:3] == [RECORD + [2], [PROGRESS, 3, 200], [PROGRESS, 4, 50]]
    assert seen["telling"]
    # 4: no stream opens once the receiver is gone: reported once, as a peer that had served
    assert seen["gone"] == [[seen["receiver"], True]] and seen["gone_map"] == [seen["receiver"]]
    assert seen["streams_opened"] == 2
