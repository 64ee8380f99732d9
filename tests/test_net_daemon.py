"""Daemons on py-libp2p (`node join --transport libp2p`: net/node.py, no hivemind in their
processes, which a py-libp2p import beside hivemind's protobufs would make impossible) in one
swarm with p2pd daemons, issue 22's mixed swarm. It starts from a py-libp2p peer, whose DHT node
(net/dhtserver.py) the p2pd peer joins through; every round aggregates the deltas of all of them;
a peer serving malformed delta frames is refused by name on py-libp2p as on p2pd; the py-libp2p
peer SIGKILLed and restarted resumes from its checkpoint and catches up by the rounds' deltas to
the state the others served; a py-libp2p joiner that is a DHT client only takes the one digest
its donors (p2pd and py-libp2p) all served for that round, and trains with everyone; and a
p2pd joiner takes it from donors of both kinds the same way."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest

import harness
from harness import (Swarm, assert_clean_exit, final, first_addr, libp2p_missing, peer_id, rounds, served_digests,
                     wait_any, wait_round, write_spec)

ARGS = ("--min-peers", "3", "--eval-every", "0")
LP2P = ("--transport", "libp2p")


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.timeout(420, method="signal")
def test_py_libp2p_and_p2pd_daemons_train_as_one_swarm_refuse_bad_frames_survive_sigkill_and_joiners_sync(
        swarm: Swarm, tmp_path):
    why = libp2p_missing()
    if why:
        pytest.skip(why)
    # Under 7 s a round's deadline bounds what the bad peer can hold (the default 30 s would make
    # the test long on a loaded machine, not different).
    run = write_spec(tmp_path / "run.toml", deadline_s=7.0)
    # The swarm starts from a py-libp2p peer, whose DHT node (net/dhtserver.py) the p2pd peer
    # joins through (the hivemind-built bad peer joins through the p2pd one).
    a = swarm.join("a", *ARGS, *LP2P, run=run)
    b = swarm.join("b", *ARGS, peer=a, run=run)
    evil = swarm.start("evil", [sys.executable, "-u", harness.EVIL_SCRIPT, "garbage", first_addr(b), str(run)],
                       stdin=subprocess.PIPE)
    evil_id = evil.wait_for(r"^(\w+)$", 90)[1]
    c = swarm.join("c", *ARGS, *LP2P, "--checkpoint-every", "1", peer=a, run=run)
    honest = {peer_id(a), peer_id(b), peer_id(c)}
    wait_round(c, 3, 240)
    # Every round on the py-libp2p peer has all three honest deltas (the bad peer claims a place and
    # is counted a participant, its delta refused); so do the p2pd peers' rounds.
    for p in (a, b, c):
        assert all(deltas >= 3 for r, deltas, _, _ in rounds(p) if r >= 1), (p.name, rounds(p), p.tail())
    for p in (a, c):
        assert re.search(rf"delta of {evil_id} for round \d+ rejected: \w+: ", p.stderr()), p.tail()
        assert "Traceback" not in p.stderr(), p.tail()

    c.proc.send_signal(signal.SIGKILL)
    c.wait_exit(30)
    killed_at = max(r for r, *_ in rounds(c))
    wait_round(a, killed_at + 2, 120)  # the others train on without it
    c = swarm.join("c", "--eval-every", "0", *LP2P, "--checkpoint-every", "1", peer=a, run=run)
    resumed = c.wait_event("resumed", 90)["round"]
    caught = c.wait_event("caught_up", 90)
    assert caught["start"] == resumed and caught["round"] >= resumed + 2, (resumed, caught)
    assert caught["digest"] in served_digests([a, b], caught["round"]), c.tail()  # its donors, one of each kind
    assert not c.events("synced"), f"c downloaded a state\n{c.tail()}"
    wait_any([c], "round", 90, lambda e: e["deltas"] >= 3)

    # A py-libp2p joiner that is a DHT client only (--dht-client: behind NAT), through the p2pd peer.
    d = swarm.join("d", "--eval-every", "0", *LP2P, "--dht-client", peer=b, run=run)
    synced = d.wait_event("synced", 120)
    served = served_digests([a, b, c], synced["round"])
    assert served == {synced["digest"]}, f"donors served {served} for round {synced['round']}, d took {synced}"
    donors = [p.name for p in (a, b, c) if any(e["round"] == synced["round"] for e in p.events("serving_state"))]
    wait_any([d], "round", 120, lambda e: e["deltas"] >= 4)  # all four honest deltas in one of d's rounds

    # The reverse: a p2pd joiner (through the py-libp2p peer's DHT node) whose donors are one p2pd
    # and three py-libp2p peers asks each of them (node/statedownload.py: up to 4, concurrently)
    # and takes the one digest they serve.
    e = swarm.join("e", "--eval-every", "0", peer=a, run=run)
    taken = e.wait_event("synced", 120)
    served_e = {p.name: {x["digest"] for x in p.events("serving_state") if x["round"] == taken["round"]}
                for p in (a, b, c, d)}
    assert set().union(*served_e.values()) == {taken["digest"]}, (served_e, taken)
    assert served_e["a"] or served_e["c"] or served_e["d"], f"no py-libp2p peer served round {taken['round']}: " \
                                                             f"{served_e}"
    for p in (a, b, c, d, e):
        p.proc.send_signal(signal.SIGTERM)
    for p in (a, b, c, d, e):
        assert_clean_exit(p, p.wait_exit(60))
    # A silent split (a delta one peer missed under the machine's load) may have been found and
    # healed on the way (seen once in seven runs on 2 cores): the one digest the joiners' donors
    # served above is what holds the swarm together; the splits are printed, not asserted.
    splits = sorted(set(re.findall(r"split at round \d+", "".join(p.stderr() for p in (a, b, c, d, e)))))
    print(f"c killed after round {killed_at}, resumed at {resumed}, caught up to {caught['round']}; d took round "
          f"{synced['round']} ({synced['digest'][:12]}) served by {donors}; e took round {taken['round']} served by "
          f"{sorted(n for n, v in served_e.items() if v)}; splits found on the way: {splits or 'none'}; honest {sorted(honest)}")


@pytest.mark.slow
@pytest.mark.timeout(240, method="signal")
def test_a_swarm_of_py_libp2p_peers_alone_trains_to_one_digest(swarm: Swarm):
    """No p2pd anywhere (as where hivemind is not installed, Windows): the first py-libp2p peer's
    DHT node holds the registry, the second joins through it, and both train every round with
    both deltas to one outer state."""
    why = libp2p_missing()
    if why:
        pytest.skip(why)
    args = ("--min-peers", "2", "--eval-every", "0", "--until-round", "3", *LP2P)
    a = swarm.join("a", *args)
    b = swarm.join("b", *args, peer=a)
    for p in (a, b):
        assert_clean_exit(p, p.wait_exit(180))
    for p in (a, b):  # every delta a round expected came, both in most rounds (a first round may see one)
        assert all(deltas == of for _, deltas, of, _ in rounds(p)), rounds(p)
        assert sum(deltas == 2 for _, deltas, _, _ in rounds(p)) >= 2, rounds(p)
    (round_a, _, digest_a), (round_b, _, digest_b) = final(a), final(b)
    assert round_a == round_b == 3 and digest_a == digest_b, (final(a), final(b))
