"""Round progress through real DHT nodes on loopback (node/rounds.py RoundProgress): reports
go straight to the key's replicas, a read sees what was stored since the last read although
the reader cached the last copy, an unchanged report is not stored again before its
keepalive, and signed entries of one peer cannot be written by another."""

from __future__ import annotations

import asyncio

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.utils.crypto import RSAPrivateKey

from locoswarm.node.registry import subkey_author
from locoswarm.node.replicas import ReplicaStore
from locoswarm.node.rounds import REPORT_SPACING_INTERVALS, RoundProgress
from locoswarm.protocol.records import decode_progress

pytestmark = pytest.mark.timeout(120)


async def _swarm(n: int) -> list[tuple[DHTNode, RSASignatureValidator]]:
    nodes, first = [], None
    for _ in range(n):
        validator = RSASignatureValidator(RSAPrivateKey())
        node = await DHTNode.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=first,
                                    record_validator=validator, cache_nearest=0, cache_on_store=False)
        first = first or [str(a) for a in await node.protocol.p2p.get_visible_maddrs()]
        nodes.append((node, validator))
    return nodes


def _progress(node: DHTNode, validator, round_: int = 7) -> RoundProgress:
    """A peer's progress in round `round_`, signed with `validator`'s key under that key's peer
    id (a daemon's DHT identity and signing key are one key; here they are two)."""
    return RoundProgress(node, "run", b"h" * 32, round_, subkey_author(validator.local_public_key)[2],
                         per_peer_tokens=100, interval_s=0.1, ttl_s=60, validator=validator,
                         store=ReplicaStore(node))


def test_a_read_sees_every_report_stored_since_the_last_read_although_the_reader_cached_it():
    async def go():
        nodes = await _swarm(6)
        try:
            # The reader is the node farthest from the key: no replica of it, so all it holds
            # between reads is its cache of the last copy.
            key_id = DHTID.generate(source=_progress(*nodes[0]).key)
            nodes.sort(key=lambda nv: key_id.xor_distance(nv[0].node_id))
            writers = [_progress(node, v) for node, v in nodes[:3]]
            reader = _progress(*nodes[-1])
            seen = []
            for tokens in (10, 20, 30):
                for w in writers:
                    w._reported = (*w._reported[:2], w._reported[2] - 1.0)  # reports a second apart
                    await w.report(tokens, 100.0)
                await reader.refresh()
                seen.append(sorted(s.progress.tokens for s in reader._others.values()))
            return seen, [w.store.fallbacks for w in writers]
        finally:
            for node, _ in nodes:
                await node.shutdown()

    seen, fallbacks = asyncio.run(go())
    assert seen == [[10, 10, 10], [20, 20, 20], [30, 30, 30]]
    assert fallbacks == [0, 0, 0], "every report went straight to the replicas"


def test_a_report_is_stored_when_it_is_news_and_no_more_often_than_readers_extrapolate():
    """Unchanged: not stored again before its keepalive. Changed, not done: at most once per
    REPORT_SPACING_INTERVALS (a reader extrapolates over that gap). Done: at once."""
    async def go():
        nodes = await _swarm(3)
        try:
            p = _progress(*nodes[0])
            stored = []
            real = p.store.store

            async def counted(*args, **kwargs):
                progress = decode_progress(args[2])
                stored.append((progress.tokens, progress.done))
                return await real(*args, **kwargs)

            def age(seconds: float) -> None:  # as if the last store were `seconds` older
                p._reported = (*p._reported[:2], p._reported[2] - seconds)

            p.store.store = counted
            await p.report(50, 10.0)
            await p.report(50, 12.0)  # same count, a new rate: no news
            await p.report(60, 12.0)  # news, but sooner than readers extrapolate to
            age(REPORT_SPACING_INTERVALS * p.interval_s)
            await p.report(60, 12.0)
            await p.report(70, 12.0, done=True)  # done is stored at once
            age(10.0)
            await p.report(70, 12.0, done=True)  # the keepalive
            return stored
        finally:
            for node, _ in nodes:
                await node.shutdown()

    assert asyncio.run(go()) == [(50, False), (60, False), (70, True), (70, True)]


def test_a_peer_cannot_report_progress_in_another_peers_name():
    async def go():
        nodes = await _swarm(3)
        try:
            honest = _progress(*nodes[0])
            await honest.report(40, 10.0)
            forger = _progress(*nodes[1])
            forger.peer_id = honest.peer_id  # entries under the honest peer's id, signed by the forger's key
            await forger.report(10_000, 1e6)
            reader = _progress(*nodes[2])
            await reader.refresh()
            return honest.peer_id, {peer: s.progress.tokens for peer, s in reader._others.items()}
        finally:
            for node, _ in nodes:
                await node.shutdown()

    honest_id, seen = asyncio.run(go())
    assert seen == {honest_id: 40}


def test_reads_ask_one_replica_in_turn_so_an_entry_one_replica_missed_is_seen_and_never_set_back():
    """Reads take one copy each from the key's replicas in turn (node/replicas.py): an entry
    that reached one replica only is seen within k reads, and a replica holding an older
    report of the same peer does not set its progress back."""
    async def go():
        nodes = await _swarm(6)
        try:
            reader = _progress(*nodes[0])
            key_id = DHTID.generate(source=reader.key)
            asked = []
            real_find = nodes[0][0].protocol.call_find

            async def counted(peer, keys):
                asked.append(peer)
                return await real_find(peer, keys)

            nodes[0][0].protocol.call_find = counted
            replicas = await reader.store._replicas_of(key_id)
            k = len(replicas)
            writer = _progress(*nodes[1])
            await writer.report(20, 10.0)  # at every replica
            await reader.refresh()
            assert reader._others[writer.peer_id].progress.tokens == 20
            # A later report that reached one replica only (the rest missed the store).
            one = max(replicas, key=key_id.xor_distance)
            writer.store._replicas[key_id] = ({one: replicas[one]}, writer.store.clock())
            await asyncio.sleep(0.01)  # a later expiration time: the newer entry
            writer._reported = (-1, False, 0.0)
            await writer.report(30, 10.0)
            seen = []
            for _ in range(2 * k):
                before = len(asked)
                await reader.refresh()
                assert len(asked) - before <= 1, "one copy a read"
                seen.append(reader._others[writer.peer_id].progress.tokens)
            return k, seen, reader.store.fallback_reads
        finally:
            for node, _ in nodes:
                await node.shutdown()

    k, seen, fallback_reads = asyncio.run(go())
    assert k >= 3 and fallback_reads == 0
    assert 30 in seen[:k], seen  # every replica asked once within k reads
    first = seen.index(30)
    assert seen[first:] == [30] * (len(seen) - first), "an older copy set the progress back"
