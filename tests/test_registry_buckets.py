"""The bounded registry on real hivemind DHT nodes (in one process, each with its own p2pd,
on loopback): records spread over bucket keys give a reader a bounded view and a size
estimate close to the truth; a newcomer is seen within one read period although the reader
holds a cached copy of the bucket that has not expired; direct stores reach the key's
replicas and fall back to DHTNode.store when none is known; bad bucket entries are refused
with the reason; a withdrawal leaves tombstones at every level written."""

from __future__ import annotations

import asyncio
import hashlib
import random

import pytest
from hivemind.dht.node import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.utils import get_dht_time

from locoswarm.node import buckets, registry as registry_module
from locoswarm.node.buckets import read_level
from locoswarm.node.host import DHT_OPTIONS
from locoswarm.node.registry import PeerRegistry
from locoswarm.protocol import records
from locoswarm.protocol.records import PeerRecord, bucket_key, bucket_of, encode_record

pytestmark = pytest.mark.timeout(180)
RUN, SPEC = "bucket-test", b"b" * 32


def _fake_id(i: int) -> str:
    """A base58-looking peer id (the registry without a signature validator takes any)."""
    return "Qm" + hashlib.sha256(f"peer {i}".encode()).hexdigest()[:30]


def _record(peer: str, round_: int = 3) -> PeerRecord:
    return PeerRecord(peer_id=peer, addrs=("/ip4/127.0.0.1/tcp/1",), device="cpu", tokens_per_s=1.0, round=round_,
                      spec_hash=SPEC)


async def _nodes(count: int, *, client_reader: bool = False) -> list[DHTNode]:
    """`count` DHT nodes joined into one DHT; the last in client mode when `client_reader`
    (it is then never a replica: what it reads comes from the network or its cache)."""
    first = await DHTNode.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], **DHT_OPTIONS)
    addrs = [str(a) for a in await first.get_visible_maddrs()]
    nodes = [first]
    for i in range(1, count):
        client = client_reader and i == count - 1
        nodes.append(await DHTNode.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=addrs,
                                          client_mode=client, **DHT_OPTIONS))
    return nodes


async def _shutdown(nodes: list[DHTNode]) -> None:
    await asyncio.gather(*(n.shutdown() for n in nodes))


def _writer(dht: DHTNode, peer: str, estimate: float | None = None) -> PeerRegistry:
    reg = PeerRegistry(dht, RUN, SPEC, ttl_s=30.0, peer_id=peer)
    if estimate is not None:
        reg.estimate.reset(estimate)
    return reg


def test_forty_records_over_buckets_give_a_bounded_view_and_an_estimate_within_a_factor_sqrt2(monkeypatch):
    """BUCKET_ENTRIES 4 puts 40 peers at ℓ = log2(10) ≈ 3.3: writes at levels 3 and 4, reads
    at level 3 (8 buckets of 5 on average); a view read aims at 16 entries. The reader starts
    knowing nothing (level 0, where nobody writes), finds the swarm's level by its probe, and
    then sees a sample, not everyone."""
    monkeypatch.setattr(records, "BUCKET_ENTRIES", 4)  # where the level arithmetic reads it
    monkeypatch.setattr(buckets, "SAMPLE_ENTRIES", 16)
    monkeypatch.setattr(buckets, "VIEW_MAX", 20)
    monkeypatch.setattr(registry_module, "VIEW_READ_S", 0.0)  # a view read at every call
    random.seed(18)
    peers = [_fake_id(i) for i in range(40)]

    async def go():
        nodes = await _nodes(3)
        try:
            for peer in peers:
                assert await _writer(nodes[0], peer, estimate=40).announce(_record(peer))
            reader = PeerRegistry(nodes[2], RUN, SPEC, ttl_s=30.0)
            views, estimates = [], []
            for _ in range(8):
                views.append({r.peer_id for r in await reader.peers()})
                estimates.append(reader.peers_estimate)
            return reader, views, estimates
        finally:
            await _shutdown(nodes)

    reader, views, estimates = asyncio.run(go())
    assert reader.rejected == []
    assert all(v <= set(peers) for v in views)
    assert all(len(v) <= 20 for v in views) and max(len(v) for v in views[1:]) < 40, "a sample, not everyone"
    # The tolerance the level agreement needs: within a factor √2 of the writers' 40.
    assert 40 / 2 ** 0.5 <= estimates[-1] <= 40 * 2 ** 0.5, estimates
    assert read_level(estimates[-1]) in (3, 4)


def test_a_newcomer_is_seen_within_one_read_period_despite_a_cached_copy():
    """The reader is a client-mode node (never a replica), so its reads come from the
    network or from its local cache. A plain get after the newcomer stored returns the cached
    copy without it (the trap); the registry's read asks the bucket's replicas and sees it."""

    async def go():
        nodes = await _nodes(3, client_reader=True)
        try:
            first, newcomer = _fake_id(1), _fake_id(2)
            assert await _writer(nodes[0], first).announce(_record(first))
            reader = PeerRegistry(nodes[2], RUN, SPEC, ttl_s=30.0, read_period_s=1.0)
            assert {r.peer_id for r in await reader.peers()} == {first}
            await nodes[2].get(bucket_key(RUN, 0, 0))  # a plain get, which caches the copy it found
            await asyncio.sleep(1.0)
            assert await _writer(nodes[1], newcomer).announce(_record(newcomer))
            cached = await nodes[2].get(bucket_key(RUN, 0, 0))
            plain = {k.decode() if isinstance(k, bytes) else k for k in cached.value}
            return plain, {r.peer_id for r in await reader.peers()}, first, newcomer
        finally:
            await _shutdown(nodes)

    plain, seen, first, newcomer = asyncio.run(go())
    assert plain == {first}, "a plain get answers from the cache (what the registry must not do)"
    assert seen == {first, newcomer}


def test_a_direct_store_reaches_the_replicas_and_falls_back_when_none_is_known():
    async def go():
        alone = await DHTNode.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], **DHT_OPTIONS)
        try:
            reg = _writer(alone, _fake_id(7))
            assert await reg.announce(_record(_fake_id(7)))
            fell_back = reg.store.fallbacks
        finally:
            await alone.shutdown()
        nodes = await _nodes(4)
        try:
            peer = _fake_id(8)
            reg = _writer(nodes[0], peer)
            assert await reg.announce(_record(peer))
            key = bucket_key(RUN, 0, 0)
            held = [n.protocol.storage.get(DHTID.generate(source=key)) is not None for n in nodes]
            flipped_held = [n.protocol.storage.get(DHTID(DHTID.generate(source=key) ^ 1)) for n in nodes]
            other = await nodes[3].get(key)
            return fell_back, reg.store.fallbacks, held, flipped_held, other, peer
        finally:
            await _shutdown(nodes)

    fell_back, fallbacks, held, flipped_held, other, peer = asyncio.run(go())
    assert fell_back == 1, "a lone node knows no replica: its one level (a small swarm) went through DHTNode.store"
    assert fallbacks == 0 and all(held), "4 nodes, 5 replicas: every node holds the entry, ours included"
    assert flipped_held == [None] * 4
    assert other is not None and peer in other.value


@pytest.mark.parametrize("mode", ["wrong_bucket", "oversized", "far_expiry", "stuffed", "other_spec"])
def test_bad_bucket_entries_are_refused_with_the_reason(monkeypatch, mode):
    """At level 1 (BUCKET_ENTRIES 1, estimate 2): an entry for a peer that hashes into the
    other bucket, an oversized value, an entry expiring far beyond any honest clock, a bucket
    holding more entries than a read decodes, a record of another spec."""
    monkeypatch.setattr(records, "BUCKET_ENTRIES", 1)  # where the level arithmetic reads it
    monkeypatch.setattr(registry_module, "MAX_ENTRIES_READ", 5)
    peers = [_fake_id(i) for i in range(40)]
    good = peers[0]
    level = 1
    home = bucket_of(good, level)
    key = bucket_key(RUN, level, home)
    stranger = next(p for p in peers if bucket_of(p, level) != home)
    neighbours = [p for p in peers[1:] if bucket_of(p, level) == home]

    async def go():
        nodes = await _nodes(2)
        try:
            dht = nodes[0]
            now = get_dht_time()
            await dht.store(key, encode_record(_record(good)), now + 10, subkey=good)
            if mode == "wrong_bucket":
                await dht.store(key, encode_record(_record(stranger)), now + 30, subkey=stranger)
            elif mode == "oversized":
                await dht.store(key, b"\x80" + b"x" * 9000, now + 30, subkey=neighbours[0])
            elif mode == "far_expiry":
                await dht.store(key, encode_record(_record(neighbours[0])), now + 86400, subkey=neighbours[0])
            elif mode == "stuffed":
                for i, p in enumerate(neighbours[:7]):
                    await dht.store(key, encode_record(_record(p)), now + 20 - i, subkey=p)
            elif mode == "other_spec":
                bad = PeerRecord(peer_id=neighbours[0], addrs=("/ip4/1.2.3.4/tcp/1",), device="cpu",
                                 tokens_per_s=1.0, round=1, spec_hash=b"o" * 32)
                await dht.store(key, encode_record(bad), now + 30, subkey=neighbours[0])
            reader = PeerRegistry(nodes[1], RUN, SPEC, ttl_s=30.0, peer_id=good)
            reader.estimate.reset(2.0)
            return {r.peer_id for r in await reader.peers()}, reader.rejected
        finally:
            await _shutdown(nodes)

    seen, rejected = asyncio.run(go())
    reasons = " | ".join(reason for _, reason in rejected)
    expected = {"wrong_bucket": f"does not hash into bucket {level}:{home}", "oversized": "exceeds the limit of 4096",
                "far_expiry": "expires too far ahead", "stuffed": "only the 5 freshest read",
                "other_spec": "another run spec"}[mode]
    if mode == "stuffed":
        assert expected in reasons and len(seen) == 5, (seen, rejected)
        assert good not in seen, "the stuffing entries were fresher than the honest one"
    else:
        assert expected in reasons and seen == {good}, (seen, rejected)


def test_a_withdrawal_leaves_a_tombstone_at_every_level_written(monkeypatch):
    monkeypatch.setattr(records, "BUCKET_ENTRIES", 1)  # where the level arithmetic reads it
    peer = _fake_id(5)

    async def go():
        nodes = await _nodes(2)
        try:
            reg = _writer(nodes[0], peer, estimate=1.0)  # writes levels 0 and 1
            assert await reg.announce(_record(peer))
            reg.estimate.reset(4.0)  # now levels 2 and 3
            assert await reg.announce(_record(peer))
            assert await reg.withdraw(peer)
            out = {}
            for level in range(4):
                found = await nodes[1].get(bucket_key(RUN, level, bucket_of(peer, level)), latest=True)
                out[level] = [item.value for item in found.value.values()]
            reader = PeerRegistry(nodes[1], RUN, SPEC, ttl_s=30.0, peer_id=peer)
            reader.estimate.reset(4.0)  # reads level 2
            return out, await reader.peers(), reader.withdrawn
        finally:
            await _shutdown(nodes)

    out, seen, withdrawn = asyncio.run(go())
    assert out == {level: [b""] for level in range(4)}
    assert seen == [] and withdrawn == {peer}
