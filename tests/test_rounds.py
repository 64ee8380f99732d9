"""Round agreement and the trainer's round boundary, without a network: RoundProgress's
target arithmetic (extrapolation, vanished peers, carry) and the overlapped restart."""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from dataclasses import replace

import pytest
import torch

from locoswarm.node.progress import Seen
from locoswarm.node.rounds import EXTRAPOLATE_INTERVALS, RoundProgress
from locoswarm.node.spec import RunSpec
from locoswarm.node.trainer import Trainer
from locoswarm.protocol.records import Progress


def progress_with(others: dict[str, tuple[int, float, bool, float]], *, per_peer: int = 100,
                  interval_s: float = 0.1, carry: int = 0, trusted=None) -> RoundProgress:
    p = RoundProgress(None, 0, "me", per_peer_tokens=per_peer, interval_s=interval_s, carry=carry, trusted=trusted)
    now = time.monotonic()
    p._others = {k: Seen(Progress(tokens=t, tokens_per_s=tps, done=d), now - age)
                 for k, (t, tps, d, age) in others.items()}
    return p


def test_a_peer_the_ledger_excludes_is_not_heard_counted_or_waited_for():
    """Its deltas failed the established peers' checks (optim/check.py): whatever it reports
    neither ends nor stretches the round, and it is no participant whose delta is pulled."""
    class Bus:
        def open_round(self, round_): pass

        def seen(self, round_):
            now = time.monotonic()
            return {"b": Seen(Progress(tokens=100, tokens_per_s=0.0, done=True), now),
                    "x": Seen(Progress(tokens=10**6, tokens_per_s=0.0, done=True), now)}

    p = RoundProgress(Bus(), 0, "me", per_peer_tokens=100, interval_s=0.1, excluded={"x"}.__contains__)
    p.refresh()
    assert p.participants() == ["b"] and p.num_peers() == 2
    assert p.totals(40) == (140, 200) and not p.reached(40)


def test_round_target_scales_with_the_number_of_reporting_peers():
    p = progress_with({"a": (100, 0.0, True, 0.0), "b": (100, 0.0, True, 0.0)})
    assert not p.reached(99)  # 299 of 300
    assert p.reached(100)


def test_a_peer_done_with_no_tokens_has_given_the_round_up_and_is_not_waited_for():
    p = progress_with({"a": (0, 0.0, True, 0.0), "b": (0, 0.0, False, 0.0), "c": (100, 0.0, True, 0.0)})
    assert p.withdrawn() == {"a"}, "b is still training; c is done with a delta to pull"

    async def gather():
        from locoswarm.node.pull import gather_deltas

        p.expected = lambda: {"a"}
        return await gather_deltas(None, p, 0, None, deadline_s=120.0, fanout=4, rng=random.Random(0))

    p._others.pop("b"), p._others.pop("c")
    started = time.monotonic()
    got = asyncio.run(gather())
    assert got.deltas == [] and not got.failed and time.monotonic() - started < 60, "no pull, no deadline wait"


@pytest.mark.parametrize("how", ["gone", "restarted"])
def test_a_pull_that_keeps_failing_ends_once_its_peer_is_found_gone_or_restarted(how):
    """Failed streams are asked again on pull.STREAM_RETRY_S (a lossy link) up to the
    deadline; a peer the membership finds gone (its progress streams fail) or whose record
    shows a new life is dropped at once instead: its delta will never come."""
    from locoswarm.node.pull import gather_deltas

    p = progress_with({"b": (100, 0.0, True, 0.0)})
    p._others["b"] = Seen(Progress(tokens=100, tokens_per_s=0.0, done=True, incarnation=7), time.monotonic())
    life = {"b": 7}
    p.incarnations = lambda peer: life.get(peer, 0)
    found_gone: set[str] = set()

    async def gather():
        async def later():
            await asyncio.sleep(0.5)
            if how == "gone":
                found_gone.add("b")
            else:
                life["b"] = 8

        flip = asyncio.ensure_future(later())
        # No network (p2p None): every attempt fails as a broken stream would.
        got = await gather_deltas(None, p, 0, None, deadline_s=120.0, fanout=4, rng=random.Random(0),
                                  gone=found_gone.__contains__)
        await flip
        return got

    started = time.monotonic()
    got = asyncio.run(gather())
    assert got.deltas == [] and got.unreachable == {"b"} and how in got.failed["b"], got.failed
    assert time.monotonic() - started < 60, "not held to the deadline"


def test_a_peer_that_answers_not_yet_until_the_deadline_is_a_stall_not_churn():
    """A participant that keeps answering "not yet" holds the round to its deadline: it is
    reported as a stall (the round loop warns about it), unlike a peer found gone."""
    from locoswarm.node.pull import gather_deltas

    class NotYet:
        async def call(self, *args, **kwargs):
            return None  # the "not yet" answer

    class Spec:
        max_message_bytes = 1 << 20

    p = progress_with({"b": (50, 0.0, False, 0.0)})
    got = asyncio.run(gather_deltas(NotYet(), p, 0, Spec(), deadline_s=0.5, fanout=4, rng=random.Random(0)))
    assert got.stalled == {"b"} and "deadline" in got.failed["b"] and not got.unreachable, got


def test_live_peers_are_extrapolated_from_their_rate():
    # b reported 50 tokens 0.2 s ago at 500 tokens/s: about 150 now.
    p = progress_with({"b": (50, 500.0, False, 0.2)}, interval_s=0.1)
    assert p.reached(55)
    assert not progress_with({"b": (50, 0.0, False, 0.2)}).reached(55)


def test_a_vanished_peer_stops_counting_after_a_few_intervals():
    interval = 0.1
    stale = progress_with({"b": (50, 1000.0, False, 100.0)}, interval_s=interval)
    cap = 50 + 1000.0 * EXTRAPOLATE_INTERVALS * interval
    assert stale.reached(int(200 - cap))
    assert not stale.reached(int(200 - cap) - 2)


def test_carry_shortens_or_lengthens_the_next_round():
    assert progress_with({}, carry=30).reached(70)
    assert not progress_with({}, carry=30).reached(69)
    assert not progress_with({}, carry=-30).reached(129)


@pytest.fixture(scope="module")
def spec() -> RunSpec:
    s = RunSpec()
    return replace(s, num_shards=2, data=replace(s.data, seq_len=32), batch_size=2)


def test_an_overlapped_restart_lands_where_the_synchronous_one_does_before_any_eval(spec):
    """With no training between boundary and shift, the overlapped replica equals the
    synchronous one (up to one fp32 rounding of the add)."""
    torch.manual_seed(0)
    sync, over = (Trainer(spec, spec.hash(), shard=0, device=torch.device("cpu")) for _ in range(2))
    stop = threading.Event()
    for t in (sync, over):
        t.train_until(stop, lambda n: n >= 3 * t.tokens_per_step)
    works = [t.end_round() for t in (sync, over)]
    for t, w in zip((sync, over), works):
        blob = t.encode(w, "me")
        t.apply(w, [t.decode(blob)], overlapped=t is over)
    assert over.handoff.has_shift
    over.evaluate()  # evaluating (like saving) first applies the pending restart
    for a, b in zip(sync.model.parameters(), over.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for a, b in zip(sync.outer.params, over.outer.params):
        assert torch.equal(a, b)
    assert sync.round == over.round == 1


def test_training_after_an_overlapped_boundary_keeps_its_progress(spec):
    """Steps taken while the exchange ran survive the restart: the replica ends at the
    restart point plus exactly what those steps changed."""
    t = Trainer(spec, spec.hash(), shard=1, device=torch.device("cpu"))
    stop = threading.Event()
    t.train_until(stop, lambda n: n >= 2 * t.tokens_per_step)
    work = t.end_round()
    t.train_until(stop, lambda n: n >= t.tokens_per_step)  # round 1 starts before round 0's exchange ends
    progress = [p.detach().clone() - s for p, s in zip(t.model.parameters(), work.snapshot)]
    t.apply(work, [t.decode(t.encode(work, "me"))], overlapped=True)
    start = t.step.restart(t.outer, t.compressor)
    t.take_shift()
    for p, st, d in zip(t.model.parameters(), start, progress):
        torch.testing.assert_close(p, st + d, rtol=0, atol=1e-5)
    assert torch.isfinite(torch.tensor(t.evaluate()))


def test_one_peer_claiming_a_huge_count_does_not_end_the_round():
    """Early in a round (everyone at 10 of a 100-token share), a claim of 10⁹ tokens counts
    for at most max(the share, 4 × the median claim): 10 + 10 + 10 + 100 = 130 of 400, the
    round goes on (uncapped, the claim would end it at once). A fast peer's real lead counts."""
    liar = progress_with({"a": (10, 0.0, False, 0.0), "b": (10, 0.0, False, 0.0), "x": (10**9, 0.0, True, 0.0)})
    assert not liar.reached(10)
    fast = progress_with({"gpu": (350, 0.0, False, 0.0)})  # 3.5 shares: more than the 2 of the round
    assert fast.reached(0)


def test_newcomers_raise_the_target_by_one_share_together_and_fill_at_most_that_much_of_it():
    """Two established peers and this one, plus four identities without earned weight that
    report a token each: counted one by one the target is 7 shares (700) that the three
    honest peers must fill; pooled it is 4 (400). Four inflated newcomer claims fill at most
    one share; a lone honest newcomer that trains its share still counts it in full."""
    established = {"me", "a", "b"}.__contains__
    honest = {"a": (100, 0.0, True, 0.0), "b": (100, 0.0, True, 0.0)}
    idle_sybils = {f"s{i}": (1, 0.0, True, 0.0) for i in range(4)}
    assert progress_with(honest | idle_sybils).totals(100)[1] == 700, "counting identities (the rule before)"
    pooled = progress_with(honest | idle_sybils, trusted=established)
    assert pooled.totals(100)[1] == 400 and not pooled.reached(100) and pooled.reached(199)
    loud = progress_with({"a": (10, 0.0, False, 0.0), "b": (10, 0.0, False, 0.0)}
                         | {f"s{i}": (10**6, 0.0, True, 0.0) for i in range(4)}, trusted=established)
    assert loud.totals(10) == (130, 400) and not loud.reached(10), "four inflated claims fill one share"
    joiner = progress_with(honest | {"new": (100, 0.0, True, 0.0)}, trusted=established)
    assert joiner.totals(100) == (400, 400) and joiner.reached(100)
    nobody = progress_with(honest | idle_sybils, trusted=lambda peer: False)
    assert nobody.totals(100)[1] == 700, "nobody has earned weight: every peer counts, as before"


@pytest.mark.parametrize("overlapped", [False, True])
def test_a_discarded_non_finite_round_resets_the_replica_and_drops_non_finite_adam_moments(spec, overlapped):
    """A replica gone non-finite is not sent and not shifted (a shift from a NaN snapshot
    stays NaN): it restarts at the round's restart point, and AdamW starts afresh where its
    moments went non-finite; the outer state is untouched."""
    t = Trainer(spec, spec.hash(), shard=0, device=torch.device("cpu"))
    stop = threading.Event()
    t.train_until(stop, lambda n: n >= 2 * t.tokens_per_step)
    with torch.no_grad():
        next(t.model.parameters()).view(-1)[0] = math.nan
        next(iter(t.inner.state.values()))["exp_avg"].view(-1)[0] = math.nan
    work = t.end_round()
    with pytest.raises(ValueError, match="not finite"):
        t.encode(work, "me")
    outer = [p.clone() for p in t.outer.params]
    t.discard(work, overlapped=overlapped)
    assert t.handoff.has_shift == overlapped
    t.take_shift()
    start = t.step.restart(t.outer, t.compressor)
    for p, st in zip(t.model.parameters(), start):
        assert torch.equal(p, st)
    assert not t.inner.state, "non-finite moments dropped"
    assert all(torch.equal(a, b) for a, b in zip(outer, t.outer.params))
    t.train_until(stop, lambda n: n >= t.tokens_per_step)
    assert all(bool(torch.isfinite(p).all()) for p in t.model.parameters())


def test_an_unproven_peer_that_answers_not_yet_for_ever_is_waited_for_a_bound_then_left_alone():
    """An identity that reports its round done and serves no delta ("not yet" to every
    request) used to hold every round to its deadline. Unproven (it never delivered a delta),
    it is waited for `unproven_wait_s`, reported as withholding, and a round that skips it
    asks it nothing; a proven peer that does the same keeps the deadline, and is reported
    as withholding once it held the round to it."""
    from locoswarm.node.pull import gather_deltas

    asked: list[str] = []

    class NotYet:
        async def call(self, peer_id, *args, **kwargs):
            asked.append(str(peer_id))  # KeptStreams.call takes the base58 text
            return None  # the "not yet" answer

    class Spec:
        max_message_bytes = 1 << 20

    staller = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
    p = progress_with({staller: (100, 0.0, True, 0.0)})
    started = time.monotonic()
    got = asyncio.run(gather_deltas(NotYet(), p, 0, Spec(), deadline_s=120.0, fanout=4, rng=random.Random(0),
                                    unproven_wait_s=0.5))
    assert time.monotonic() - started < 60, "held to the deadline"
    assert got.unserved == {staller} and got.withheld == {staller} and not got.stalled, got
    assert "not proven" in got.failed[staller] and asked

    asked.clear()
    got = asyncio.run(gather_deltas(NotYet(), p, 0, Spec(), deadline_s=120.0, fanout=4, rng=random.Random(0),
                                    skip={staller}.__contains__))
    assert asked == [] and not got.failed, "left alone"

    p.expected = lambda: {staller}
    got = asyncio.run(gather_deltas(NotYet(), p, 0, Spec(), deadline_s=1.0, fanout=4, rng=random.Random(0),
                                    unproven_wait_s=0.2))
    assert got.stalled == {staller} and got.withheld == {staller} and not got.unserved, got
