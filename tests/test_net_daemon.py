"""A daemon on py-libp2p (`node join --transport libp2p`: net/node.py, no hivemind in its
process, which a py-libp2p import beside hivemind's protobufs would make impossible) trains in
a swarm of p2pd daemons, issue 22's mixed swarm: every round aggregates the deltas of all of
them; a peer serving malformed delta frames is refused by name on py-libp2p as on p2pd; the
py-libp2p peer SIGKILLed and restarted resumes from its checkpoint and catches up by the
rounds' deltas to the state the p2pd peers served; a py-libp2p joiner takes the state its
donors (p2pd and py-libp2p) serve, the one digest they all served for that round, and then
trains with everyone."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest

import harness
from harness import (Swarm, assert_clean_exit, first_addr, libp2p_missing, peer_id, rounds, served_digests,
                     wait_any, wait_round, write_spec)

ARGS = ("--min-peers", "3", "--eval-every", "0")


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.timeout(420, method="signal")
def test_a_py_libp2p_daemon_trains_with_p2pd_daemons_refuses_bad_frames_survives_sigkill_and_a_joiner_syncs(
        swarm: Swarm, tmp_path):
    why = libp2p_missing()
    if why:
        pytest.skip(why)
    # Under 7 s a round's deadline bounds what the bad peer can hold (the default 30 s would make
    # the test long on a loaded machine, not different).
    run = write_spec(tmp_path / "run.toml", deadline_s=7.0)
    a = swarm.join("a", *ARGS, run=run)
    evil = swarm.start("evil", [sys.executable, "-u", harness.EVIL_SCRIPT, "garbage", first_addr(a), str(run)],
                       stdin=subprocess.PIPE)
    evil_id = evil.wait_for(r"^(\w+)$", 90)[1]
    b = swarm.join("b", *ARGS, peer=a, run=run)
    c = swarm.join("c", *ARGS, "--transport", "libp2p", "--checkpoint-every", "1", peer=a, run=run)
    honest = {peer_id(a), peer_id(b), peer_id(c)}
    wait_round(c, 3, 240)
    # Every round on the py-libp2p peer has all three honest deltas (the bad peer claims a place and
    # is counted a participant, its delta refused); so do the p2pd peers' rounds.
    for p in (a, b, c):
        assert all(deltas >= 3 for r, deltas, _, _ in rounds(p) if r >= 1), (p.name, rounds(p), p.tail())
    assert re.search(rf"delta of {evil_id} for round \d+ rejected: \w+: ", c.stderr()), c.tail()
    assert "Traceback" not in c.stderr(), c.tail()

    c.proc.send_signal(signal.SIGKILL)
    c.wait_exit(30)
    killed_at = max(r for r, *_ in rounds(c))
    wait_round(a, killed_at + 2, 120)  # the p2pd peers train on without it
    c = swarm.join("c", "--eval-every", "0", "--transport", "libp2p", "--checkpoint-every", "1", peer=a, run=run)
    resumed = c.wait_event("resumed", 90)["round"]
    caught = c.wait_event("caught_up", 90)
    assert caught["start"] == resumed and caught["round"] >= resumed + 2, (resumed, caught)
    assert caught["digest"] in served_digests([a, b], caught["round"]), c.tail()
    assert not c.events("synced"), f"c downloaded a state\n{c.tail()}"
    wait_any([c], "round", 90, lambda e: e["deltas"] >= 3)

    d = swarm.join("d", "--eval-every", "0", "--transport", "libp2p", peer=b, run=run)
    synced = d.wait_event("synced", 120)
    served = served_digests([a, b, c], synced["round"])
    assert served == {synced["digest"]}, f"donors served {served} for round {synced['round']}, d took {synced}"
    donors = [p.name for p in (a, b, c) if any(e["round"] == synced["round"] for e in p.events("serving_state"))]
    wait_any([d], "round", 120, lambda e: e["deltas"] >= 4)  # all four honest deltas in one of d's rounds
    for p in (a, b, c, d):
        p.proc.send_signal(signal.SIGTERM)
    for p in (a, b, c, d):
        assert_clean_exit(p, p.wait_exit(60))
    assert not (set(re.findall(r"split at round \d+", c.stderr() + d.stderr()))), c.tail() + d.tail()
    print(f"c killed after round {killed_at}, resumed at {resumed}, caught up to {caught['round']}; d took round "
          f"{synced['round']} ({synced['digest'][:12]}) served by {donors}; honest {sorted(honest)}")
