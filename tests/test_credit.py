"""Earned weight (optim/credit.py) and the rules that use it: the ledger's arithmetic, the
screening of a round with established peers and newcomers (optim/screen.py), the decisions
whom to follow (node/lineage.py), and the ledger's travel with a state manifest and a
checkpoint. The deltas are real encoded-and-decoded ones."""

from __future__ import annotations

import math

import pytest
import torch

from locoswarm.node.lineage import whom_to_follow, whom_to_rejoin
from locoswarm.optim import CompressionConfig, ErrorFeedbackCompressor, delta_spec
from locoswarm.optim.config import RobustConfig
from locoswarm.optim.credit import DECAY_SHIFT, MAX_ENTRIES, Ledger
from locoswarm.optim.screen import apply_screen, delta_norm, median, screen
from locoswarm.protocol import DeltaMessage, MalformedMessage, decode_delta, encode_delta
from locoswarm.protocol.records import PeerRecord
from locoswarm.protocol.state import StateSpec, check_ledger, decode_manifest, encode_state, state_digest

SHAPES = [("w", (16, 64)), ("v", (300,))]
CFG = CompressionConfig(density=0.05, bits=4, chunk=256)
SPEC = delta_spec(SHAPES, CFG, run_id="r", spec_hash=b"h" * 32, max_tokens=1 << 30)
PLAN = 1000
"""Tokens a peer plans per round in these tests."""


def _delta(gen, sender: str, tokens: int = PLAN, times: float = 1.0):
    comp = ErrorFeedbackCompressor(SPEC.tensors, CFG, "cpu")
    packed, _ = comp.compress([times * torch.randn(shape, generator=gen) for _, shape in SHAPES])
    msg = DeltaMessage(run_id="r", spec_hash=b"h" * 32, round=0, sender=sender, num_tokens=tokens,
                       tensors=tuple(packed))
    return decode_delta(encode_delta(msg), SPEC)


def _ledger(established: list[str], earn_rounds: int = 8) -> Ledger:
    led = Ledger(earn_rounds=earn_rounds, per_peer_tokens=PLAN)
    for _ in range(earn_rounds + 2):
        led.credit({p: PLAN for p in established})
    assert all(led.established(p) for p in established)
    return led


def test_a_peer_is_established_after_earn_rounds_of_full_work_and_loses_it_after_a_long_absence():
    led = Ledger(earn_rounds=8, per_peer_tokens=PLAN)
    rounds = 0
    while not led.established("a"):
        led.credit({"a": PLAN, "b": PLAN // 2})
        rounds += 1
    assert rounds == 8, "8 rounds of full work: a newcomer at work loses nothing to the decay"
    assert not led.established("b"), "half the work: not yet"
    for _ in range(600):
        led.credit({"a": PLAN})
    settled = led.credits["a"]
    assert settled == pytest.approx(PLAN << DECAY_SHIFT, rel=0.02), "working on: about 64 rounds of work"
    gone = 0
    while led.established("a"):
        led.credit({})
        gone += 1
    assert 120 <= gone <= 140, gone
    for _ in range(600):
        led.credit({})
    assert "a" not in led.credits and "b" not in led.credits, "faded to nothing: dropped"


def test_rounds_alone_leave_the_others_credit_standing_and_the_lone_peers_own_settle_as_ever():
    """A peer alone (a round of one sender: offline, cut off) says nothing of the others'
    absence. Decayed there, after about 130 rounds alone its ledger established nobody but
    itself, and back online it weighed the swarm's peers at nothing (node/lineage.py)."""
    led = Ledger(earn_rounds=8, per_peer_tokens=PLAN)
    for _ in range(40):
        led.credit({"a": PLAN, "b": PLAN, "c": PLAN})
    others = {p: led.credits[p] for p in ("b", "c")}
    for r in range(1000):
        led.credit({"a": PLAN}, (), 40 + r)
    assert {p: led.credits[p] for p in ("b", "c")} == others and led.established("b") and led.established("c")
    assert led.credits["a"] == pytest.approx(PLAN << DECAY_SHIFT, rel=0.02), "its own: settled as with others"
    led.credit({"a": PLAN, "b": PLAN})  # two senders: c's absence is seen, and decays it
    assert led.credits["c"] < others["c"]
    # An exclusion still ends by the round, alone or not.
    led.credit({"a": PLAN, "b": PLAN}, ("x",), 2000)
    led.credit({"a": PLAN}, (), 2000 + 15)
    assert led.banned("x")
    led.credit({"a": PLAN}, (), 2000 + 16)
    assert "x" not in led.credits


def test_a_crowd_of_newcomers_sharing_one_peers_weight_is_established_after_its_size_times_earn_rounds():
    """Twenty newcomers beside one established peer share one peer's weight: each earns a
    twentieth of a round's credit a round. Decayed like an established peer's, that credit
    settled at 64/20 = 3.2 rounds' worth, below the 8 of the threshold: none of them was ever
    established. Kept while they work, all are after 20 × 8 rounds; one that stops fades."""
    led = Ledger.founded(["anchor"], earn_rounds=8, per_peer_tokens=PLAN)
    crowd = [f"n{i:02d}" for i in range(20)]
    rounds = 0
    while not any(led.established(p) for p in crowd):
        led.credit({"anchor": PLAN, **{p: PLAN // 20 for p in crowd if p != "n00" or rounds < 10}})
        rounds += 1
        assert rounds <= 200, "never established"
    assert rounds == 20 * 8 and all(led.established(p) for p in crowd[1:])
    assert not led.established("n00") and led.credits["n00"] < 10 * PLAN // 20, "stopped after 10 rounds: faded"


def test_a_ledger_depends_only_on_what_was_credited_and_is_off_when_earn_rounds_is_zero():
    one, two = Ledger(earn_rounds=4, per_peer_tokens=PLAN), Ledger(earn_rounds=4, per_peer_tokens=PLAN)
    for r in range(10):
        one.credit({"a": PLAN + r, "b": PLAN - r, "c": 7})
        two.credit({"c": 7, "b": PLAN - r, "a": PLAN + r})
    assert one.pairs() == two.pairs()
    off = Ledger(earn_rounds=0, per_peer_tokens=PLAN)
    off.credit({"a": 10**9})
    assert off.pairs() == () and not off.established("a") and off.standing(["a"]) is None


def test_credit_never_goes_negative_and_a_delta_weighted_to_nothing_earns_no_entry():
    led = Ledger(earn_rounds=8, per_peer_tokens=PLAN)
    led.credit({"a": 3, "b": 0})
    assert led.pairs() == (("a", 3),)
    for _ in range(10):
        led.credit({"a": 0, "b": 0})
        assert all(c >= 0 for _, c in led.pairs())
    assert led.pairs() == ()


def test_a_flood_of_identities_cannot_push_established_peers_out_of_the_ledger():
    led = _ledger(["honest-1", "honest-2"])
    led.credit({f"sybil-{i:05d}": 1 for i in range(2 * MAX_ENTRIES)})
    assert len(led.credits) == MAX_ENTRIES
    assert led.established("honest-1") and led.established("honest-2")


@pytest.mark.parametrize("bad, why", [
    ("not a list", "must be a list"),
    ([["a", 1, 2]], "not a [peer id, credit] pair"),
    ([["", 1]], "peer id must be"),
    ([["a", -2**62 - 1]], "outside [-2**62, 2**62]"),
    ([["a", 2**62 + 1]], "outside [-2**62, 2**62]"),
    ([["a", 1.5]], "outside [-2**62, 2**62]"),
    ([["b", 1], ["a", 1]], "ascending order"),
    ([["a", 1], ["a", 2]], "ascending order"),
    ([[f"p{i:05d}", 1] for i in range(MAX_ENTRIES + 1)], "more than"),
])
def test_a_ledger_from_the_network_or_a_file_is_refused_naming_what_is_wrong(bad, why):
    led = _ledger(["a"])
    before = led.pairs()
    with pytest.raises(MalformedMessage, match=re_escape(why)):
        led.load(bad)
    assert led.pairs() == before, "nothing changed"


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_sybils_that_hold_the_median_are_clipped_to_the_established_peers_and_share_one_peers_weight(gen):
    honest = [_delta(gen, f"h{i}") for i in range(3)]
    sybils = [_delta(gen, f"s{i}", times=10.0) for i in range(4)]
    reference = median([delta_norm(d) for d in honest])
    # Without earned weight (the rule before): four of seven hold the median, so the sybils
    # are clipped to the smallest of their own norms and weigh four of seven.
    before = {d.sender: d for d in apply_screen(screen(honest + sybils, RobustConfig()))}
    assert all(delta_norm(before[d.sender]) > 8 * reference for d in sybils)
    assert sum(before[d.sender].num_tokens for d in sybils) == 4 * PLAN
    out = screen(honest + sybils, RobustConfig(), _ledger(["h0", "h1", "h2"]))
    kept = {d.sender: d for d in apply_screen(out)}
    for d in sybils:
        assert delta_norm(kept[d.sender]) == pytest.approx(reference, rel=1e-5)
        assert any(n.startswith(f"{d.sender}: norm") and "the established peers' median" in n for n in out.notes)
    assert sum(out.tokens[d.sender] for d in sybils) <= PLAN, "four newcomers weigh one peer"
    assert out.shares == 4 and before_shares(honest + sybils) == 7, "and plan one share of work together"
    assert all(out.tokens[d.sender] == PLAN for d in honest)
    assert any("4 newcomers (4000 tokens claimed) share one established peer's weight, 1000 tokens" in n
               for n in out.notes)
    # Credit follows the weight: a sybil earns a fraction of a round of what an honest peer does.
    assert all(out.earned[d.sender] <= PLAN // 4 * 0.15 for d in sybils)
    assert all(out.earned[d.sender] >= PLAN * 0.5 for d in honest)


def test_a_runs_anchors_are_established_from_its_first_round_and_sybils_there_from_the_start_are_newcomers(gen):
    """Without anchors nobody is established in a run's first rounds and four loud identities
    present from the start hold the median (the case above, before). A spec's trust anchors
    are in the genesis ledger with a settled peer's credit: from round 0 the sybils are
    clipped to the anchors' median and share one peer's weight, and an anchor that never comes
    stops counting after as long an absence as a peer that left."""
    from locoswarm.node.spec import RunSpec, TrustPolicy
    from locoswarm.optim.round import RoundStep

    assert Ledger.founded([], earn_rounds=8, per_peer_tokens=PLAN).credits == {}
    assert Ledger.founded(["h0"], earn_rounds=0, per_peer_tokens=PLAN).credits == {}, "earned weight off: none"
    led = Ledger.founded(["h2", "h0", "h1"], earn_rounds=8, per_peer_tokens=PLAN)
    assert led.pairs() == tuple((p, PLAN << DECAY_SHIFT) for p in ("h0", "h1", "h2"))
    honest = [_delta(gen, f"h{i}") for i in range(3)]
    sybils = [_delta(gen, f"s{i}", times=10.0) for i in range(4)]
    reference = median([delta_norm(d) for d in honest])
    out = screen(honest + sybils, RobustConfig(), led)
    kept = {d.sender: d for d in apply_screen(out)}
    assert all(delta_norm(kept[d.sender]) == pytest.approx(reference, rel=1e-5) for d in sybils)
    assert sum(out.tokens[d.sender] for d in sybils) <= PLAN, "four newcomers weigh one peer"
    led.credit({"h0": PLAN, "h1": PLAN})  # h2 never comes
    assert led.credits["h0"] == PLAN << DECAY_SHIFT, "a working anchor stays settled"
    gone = 1
    while led.established("h2"):
        led.credit({"h0": PLAN, "h1": PLAN})
        gone += 1
    assert 120 <= gone <= 140, gone
    # Every peer's genesis: the trainer's round step founds its ledger on the spec's anchors.
    spec = RunSpec()
    step = RoundStep(spec.diloco, [("w", (4, 4))], run_id="r", spec_hash=b"h" * 32, max_tokens=1 << 20)
    anchors = TrustPolicy(anchors=["QmB", "QmA"]).anchors
    assert step.ledger(PLAN, anchors).established_peers() == {"QmA", "QmB"}
    assert step.ledger(PLAN).credits == {}


def before_shares(deltas) -> int:
    return screen(deltas, RobustConfig()).shares


def test_a_hundred_fresh_identities_weigh_as_one_and_each_earns_a_hundredth(gen):
    honest = [_delta(gen, f"h{i}") for i in range(3)]
    fresh = [_delta(gen, f"n{i:03d}") for i in range(100)]
    out = screen(honest + fresh, RobustConfig(), _ledger(["h0", "h1", "h2"]))
    assert sum(out.tokens[d.sender] for d in fresh) <= PLAN
    assert max(out.earned[d.sender] for d in fresh) <= PLAN // 100


def test_a_lone_newcomer_is_held_to_the_established_median_in_a_round_of_two(gen):
    h, n = _delta(gen, "h"), _delta(gen, "n", times=10.0)
    assert screen([h, n], RobustConfig()).scales["n"] == 1.0, "two deltas: no median of the round"
    out = screen([h, n], RobustConfig(), _ledger(["h"]))
    assert out.scales["n"] == pytest.approx(delta_norm(h) / delta_norm(n))
    assert out.scales["h"] == 1.0 and out.tokens == {"h": PLAN, "n": PLAN}, "one newcomer: a peer's weight"


def test_with_every_sender_established_or_none_the_screening_is_the_rule_before_earned_weight(gen):
    deltas = [_delta(gen, f"p{i}", tokens=PLAN + 100 * i, times=1 + i / 3) for i in range(5)]
    plain = screen(deltas, RobustConfig())
    for led in (_ledger([f"p{i}" for i in range(5)]), Ledger(earn_rounds=8, per_peer_tokens=PLAN)):
        out = screen(deltas, RobustConfig(), led)
        assert (out.scales, out.tokens) == (plain.scales, plain.tokens)


def _record(peer: str, round_: int, *, chain: str = "", diverged: bool = False) -> PeerRecord:
    return PeerRecord(peer_id=peer, addrs=("/ip4/127.0.0.1/tcp/1",), device="cpu", tokens_per_s=1.0, round=round_,
                      spec_hash=b"s" * 32, diverged=diverged, chain=chain)


def test_identities_ahead_without_earned_weight_are_never_followed_and_established_ones_are():
    led = _ledger(["me", "h1", "h2"])
    fresh_ahead = [_record(f"s{i}", 25) for i in range(3)]
    level = [_record("h1", 20), _record("h2", 20)]
    assert whom_to_follow("me", 20, level + fresh_ahead, diverged_at=None) is not None, \
        "counting identities (the rule before): three ahead outnumber three level"
    assert whom_to_follow("me", 20, level + fresh_ahead, diverged_at=None, trusted=led.established) is None
    ahead = [_record("h1", 25), _record("h2", 25)]
    found = whom_to_follow("me", 20, ahead + fresh_ahead, diverged_at=None, trusted=led.established)
    assert found is not None and sorted(r.peer_id for r in found.donors) == ["h1", "h2"], "only established donors"
    # A ledger that knows nobody here weighs everyone alike (a peer back from an old checkpoint).
    stranger = _ledger(["x"])
    assert whom_to_follow("me", 20, level + fresh_ahead, diverged_at=None, trusted=stranger.established) is not None


def test_an_invented_chain_shown_by_fresh_identities_or_a_bare_key_with_the_smallest_id_moves_nobody():
    good, bad = "a" * 32, "b" * 32
    led = _ledger(["me", "h1"])
    invented = [_record(f"s{i}", 10, chain=bad) for i in range(4)]
    assert whom_to_rejoin("me", {10: good}, [_record("h1", 10, chain=good)] + invented) is not None, \
        "counting identities (the rule before): four beat two"
    assert whom_to_rejoin("me", {10: good}, [_record("h1", 10, chain=good)] + invented, led.established) is None
    # Nor can a fresh identity keep a real split from being healed by showing no chain at the
    # round the others share (a record of round 12 shows chains at 12 and 11 only).
    split = [_record("h1", 10, chain=bad), _record("h2", 10, chain=bad), _record("s9", 12, chain=bad)]
    assert whom_to_rejoin("me", {10: good}, split) is None, "counting identities: no round known to all"
    found = whom_to_rejoin("me", {10: good}, split, _ledger(["me", "h1", "h2"]).established)
    assert found is not None and sorted(r.peer_id for r in found.donors) == ["h1", "h2"]
    # Two established peers split one against one: the tie goes to the smallest established
    # id (m), never to a group that a bare key joined to outnumber it.
    tie = _ledger(["m", "z"])
    seen_by_m = [_record("z", 10, chain=bad), _record("0bare", 10, chain=bad)]
    assert whom_to_rejoin("m", {10: good}, seen_by_m) is not None, "counting identities: the bare key's side wins"
    assert whom_to_rejoin("m", {10: good}, seen_by_m, tie.established) is None
    seen_by_z = [_record("m", 10, chain=good), _record("0bare", 10, chain=bad)]
    found = whom_to_rejoin("z", {10: bad}, seen_by_z, tie.established)
    assert found is not None and [r.peer_id for r in found.donors] == ["m"]


def test_the_ledger_travels_in_the_state_manifest_and_counts_in_the_state_digest():
    spec = StateSpec(run_id="r", spec_hash=b"h" * 32, tensors=(("w", (4, 4)),))
    state = {"w": torch.arange(16, dtype=torch.float32).view(4, 4)}
    led = _ledger(["a", "b"])
    manifest, body = encode_state(spec, state, 3, chunk_bytes=1024, ledger=led.pairs())
    assert decode_manifest(manifest, spec).ledger == led.pairs()
    assert state_digest(body) != state_digest(body, led.pairs())
    assert state_digest(body, ()) == __import__("hashlib").sha256(body).hexdigest(), "no ledger: the body's hash"
    import msgpack

    m = msgpack.unpackb(manifest)
    m["ledger"] = [["b", 1], ["a", 1]]
    with pytest.raises(MalformedMessage, match="state manifest ledger entry 1 .*ascending"):
        decode_manifest(msgpack.packb(m), spec)
    m["ledger"] = [["a", math.inf]]
    with pytest.raises(MalformedMessage, match="credit"):
        decode_manifest(msgpack.packb(m), spec)
    assert check_ledger([]) == ()


def _catch_up(records: list[str], *, ledger: Ledger | None = None, anchors: tuple[str, ...] = (),
              bootstrap: frozenset[str] = frozenset(), me: str = "me"):
    from types import SimpleNamespace

    from locoswarm.node.catchup import CatchUp
    from locoswarm.node.spec import TrustPolicy

    ctx = SimpleNamespace(membership=SimpleNamespace(records=[_record(p, 5) for p in records]),
                          trainer=SimpleNamespace(ledger=ledger or Ledger(earn_rounds=8, per_peer_tokens=PLAN)),
                          spec=SimpleNamespace(trust=TrustPolicy(anchors=list(anchors))), peer_id=me,
                          bootstrap=bootstrap)
    return CatchUp(ctx)


def test_a_joiner_that_knows_nobody_takes_the_state_its_anchors_or_bootstrap_peers_vouch_for():
    from locoswarm.node.host import NodeError

    assert _catch_up(["b", "x"], bootstrap=frozenset({"b"})).vouching() == {"b"}
    assert _catch_up(["b", "x"]).vouching() == frozenset(), "nobody vouches: the donors' agreement decides"
    assert _catch_up(["A", "b", "x"], anchors=("A",), bootstrap=frozenset({"b"})).vouching() == {"A"}, \
        "the run's anchors before the peers it joined through"
    with pytest.raises(NodeError, match="none of the run's 1 anchors"):
        _catch_up(["b", "x"], anchors=("A",), bootstrap=frozenset({"b"})).vouching()
    assert _catch_up(["b"], anchors=("me",), bootstrap=frozenset({"b"})).vouching() == {"b"}, \
        "an anchor rejoining its own run is vouched for by the peers it joins through"
    assert _catch_up(["b", "x"], ledger=_ledger(["x"]), bootstrap=frozenset({"b"})).vouching() == frozenset(), \
        "a ledger that knows a live peer: earned weight decides"


def test_a_peer_behind_after_a_discarded_round_whose_own_state_earned_weight_attests_trains_on():
    """After a discarded round, records ahead on another chain say "behind", but the state the
    majority of earned weight attests is ours: nothing is taken, the round is not given up,
    and the next boundary does not ask again (it gave every round up, 10 times a second, for
    minutes: 16 peers in tree rows on 16 cores, 2026-12-07)."""
    import asyncio
    from types import SimpleNamespace

    from locoswarm.node.catchup import CatchUp
    from locoswarm.node.lineage import Lineage

    ours = "a" * 32
    lineage = Lineage(b"s" * 32)
    lineage.start(16, ours, resumed=True, me="me")
    lineage.discarded(16)
    records = [_record("h1", 16, chain=ours), _record("h2", 16, chain=ours), _record("h3", 26, chain="b" * 32)]
    trainer = SimpleNamespace(ledger=_ledger(["me", "h1", "h2", "h3"]), outer_steps=16, round=17)
    ctx = SimpleNamespace(membership=SimpleNamespace(records=records), trainer=trainer, lineage=lineage,
                          peer_id="me", spec=SimpleNamespace(trust=None), stats=SimpleNamespace(state="training"))
    catch_up = CatchUp(ctx)
    asked = []

    async def no_replay(*_a, **_k) -> bool:
        asked.append("by_deltas")
        return False

    catch_up.by_deltas = no_replay
    assert lineage.follow(16, records, trainer.ledger.established) is not None, "records ahead: behind"
    assert asyncio.run(catch_up.maybe_follow()) is False, "nothing taken: train on"
    assert asked == ["by_deltas"] and lineage.behind_at is None
    assert asyncio.run(catch_up.maybe_follow()) is False and asked == ["by_deltas"], "not asked again"


def test_the_round_chain_tells_two_deltas_of_one_sender_and_token_count_apart(gen):
    from locoswarm.node.chains import chain_start, delta_content, round_chain

    first, second = _delta(gen, "a"), _delta(gen, "a")  # one sender, one token count, other values
    kept = apply_screen(screen([first], RobustConfig()))[0]
    assert delta_content(kept) == delta_content(first), "what every peer holding the delta computes"
    start = chain_start(b"s" * 32)
    one, other = (round_chain(start, 0, [(d.sender, d.num_tokens, delta_content(d))]) for d in (first, second))
    assert one != other
    assert round_chain(start, 0, [("a", PLAN)]) == round_chain(start, 0, [("a", PLAN)]), "pairs still chain"
