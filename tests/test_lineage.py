"""After a partition: the side that trained alone takes the state of the side that trained
together, whichever is ahead in rounds; in a swarm cut into lone peers exactly one keeps
its state; a peer that sat paused is not followed; vanished peers are dialed back from
their last records (real p2pd on loopback), and a donor keeps a round a joiner is
downloading while the swarm moves on. After a silent split (peers that aggregated different
sets of deltas) the peers outside the largest group of equal round chains, and only they,
take that group's state. The Lineage and Membership objects the daemon keeps apply these
rules to what each round aggregated and each registry refresh showed."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P

from locoswarm.node.chains import ANCHOR_EVERY, chain_start, round_chain
from locoswarm.node.lineage import Lineage, attested_state, chain_at, whom_to_follow, whom_to_rejoin
from locoswarm.node.membership import Membership
from locoswarm.node.upkeep import REDIAL_S, LostPeers, redial
from locoswarm.node.statedownload import download_state
from locoswarm.node.statesync import StateServer
from locoswarm.protocol.records import PeerRecord


def rec(peer: str, round_: int, diverged: bool = False, paused: bool = False, chain: str = "",
        prev_chain: str = "", incarnation: int = 1, seq: int = 0) -> PeerRecord:
    return PeerRecord(peer_id=peer, addrs=("/ip4/127.0.0.1/tcp/1",), device="cpu", tokens_per_s=1.0, round=round_,
                      spec_hash=b"h" * 32, paused=paused, diverged=diverged, chain=chain, prev_chain=prev_chain,
                      incarnation=incarnation, seq=seq)


def donors(follow) -> list[str] | None:
    return None if follow is None else sorted(r.peer_id for r in follow.donors)


START = chain_start(b"h" * 32)
ALL = round_chain(START, 0, [("Qa", 100), ("Qb", 90), ("Qc", 80)])
"""Round 0 with all three deltas."""
NO_A = round_chain(START, 0, [("Qb", 90), ("Qc", 80)])
"""Round 0 without a's delta (its request timed out)."""


def test_round_chains_are_equal_exactly_for_the_same_aggregated_deltas_in_any_order():
    assert ALL == round_chain(START, 0, [("Qc", 80), ("Qa", 100), ("Qb", 90)])
    assert len({ALL, NO_A, round_chain(START, 0, [("Qa", 101), ("Qb", 90), ("Qc", 80)]),
                round_chain(START, 1, [("Qa", 100), ("Qb", 90), ("Qc", 80)]),
                round_chain(chain_start(b"x" * 32), 0, [("Qa", 100), ("Qb", 90), ("Qc", 80)])}) == 5
    # The difference stays in every later chain, whatever those rounds aggregate.
    same = [("Qa", 1), ("Qb", 1), ("Qc", 1)]
    assert round_chain(ALL, 1, same) != round_chain(NO_A, 1, same)
    # One sender's two different deltas of one round, with one token count: other chains.
    assert round_chain(START, 0, [("Qa", 100, b"x" * 16)]) != round_chain(START, 0, [("Qa", 100, b"y" * 16)])


def test_after_a_silent_split_the_minority_takes_the_majoritys_state_and_the_majority_never_moves():
    a, b, c = rec("Qa", 1, chain=ALL), rec("Qb", 1, chain=ALL), rec("Qc", 1, chain=NO_A)
    follow = whom_to_rejoin("Qc", {0: START, 1: NO_A}, [a, b])
    assert donors(follow) == ["Qa", "Qb"] and "split at round 1" in follow.why
    assert whom_to_rejoin("Qa", {1: ALL}, [b, c]) is None
    assert whom_to_rejoin("Qb", {1: ALL}, [a, c]) is None
    # One peer a round ahead shows its chain of the round before too: the view at round 1 is
    # whole, and c decides there, whether or not it is itself a round on.
    ahead = rec("Qb", 2, chain="cd" * 16, prev_chain=ALL)
    assert donors(whom_to_rejoin("Qc", {1: NO_A}, [a, ahead])) == ["Qa", "Qb"]
    assert donors(whom_to_rejoin("Qc", {1: NO_A, 2: "ab" * 16}, [a, ahead])) == ["Qa", "Qb"]
    assert whom_to_rejoin("Qa", {1: ALL}, [ahead, c]) is None
    # Without its chain of the round before (it took a state at round 2), no round is known to
    # all: nobody decides on a partial view.
    assert whom_to_rejoin("Qc", {1: NO_A, 2: "ab" * 16}, [a, rec("Qb", 2, chain="cd" * 16)]) is None
    # All a round on: the latest round they all show decides.
    later = [rec(p, 2, chain="cd" * 16, prev_chain=ALL) for p in ("Qa", "Qb")]
    assert whom_to_rejoin("Qc", {1: NO_A, 2: "ab" * 16}, later) is not None
    assert donors(whom_to_rejoin("Qc", {1: NO_A, 2: "cd" * 16}, later)) is None


def test_a_peer_that_takes_a_state_takes_the_chain_most_records_show_at_that_round():
    records = [rec("Qa", 2, chain="cd" * 16, prev_chain=ALL), rec("Qb", 1, chain=ALL), rec("Qd", 1, chain=NO_A),
               rec("Qe", 1, chain=NO_A, diverged=True)]
    assert chain_at(1, records) == ALL  # Qa (a round on) and Qb against Qd; the diverged Qe is not counted
    assert chain_at(2, records) == "cd" * 16
    assert chain_at(0, records) == "" and chain_at(3, records) == ""


def test_a_tie_between_split_groups_goes_to_the_group_with_the_smallest_peer_id_on_every_peer():
    a, b = rec("Qa", 1, chain=ALL), rec("Qb", 1, chain=NO_A)
    assert whom_to_rejoin("Qa", {1: ALL}, [b]) is None
    assert donors(whom_to_rejoin("Qb", {1: NO_A}, [a])) == ["Qa"]
    # Four peers in two pairs: the pair holding Qa keeps its state.
    c, d = rec("Qc", 1, chain=ALL), rec("Qd", 1, chain=NO_A)
    assert whom_to_rejoin("Qc", {1: ALL}, [a, b, d]) is None
    assert donors(whom_to_rejoin("Qd", {1: NO_A}, [a, b, c])) == ["Qa", "Qc"]
    assert donors(whom_to_rejoin("Qb", {1: NO_A}, [a, c, d])) == ["Qa", "Qc"]
    # Three peers, three chains: everyone takes Qa's.
    third = "ef" * 16
    assert donors(whom_to_rejoin("Qc", {1: third}, [a, b])) == ["Qa"]
    assert whom_to_rejoin("Qa", {1: ALL}, [b, rec("Qc", 1, chain=third)]) is None


def test_no_split_verdict_without_data_at_a_stale_round_or_from_diverged_and_paused_peers():
    a, b = rec("Qa", 1, chain=ALL), rec("Qb", 1, chain=ALL)
    assert whom_to_rejoin("Qc", {1: NO_A}, []) is None  # alone
    assert whom_to_rejoin("Qc", {1: NO_A}, [rec("Qa", 1), rec("Qb", 1)]) is None  # their chains unknown
    assert whom_to_rejoin("Qc", {}, [a, b]) is None  # ours unknown (resumed from a checkpoint)
    assert whom_to_rejoin("Qc", {1: ""}, [a, b]) is None
    # Their round is older than the chains we keep, or we never were at it: no comparison.
    assert whom_to_rejoin("Qc", {5: NO_A, 6: NO_A}, [a, b]) is None
    # Diverged peers are the partition rule's (whom_to_follow), paused ones are not in the
    # round: neither counts, so the one sound peer left decides (a tie: Qa's group).
    diverged, paused = rec("Qa", 1, chain=ALL, diverged=True), rec("Qb", 1, chain=ALL, paused=True)
    assert whom_to_rejoin("Qc", {1: NO_A}, [diverged, paused]) is None
    assert whom_to_rejoin("Qc", {1: NO_A}, [diverged, rec("Qd", 1, chain=NO_A), rec("Qb", 1, chain=ALL)]) is None
    assert donors(whom_to_rejoin("Qc", {1: NO_A}, [diverged, rec("Qb", 1, chain=ALL)])) == ["Qb"]


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


def test_the_state_taken_is_the_newest_a_majority_of_earned_weight_attests_never_the_newest_shown():
    y48, y49, x49, x50 = "a" * 32, "b" * 32, "c" * 32, "d" * 32
    honest = [rec("Qa", 49, chain=y49, prev_chain=y48), rec("Qb", 49, chain=y49, prev_chain=y48),
              rec("Qc", 48, chain=y48)]
    liars = [rec("Qd", 50, chain=x50, prev_chain=x49), rec("Qe", 50, chain=x50, prev_chain=x49)]
    everyone = {"Qa", "Qb", "Qc", "Qd", "Qe"}.__contains__
    found, shown = attested_state("me", honest + liars, everyone)
    assert shown == 5
    assert (found.round, found.chain) == (48, y48), "round 49's chain has 2 of 5: the round behind it has 3"
    assert sorted(r.peer_id for r in found.attesters) == ["Qa", "Qb", "Qc"]
    # Two established minorities of equal weight: nothing has a majority, nothing is taken.
    found, shown = attested_state("me", honest[:2] + liars, everyone)
    assert found is None and shown == 4
    # Identities without earned weight are not counted at all, however many and however far ahead.
    sybils = [rec(f"Qs{i}", 90, chain=x50) for i in range(20)]
    found, shown = attested_state("me", honest + sybils, {"Qa", "Qb", "Qc"}.__contains__)
    assert (found.round, found.chain, shown) == (49, y49, 3), "a peer a round further on attests the round behind"
    # Diverged, paused and chainless records are not in the weight the majority is of; we are not either.
    others = [rec("Qd", 50, chain=x50, diverged=True), rec("Qe", 50, chain=x50, paused=True), rec("Qf", 30),
              rec("me", 50, chain=x50)]
    found, shown = attested_state("me", honest[2:] + others, None)
    assert (found.round, found.chain, shown) == (48, y48, 1)
    assert attested_state("me", [rec("Qa", 30), rec("Qb", 31)], everyone) == (None, 0), "nobody shows a chain"


def test_lineage_chain_follows_what_each_round_aggregated_and_forgets_a_sampled_round():
    lin = Lineage(b"h" * 32)
    lin.start(0)
    start = chain_start(b"h" * 32)
    assert lin.shown(0) == {"diverged": False, "chain": start, "prev_chain": "", "anchors": ((0, start),)}
    lin.after_round(0, 0, 1, [("b", 10), ("a", 12)], others_trained=True, sampled=False)
    one = round_chain(start, 0, [("a", 12), ("b", 10)])
    assert lin.shown(1) == {"diverged": False, "chain": one, "prev_chain": start, "anchors": ((0, start),)}
    assert lin.checkpoint_extra(1) == {"chain": one, "vouched": False}  # "" was not established in round 0
    lin.after_round(1, 1, 2, [("a", 12), ("b", 10), ("c", 9)], others_trained=True, sampled=True)
    assert lin.shown(2)["chain"] == "" and lin.chains == {}


def _chains_through(rounds_: int, split_at: int | None = None) -> Lineage:
    """A lineage that aggregated a and b's deltas each round (without b's from `split_at` on)."""
    lin = Lineage(b"h" * 32)
    lin.start(0)
    for r in range(rounds_):
        lin.after_round(r, r, r + 1, [("a", 5)] if split_at is not None and r >= split_at else [("a", 5), ("b", 5)],
                        others_trained=True, sampled=False)
    return lin


def _record_of(lin: Lineage, peer: str, outer_steps: int) -> PeerRecord:
    return PeerRecord(peer_id=peer, addrs=("/ip4/127.0.0.1/tcp/1",), device="cpu", tokens_per_s=1.0,
                      round=outer_steps, spec_hash=b"h" * 32, **lin.shown(outer_steps))


def test_anchor_chains_outlive_the_recent_ones_and_records_show_the_last_two():
    lin = _chains_through(30)
    assert sorted(lin.chains) == [16, 23, 24, 25, 26, 27, 28, 29, 30], "8 recent rounds and the anchors 16, 24"
    assert [k for k, _ in lin.shown(30)["anchors"]] == [16, 24]


@pytest.mark.parametrize("apart", range(0, ANCHOR_EVERY + 1))
def test_a_split_is_found_whenever_records_stand_up_to_anchor_every_rounds_apart(apart):
    """The timing assumption of split healing, made explicit: records refreshed once a
    second show their chain at their round, the one before and two anchors, so peers whose
    records stand up to ANCHOR_EVERY rounds apart (a machine fast enough for that many
    rounds a second) still compare chains at a common round."""
    me = _chains_through(40, split_at=3)  # left out b's delta from round 3 on: split
    majority = _chains_through(40)
    others = [_record_of(majority, "Qb", 40), _record_of(majority, "Qc", 40 - apart)]  # refreshed at other times
    found = whom_to_rejoin("Qz", me.chains, others)
    assert found is not None and {r.peer_id for r in found.donors} == {"Qb", "Qc"}, (apart, me.chains.keys())


def test_lineage_diverges_only_when_others_trained_a_round_it_aggregated_alone():
    lin = Lineage(b"h" * 32)
    lin.start(0)
    lin.after_round(0, 0, 1, [("me", 5)], others_trained=True, sampled=False)
    assert lin.diverged_at is None, "alone before ever having peers: the swarm's state"
    lin.after_round(1, 1, 2, [("me", 5), ("b", 5)], others_trained=True, sampled=False)
    lin.after_round(2, 2, 3, [("me", 5)], others_trained=False, sampled=False)
    assert lin.diverged_at is None and lin.alone_rounds == 1, "nobody else trained: not diverged"
    lin.after_round(3, 3, 4, [("me", 5)], others_trained=True, sampled=False)
    assert lin.diverged_at == 3 and lin.shown(4)["diverged"]
    lin.synced(9, [rec("b", 9, chain="c9")], [])
    assert (lin.diverged_at, lin.alone_rounds, lin.chains) == (None, 0, {9: "c9"})


def test_a_diverged_peer_weighs_the_others_as_its_ledger_did_when_it_diverged_not_by_its_rounds_alone():
    """Cut off for longer than earn_rounds, a peer's ledger credits only itself: weighing by
    it, the peer would trust itself alone and never take the swarm's state back (its deltas
    and the swarm's, taken from different outer states, are refused both ways)."""
    only_me = {"me"}.__contains__
    lin = Lineage(b"h" * 32)
    lin.start(0, me="me")
    lin.after_round(0, 0, 1, [("me", 5), ("b", 5)], others_trained=True, sampled=False)
    lin.after_round(1, 1, 2, [("me", 5)], others_trained=True, sampled=False, established=frozenset())
    assert lin.diverged_at == 1
    swarm = [rec("b", 12), rec("c", 12)]
    assert whom_to_follow("me", 12, swarm, diverged_at=1, trusted=only_me) is None, "the rule without it"
    assert donors(lin.follow(12, swarm, only_me)) == ["b", "c"], "nobody established then: peers count"
    lin.synced(12, swarm, [])
    lin.after_round(12, 12, 13, [("me", 5), ("b", 5)], others_trained=True, sampled=False)
    lin.after_round(13, 13, 14, [("me", 5)], others_trained=True, sampled=False, established=frozenset({"b"}))
    assert donors(lin.follow(20, [rec("b", 20), rec("x", 20)], only_me)) == ["b"], "b was established then"


def test_a_peer_established_only_by_its_rounds_alone_weighs_the_swarm_as_before_them_and_follows_it():
    """Restarted offline, a peer trains alone (no peer trained, so it has not diverged) until
    its ledger establishes it and nobody else: weighing by that ledger it passed over the
    swarm ahead (not established there) for good, and the swarm never waited for it (it was
    behind). Its own weight counts only where a round with others, a taken state or the
    genesis ledger said so (`vouched`, kept with checkpoints); other peers' credit is earned
    only in rounds with them and counts as before."""
    only_me = {"me"}.__contains__
    swarm = [rec("b", 40), rec("c", 40)]
    lin = Lineage(b"h" * 32)
    lin.start(0, me="me", vouched=False)
    lin.after_round(0, 0, 1, [("me", 5), ("b", 5)], others_trained=True, sampled=False, established=frozenset())
    assert lin.checkpoint_extra(1)["vouched"] is False
    offline = Lineage(b"h" * 32)
    offline.start(1, lin.chains[1], resumed=True, me="me", vouched=lin.checkpoint_extra(1)["vouched"])
    for r in range(1, 12):  # alone: no peer trained, nothing diverged, our credit grows
        offline.after_round(r, r, r + 1, [("me", 5)], others_trained=False, sampled=False,
                            established=frozenset({"me"}))
    assert offline.diverged_at is None
    assert whom_to_follow("me", 12, swarm, diverged_at=None, trusted=only_me) is None, "the rule without it"
    assert donors(offline.follow(12, swarm, only_me)) == ["b", "c"], "nobody else established: peers count"
    # Established in a round with others (a run's first peer that trained alone before anyone
    # came, say), its weight counts: records of fresh identities ahead are passed over.
    founder = Lineage(b"h" * 32)
    founder.start(0, me="me", vouched=False)
    founder.after_round(8, 8, 9, [("me", 5), ("n", 5)], others_trained=True, sampled=False,
                        established=frozenset({"me"}))
    assert founder.vouched and founder.follow(9, [rec("x", 40), rec("y", 40)], only_me) is None
    # A state taken from donors: whatever their ledger says of us.
    founder.synced(40, swarm, [], trusted=frozenset({"b"}).__contains__)
    assert not founder.vouched
    founder.synced(40, swarm, [], trusted=frozenset({"b", "me"}).__contains__)
    assert founder.vouched
    # A checkpoint written before the flag was kept: vouched, as its weight was then taken.
    old = Lineage(b"h" * 32)
    old.start(5, "ab" * 16, resumed=True, me="me", vouched=None)
    assert old.vouched


def test_a_diverged_peer_whose_state_a_peer_behind_took_is_diverged_no_more_and_takes_nothing_back():
    """c trained a round alone because b died in it (a was gone): diverged. b came back from
    an older checkpoint and took c's state. c used to take b's state then, its own of a
    round before, and the two trained apart; b showing c's chain says c's is the swarm's."""
    lin = Lineage(b"h" * 32)
    lin.start(0, me="Qc")
    lin.after_round(0, 0, 1, [("Qc", 5), ("Qb", 5)], others_trained=True, sampled=False)
    lin.after_round(1, 1, 2, [("Qc", 5)], others_trained=True, sampled=False)
    lin.after_round(2, 2, 3, [("Qc", 5)], others_trained=True, sampled=False)
    assert lin.diverged_at == 1
    b_took_ours = rec("Qb", 2, chain=lin.chains[2], prev_chain=lin.chains[1])
    assert donors(lin.follow(3, [b_took_ours])) is None
    assert lin.diverged_at is None and not lin.shown(3)["diverged"]
    # A sound peer that shows only chains of before the divergence (or other ones) is the
    # swarm that trained on without us: followed, as before.
    lin = Lineage(b"h" * 32)
    lin.start(0, me="Qc")
    lin.after_round(0, 0, 1, [("Qc", 5), ("Qb", 5)], others_trained=True, sampled=False)
    lin.after_round(1, 1, 2, [("Qc", 5)], others_trained=True, sampled=False)
    swarm = rec("Qb", 2, chain="other", prev_chain=lin.chains[1])  # round 1's chain: of before
    assert donors(lin.follow(2, [swarm])) == ["Qb"] and lin.diverged_at == 1


def test_a_resumed_checkpoint_without_a_valid_chain_leaves_the_lineage_unknown():
    lin = Lineage(b"h" * 32)
    lin.start(7, "not a chain", resumed=True)
    assert lin.chains == {}
    lin.start(7, "ab" * 16, resumed=True)
    assert lin.chains == {7: "ab" * 16}


def test_after_a_discarded_round_the_peer_takes_the_state_of_the_peers_that_stepped_past_it():
    lin = Lineage(b"h" * 32)
    lin.start(3, "ef" * 16, resumed=True, me="me")
    lin.after_round(3, 3, 4, [("me", 1), ("b", 1)], others_trained=True, sampled=False)
    lin.discarded(4)
    assert list(lin.chains) == [4], "the state a discarded round leaves is the one its chain names, no other"
    assert lin.follow(4, [rec("b", 4), rec("c", 4)]) is None, "nobody stepped past us yet"
    follow = lin.follow(4, [rec("b", 5), rec("c", 5, diverged=True), rec("d", 5, paused=True)])
    assert donors(follow) == ["b"]
    lin.synced(5, [rec("b", 5, chain="cd" * 16)], [])
    assert lin.follow(5, [rec("b", 6)]) is None and lin.chains == {5: "cd" * 16}


def test_a_discarded_round_alone_is_forgotten_when_nobody_else_is_live():
    lin = Lineage(b"h" * 32)
    lin.start(0, me="me")
    lin.discarded(3)
    assert lin.follow(3, []) is None
    assert lin.behind_at is None, "alone, nobody stepped without us: nothing to take later"


def test_membership_keeps_the_others_admits_them_in_a_private_run_and_expects_recent_unpaused_peers():
    now = [0.0]
    m = Membership("me", restricted=True, clock=lambda: now[0])
    due = m.update([rec("me", 5), rec("a", 5), rec("b", 3), rec("c", 5, paused=True), rec("d", 2)])
    assert due == [] and m.num_peers == 4 and {r.peer_id for r in m.records} == {"a", "b", "c", "d"}
    assert m.admit("a") and not m.admit("me") and not m.admit("zz")
    assert m.expected(5) == set(), "a record alone is never waited for"
    assert m.told(5) == {"a", "b", "d"} and m.told(11) == {"a", "b", "d"} and m.told(0) == {"d"}, \
        "told: not paused, at most 2 ahead; a registry record whatever its round (it can be a refresh old)"
    fresh = Membership("me", restricted=False)
    fresh.update([rec("a", 5), rec("d", 2)])
    fresh.heard(rec("d", 2, seq=2))
    assert fresh.told(11) == {"a"} and fresh.told(10) == {"a", "d"}, \
        "a record its peer told us is fresh: told from 8 rounds behind"
    m.prove(["a", "b", "c", "d", "zz"])
    assert m.expected(5) == {"a", "b"}, "proven, within two rounds before, not paused"
    m.unprove("b")
    assert m.expected(5) == {"a"}, "a peer found unreachable is not waited for until it delivers again"
    assert Membership("me", restricted=False).admit is None, "an open run admits everyone"
    now[0] = 1.0
    due = m.update([rec("a", 6)], withdrawn={"b"})
    assert sorted(r.peer_id for r in due) == ["c", "d"], "vanished without a tombstone: dialed back"
    assert len(m.lost) == 2


def test_a_record_told_over_a_stream_replaces_the_registrys_while_it_is_the_newer_statement():
    """Within one incarnation the larger sequence number wins, whichever way it came; across a
    restart the life seen last; a peer the registry does not list is not taken from a stream."""
    now = [0.0]
    m = Membership("me", restricted=True, clock=lambda: now[0])
    m.update([rec("a", 5, seq=3), rec("b", 5)])
    m.heard(rec("a", 7, chain="ab" * 16, seq=5))
    m.heard(rec("zz", 9, seq=9))
    assert {r.peer_id: r.round for r in m.records} == {"a": 7, "b": 5} and not m.admit("zz")
    now[0] = 1.0
    m.update([rec("a", 6, seq=4), rec("b", 5)])  # the registry's copy, stored before the stream's news
    assert {r.peer_id: r.round for r in m.records}["a"] == 7
    m.prove(["a"])
    assert m.expected(7) == {"a"} and m.expected(9) == {"a"} and m.expected(5) == set()
    m.update([rec("a", 8, seq=6), rec("b", 5)])
    assert {r.peer_id: r.round for r in m.records}["a"] == 8
    now[0] = 2.0
    m.heard(rec("a", 2, incarnation=9, seq=1))  # restarted from an older checkpoint: told before the registry shows it
    assert m.incarnation("a") == 9 and m.expected(8) == set(), "its new life proves itself again"
    now[0] = 3.0
    m.update([rec("a", 8, seq=6), rec("b", 5)])  # the dead life's record, not expired yet
    assert m.incarnation("a") == 9
    m.update([rec("a", 2, incarnation=9, seq=1), rec("b", 5)])
    m.heard(rec("a", 3, incarnation=9, seq=2))
    assert {r.peer_id: r.round for r in m.records}["a"] == 3
    m.update([rec("b", 5)])
    assert {r.peer_id: r.round for r in m.records} == {"a": 3, "b": 5}, "told within the TTL: still in view"
    now[0] = 13.5
    m.update([rec("b", 5)])
    assert [r.peer_id for r in m.records] == ["b"], "neither listed nor heard for a TTL: gone"


def test_a_peer_the_registry_does_not_list_yet_joins_the_view_by_its_stream_if_the_policy_admits_it():
    now = [0.0]
    m = Membership("me", restricted=True, clock=lambda: now[0], heard_ttl_s=10.0,
                   refuse=lambda r: None if r.proof == b"p" * 32 else "no proof")
    m.update([rec("b", 5)])
    m.heard(rec("zz", 5))
    m.heard(dataclasses.replace(rec("new", 5, seq=1), proof=b"p" * 32))
    assert sorted(r.peer_id for r in m.records) == ["b", "new"] and m.admit("new") and not m.admit("zz")
    now[0] = 8.0
    m.heard(dataclasses.replace(rec("new", 5, seq=1), proof=b"p" * 32))  # the same record again: still alive
    now[0] = 15.0
    m.update([rec("b", 5)], withdrawn=set())
    assert "new" in {r.peer_id for r in m.records}
    m.update([rec("b", 5)], withdrawn={"new"})
    assert "new" not in {r.peer_id for r in m.records}, "withdrawn: gone at once"
    m.heard(dataclasses.replace(rec("open", 1), proof=b""))
    assert "open" not in m.admitted
    o = Membership("me", restricted=False, clock=lambda: now[0])
    o.heard(rec("x", 3))
    assert [r.peer_id for r in o.records] == ["x"], "an open run takes any peer of its spec"


def test_a_restarted_peer_is_not_waited_for_until_its_new_life_delivers_a_delta():
    m = Membership("me", restricted=False)
    m.update([rec("a", 5, incarnation=7), rec("b", 5, incarnation=3)])
    m.prove(["a", "b"])
    assert m.expected(5) == {"a", "b"}
    m.update([rec("a", 2, incarnation=8), rec("b", 5, incarnation=3)])  # a restarted from an older checkpoint
    assert m.expected(5) == {"b"} and m.expected(2) == set()
    m.prove(["a"])
    assert m.expected(3) == {"a"}
    m.update([rec("b", 5, incarnation=3)], withdrawn={"a"})
    assert "a" not in m.proven, "a withdrawn peer's proof is forgotten"


def test_a_peer_whose_stream_fails_is_out_of_the_view_at_once_until_it_shows_life_again():
    """Its record stays listed in the registry until it expires (a minute by default), but
    the peer is neither told, waited for nor a donor from the moment its streams fail;
    dialed back only when a daemon of ours ran there."""
    now = [0.0]
    m = Membership("me", restricted=False, clock=lambda: now[0])
    m.update([rec("a", 5, seq=3), rec("b", 5, seq=3), rec("fake", 5)])
    m.prove(["a", "b"])
    now[0] = 1.0
    m.gone("a", served=True)
    m.gone("fake", served=False)
    m.gone("nobody", served=True)
    assert {r.peer_id for r in m.records} == {"b"} and m.expected(5) == {"b"} and m.told(5) == {"b"}
    assert [r.peer_id for r in m.lost.due()] == ["a"], "dialed back at once; the bare record never"
    now[0] = 2.0
    m.update([rec("a", 5, seq=3), rec("b", 6, seq=4), rec("fake", 5)])
    assert {r.peer_id for r in m.records} == {"b"}, "the registry's unchanged copies do not bring them back"
    m.back("a")  # a dial reached it (a cut link healed)
    assert {r.peer_id for r in m.records} == {"a", "b"} and m.expected(6) == {"b"}, "back, but proves itself again"
    now[0] = 10.0
    assert m.lost.due() == [], "reached: not dialed again"
    m.gone("a", served=True)
    m.heard(rec("a", 5, seq=3))  # it talks to us: there, whatever record it tells
    assert "a" in {r.peer_id for r in m.records}
    m.gone("a", served=True)
    now[0] = 11.0
    m.update([rec("a", 2, incarnation=9), rec("b", 6, seq=4), rec("fake", 5)])  # restarted: a new record
    assert {r.peer_id for r in m.records} == {"a", "b"}
    m.update([rec("a", 2, incarnation=9), rec("b", 6, seq=4)])
    assert "fake" not in m._gone, "forgotten with its record"


def test_a_bare_record_found_gone_stays_out_for_a_quiet_time_that_doubles_whatever_newer_records_it_publishes():
    """A record with nothing behind it (no stream to it ever opened) used to come back into
    the view with each refresh (a new sequence number, every second), to be dialled and
    found gone again: 40 keys of one process were found gone 120 times by one peer in 27
    rounds. It now stays out for BARE_QUIET_S, doubled each time it is found gone again; a
    peer that talks to us is back at once, and a peer that served is dialled back as before."""
    from locoswarm.node.membership import BARE_QUIET_S, MAX_BARE_QUIET_S

    now = [0.0]
    m = Membership("me", restricted=False, clock=lambda: now[0])
    m.update([rec("ghost", 5, seq=1), rec("b", 5, seq=1)])
    m.gone("ghost", served=False)
    assert m.found_gone == 1
    for t, seq in ((1.0, 2), (BARE_QUIET_S - 0.1, 3)):
        now[0] = t
        m.update([rec("ghost", 5, seq=seq), rec("b", 5, seq=1)])
        assert {r.peer_id for r in m.records} == {"b"}, f"a newer record at {t} s, within its quiet time"
    now[0] = BARE_QUIET_S + 0.1
    m.update([rec("ghost", 5, seq=4), rec("b", 5, seq=1)])
    assert {r.peer_id for r in m.records} == {"ghost", "b"}, "back once its quiet time is over"
    m.gone("ghost", served=False)
    assert m.found_gone == 1, "one bare peer counted once"
    now[0] += 2 * BARE_QUIET_S - 0.1
    m.update([rec("ghost", 5, seq=5), rec("b", 5, seq=1)])
    assert {r.peer_id for r in m.records} == {"b"}, "found gone again: out twice as long"
    m.heard(rec("ghost", 5, seq=6))  # it talks to us over its own stream: a daemon is there
    assert {r.peer_id for r in m.records} == {"ghost", "b"} and "ghost" not in m._quiet
    for seq in range(7, 17):  # back after each quiet time, found gone again: never out longer than the cap
        m.gone("ghost", served=False)
        now[0] += MAX_BARE_QUIET_S + 1
        m.update([rec("ghost", 5, seq=seq), rec("b", 5, seq=1)])
    m.gone("ghost", served=False)
    assert m._quiet["ghost"] == (11, now[0] + MAX_BARE_QUIET_S)


def test_a_held_round_asks_the_peers_already_past_it_for_their_deltas():
    """A joiner holds the first round it trains in a state it took: it joined that round
    late, and the peers that took part may have stepped past it before their progress
    reached it. Their records then show a later round, while they still serve its delta:
    a held round asks them too, proven or not, up to LATE_AHEAD rounds on, where a round
    trained from its start asks only the peers whose record puts them in it."""
    from locoswarm.node.membership import LATE_AHEAD

    m = Membership("me", restricted=False)
    m.update([rec("still", 17), rec("past", 18), rec("proven", 17 + LATE_AHEAD), rec("gone_on", 18 + LATE_AHEAD),
              rec("behind", 14), rec("rest", 18, paused=True)])
    m.prove(["proven"])
    assert m.candidates(17) == {"still"}
    assert m.candidates(17, late=True) == {"still", "past", "proven"}, "past it by at most LATE_AHEAD, not paused"
    m.mark_silent("past", 17)
    m.mark_withholding("still", 17)
    assert m.candidates(17, late=True) == {"proven"}, "left alone as in a round trained from its start"


def test_unproven_peers_are_probed_and_one_that_did_not_answer_is_left_alone_ever_longer():
    from locoswarm.node.membership import MAX_SILENT_ROUNDS, SILENT_ROUNDS

    m = Membership("me", restricted=False)
    m.update([rec("new", 5, incarnation=1), rec("old", 5), rec("far", 1), rec("rest", 5, paused=True)])
    m.prove(["old"])
    assert m.candidates(5) == {"new"}, "unproven, in the round's range, not paused"
    m.mark_silent("new", 5)
    assert m.candidates(6) == set()
    later = 5 + SILENT_ROUNDS
    m.update([rec("new", later, incarnation=1), rec("old", later)])
    assert m.candidates(later) == {"new"}, "asked again after SILENT_ROUNDS"
    m.mark_silent("new", later)  # silent again: left alone twice as long
    m.update([rec("new", later + SILENT_ROUNDS, incarnation=1), rec("old", later + SILENT_ROUNDS)])
    assert m.candidates(later + SILENT_ROUNDS) == set()
    m.update([rec("new", later + 2 * SILENT_ROUNDS, incarnation=1), rec("old", later + 2 * SILENT_ROUNDS)])
    assert m.candidates(later + 2 * SILENT_ROUNDS) == {"new"}
    for _ in range(12):  # never left alone for more than MAX_SILENT_ROUNDS
        m.mark_silent("new", later)
    assert m.silent["new"][2] == MAX_SILENT_ROUNDS
    m.update([rec("new", 5, incarnation=2), rec("old", 5)])
    assert m.candidates(6) == {"new"}, "a restart is probed again"
    m.prove(["new"])
    assert m.candidates(6) == set() and m.expected(6) == {"new", "old"} and not m.silent


def test_a_peer_that_withheld_its_delta_is_no_longer_waited_for_and_left_alone_ever_longer():
    """Proven once, then live and serving no delta (node/pull.py `Gathered.withheld`): not
    expected any more, left alone (no probe, its pulls skipped) for WITHHELD_ROUNDS, twice as
    long when it does it again; a delta delivered, or a new life, ends that."""
    from locoswarm.node.membership import WITHHELD_ROUNDS as SILENT_ROUNDS

    m = Membership("me", restricted=False)
    m.update([rec("bad", 5), rec("old", 5)])
    m.prove(["bad", "old"])
    assert m.expected(5) == {"bad", "old"}
    m.mark_withholding("bad", 5)
    assert m.expected(6) == {"old"} and m.candidates(6) == set() and m.withheld("bad", 6)
    assert m.withheld("bad", 5 + SILENT_ROUNDS - 1) and not m.withheld("bad", 5 + SILENT_ROUNDS)
    m.update([rec("bad", 5 + SILENT_ROUNDS), rec("old", 5 + SILENT_ROUNDS)])
    assert m.candidates(5 + SILENT_ROUNDS) == {"bad"}, "asked again, as a newcomer"
    m.mark_withholding("bad", 5 + SILENT_ROUNDS)
    assert m.withheld("bad", 5 + 3 * SILENT_ROUNDS - 1), "twice as long"
    m.update([rec("bad", 5, incarnation=2), rec("old", 5)])
    assert not m.withheld("bad", 6) and m.candidates(6) == {"bad"}, "a new life is probed again"
    m.update([rec("bad", 5), rec("old", 5)])
    m.prove(["bad"])
    assert not m.withheld("bad", 6) and m.expected(6) == {"bad", "old"}


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


def test_peers_the_partial_view_let_go_of_for_age_or_room_are_not_dialed_back():
    """A peer aged out of the registry's partial view (its bucket not re-read lately) is out
    of sight, not known to have vanished: dialing it would redial much of a large swarm."""
    lost = LostPeers(clock=lambda: 0.0)
    a, b = rec("Qa", 1, 3), rec("Qb", 1, 3)
    lost.update([a, b], set())
    lost.update([a], set(), out_of_sight={"Qb"})
    assert len(lost) == 0 and lost.due() == []
    m = Membership("me", restricted=False, clock=lambda: 0.0)
    m.update([a, b])
    assert m.update([a], out_of_sight={"Qb"}) == [] and m.num_peers == 1


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
            got = await download_state(joiner, [donor.peer_id], spec, on_progress=moved_on)
        finally:
            await joiner.shutdown()
            await donor.shutdown()
        return got.round, got.tensors, newer[0]

    round_, tensors, published = asyncio.run(go())
    assert published > 13, "the donor moved on by more than the rounds it keeps"
    assert round_ == 10
    assert all(torch.equal(tensors[n], first[n]) for n in first)
