"""After a partition: the side that trained alone takes the state of the side that trained
together, whichever is ahead in rounds; in a swarm cut into lone peers exactly one keeps
its state; a peer that sat paused is not followed; vanished peers are dialed back from
their last records (real p2pd on loopback), and a donor keeps a round a joiner is
downloading while the swarm moves on."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P

from locoswarm.node.reunion import REDIAL_S, LostPeers, redial, whom_to_follow
from locoswarm.node.statesync import StateServer, download_state
from locoswarm.protocol.records import PeerRecord


def rec(peer: str, round_: int, diverged: bool = False, paused: bool = False) -> PeerRecord:
    return PeerRecord(peer_id=peer, addrs=("/ip4/127.0.0.1/tcp/1",), device="cpu", tokens_per_s=1.0, round=round_,
                      spec_hash=b"h" * 32, paused=paused, diverged=diverged)


def donors(follow) -> list[str] | None:
    return None if follow is None else sorted(r.peer_id for r in follow.donors)


def test_a_peer_that_ran_ahead_alone_takes_the_state_of_the_two_that_stayed_together():
    # Measured in the fault suite: c, diverged in round 3, was at outer step 20 when it saw
    # a and b (at step 6) again.
    a, b, c = rec("Qa", 6), rec("Qb", 6), rec("Qc", 20, diverged=True)
    assert donors(whom_to_follow("Qc", 20, [a, b], diverged_at=3)) == ["Qa", "Qb"]
    # They never follow it, ahead as it is.
    assert whom_to_follow("Qa", 6, [b, c], diverged_at=None) is None
    assert whom_to_follow("Qb", 6, [a, c], diverged_at=None) is None


def test_in_a_swarm_cut_into_lone_peers_exactly_one_keeps_its_state():
    a, c = rec("Qa", 9, diverged=True), rec("Qc", 30, diverged=True)
    moves = {me.peer_id: whom_to_follow(me.peer_id, me.round, [other], diverged_at=4) for me, other in ((a, c), (c, a))}
    assert moves["Qa"] is None
    assert donors(moves["Qc"]) == ["Qa"]


def test_a_peer_that_sat_paused_through_the_split_is_not_followed_and_catches_up_itself():
    # b paused after its step of round 4 (record round 5); a went on, diverged in round 5.
    a, b = rec("Qa", 12, diverged=True), rec("Qb", 5)
    assert whom_to_follow("Qa", 12, [b], diverged_at=5) is None
    assert donors(whom_to_follow("Qb", 5, [a], diverged_at=None)) == ["Qa"]
    assert whom_to_follow("Qa", 12, [rec("Qb", 9, paused=True)], diverged_at=5) is None


def test_a_peer_behind_takes_the_state_of_the_peers_ahead_only_when_they_outnumber_those_level():
    assert donors(whom_to_follow("Qb", 2, [rec("Qa", 8), rec("Qc", 8)], diverged_at=None)) == ["Qa", "Qc"]
    assert whom_to_follow("Qb", 2, [rec("Qa", 8, diverged=True), rec("Qc", 2)], diverged_at=None) is None
    assert whom_to_follow("Qb", 7, [rec("Qa", 8)], diverged_at=None) is None
    # A diverged runaway is not followed while a sound peer is there, even one not level...
    assert whom_to_follow("Qb", 6, [rec("Qa", 3), rec("Qc", 9, diverged=True)], diverged_at=None) is None
    # ...but it is when it is the only one left (a swarm of two; b restarted from a checkpoint).
    assert donors(whom_to_follow("Qb", 2, [rec("Qa", 9, diverged=True)], diverged_at=None)) == ["Qa"]


def test_vanished_peers_are_dialed_every_few_seconds_until_back_withdrawn_or_forgotten():
    now = [0.0]
    lost = LostPeers(clock=lambda: now[0])
    a, b, c = rec("Qa", 1, 3), rec("Qb", 1, 3), rec("Qc", 1, 3)
    lost.update([a, b, c], set())
    assert lost.due() == []
    lost.update([a], {"Qc"})  # b vanished, c left on purpose
    assert [r.peer_id for r in lost.due()] == ["Qb"]
    now[0] += REDIAL_S / 2
    assert lost.due() == []
    now[0] += REDIAL_S
    assert [r.peer_id for r in lost.due()] == ["Qb"]
    lost.update([a, b], set())
    assert len(lost) == 0
    lost.update([a], set())
    now[0] += 3600
    lost.update([a], set())
    assert len(lost) == 0 and lost.due() == []


@pytest.mark.timeout(120)
def test_redial_reaches_a_peer_from_its_record_and_puts_each_in_the_others_routing_table():
    async def go():
        p2p_a = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        p2p_b = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        dht_a = await DHTNode.create(p2p=p2p_a)
        dht_b = await DHTNode.create(p2p=p2p_b)
        try:
            record_b = PeerRecord(peer_id=p2p_b.peer_id.to_base58(), spec_hash=b"h" * 32, device="cpu",
                                  tokens_per_s=1.0, round=3,
                                  addrs=tuple(str(m) for m in await p2p_b.get_visible_maddrs()))
            assert all("/p2p/" in m for m in record_b.addrs)
            assert dht_b.protocol.routing_table.get(peer_id=p2p_a.peer_id) is None
            assert await redial(p2p_a, dht_a, record_b)
            await asyncio.sleep(0.5)  # the routing-table update is a task of its own
            assert dht_a.protocol.routing_table.get(peer_id=p2p_b.peer_id) is not None
            assert dht_b.protocol.routing_table.get(peer_id=p2p_a.peer_id) is not None
            p2p_c = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
            gone = PeerRecord(**{**{f: getattr(record_b, f) for f in record_b.__slots__},
                                 "peer_id": p2p_c.peer_id.to_base58(),
                                 "addrs": tuple(str(m) for m in await p2p_c.get_visible_maddrs())})
            await p2p_c.shutdown()
            assert not await redial(p2p_a, dht_a, gone, timeout_s=3.0)
        finally:
            for node in (dht_a, dht_b):
                await node.shutdown()
            for p2p in (p2p_a, p2p_b):
                await p2p.shutdown()

    asyncio.run(go())


@pytest.mark.timeout(120)
def test_a_donor_keeps_the_round_being_downloaded_while_it_publishes_newer_ones():
    """The donor publishes a new round after every chunk it serves (a swarm whose rounds are
    shorter than the download); the joiner still gets the round it began, intact."""
    from locoswarm.protocol.state import StateSpec

    spec = StateSpec(run_id="pin-test", spec_hash=b"t" * 32, tensors=(("param.0", (64, 100)), ("momentum.0", (64, 100))))
    gen = torch.Generator().manual_seed(3)
    first = {n: torch.randn(s, generator=gen) for n, s in spec.tensors}

    async def go():
        donor = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        joiner = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                  initial_peers=[str(m) for m in await donor.get_visible_maddrs()])
        server = StateServer(donor, spec, chunk_bytes=4096)
        await server.start()
        server.publish(first, 10)
        newer = [11]

        def moved_on(done: int, total: int) -> None:
            server.publish({n: t + newer[0] for n, t in first.items()}, newer[0])
            newer[0] += 1

        try:
            round_, tensors = await download_state(joiner, [donor.peer_id], spec, on_progress=moved_on)
        finally:
            await joiner.shutdown()
            await donor.shutdown()
        return round_, tensors, newer[0]

    round_, tensors, published = asyncio.run(go())
    assert published > 13, "the donor moved on by more than the rounds it keeps"
    assert round_ == 10
    assert all(torch.equal(tensors[n], first[n]) for n in first)
