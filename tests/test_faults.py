"""Fault injection: real daemons in network namespaces this test creates, their links
slowed, made lossy and cut, and real processes killed. Each case asserts that no honest peer
crashes, the honest peers' eval loss stays within a stated margin of a clean run, and what
was refused was logged. Cases that need namespaces skip, saying why, where they cannot be
made (not root); the rest run anyway.

Links: 50 Mbit/s (kernel tbf), 25 ms each way through a user-space switch (50 ms RTT),
1 % of frames dropped at random (tests/peers/netns.py says why not tc netem).
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

import harness as daemon
from peers import netns

pytestmark = [pytest.mark.fault, pytest.mark.slow]
LOSS_MARGIN = 0.10
"""Honest peers' final eval loss may exceed the clean run's by at most this fraction (being
lower is no failure). Rounds end on token progress, so timing moves a round's tokens and
the loss with them. Measured: the mean over three peers of clean runs of this length
3.70–4.04."""
ATTACK_MARGIN = 0.20
"""Where an attack is let into the aggregate before it can be refused, the honest loss may
exceed the clean run's by this fraction. Under five malicious peers two of them send noise
that is clipped to the median norm but still averaged in: measured +6.6 %, +7.3 % and +14 %
over three runs. Two peers that turn to the negated direction get one round's deltas in
before the checks of it exclude them: +5.4 %, +5.9 % and +6.3 % on 2 cores (2026-12-07),
and +10.8 % once in clean-clone CI at 894466c, over LOSS_MARGIN."""
ROUNDS = daemon.CLEAN_ROUNDS
"""Rounds of each case that compares its loss with the clean run's: as many as it has."""


@pytest.fixture
def net(request):
    try:
        n = netns.Net(3, seed=zlib_seed(request.node.nodeid))
    except netns.NamespaceUnavailable as e:
        pytest.skip(f"network namespaces cannot be made here: {e}")
    yield n
    print(f"link emulator: {n.close()}")


def zlib_seed(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode())


@pytest.fixture(scope="module")
def clean_eval_loss(clean_three_peers) -> float:
    """Final eval loss of three peers on loopback, no faults (the suite's clean run,
    conftest.py, which test_daemon.py checks): the reference."""
    return mean_eval(clean_three_peers[1])


def assert_checkpoints_load(swarm, names, spec_hash: bytes | None = None) -> None:
    """Every peer's newest checkpoint parses, is of the spec and matches its digest."""
    from locoswarm.node.checkpoint import load_latest
    from locoswarm.node.spec import RunSpec

    for name in names:
        found = load_latest(str(swarm.root / name / "checkpoints"), spec_hash or RunSpec().hash())
        assert found is not None, f"{name}: no loadable checkpoint"


def last_eval(peer) -> float:
    """The eval loss on a peer's last round line (for runs ended by SIGTERM)."""
    return daemon.rounds(peer)[-1][3]


def mean_eval(peers) -> float:
    """Mean of the peers' final eval losses. Each evaluates its own replica (the consensus
    minus its unsent residual), and a peer that trained little in the last rounds can sit
    0.8 above the others on the same consensus: the mean is the stable figure."""
    return sum(daemon.final(p)[1] for p in peers) / len(peers)


def new_identity(state_dir: Path) -> str:
    """Give a daemon's state directory a new identity key before the daemon starts; returns
    its peer id."""
    from hivemind.p2p import P2P, PeerID

    state_dir.mkdir(mode=0o700, parents=True)
    key = state_dir / "identity.key"
    P2P.generate_identity(str(key))
    return PeerID.from_identity(key.read_bytes()).to_base58()


def join_in(swarm, net, i: int, name: str, *args: str, peer: str | None = None, run: Path | None = None):
    return swarm.join(name, *args, peer=peer, run=run, listen=f"/ip4/{net.addrs[i]}/tcp/0",
                      wrap=lambda argv: net.argv(i, argv))


def three_in(swarm, net, *args: str, run: Path | None = None):
    """Three peers, each started once the one before listens: two peers dialing each other
    at the same moment over the lossy link could both fail and sit in libp2p's dial backoff
    for the whole first round."""
    a = join_in(swarm, net, 0, "a", "--min-peers", "3", *args, run=run)
    addr = daemon.first_addr(a)
    b = join_in(swarm, net, 1, "b", "--min-peers", "3", *args, peer=addr, run=run)
    daemon.first_addr(b)
    time.sleep(2.0)
    return [a, b, join_in(swarm, net, 2, "c", "--min-peers", "3", *args, peer=addr, run=run)]


@pytest.fixture
def swarm(tmp_path):
    s = daemon.Swarm(tmp_path)
    yield s
    s.reap()
    for child in s.children:
        print(child.tail(40))
        print(f"--- {child.name} stderr, whole\n{child.stderr()}")


@pytest.mark.timeout(400, method="signal")
def test_slow_lossy_links_keep_every_delta_and_the_loss_of_a_clean_run(swarm, net, clean_eval_loss):
    peers = three_in(swarm, net, "--max-rounds", str(ROUNDS), "--checkpoint-every", "1")
    for p in peers:
        daemon.assert_clean_exit(p, p.wait_exit(300))
    finals = [daemon.final(p) for p in peers]
    assert len({d for *_, d in finals}) == 1, "outer states differ"
    assert_checkpoints_load(swarm, ["a", "b", "c"])
    assert all((got, of) == (3, 3) for p in peers for _, got, of, _ in daemon.rounds(p))
    loss = mean_eval(peers)
    print(f"mean eval loss {loss:.4f} over 50 Mbit/s, 50 ms RTT, 1 % loss; clean run {clean_eval_loss:.4f}")
    assert loss <= (1 + LOSS_MARGIN) * clean_eval_loss


@pytest.mark.timeout(400, method="signal")
def test_a_peer_cut_off_for_a_while_is_left_out_then_takes_the_swarms_state_again(swarm, net, clean_eval_loss,
                                                                                 tmp_path):
    """Peer c's link goes down for 10 s after round 2, then comes back. a and b carry on
    without it (rounds with 2 of 3 deltas, after the 5 s deadline); c trains alone, its
    outer state diverged, and runs ahead in rounds; once the link is back c finds a and b
    again (both sides dial: node/upkeep.py) and takes their state, and rounds have 3 of 3
    deltas again. Measured: c took the swarm's state 12.2–14.3 s after the heal in 6 runs in
    a row (the 120 s bound leaves room for a loaded machine). No one crashes; SIGTERM ends
    them all with exit 0."""
    import signal

    run = daemon.write_spec(tmp_path / "run.toml", deadline_s=5.0)
    a, b, c = three_in(swarm, net, "--eval-every", "1", run=run)  # last_eval: the last round's loss
    daemon.wait_round(c, 2, 200)
    net.partition(2)
    time.sleep(10)
    net.heal(2)
    healed = time.monotonic()
    event = c.wait_event("synced", 120)
    back_s = time.monotonic() - healed
    synced, digest = event["round"], event["digest"]
    served = daemon.served_digests([a, b], synced)
    assert digest in served, f"c took {digest}, a and b served {served}"
    assert c.wait_for(r"found \d+ peers again after \d+ rounds alone", 0, stderr=True)
    deadline = time.monotonic() + 120
    while not (whole := [r for r, got, of, _ in daemon.rounds(a) if (got, of) == (3, 3) and r > synced]):
        assert time.monotonic() < deadline, f"a had no round of 3/3 deltas after round {synced} in 120 s\n{a.tail(10)}"
        time.sleep(0.2)
    for p in (a, b, c):
        p.proc.send_signal(signal.SIGTERM)
    for p in (a, b, c):
        daemon.assert_clean_exit(p, p.wait_exit(60))
    seen = [(got, of) for _, got, of, _ in daemon.rounds(a)]
    assert any(got < 3 for got, _ in seen), f"c was never left out: {seen}"
    alone = [got for _, got, _, _ in daemon.rounds(c) if got == 1]
    loss = sum(last_eval(p) for p in (a, b, c)) / 3
    print(f"c took the swarm's state {back_s:.1f} s after the heal; a's first round of 3/3 after it: {whole[0]}")
    print(f"a's rounds {seen}; c aggregated {len(alone)} rounds alone, then took round {synced}'s state; "
          f"mean last eval {loss:.4f} after {len(seen)} rounds, clean run ({ROUNDS} rounds) {clean_eval_loss:.4f}")
    assert loss <= (1 + LOSS_MARGIN) * clean_eval_loss  # more rounds than the clean run: lower is expected
    from locoswarm.node.spec import load_spec

    assert_checkpoints_load(swarm, ["a", "b", "c"], load_spec(str(run)).hash())


@pytest.mark.timeout(300, method="signal")
def test_a_peer_that_missed_one_delta_finds_the_silent_split_and_takes_the_majoritys_state(swarm):
    """Three honest peers on loopback; c leaves out, in round 2, the delta of the first other
    peer by id (an injected fault, what a timed-out request does), so it aggregates 2
    deltas where a and b aggregate 3: no one is alone, nothing is diverged, yet c's outer
    state differs from theirs from then on. It heals one of two ways, whichever comes first
    on the machine: the round chains in the records show the split at a round boundary, or in
    the next round each side refuses the other's deltas as taken from another outer state (a
    delta names its chain), c aggregates alone, diverges, and takes the others' state. Either
    way c takes a and b's state (the digest one of them served), they never move, all three
    end on one digest and exit 0."""
    # No eval loss is asserted: no peer evaluates a round (a third of a round's CPU on 2 cores).
    a, b, c = peers = daemon.three_peers_faults(swarm, {"c": ["drop=2:0"]}, "--max-rounds", str(ROUNDS),
                                                "--eval-every", "0")
    for p in peers:
        daemon.assert_clean_exit(p, p.wait_exit(250))
    ids = sorted(daemon.peer_id(p, 0) for p in (a, b))
    assert c.wait_for(rf"round 2: delta of {ids[0]} left out", 0, stderr=True)
    assert [(got, of) for r, got, of, _ in daemon.rounds(c) if r == 2] == [(2, 3)]
    m = c.wait_for(r"split at round (\d+): took the state of 2 peers|found 2 peers again after 1 rounds alone", 0,
                   stderr=True)
    how = f"found the split at round {m[1]}" if m[1] else "diverged for a round"
    s = c.wait_event("synced", 0)
    assert s["donors"] == 2, s
    served = daemon.served_digests([a, b], s["round"])
    assert s["digest"] in served, f"c took {s['digest']}, a and b served {served}"
    for p in (a, b):
        assert not re.search(r"split at round|downloading", p.stderr()), f"{p.name} moved\n{p.tail()}"
    finals = [daemon.final(p) for p in peers]
    assert len({d for *_, d in finals}) == 1, f"outer states differ: {finals}"
    print(f"c left out a delta in round 2, {how} and took round {s['round']}'s state; "
          f"rounds of c {[(r, got, of) for r, got, of, _ in daemon.rounds(c)]}")


@pytest.mark.timeout(300, method="signal")
def test_a_failed_round_is_discarded_and_logged_and_the_peer_trains_on_and_rejoins_the_swarm(swarm, tmp_path):
    """Three honest peers on loopback; c's replica yields a non-finite pseudo-gradient in
    round 2 and its DHT fails when it reports round 1 done (both injected; not a round after
    the state it takes, whose delta it holds: node/trainer.py Trainer.hold). c discards round
    2 (logged, an event), never sends that delta, and at a round boundary takes the step its
    outer state missed, by that round's deltas (node/replay.py) or, where the overlapped round
    after it had it aggregate its own delta alone (diverged), by the swarm's state; it carries
    on; the failed report costs nothing (the others still see its earlier reports). No
    traceback, exit 0, one digest."""
    run = daemon.write_spec(tmp_path / "run.toml", deadline_s=6.0)
    # No eval loss is asserted: no peer evaluates a round (a third of a round's CPU on 2 cores).
    args = ("--min-peers", "3", "--max-rounds", str(ROUNDS), "--eval-every", "0")
    a = swarm.join("a", *args, run=run)
    b = swarm.join("b", *args, peer=a, run=run)
    c = swarm.join("c", *args, peer=a, run=run, faults=["nan=2", "report=1"])
    peers = [a, b, c]
    for p in peers:
        daemon.assert_clean_exit(p, p.wait_exit(250))
    discarded = c.wait_event("round_discarded", 0)
    assert discarded["round"] == 2 and re.match(r"ValueError: pseudo-gradient of .* is not finite", discarded["reason"])
    assert c.wait_for(r"a discarded round left outer step \d+ behind the swarm's \d+", 0, stderr=True)
    taken = min(c.events("caught_up") + c.events("synced"), key=lambda e: e["time"], default=None)
    assert taken is not None and taken["round"] > 2, c.tail()
    assert taken["digest"] in daemon.served_digests([a, b], taken["round"]), taken
    if taken["event"] == "caught_up":
        assert taken["start"] == 2, taken
    else:
        assert c.wait_for(r"found 2 peers again after \d+ rounds alone", 0, stderr=True)
    assert c.wait_for(r"round 1: reporting the round done failed: ConnectionError: injected", 0, stderr=True)
    assert not [r for r, *_ in daemon.rounds(c) if r == 2], "no round line for the discarded round"
    for p in (a, b):
        assert not p.events("round_discarded"), f"{p.name} discarded a round\n{p.tail()}"
        # c said it gave round 2 up: nobody waited for its delta until the deadline.
        assert not re.search(r"round 2: no delta from \w+: no delta before the", p.stderr()), p.tail()
        assert [(got, of) for r, got, of, _ in daemon.rounds(p) if r == 2] == [(2, 3)]
    finals = [daemon.final(p) for p in peers]
    assert len({d for *_, d in finals}) == 1, f"outer states differ: {finals}"
    print(f"c's rounds {[r for r, *_ in daemon.rounds(c)]}; finals {finals}")


@pytest.mark.timeout(400, method="signal")
def test_malicious_peers_deltas_are_refused_or_bounded_and_the_honest_peers_train_on(swarm, clean_eval_loss):
    """Three honest peers on loopback and five malicious ones, each claiming a place in every
    round and answering delta requests with a well-formed but bad delta: NaN scales, values
    about 1000 times an honest delta's, a delta of another round, an honest peer's old delta
    replayed, and an inflated token count (the spec's maximum, plus 10⁹ tokens of progress).
    Each is refused or bounded with a log line naming the peer; the honest peers agree on
    one outer state and their loss stays within the margin of the clean run. On top, honest
    c loses honest a's delta of round 2 (an injected fault, as a request timed out
    under CPU load did): the silent split is found and healed (c usually takes a and b's
    state; the side of more earned weight wins), so the one outer state still holds."""
    loss = attack(swarm, drop_round=2)
    print(f"mean eval loss {loss:.4f} under five malicious peers; clean run {clean_eval_loss:.4f}")
    assert loss <= (1 + ATTACK_MARGIN) * clean_eval_loss


def attack(swarm, run: Path | None = None, drop_round: int | None = None) -> float:
    """The malicious-peer case under run spec `run` (the default without it): asserts the
    refusals, the one outer state and loadable checkpoints; returns the honest peers' mean
    final eval loss. `drop_round`: honest c leaves out honest a's delta in that round, and
    must heal the split that makes."""
    import subprocess

    from locoswarm.node.spec import load_spec

    modes = ("nan", "huge", "wrong_round", "replay", "inflated")
    # Only the final eval loss is asserted: no peer evaluates the rounds before (a third of a
    # round's CPU on 2 cores).
    args = ("--min-peers", "3", "--max-rounds", str(ROUNDS), "--checkpoint-every", "1", "--eval-every", "0")
    a = swarm.join("a", *args, run=run)
    addr = daemon.first_addr(a)
    spec_args = [] if run is None else [str(run)]
    evil = {m: swarm.start(f"evil-{m}", [sys.executable, "-u", daemon.EVIL_SCRIPT, m, addr, *spec_args],
                           stdin=subprocess.PIPE) for m in modes}
    ids = {m: child.wait_for(r"^(\w+)$", 90)[1] for m, child in evil.items()}
    b_id = new_identity(swarm.root / "b")  # known before b is up, so that c starts beside it
    b = swarm.join("b", *args, peer=a, run=run)
    faults = None
    if drop_round is not None:
        # c's index of a among the other peers it expects: a, b and the five malicious ones.
        others = sorted([daemon.peer_id(a), b_id, *ids.values()])
        faults = [f"drop={drop_round}:{others.index(daemon.peer_id(a))}"]
    honest = [a, b, swarm.join("c", *args, peer=a, run=run, faults=faults)]
    assert daemon.peer_id(b) == b_id, b.tail()
    for p in honest:
        daemon.assert_clean_exit(p, p.wait_exit(300))
    finals = [daemon.final(p) for p in honest]
    assert len({d for *_, d in finals}) == 1, "honest outer states differ"
    expected = {
        "nan": r"delta of {pid} for round \d+ rejected: NonFiniteValue: .*non-finite",
        "wrong_round": r"delta of {pid} for round \d+ rejected: MalformedMessage: .*with a delta of round",
        "replay": r"(delta of {pid} for round \d+ rejected: MalformedMessage: .*with a delta of round|"
                  r"delta from {pid} names sender)",
        "huge": r"round \d+: {pid}: norm \S+ is \S+× the round's median .*clipped",
        "inflated": r"round \d+: {pid}: claims \d+ tokens, .* weighted as \d+",
    }
    for p in honest:
        err = p.stderr()
        for mode, pattern in expected.items():
            assert re.search(pattern.format(pid=ids[mode]), err), f"{p.name}: nothing logged for {mode}\n{p.tail()}"
    if drop_round is not None:
        c_err = honest[2].stderr()
        assert re.search(rf"round {drop_round}: delta of {daemon.peer_id(a)} left out", c_err), honest[2].tail()
        # The split heals, by either path: found by the records' chains (by both others, or by
        # one where the other's record had not yet shown the round), or, by c having counted
        # itself alone that round (the malicious peers' deltas refused, a's lost), found again.
        # Usually c takes a and b's state. The larger side is the one of more earned weight, not
        # more peers: where b joined late and is no established peer yet, a and c weigh by
        # their credits, and a may take c's state (then b takes it too: clean-clone CI of
        # 6360a10). The end's one digest is asserted above.
        heal = r"split at round \d+: took the state of [12] peers?|found [12] peers again after \d+ rounds? alone"
        assert any(re.search(heal, p.stderr()) for p in honest), "\n".join(p.tail() for p in honest)
    print(f"finals {[f[1] for f in finals]}")
    assert_checkpoints_load(swarm, ["a", "b", "c"], None if run is None else load_spec(str(run)).hash())
    return mean_eval(honest)


@pytest.mark.timeout(450, method="signal")
def test_sybils_from_a_runs_start_are_clipped_and_pooled_beside_its_anchors_and_identities_ahead_never_followed(
        swarm, tmp_path, clean_eval_loss):
    """Issue 19's sybil attacks against three honest peers that the run's spec names as its
    trust anchors, so that they are established from round 0 (optim/credit.py Ledger.founded;
    how peers earn their weight, and lose it by turning, is the negated-direction case below).
    Four identities there from round 0 send deltas of about 10× an honest one's norm after a
    round (70× at round 0), each its own noise: before earned weight they held the round's
    median, nothing was clipped or logged, and the honest loss ended above the untrained
    model's; without anchors they still held it until the honest peers had earned their
    weight (rounds 0-4 with the default earn_rounds, measured: docs/trust.md). Three more
    identities show records 5 rounds or more ahead of the swarm at dialable addresses that
    serve no state: before, every honest peer set out to download from them. Four more show
    one invented round chain (at round 0, an anchor every record shows): before, they
    outnumbered the honest peers in the silent-split vote. Now each sybil delta of round 0 is
    clipped to the established peers' median and the four share one peer's weight, both
    logged, and the honest peers' checks of them fail (noise agrees with no one's training):
    they are excluded with the next round's deltas. No honest peer follows anyone ahead or the
    invented chain; the honest peers end on one outer state within LOSS_MARGIN of the clean run."""
    import subprocess

    anchors = [new_identity(swarm.root / name) for name in ("a", "b", "c")]
    run = daemon.write_spec(tmp_path / "run.toml", anchors=anchors)
    args = ("--min-peers", "3", "--max-rounds", str(ROUNDS))
    a = swarm.join("a", *args, run=run)
    addr = daemon.first_addr(a)
    # Ready before round 0 (a waits for b and c), the sybils send from round 0, and the
    # identities ahead show their records once told to, when round 1 ended.
    sybils = [swarm.start(f"sybil-{i}", [sys.executable, "-u", daemon.EVIL_SCRIPT, "loud", addr, str(run), "0"],
                          stdin=subprocess.PIPE) for i in range(4)]
    fake = [sys.executable, "-u", "-m", "locoswarm.bench.fake_peer", addr, str(run)]
    ahead = [swarm.start(f"ahead-{i}", fake + ["ahead:20"], stdin=subprocess.PIPE) for i in range(3)]
    chain = [swarm.start(f"chain-{i}", fake + ["chain"], stdin=subprocess.PIPE) for i in range(4)]
    ids = [child.wait_for(r"^(\w+)$", 90)[1] for child in sybils]
    honest = [a] + [swarm.join(name, *args, peer=a, run=run) for name in ("b", "c")]
    daemon.wait_round(a, 1, 150)
    for child in ahead + chain:
        child.proc.stdin.write("go\n")
        child.proc.stdin.flush()
    fakes = [child.wait_for(r"^fake (\w+) announced", 60)[1] for child in ahead]
    for child in chain:
        child.wait_for(r"^fake \w+ announced", 60)
    for p in honest:
        daemon.assert_clean_exit(p, p.wait_exit(300))
    finals = [daemon.final(p) for p in honest]
    assert len({d for *_, d in finals}) == 1, "honest outer states differ"
    for p in honest:
        err = p.stderr()
        assert "downloading its state" not in err, f"{p.name} followed\n{p.tail()}"
        # A round ending before every sybil delta reached every honest peer (16 cores: round
        # 0's) splits the honest peers, and the smaller side takes the others' state; the
        # invented chain is shown by 4, the other honest peers are 2.
        donors = [int(n) for n in re.findall(r"split at round \d+: took the state of (\d+) peers", err)]
        assert all(n <= 2 for n in donors), f"{p.name} took the invented chain's side\n{p.tail()}"
        passed = [f for f in fakes if re.search(rf"{f} shows round \d+, ahead of our \d+, but has no earned weight", err)]
        assert passed, f"{p.name} never saw the identities ahead\n{p.tail()}"
        assert_clipped_pooled_and_excluded(p, ids, "0")
    loss = mean_eval(honest)
    print(f"mean eval loss {loss:.4f} under 4 loud sybils from round 0, 3 identities ahead and 4 with an invented "
          f"chain; "
          f"clean run {clean_eval_loss:.4f}; "
          f"finals {[f[1] for f in finals]}")
    assert loss <= (1 + LOSS_MARGIN) * clean_eval_loss


def assert_clipped_pooled_and_excluded(p, ids: list[str], round_pattern: str) -> None:
    """Honest peer `p` clipped each of the four loud identities `ids` to the established
    peers' median and pooled them as one peer in a round matching `round_pattern`, and
    excluded each on the checks of the established peers (noise agrees with no one's
    training): all three, or two where the third held its delta that round (it had just
    taken the others' state)."""
    err = p.stderr()
    clipped = [i for i in ids if re.search(rf"round {round_pattern}: {i}: norm \S+ is \S+× the established peers' "
                                           rf"median", err)]
    assert clipped == ids, f"{p.name}: sybil deltas clipped {len(clipped)} of 4\n{p.tail()}"
    assert re.search(rf"round {round_pattern}: 4 newcomers \(\d+ tokens claimed\) share one established peer's "
                     rf"weight", err), p.tail()
    excluded = [i for i in ids if re.search(rf"delta of {i} refused: its delta of the round before failed the "
                                             rf"checks of [23] established peers", err)]
    assert excluded == ids, f"{p.name}: sybils excluded {len(excluded)} of 4\n{p.tail()}"


@pytest.mark.timeout(300, method="signal")
def test_a_joiner_takes_the_state_the_peers_on_an_anchors_roll_attest_while_no_anchor_is_live(swarm, tmp_path):
    """A run whose one trust anchor (a) has stopped: a joiner took no state without its word
    and exited 2, however long the others trained on. Now a signed its roll (the established
    peers of its newest state) into the DHT while it trained; the joiner reads it, and b and
    c, on it and live, attest their state by a majority: the joiner takes the state they
    serve and aggregates the three deltas of a round with them."""
    import signal

    a_id = new_identity(swarm.root / "a")
    run = daemon.write_spec(tmp_path / "run.toml", earn_rounds=1, anchors=[a_id])
    a = swarm.join("a", "--min-peers", "3", "--max-rounds", "5", run=run)
    b = swarm.join("b", "--min-peers", "3", peer=a, run=run)
    c = swarm.join("c", "--min-peers", "3", peer=a, run=run)
    daemon.assert_clean_exit(a, a.wait_exit(150))
    assert re.search(r"signed the roll of round \d+: 3 established peers", a.stderr()), a.tail()
    d = swarm.join("d", peer=b, run=run)
    synced = d.wait_event("synced", 90)
    assert synced["digest"] in daemon.served_digests([b, c], synced["round"]), d.tail()
    daemon.wait_any([d], "round", 90, lambda e: (e["deltas"], e["participants"]) == (3, 3))
    vouch = re.search(r"none of the run's 1 anchors is live: (\d) live peers on the roll (\w+) signed at round "
                      r"(\d+) attest round \d+ \(chain \w+…\) and vouch for it", d.stderr())
    assert vouch and vouch[1] == "2" and vouch[2] == a_id, d.tail()
    for p in (b, c, d):
        p.proc.send_signal(signal.SIGTERM)
    for p in (b, c, d):
        daemon.assert_clean_exit(p, p.wait_exit(60))


TURN = 2
"""The round from which the turned peers send the negated direction."""


@pytest.mark.timeout(450, method="signal")
def test_peers_that_earned_their_weight_then_send_the_negated_direction_are_checked_and_excluded(swarm, tmp_path,
                                                                                               clean_eval_loss):
    """Issue 19's attack of two identities sending the negated honest direction at a norm the
    clip allows, by peers that earned their weight honestly first (earn_rounds 1: everyone is
    established after round 1). From round 2, d and e send their pseudo-gradients negated,
    2 of 5 peers: no norm rule bounds that, and before checked contributions they kept their
    weight for good. Each honest peer's check of their round-2 deltas fails (logged) and goes
    out with its round-3 delta; the three honest peers hold 3/5 of the established weight, so
    every peer's screening of round 3 excludes d and e: from then on they are not waited
    for, nor their deltas pulled (rounds of 3/3). No honest delta fails a check; the honest peers end on one outer state within
    ATTACK_MARGIN of the clean run (the round the checks are of is in the aggregate)."""
    run = daemon.write_spec(tmp_path / "run.toml", earn_rounds=1)
    # Only the final eval loss is asserted: no peer evaluates the rounds before (five peers on
    # 2 cores, a third of a round's CPU each).
    args = ("--min-peers", "5", "--max-rounds", str(ROUNDS), "--eval-every", "0")
    a = swarm.join("a", *args, run=run)
    honest = [a] + [swarm.join(name, *args, peer=a, run=run) for name in ("b", "c")]
    turned = [swarm.join(name, *args, peer=a, run=run, faults=[f"negate={TURN}"]) for name in ("d", "e")]
    ids = [daemon.peer_id(p) for p in turned]
    for p in honest + turned:
        daemon.assert_clean_exit(p, p.wait_exit(300))
    finals = [daemon.final(p) for p in honest]
    assert len({d for *_, d in finals}) == 1, "honest outer states differ"
    honest_ids = [daemon.peer_id(p) for p in honest]
    for p in honest:
        err = p.stderr()
        for i in ids:
            assert re.search(rf"round {TURN}: delta of {i} failed our check: it agrees with our own pseudo-gradient "
                             rf"at -\d", err), f"{p.name}: no failed check of {i}\n{p.tail()}"
            assert re.search(rf"round {TURN + 1}: delta of {i} refused: its delta of the round before failed the "
                             rf"checks of 3 established peers holding \d+% of the established weight", err), p.tail()
        for i in honest_ids:
            assert not re.search(rf"delta of {i} failed our check", err), f"{p.name} failed an honest delta"
        # Excluded, d and e are neither waited for nor asked for their deltas.
        later = [(got, of) for r, got, of, _ in daemon.rounds(p) if r >= TURN + 2]
        assert later and all(x == (3, 3) for x in later), f"{p.name}: rounds after the exclusion {later}"
    loss = mean_eval(honest)
    print(f"mean eval loss {loss:.4f} with 2 of 5 peers turned to the negated direction at round {TURN}; "
          f"clean run {clean_eval_loss:.4f}; finals {[f[1] for f in finals]}")
    assert loss <= (1 + ATTACK_MARGIN) * clean_eval_loss


STRANGER_ROUNDS = 40
"""Rounds the stranger trains alone before it joins. The swarm must still be behind this
round when the joiner takes its state, on a loaded 2-core machine and on a 16-core one. The
swarm's round then is what it ran during two process starts in a row, the stranger's restart
and then the joiner's start and download (its first rounds overlap the first of them): on
2 cores at load 6-9 each start took 6-8 of the swarm's rounds and the joiner synced at round
16-19, with the stranger joining at round 2 (as it did) or at round 0 (as it does). A start
is CPU work like a round's training, so a 16-core machine, whose rounds run about 3× faster,
starts faster too. 40 leaves twice the rounds measured (36 would save 2 s, in rounds alone of
0.5 s, for less): the assertion below names this constant if it ever fails."""


@pytest.mark.timeout(400, method="signal")
def test_a_joiner_takes_the_state_its_bootstrap_peer_vouches_for_not_a_newer_one_a_stranger_shows(swarm):
    """A peer that trained alone to round STRANGER_ROUNDS (a real state, not the swarm's;
    alone, a round takes a fraction of a swarm's) joins a swarm of three in its first rounds,
    its record far ahead of theirs. A joiner told to join through b,
    whose ledger knows nobody yet, used to take the newest state on offer: the stranger's. It
    takes the state b vouches for (b's manifest; any donor of that manifest may serve chunks)
    and the stranger's record drags none of the three along."""
    # Alone, nothing of its rounds is asserted but the state it ends on: it evaluates only at
    # the end (an eval every round made its 40 rounds a third longer on 2 cores) and
    # checkpoints only on leaving, which it resumes from (one every round, 30 MB each, cost 5 s
    # more; the default, every 10, wrote three more).
    x = swarm.join("x", "--max-rounds", str(STRANGER_ROUNDS), "--eval-every", "0",
                   "--checkpoint-every", str(STRANGER_ROUNDS))
    # Meanwhile two of the swarm start (its own swarm: no peer links it to the stranger's) and
    # wait for a third; nothing of theirs is asserted before the stranger is back, nor any eval
    # loss of the swarm. The third starts once the stranger has left, so that the swarm's
    # rounds start after the stranger's last and its lead is all of STRANGER_ROUNDS, as before.
    a = swarm.join("a", "--min-peers", "3", "--eval-every", "0")
    b = swarm.join("b", "--min-peers", "3", "--eval-every", "0", peer=a)
    daemon.assert_clean_exit(x, x.wait_exit(240))
    x_digest = daemon.final(x)[2]
    assert not a.events("round") and not b.events("round"), "two peers trained without the third"
    honest = [a, b, swarm.join("c", "--min-peers", "3", "--eval-every", "0", peer=a)]
    # The stranger joins once the swarm has a state of its own (its round 0 ended); its start
    # overlaps the swarm's next rounds, and the joiner comes at round 2 or later, as before.
    daemon.wait_round(honest[0], 0, 150)
    x = swarm.join("x", peer=honest[0])  # resumes on its state directory
    x.wait_for(rf"resumed from checkpoint round {STRANGER_ROUNDS}", 60)
    daemon.first_addr(x)
    daemon.wait_round(honest[0], 2, 150)
    joiner = swarm.join("d", "--eval-every", "0", peer=honest[1])
    synced = joiner.wait_event("synced", 90)
    served = daemon.served_digests(honest, synced["round"])
    assert synced["digest"] in served, f"joiner took {synced['digest']} at round {synced['round']}, honest served {served}"
    assert synced["round"] < STRANGER_ROUNDS and synced["digest"] != x_digest, \
        f"the stranger was not ahead: the joiner synced at round {synced['round']} (too few STRANGER_ROUNDS)"
    # The joiner saw the stranger and asked it (its manifest, encoded for that request only):
    # it was on offer, and not taken.
    assert any(e["round"] >= STRANGER_ROUNDS for e in x.events("serving_state")), "the stranger was never asked"
    for p in honest:
        assert "downloading its state" not in p.stderr(), f"{p.name} followed the stranger\n{p.tail()}"
