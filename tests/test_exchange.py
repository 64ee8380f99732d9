"""Delta exchange between real peer processes over hivemind's p2pd on loopback: a good
delta arrives intact; garbage, truncated, oversized, silent and wrong-round answers are
rejected with a ProtocolError or a timeout, and the puller carries on."""

from __future__ import annotations

import asyncio
import importlib.util
import os

import pytest
from hivemind.p2p import P2P, PeerID

from locoswarm.node.exchange import (GONE, PROTOCOL, DeltaGone, DeltaServer, DeltaUnavailable, call_get_delta,
                                     delta_streams)
from locoswarm.protocol import MalformedMessage, OversizedMessage, ProtocolError

SERVER = os.path.join(os.path.dirname(__file__), "peers", "serve_delta.py")
_spec = importlib.util.spec_from_file_location("serve_delta", SERVER)
serve_delta = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve_delta)


def _pull(maddr: str, round_: int, timeout_s: float = 10.0):
    async def go():
        client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=[maddr])
        try:
            peer = PeerID.from_base58(maddr.split("/p2p/")[1])
            return await call_get_delta(delta_streams(client), peer, round_, serve_delta.SPEC, timeout_s=timeout_s)
        finally:
            await client.shutdown()

    return asyncio.run(go())


@pytest.mark.timeout(120)
def test_a_served_delta_arrives_intact_from_another_process(spawn_peers):
    _, (maddr,) = spawn_peers(SERVER, "good")
    delta = _pull(maddr, serve_delta.ROUND)
    assert delta.nbytes == len(serve_delta.good_blob())
    assert delta.round == serve_delta.ROUND and delta.sender == "server" and delta.num_tokens == 1000
    with pytest.raises(DeltaUnavailable):
        _pull(maddr, serve_delta.ROUND + 1)  # the round it trains: not yet
    with pytest.raises(DeltaGone):
        _pull(maddr, serve_delta.ROUND - 1)  # a round it passed without a delta: never


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("mode", "error", "message"),
    [
        ("garbage", ProtocolError, "delta"),
        ("truncated", MalformedMessage, "announced bytes"),
        ("oversized", OversizedMessage, "above the spec's limit"),
        ("wrong_round", MalformedMessage, "delta of round"),
    ],
)
def test_a_bad_answer_is_rejected_with_a_protocol_error(spawn_peers, mode, error, message):
    _, (maddr,) = spawn_peers(SERVER, mode)
    with pytest.raises(error, match=message):
        _pull(maddr, serve_delta.ROUND)


@pytest.mark.timeout(120)
def test_a_silent_peer_costs_a_timeout_not_a_hang(spawn_peers):
    _, (maddr,) = spawn_peers(SERVER, "silent")
    with pytest.raises(asyncio.TimeoutError):
        _pull(maddr, serve_delta.ROUND, timeout_s=2.0)


async def _serving(num_clients: int):
    """A real DeltaServer with round 7's delta (1,000 bytes) published, and `num_clients`
    peers connected to it: (its P2P, the server, the clients' P2Ps)."""
    server_p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    server = DeltaServer(server_p2p)
    await server.start()
    server.publish(7, b"x" * 1000)
    maddrs = [str(a) for a in await server_p2p.get_visible_maddrs()]
    clients = [await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=maddrs) for _ in range(num_clients)]
    return server_p2p, server, clients


def test_server_forgets_rounds_older_than_the_last_two():
    server = DeltaServer(p2p=None)
    for r in range(5):
        server.publish(r, bytes([r]))
    assert sorted(server.book._deltas) == [3, 4]


def test_server_says_never_for_rounds_it_passed_without_a_delta_and_to_a_request_of_another_life():
    server = DeltaServer(p2p=None, incarnation=77)
    assert server.answer(0) == b"" and server.answer(9) == b"", "before training: every round may still come"
    server.training(5)
    server.training(6)
    assert server.answer(5) == b"" and server.answer(6) == b"" and server.answer(7) == b""  # not yet
    assert server.answer(4) == GONE, "passed without a delta"
    server.publish(5, b"delta 5")
    assert server.answer(5) == b"delta 5" and server.answer(5, 77) == b"delta 5"
    assert server.answer(5, 76) == GONE and server.answer(7, 76) == GONE, "asked of an earlier life: never"
    server.give_up(6)  # discarded, or its state replaced by a download
    assert server.answer(6) == GONE


def test_peer_limits_bound_concurrency_and_rate_per_peer():
    from locoswarm.node.streams import PeerLimits

    now = [0.0]
    lim = PeerLimits(max_concurrent=2, rate=5.0, burst=3, clock=lambda: now[0])
    assert lim.admit("a") is None and lim.admit("a") is None
    assert "2 requests already in flight" in lim.admit("a")
    assert lim.admit("b") is None  # another peer is not affected
    lim.release("a")
    assert lim.admit("a") is None  # third token of the burst
    lim.release("a")
    lim.release("a")
    assert "requests a second" in lim.admit("a")  # burst spent, no time passed
    now[0] += 0.2  # one token back at 5/s
    assert lim.admit("a") is None
    assert lim.refused == 2


@pytest.mark.timeout(120)
def test_a_peer_flooding_a_delta_server_is_refused_and_another_is_still_served():
    """A real DeltaServer; one client opens 100 streams as fast as it can: the server
    answers at most its burst of them and closes the rest unanswered (over its concurrency
    or rate limit, or beyond the streams a peer may keep open); a second client pulls the
    delta."""
    from locoswarm.node.streams import call_framed

    async def go():
        server_p2p, server, (flood, honest) = await _serving(2)
        try:
            async def one(p2p):
                try:
                    return await call_framed(p2p, server_p2p.peer_id, PROTOCOL, (7).to_bytes(8, "big") + bytes(8),
                                             limit=1 << 20, limit_name="limit", timeout_s=10)
                except (ConnectionError, ProtocolError, asyncio.TimeoutError):
                    return None

            results = await asyncio.gather(*(one(flood) for _ in range(100)))
            honest_got = await one(honest)
            return results, honest_got, server.limits.refused
        finally:
            for p in (flood, honest, server_p2p):
                await p.shutdown()

    results, honest_got, refused = asyncio.run(go())
    answered = sum(r == b"x" * 1000 for r in results)
    assert answered <= 40 and refused >= 60, (answered, refused)
    assert honest_got == b"x" * 1000


def test_a_request_for_a_round_in_training_is_held_until_its_delta_is_published_or_given_up():
    async def go():
        server = DeltaServer(p2p=None, incarnation=5)
        server.training(3)
        server.training(4)
        held = asyncio.ensure_future(server.respond(3, 5, hold_s=30))
        gone = asyncio.ensure_future(server.respond(4, hold_s=30))
        await asyncio.sleep(0.05)
        assert not held.done() and not gone.done(), "held while the round trains"
        server.publish(3, b"delta 3")
        server.give_up(4)
        expired = await server.respond(5, hold_s=0.01)  # not started: answered at once
        server.training(5)
        late = await server.respond(5, hold_s=0.05)  # held, then "not yet" when nothing came
        return await asyncio.wait_for(held, 1), await asyncio.wait_for(gone, 1), expired, late

    assert asyncio.run(go()) == (b"delta 3", GONE, b"", b"")


@pytest.mark.timeout(120)
def test_deltas_served_at_once_are_all_counted():
    """Requests held for one round end together when its delta is published: every byte
    written counts in `bytes_sent` (a `+= await` read the counter before waiting and lost
    all but one of them; bench swarm took the missing deltas for control traffic)."""
    from locoswarm.node.streams import call_framed
    from locoswarm.protocol.framing import frame_header

    async def go():
        server_p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        server = DeltaServer(server_p2p)
        await server.start()
        server.training(7)
        held, respond = [], server.respond

        async def counted(*args, **kwargs):
            held.append(args)
            return await respond(*args, **kwargs)

        server.respond = counted
        maddrs = [str(a) for a in await server_p2p.get_visible_maddrs()]
        clients = [await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=maddrs) for _ in range(3)]
        try:
            pulls = [asyncio.ensure_future(call_framed(c, server_p2p.peer_id, PROTOCOL, (7).to_bytes(8, "big") + bytes(8),
                                                       limit=1 << 20, limit_name="limit", timeout_s=30))
                     for c in clients]
            while len(held) < 3:  # all three requests reached the server and wait for the delta
                await asyncio.sleep(0.02)
            server.publish(7, b"x" * 1000)
            return await asyncio.gather(*pulls), server.bytes_sent
        finally:
            for p in (*clients, server_p2p):
                await p.shutdown()

    bodies, sent = asyncio.run(go())
    assert bodies == [b"x" * 1000] * 3
    assert sent == 3 * (len(frame_header(1000)) + 1000)


@pytest.mark.timeout(120)
def test_pulls_from_one_peer_share_one_kept_stream_and_a_stream_the_server_closed_is_replaced():
    """Round after round a puller asks the same peers: its requests go on one stream (libp2p's
    negotiation once, not per request). A stream the server ended meanwhile (its idle bound,
    or a restart) costs no failed pull: the request goes again on a new stream. A request cut
    off by its timeout leaves its stream closed, never read by the next request."""

    async def go():
        server_p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        server = DeltaServer(server_p2p)
        await server.start()
        maddrs = [str(a) for a in await server_p2p.get_visible_maddrs()]
        client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=maddrs)
        streams = delta_streams(client)
        blobs = {r: serve_delta.good_blob(r) for r in range(1, 5)}
        try:
            got = []
            for r in (1, 2, 3):
                server.training(r)
                server.publish(r, blobs[r])
                got.append(await call_get_delta(streams, server_p2p.peer_id, r, serve_delta.SPEC, timeout_s=10))
            opened_for_three = streams.num_opened
            open_at_server = sum(map(len, server.limits._streams.values()))
            for writers in list(server.limits._streams.values()):
                for w in list(writers):
                    w.close()  # the server ends the kept stream
            await asyncio.sleep(0.2)
            server.training(4)
            with pytest.raises(asyncio.TimeoutError):  # held: the delta of 4 is not published yet
                await call_get_delta(streams, server_p2p.peer_id, 4, serve_delta.SPEC, timeout_s=0.3)
            server.publish(4, blobs[4])
            got.append(await call_get_delta(streams, server_p2p.peer_id, 4, serve_delta.SPEC, timeout_s=10))
            return got, opened_for_three, open_at_server, streams.num_opened, server.bytes_sent
        finally:
            streams.close()
            for p in (client, server_p2p):
                await p.shutdown()

    got, opened_for_three, open_at_server, opened, sent = asyncio.run(go())
    assert [d.round for d in got] == [1, 2, 3, 4] and all(d.sender == "server" for d in got)
    assert opened_for_three == 1 and open_at_server == 1, "three requests, one stream"
    # The closed stream, then the timed-out request's stream (closed, not reused): 3 in all.
    assert opened == 3
    assert sent >= sum(len(serve_delta.good_blob(r)) for r in range(1, 5)), "every answer counted as it went"


def test_a_peer_keeps_a_bounded_number_of_streams_open_at_a_server():
    """An honest puller keeps one stream to a server; the ones beyond max_concurrent + 1
    close its oldest, and past max_peers streams in all new ones are refused."""
    from locoswarm.node.streams import PeerLimits

    class Stream:
        closed = False

        def close(self):
            self.closed = True

    lim = PeerLimits(max_concurrent=2, rate=10.0, burst=30, max_peers=5)
    a = [Stream() for _ in range(4)]
    for s in a:
        assert lim.open_stream("a", s) is None
    assert [s.closed for s in a] == [True, False, False, False], "the oldest of four closed"
    assert lim.refused == 1
    b = [Stream() for _ in range(4)]
    assert lim.open_stream("b", b[0]) is None and lim.open_stream("b", b[1]) is None
    assert "5 streams open" in lim.open_stream("c", Stream()), "a new peer past the total is refused"
    assert lim.open_stream("b", b[2]) is None and lim.open_stream("b", b[3]) is None, "a known peer may"
    assert b[0].closed and not b[1].closed
    for s in a[1:]:
        lim.close_stream("a", s)
    assert lim.open_stream("c", Stream()) is None, "room again once a's streams ended"


def test_a_byte_budget_paces_answers_in_order_and_refuses_past_its_wait():
    """Whoever asks, a server sends at most its budget: answers within the burst go at once,
    later ones wait their turn at the rate, and one that would wait past max_wait_s is
    refused (the client asks again later or elsewhere)."""
    from locoswarm.node.streams import Busy, ByteBudget

    now = [0.0]
    budget = ByteBudget(1000.0, burst_bytes=2000, max_wait_s=3.0, clock=lambda: now[0])
    assert [budget.reserve(1000) for _ in range(5)] == [0.0, 0.0, 0.0, 1.0, 2.0]
    with pytest.raises(Busy, match="budget"):
        budget.reserve(1000)  # would wait 3 s... and one more reservation beyond
        budget.reserve(1000)
    assert budget.refused == 1
    now[0] = 100.0  # idle: the burst is back, no more
    assert [budget.reserve(1000) for _ in range(4)] == [0.0, 0.0, 0.0, 1.0]


@pytest.mark.timeout(120)
def test_one_peer_is_sent_a_rounds_delta_a_bounded_number_of_times():
    """A peer asking for the same round's delta in a loop gets it MAX_SENDS_PER_ROUND times
    (an honest puller's retries after cut streams fit), then its requests are closed
    unanswered; another peer is still served, and a new round starts the count again."""
    from locoswarm.node.exchange import MAX_SENDS_PER_ROUND
    from locoswarm.node.streams import call_framed

    async def go():
        server_p2p, server, (greedy, other) = await _serving(2)

        async def ask(p2p, round_):
            try:
                return await call_framed(p2p, server_p2p.peer_id, PROTOCOL, round_.to_bytes(8, "big") + bytes(8),
                                         limit=1 << 20, limit_name="limit", timeout_s=10)
            except ConnectionError:
                return None

        try:
            looped = [await ask(greedy, 7) for _ in range(MAX_SENDS_PER_ROUND + 3)]
            other_got = await ask(other, 7)
            server.publish(8, b"y" * 1000)
            next_round = await ask(greedy, 8)
            return looped, other_got, next_round
        finally:
            for p in (greedy, other, server_p2p):
                await p.shutdown()

    looped, other_got, next_round = asyncio.run(go())
    assert looped[:MAX_SENDS_PER_ROUND] == [b"x" * 1000] * MAX_SENDS_PER_ROUND
    assert looped[MAX_SENDS_PER_ROUND:] == [None] * 3
    assert other_got == b"x" * 1000 and next_round == b"y" * 1000
