"""Catching up by the rounds' deltas (node/replay.py): a replica that took a state rounds
behind the swarm replays the rounds since from the delta messages a donor screened, screening
and stepping exactly as the donor did, and ends on the donor's state bit for bit; deltas
other than the swarm's make another round chain and nothing is applied. The wire side
(node/statesync.py RoundLog, kind ROUND_DELTAS) is exercised by real donor processes in
tests/test_faults.py."""

from __future__ import annotations

import threading
from dataclasses import replace

import msgpack
import pytest
import torch

from locoswarm.node.handover import served, take_state
from locoswarm.node.chains import chain_start, delta_content, round_chain
from locoswarm.node.replay import ReplayRefused, take_steps, verify
from locoswarm.node.spec import RunSpec
from locoswarm.node.statesync import RoundLog
from locoswarm.node.trainer import Trainer
from locoswarm.protocol.state import decode_manifest, encode_state

SPEC = replace(RunSpec(), num_shards=3, batch_size=4)


def _trainer(shard: int) -> Trainer:
    return Trainer(SPEC, SPEC.hash(), shard=shard, device=torch.device("cpu"))


class Swarm:
    """Two replicas stepping together as the round loop does (node/roundloop.py): decode,
    screen against their ledger and chain, step, and keep the round's messages."""

    def __init__(self) -> None:
        self.peers = {"a": _trainer(0), "b": _trainer(1)}
        self.chains = {0: chain_start(SPEC.hash())}
        self.log = RoundLog()
        self._stop = threading.Event()

    def round(self) -> None:
        works = {}
        for name, t in self.peers.items():
            t.train_until(self._stop, lambda n: n >= t.round_tokens)
            works[name] = t.end_round()
        step = self.peers["a"].outer_steps
        base = self.chains[step]
        wires = [t.encode(works[n], n, base) for n, t in self.peers.items()]
        for name, t in self.peers.items():
            screened = t.screen([t.decode(w) for w in wires], base)
            kept = t.step.kept(screened)
            t.apply(works[name], kept, overlapped=False, earned=screened.earned, banned=screened.banned)
        self.chains[step + 1] = round_chain(base, works["a"].round,
                                            [(d.sender, d.num_tokens, delta_content(d)) for d in kept])
        self.log.keep(step, wires)

    def manifest(self, round_: int):
        a = self.peers["a"]
        m, _ = encode_state(a.state_spec, a.state_snapshot(), round_, chain=self.chains[round_],
                            ledger=a.ledger.pairs())
        return decode_manifest(m, a.state_spec)

    def steps(self, first: int, last: int) -> list[list[bytes]]:
        out = []
        for step in range(first, last):
            count = int.from_bytes(self.log.answer(step, 0)[:2], "big")
            out.append([self.log.answer(step, i)[2:] for i in range(count)])
        return out


@pytest.fixture(scope="module")
def swarm_at_4():
    """A swarm that ran 4 rounds, and what it served of round 1."""
    s = Swarm()
    s.round()
    state, residual = served(s.peers["a"])
    ledger = s.peers["a"].ledger.pairs()
    for _ in range(3):
        s.round()
    return s, (state, ledger, residual)


def _joiner(taken) -> Trainer:
    state, ledger, residual = taken
    j = _trainer(2)
    take_state(j, 1, state, ledger)  # no residual: nothing to score, and replaying does not need one
    return j


def test_a_replica_replays_the_rounds_since_its_state_and_ends_on_the_swarms_state_bit_for_bit(swarm_at_4):
    s, taken = swarm_at_4
    j = _joiner(taken)
    chain, steps = verify(j, s.chains[1], 1, s.steps(1, 4))
    assert chain == s.chains[4]
    assert j.outer_steps == 1, "verify changes nothing"
    digest, start = take_steps(j, steps, s.manifest(4))
    assert start.outer_loss is None and "with its own residual" in start.describe()
    a = s.peers["a"]
    assert (j.outer_steps, j.round, j.holds) == (4, 4, 4)
    assert digest == j.state_digest() == a.state_digest() == s.peers["b"].state_digest()
    assert j.ledger.pairs() == a.ledger.pairs() and any(c > 0 for _, c in a.ledger.pairs())
    # The replica restarts from the new outer state, ahead of it by what it holds unsent.
    start = j.step.restart(j.outer, j.compressor)
    assert all(torch.equal(p, q) for p, q in zip(j.model.parameters(), start))


def test_a_round_of_other_deltas_makes_another_chain_and_a_broken_one_is_refused_with_nothing_applied(swarm_at_4):
    s, taken = swarm_at_4
    j = _joiner(taken)
    before = j.state_digest()
    steps = s.steps(1, 4)
    # A donor that leaves b's delta out of round 2: a valid round, not the swarm's (and the
    # swarm's deltas of round 3, taken from the swarm's state, no longer pass its screening).
    short = [steps[0], [w for w in steps[1] if j.decode(w).sender == "a"]]
    chain, _ = verify(j, s.chains[1], 1, short)
    assert chain != s.chains[3]
    with pytest.raises(ReplayRefused, match="no delta of outer step 3 passes the screening"):
        verify(j, s.chains[1], 1, short + [steps[2]])
    # A donor that changes a delta it relays (here b's token count): another chain.
    body = msgpack.unpackb(steps[1][1], raw=False)
    body["tokens"] -= 1
    chain, _ = verify(j, s.chains[1], 1, [steps[0], [steps[1][0], msgpack.packb(body, use_bin_type=True)]])
    assert chain != s.chains[3]
    with pytest.raises(ReplayRefused, match="a delta of outer step 2"):
        verify(j, s.chains[1], 1, [steps[0], [steps[1][0][:-3]], steps[2]])
    with pytest.raises(ReplayRefused, match=r"the deltas of outer step 2 name rounds \[2, 3\]"):
        verify(j, s.chains[1], 1, [steps[0], [steps[1][0], steps[2][1]]])
    assert j.state_digest() == before and j.outer_steps == 1


def test_a_state_that_comes_out_other_than_the_donors_manifest_is_told(swarm_at_4):
    s, taken = swarm_at_4
    j = _joiner(taken)
    _, steps = verify(j, s.chains[1], 1, s.steps(1, 4))
    m = s.manifest(4)
    assert take_steps(j, steps, replace(m, ledger=m.ledger + (("stranger", 1),)))[0] is None


def test_a_long_catch_up_starts_from_the_donors_residual_where_it_scores_better_than_its_own(swarm_at_4):
    """Caught up over RESIDUAL_AFTER steps, the replica's own residual is where it last
    trained: the donor's is offered, and kept only where its held-out loss is lower."""
    s, taken = swarm_at_4
    _, residual = served(s.peers["a"])
    j = _joiner(taken)
    _, steps = verify(j, s.chains[1], 1, s.steps(1, 4))
    digest, start = take_steps(j, steps, s.manifest(4), residual)
    assert digest == s.peers["a"].state_digest()
    assert start.donors and start.donor_loss < start.outer_loss, start
    assert all(torch.equal(e, residual[n].reshape(-1).float()) for e, (n, _) in zip(j.compressor.errors,
                                                                                      j.residual_spec.tensors))
    k = _joiner(taken)
    own = [e.clone() for e in k.compressor.errors]
    _, steps = verify(k, s.chains[1], 1, s.steps(1, 4))
    noise = {n: 1e3 * torch.randn(t.shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
             for n, t in residual.items()}
    _, start = take_steps(k, steps, s.manifest(4), noise)
    assert not start.donors and "with its own residual, refusing" in start.describe()
    assert all(torch.equal(e, o) for e, o in zip(k.compressor.errors, own))


def test_the_round_log_keeps_the_last_rounds_under_its_byte_bound_and_answers_with_the_count():
    log = RoundLog(rounds=3, max_bytes=100)
    for step in range(5):
        log.keep(step, [bytes([step]) * 10, b"x" * 5])
    assert [s for s in range(5) if log.answer(s, 0)] == [2, 3, 4]
    assert log.answer(4, 1) == (2).to_bytes(2, "big") + b"x" * 5
    assert log.answer(4, 2) == b"" and log.answer(9, 0) == b""
    log.keep(5, [b"y" * 90])
    assert [s for s in range(6) if log.answer(s, 0)] == [5] and log.nbytes == 90
    log.keep(6, [])  # a round without deltas is not kept, nor one with an empty message
    log.keep(7, [b"z", b""])
    assert log.answer(6, 0) == log.answer(7, 0) == b""
    log.clear()
    assert log.nbytes == 0 and log.answer(5, 0) == b""
