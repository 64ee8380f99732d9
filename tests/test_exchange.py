"""Delta exchange between real peer processes over hivemind's p2pd on loopback: a good
delta arrives intact; garbage, truncated, oversized, silent and wrong-round answers are
rejected with a ProtocolError or a timeout, and the puller carries on."""

from __future__ import annotations

import asyncio
import importlib.util
import os

import pytest
from hivemind.p2p import P2P, PeerID

from locoswarm.node.exchange import DeltaServer, DeltaUnavailable, call_get_delta
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
            return await call_get_delta(client, peer, round_, serve_delta.SPEC, timeout_s=timeout_s)
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
        _pull(maddr, serve_delta.ROUND + 5)


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


def test_server_forgets_rounds_older_than_the_last_two():
    server = DeltaServer.__new__(DeltaServer)
    server._deltas = {}
    for r in range(5):
        server.publish(r, bytes([r]))
    assert sorted(server._deltas) == [3, 4]
