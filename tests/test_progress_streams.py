"""Round progress over the progress streams (node/progress.py): told between two real
p2pd peers on loopback, attributed by the connection, kept per round within the window,
told again on a new stream after a break, refused from a peer the policy does not admit,
and a malformed or flooding stream is dropped without touching what honest peers told."""

from __future__ import annotations

import asyncio
import time

import pytest
from hivemind.p2p import P2P, PeerID

from locoswarm.node.progress import (KIND_RECORD, KIND_UPDATE, MESSAGE_BURST, PROTOCOL, ROUNDS_AHEAD, ROUNDS_KEPT,
                                     ProgressBus, frame, progress_frame, record_frame)
from locoswarm.node.rounds import RoundProgress
from locoswarm.protocol.records import PeerRecord, Progress, encode_record, encode_update

SPEC = b"s" * 32


def _progress(tokens: int, round_: int = 0, done: bool = False) -> Progress:
    return Progress(tokens=tokens, tokens_per_s=10.0, done=done, incarnation=7, round=round_)


def _record(peer: str, seq: int = 1, **fields) -> PeerRecord:
    return PeerRecord(**{"peer_id": peer, "addrs": ("/ip4/127.0.0.1/tcp/1",), "device": "cpu", "tokens_per_s": 1.0,
                         "round": 3, "spec_hash": SPEC, "incarnation": 7, "seq": seq, **fields})


async def _pair(admit=None, record=None, on_record=None):
    """Two connected peers, each with a started bus (A's with the access policy `admit` and
    `on_record`, B's telling `record(B's id)`)."""
    a = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    b = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                         initial_peers=[str(m) for m in await a.get_visible_maddrs()])
    idb = b.peer_id.to_base58()
    bus_a = ProgressBus(a, a.peer_id.to_base58(), admit=admit, spec_hash=SPEC, on_record=on_record)
    bus_b = ProgressBus(b, idb, spec_hash=SPEC, record=None if record is None else lambda: record(idb))
    await bus_a.start()
    await bus_b.start()
    return a, b, bus_a, bus_b


def _run_pair(go, **pair_args) -> None:
    """Run `go(a, b, bus_a, bus_b)` on a fresh pair (`_pair(**pair_args)`), closed after."""
    async def run() -> None:
        a, b, bus_a, bus_b = await _pair(**pair_args)
        try:
            await go(a, b, bus_a, bus_b)
        finally:
            bus_a.close()
            bus_b.close()
            await _close(b, a)

    asyncio.run(run())


async def _close(*nodes) -> None:
    for node in nodes:
        await node.shutdown()


async def _until(condition, timeout_s: float = 20.0) -> None:
    """Wait for `condition()` (loopback delivery takes milliseconds; the bound is for a loaded machine)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "not delivered in time"
        await asyncio.sleep(0.02)


@pytest.mark.timeout(120)
def test_progress_reaches_the_rounds_peer_under_the_senders_connection_identity_latest_kept():
    """And a peer whose progress stream opened is reachable; a bare p2pd is not."""
    async def go(a, b, bus_a, bus_b):
        ida, idb = bus_a.me, bus_b.me
        bus_a.open_round(0)
        bus_b.publish(_progress(100), [ida])
        await _until(lambda: idb in bus_a.seen(0))
        first = bus_a.seen(0)[idb]
        assert first.progress == _progress(100)
        bus_b.publish(_progress(300, done=True), [ida])
        await _until(lambda: bus_a.seen(0)[idb].progress.done)
        assert bus_a.seen(0)[idb].progress.tokens == 300 and bus_a.seen(0)[idb].at >= first.at
        # The same message again is not sent again; a round's message goes to its round only.
        sent = bus_b.messages_sent
        bus_b.publish(_progress(300, done=True), [ida])
        bus_b.publish(_progress(50, round_=1), [ida])
        await _until(lambda: idb in bus_a.seen(1))
        assert bus_b.messages_sent == sent + 1 and bus_a.seen(0)[idb].progress.tokens == 300
        assert bus_b.reachable(ida)
        # A p2pd with no daemon behind it (what a bare record points at) never is.
        bare = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                initial_peers=[str(m) for m in await a.get_visible_maddrs()])
        try:
            bus_b.publish(_progress(300, done=True), [bare.peer_id.to_base58()])
            await asyncio.sleep(1.0)
            assert not bus_b.reachable(bare.peer_id.to_base58()) and bus_b.reachable(ida)
        finally:
            await bare.shutdown()

    _run_pair(go)


@pytest.mark.timeout(120)
def test_a_stream_the_receiver_closed_is_opened_again_and_a_newly_told_peer_gets_the_last_report():
    async def go(a, b, bus_a, bus_b):
        ida, idb = bus_a.me, bus_b.me
        bus_a.open_round(0)
        progress = RoundProgress(bus_b, 0, idb, per_peer_tokens=100, interval_s=0.1)
        progress.report(40, 10.0)  # nobody in the round yet: nobody told
        await asyncio.sleep(0.3)
        assert idb not in bus_a.seen(0)
        progress.told = lambda: {ida}  # A's record shows up: told the last report at once
        progress.report(40, 10.0)
        await _until(lambda: idb in bus_a.seen(0))
        bus_a._inbound[idb].close()  # the receiver drops the stream (as when it restarts its handler)
        await _until(lambda: idb not in bus_a._inbound)
        progress.report(90, 10.0, done=True)
        await _until(lambda: bus_a.seen(0)[idb].progress.done)
        assert bus_a.seen(0)[idb].progress.tokens == 90

    _run_pair(go)


@pytest.mark.timeout(120)
def test_a_peer_not_admitted_is_not_heard_and_once_admitted_is_heard_without_telling_again():
    """A private run's peer does not hear a peer whose record it has not read yet, and hears
    what it told before as soon as it has, without a new report."""
    admitted = [False]

    async def go(a, b, bus_a, bus_b):
        bus_a.open_round(0)
        bus_b.publish(_progress(100, done=True), [bus_a.me])
        await asyncio.sleep(1.0)
        assert bus_a.seen(0) == {}
        admitted[0] = True  # its record has been read
        await _until(lambda: bus_b.me in bus_a.seen(0))
        assert bus_a.seen(0)[bus_b.me].progress == _progress(100, done=True)

    _run_pair(go, admit=lambda peer: admitted[0])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("attack", ["zero_length", "garbage", "unknown_kind", "oversized", "flood",
                                    "record_of_another_peer", "record_of_another_spec", "update_before_any_record"])
def test_a_malformed_or_flooding_stream_is_dropped_and_the_peer_heard_again_on_a_new_one(attack):
    heard = []

    async def go(a, b, bus_a, bus_b):
        ida, idb = bus_a.me, bus_b.me
        bus_a.open_round(0)
        _, _, writer = await b.call_binary_stream_handler(PeerID.from_base58(ida), PROTOCOL)
        writer.write({"zero_length": b"\x01\x00\x00", "garbage": b"\x01\x00\x05hello",
                      "unknown_kind": b"\x07\x00\x01x", "oversized": b"\x01\x01\x00" + bytes(256),
                      "flood": progress_frame(_progress(1)) * (3 * MESSAGE_BURST),
                      "record_of_another_peer": record_frame(_record(ida)),
                      "record_of_another_spec": frame(KIND_RECORD, encode_record(_record(idb, spec_hash=b"x" * 32))),
                      "update_before_any_record": frame(KIND_UPDATE, encode_update(_record(idb))),
                      }[attack])
        await writer.drain()
        await _until(lambda: bus_a.rejected == 1)
        assert heard == []
        writer.close()
        bus_b.publish(_progress(100), [ida])  # an honest stream of the same peer afterwards
        await _until(lambda: bus_a.seen(0).get(idb) is not None and bus_a.seen(0)[idb].progress.tokens == 100)

    _run_pair(go, on_record=heard.append)


def test_progress_is_kept_for_the_open_rounds_only_and_never_our_own():
    bus = ProgressBus(None, "me")
    window = ROUNDS_KEPT + ROUNDS_AHEAD + 1
    for r in range(40, 40 + 2 * window):  # nothing opened yet: the first rounds told are kept, a window's worth
        bus.take("p", _progress(1, round_=r))
    assert sorted(bus._rounds) == list(range(40, 40 + window))
    bus.open_round(10)
    assert bus._rounds == {}
    for r in range(10 - ROUNDS_KEPT - 1, 10 + ROUNDS_AHEAD + 2):
        bus.take("p", _progress(r, round_=r))
    bus.take("me", _progress(5, round_=10))
    assert sorted(bus._rounds) == list(range(10 - ROUNDS_KEPT, 10 + ROUNDS_AHEAD + 1))
    assert set(bus.seen(10)) == {"p"}
    bus.open_round(12)
    assert min(bus._rounds) == 12 - ROUNDS_KEPT


def test_an_unchanged_count_keeps_the_time_it_last_changed_for_extrapolation():
    clock = [100.0]
    bus = ProgressBus(None, "me", clock=lambda: clock[0])
    bus.open_round(0)
    bus.take("p", _progress(10))
    clock[0] = 101.0
    bus.take("p", _progress(10))
    assert bus.seen(0)["p"].at == 100.0
    bus.take("p", _progress(20))
    assert bus.seen(0)["p"].at == 101.0


@pytest.mark.timeout(120)
def test_the_senders_record_goes_with_its_progress_once_per_change_and_on_show():
    """The record reaches the peers told progress before that progress, once per sequence
    number (a throughput that moved is no news), and `show()` tells them a change no report
    follows (a pause)."""
    heard, current = [], {"seq": 1, "tokens_per_s": 1.0, "paused": False}

    async def go(a, b, bus_a, bus_b):
        ida, idb = bus_a.me, bus_b.me
        bus_a.open_round(0)
        bus_b.publish(_progress(100), [ida])
        await _until(lambda: idb in bus_a.seen(0))
        assert [(r.peer_id, r.seq) for r in heard] == [(idb, 1)]
        current["tokens_per_s"] = 5.0
        bus_b.publish(_progress(200), [ida])
        await _until(lambda: bus_a.seen(0)[idb].progress.tokens == 200)
        assert len(heard) == 1
        assert bus_b.records_sent == 1 and bus_b.messages_sent == 3  # the record, then two counts
        current.update(seq=2, paused=True)
        bus_b.show()
        await _until(lambda: len(heard) == 2)
        assert heard[-1].paused and heard[-1].seq == 2
        assert bus_b.records_sent == 2

    _run_pair(go, record=lambda peer: _record(peer, **current), on_record=heard.append)


@pytest.mark.timeout(120)
def test_a_changed_record_goes_as_an_update_on_a_stream_that_carried_it_whole_and_whole_on_a_new_one():
    """The receiver rebuilds the whole record from the update (what it heard equals what was
    told); the update costs a fraction of the record; a stream opened again starts with the
    whole record, and a record whose base changed (a new address) goes whole."""
    heard, current = [], {"seq": 1, "round": 3, "chain": "a" * 32}

    async def go(a, b, bus_a, bus_b):
        ida, idb = bus_a.me, bus_b.me
        bus_a.open_round(0)
        bus_b.publish(_progress(100), [ida])
        await _until(lambda: len(heard) == 1)
        whole = bus_b.bytes_sent
        current.update(seq=2, round=4, prev_chain="a" * 32, chain="b" * 32)
        bus_b.publish(_progress(200), [ida])
        await _until(lambda: len(heard) == 2)
        assert heard[-1] == _record(idb, **current)
        update = bus_b.bytes_sent - whole
        assert update < 0.6 * whole, (update, whole)
        bus_a._inbound[idb].close()  # the stream breaks: the next one starts with the whole record
        await _until(lambda: idb not in bus_a._inbound)
        current.update(seq=3, round=5, prev_chain="b" * 32, chain="c" * 32)
        before = bus_b.bytes_sent
        bus_b.publish(_progress(300), [ida])
        await _until(lambda: len(heard) == 3)
        assert heard[-1] == _record(idb, **current) and bus_b.bytes_sent - before > update
        current.update(seq=4, addrs=("/ip4/127.0.0.1/tcp/2",))
        bus_b.show()
        await _until(lambda: len(heard) == 4)
        assert heard[-1].addrs == ("/ip4/127.0.0.1/tcp/2",) and heard[-1] == _record(idb, **current)
        assert bus_a.rejected == 0

    _run_pair(go, record=lambda peer: _record(peer, **current), on_record=heard.append)


@pytest.mark.timeout(120)
def test_a_peer_that_tells_a_round_late_is_told_back_our_message_of_that_round():
    """A reported its round (done) to nobody it knew; B, which joined late, tells A its own:
    A answers with its message of that round, so B hears A without A reporting again."""
    async def go(a, b, bus_a, bus_b):
        ida, idb = bus_a.me, bus_b.me
        bus_a.open_round(4)
        bus_b.open_round(4)
        bus_a.publish(_progress(700, round_=4, done=True), [])
        bus_b.publish(_progress(10, round_=4), [ida])
        await _until(lambda: ida in bus_b.seen(4))
        assert bus_b.seen(4)[ida].progress == _progress(700, round_=4, done=True)
        assert bus_a.seen(4)[idb].progress.tokens == 10

    _run_pair(go)


@pytest.mark.timeout(120)
def test_a_peer_whose_streams_no_longer_open_is_reported_gone_and_a_record_is_introduced_before_any_progress():
    """Killed (its p2pd gone: dials refused) or never a daemon of ours (a bare p2pd: no
    handler): reported gone within GONE_S of the first failed open, `served` telling the
    two apart, and no longer told. A joiner's record reaches a peer before any progress, and
    the peer's comes back."""
    async def go() -> None:
        a = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        boot = [str(m) for m in await a.get_visible_maddrs()]
        b = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=boot)
        bare = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=boot)
        ida, idb, idbare = (n.peer_id.to_base58() for n in (a, b, bare))
        heard, heard_back, gone = [], [], {}
        bus_a = ProgressBus(a, ida, spec_hash=SPEC, on_record=heard.append, record=lambda: _record(ida))
        bus_b = ProgressBus(b, idb, spec_hash=SPEC, record=lambda: _record(idb), on_record=heard_back.append,
                            on_gone=lambda peer, served: gone.setdefault(peer, (served,)))
        await bus_a.start()
        await bus_b.start()
        try:
            bus_b.introduce([ida])
            assert await bus_b.delivered([ida], timeout_s=20.0) == {ida}
            await _until(lambda: [r.peer_id for r in heard] == [idb])
            await _until(lambda: [r.peer_id for r in heard_back] == [ida])  # told ours back
            bus_b.publish(_progress(100), [ida, idbare])
            await _until(lambda: idbare in gone)
            assert gone[idbare][0] is False and bus_b.reachable(ida) and ida not in gone
            bus_a.close()
            await a.shutdown()
            bus_b.publish(_progress(200), [ida])
            await _until(lambda: ida in gone)
            assert gone[ida][0] is True and not bus_b.reachable(ida) and ida not in bus_b._outboxes
            assert await bus_b.delivered([ida, idbare], timeout_s=5.0) == set(), "nobody left to deliver to"
        finally:
            bus_b.close()
            await _close(bare, b)

    asyncio.run(go())
