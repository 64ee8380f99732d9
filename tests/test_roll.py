"""An anchor's roll (protocol/roll.py, node/roll.py): what it says, how it is refused, how a
joiner reads the newest one an anchor signed from a real DHT, and whose word it then takes
while none of the run's anchors is live (node/catchup.py vouching)."""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from locoswarm.protocol import MalformedMessage, SpecMismatch
from locoswarm.protocol.roll import MAX_ROLL_PEERS, decode_roll, encode_roll, roll_peers, take_roll

SPEC = b"s" * 32
CHAIN = "ab" * 16


def test_a_roll_names_the_established_peers_of_a_state_and_is_checked_field_by_field():
    ledger = (("a", 100), ("b", 5), ("c", 80), ("x", -3))
    roll = decode_roll(encode_roll(SPEC, 12, CHAIN, roll_peers(ledger, 50)), "A", SPEC)
    assert (roll.anchor, roll.round, roll.chain, roll.peers) == ("A", 12, CHAIN, {"a", "c"})
    many = tuple((f"p{i:03d}", 1000 + i) for i in range(100))
    kept = decode_roll(encode_roll(SPEC, 1, CHAIN, roll_peers(many, 1)), "A", SPEC).peers
    assert kept == {f"p{i:03d}" for i in range(100 - MAX_ROLL_PEERS, 100)}, "the largest credits"
    with pytest.raises(ValueError, match="needs the state's round chain"):
        encode_roll(SPEC, 1, "", ["a"])
    with pytest.raises(SpecMismatch, match="roll of A is of another run spec"):
        decode_roll(encode_roll(b"t" * 32, 12, CHAIN, ["a"]), "A", SPEC)
    good = {"v": 1, "spec": SPEC, "round": 3, "chain": CHAIN, "peers": ["a", "b"]}
    for change, why in (({"round": -1}, "round must be an integer"), ({"round": 1.5}, "round must be an integer"),
                        ({"chain": "xyz"}, "chain must be 32 lowercase hex digits"),
                        ({"peers": ["b", "a"]}, "distinct peer ids in ascending order"),
                        ({"peers": ["a", "a"]}, "distinct peer ids in ascending order"),
                        ({"peers": [""]}, "distinct peer ids"), ({"peers": [7]}, "distinct peer ids")):
        with pytest.raises(MalformedMessage, match=why):
            decode_roll(msgpack.packb({**good, **change}, use_bin_type=True), "A", SPEC)
    with pytest.raises(MalformedMessage):
        decode_roll(b"\x93garbage", "A", SPEC)
    with pytest.raises(MalformedMessage):
        decode_roll(msgpack.packb({**good, "extra": 1}, use_bin_type=True), "A", SPEC)


def _identity_node(state_dir, initial_peers=None):
    """A DHT node whose records are signed with its own libp2p identity, as a daemon's are."""
    from hivemind.dht.node import DHTNode
    from hivemind.p2p import P2P

    from locoswarm.node.signers import CachedSignatureValidator
    from locoswarm.node.statedir import IDENTITY_FILE, ensure_identity, identity_key

    async def go():
        state_dir.mkdir(mode=0o700)
        ensure_identity(str(state_dir))
        p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity_path=str(state_dir / IDENTITY_FILE),
                               initial_peers=initial_peers or [])
        validator = CachedSignatureValidator(identity_key(str(state_dir)))
        dht = await DHTNode.create(p2p=p2p, initial_peers=initial_peers, record_validator=validator)
        return dht, validator, p2p.peer_id.to_base58(), [str(a) for a in await p2p.get_visible_maddrs()]

    return go()


@pytest.mark.timeout(120)
def test_a_joiner_reads_the_newest_roll_an_anchor_signed_and_no_other(tmp_path):
    """Real DHT nodes with their own identities: the anchor's roll is found; a roll signed by
    a peer that is no anchor (newer), and one stored under the anchor's name but signed with
    another key, are skipped."""
    from hivemind.utils import get_dht_time

    from locoswarm.node.roll import keep_roll, read_roll, roll_key

    async def go():
        anchor, a_val, a_id, addrs = await _identity_node(tmp_path / "a")
        other, o_val, o_id, _ = await _identity_node(tmp_path / "o", addrs)
        reader, _, _, _ = await _identity_node(tmp_path / "r", addrs)
        nodes = [anchor, other, reader]
        try:
            state = (7, CHAIN, (("a", 10), ("b", 10), ("c", 1)))
            task = asyncio.create_task(keep_roll(anchor, a_id.encode() + a_val.local_public_key, "run", SPEC,
                                                 lambda: state, 10, poll_s=0.05))
            found = None
            for _ in range(100):
                found = await read_roll(reader, "run", SPEC, [a_id])
                if found is not None:
                    break
                await asyncio.sleep(0.1)
            task.cancel()
            assert found is not None and (found.anchor, found.round, found.peers) == (a_id, 7, {"a", "b"})
            later = encode_roll(SPEC, 9, CHAIN, ["z"])
            expires = get_dht_time() + 60
            await other.store(roll_key("run"), later, expires, subkey=o_id.encode() + o_val.local_public_key)
            # A's name, another's key: signed (the DHT takes it) but not by the peer it names.
            await other.store(roll_key("run"), later, expires, subkey=a_id.encode() + o_val.local_public_key)
            stored = await reader.get(roll_key("run"), latest=True)
            assert len(stored.value) == 3, "all three entries are in the DHT"
            found = await read_roll(reader, "run", SPEC, [a_id])
            assert (found.anchor, found.round) == (a_id, 7)
            assert (await read_roll(reader, "run", SPEC, [o_id])).round == 9, "when that peer is an anchor"
            assert await read_roll(reader, "other-run", SPEC, [a_id]) is None
        finally:
            for node in nodes:
                p2p = node.protocol.p2p
                await node.shutdown()
                await p2p.shutdown()  # given to the DHT node, not owned by it

    asyncio.run(go())


def _record(peer: str, round_: int, chain: str = CHAIN):
    from locoswarm.protocol.records import PeerRecord

    return PeerRecord(peer_id=peer, addrs=("/ip4/127.0.0.1/tcp/1",), device="cpu", tokens_per_s=1.0, round=round_,
                      spec_hash=SPEC, chain=chain)


def _catch_up(records, anchors=("A",)):
    from types import SimpleNamespace

    from locoswarm.node.catchup import CatchUp
    from locoswarm.node.spec import TrustPolicy
    from locoswarm.optim.credit import Ledger

    ctx = SimpleNamespace(membership=SimpleNamespace(records=records),
                          trainer=SimpleNamespace(ledger=Ledger(earn_rounds=8, per_peer_tokens=10)),
                          spec=SimpleNamespace(trust=TrustPolicy(anchors=list(anchors))), peer_id="me",
                          bootstrap=frozenset({"s1"}))
    return CatchUp(ctx)


def test_while_no_anchor_is_live_the_peers_on_its_roll_vouch_by_a_majority():
    from locoswarm.node.host import NodeError
    from locoswarm.protocol.roll import Roll

    other = "cd" * 16
    roll = Roll(anchor="A", round=20, chain=CHAIN, peers=frozenset({"b", "c", "d"}))
    honest = [_record("b", 30), _record("c", 30)]
    fresh = [_record(f"s{i}", 40, other) for i in range(5)]  # identities minted since, showing another state
    assert _catch_up(honest + [_record("d", 30, other)] + fresh).vouching(roll) == {"b", "c"}
    assert _catch_up([_record("A", 30)] + honest + fresh).vouching(roll) == {"A"}, "a live anchor's word first"
    with pytest.raises(NodeError, match="none of the run's 1 anchors .* is live and no roll of theirs was found"):
        _catch_up(honest + fresh).vouching(None)
    with pytest.raises(NodeError, match=r"of the 3 peers on the roll A signed at round 20, 0 are live"):
        _catch_up(fresh).vouching(roll)
    with pytest.raises(NodeError, match=r"2 are live, no majority of them attesting one state"):
        _catch_up([_record("b", 30), _record("d", 30, other)] + fresh).vouching(roll)


def test_an_anchor_signs_again_when_its_established_peers_change_and_not_every_round():
    """keep_roll's schedule, against a recorder of stores: the first roll, a new one when the
    peers change, none for a newer round alone within every_s; a failed store is tried again."""
    from locoswarm.node.roll import keep_roll

    stores, answers = [], iter([True, False, True, True, True, True])
    states = iter([(1, CHAIN, (("a", 5),)), (2, CHAIN, (("a", 5),)), (3, CHAIN, (("a", 5), ("b", 5))),
                   (4, CHAIN, (("a", 5), ("b", 5))), (5, CHAIN, (("a", 5), ("b", 5)))])

    class Recorder:
        async def store(self, key, value, expiration, subkey):
            stores.append(decode_roll(value, "A", SPEC))
            return next(answers)

    current = [None]

    def newest():
        current[0] = next(states, current[0])
        return current[0]

    async def go():
        task = asyncio.create_task(keep_roll(Recorder(), b"A", "run", SPEC, newest, 5, every_s=3600, poll_s=0))
        for _ in range(100):
            await asyncio.sleep(0)
        task.cancel()

    asyncio.run(go())
    assert [(r.round, sorted(r.peers)) for r in stores] == [(1, ["a"]), (3, ["a", "b"]), (4, ["a", "b"])], \
        "round 2 (same peers) skipped; round 3's store failed and round 4's took its place"


@pytest.mark.timeout(120)
def test_a_roll_outlives_the_node_it_was_stored_at_once_a_peer_relays_it(tmp_path):
    """One replica a key (num_replicas 1): the anchor's roll goes to the node nearest the key.
    A nearer node joins and lacks it; a peer relays the rolls (ReplicaStore.relay), and the
    nearer node holds the roll as the anchor signed it; the first node and the anchor leave,
    and a reader that never met them still reads the roll. A roll signed by a non-anchor is
    not relayed."""
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.dht.node import DHTNode
    from hivemind.dht.routing import DHTID
    from hivemind.utils import get_dht_time
    from hivemind.utils.crypto import RSAPrivateKey

    from locoswarm.node.replicas import ReplicaStore
    from locoswarm.node.roll import read_roll, roll_key
    from locoswarm.protocol.roll import Roll

    key_id = DHTID.generate(source=roll_key("run"))

    async def plain(node_id=None, peers=None, replicas=1):
        return await DHTNode.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=peers, node_id=node_id,
                                    num_replicas=replicas, record_validator=RSASignatureValidator(RSAPrivateKey()))

    async def addrs_of(node):
        return [str(a) for a in await node.protocol.p2p.get_visible_maddrs()]

    async def go():
        first = await plain(DHTID(key_id ^ 0b100))
        peers = await addrs_of(first)
        anchor, a_val, a_id, _ = await _identity_node(tmp_path / "a", peers)
        other, o_val, o_id, _ = await _identity_node(tmp_path / "o", peers)
        nodes = [first, anchor, other]
        try:
            for node, val, pid, round_ in ((anchor, a_val, a_id, 7), (other, o_val, o_id, 9)):
                node.num_replicas = 1
                assert await node.store(roll_key("run"), encode_roll(SPEC, round_, CHAIN, ["b"]),
                                        get_dht_time() + 60, subkey=pid.encode() + val.local_public_key)
            assert len(first.protocol.storage.get(key_id).value) == 2, "both at the one node nearest the key"
            nearer = await plain(DHTID(key_id ^ 0b10), peers)
            relay = await plain(peers=peers + await addrs_of(nearer), replicas=2)
            nodes += [nearer, relay]
            # hivemind hands a key to a new node nearer to it when the node nearest the key
            # meets it, and only that node: a replica can miss an entry (the nearest left
            # first, or the entry came later). Here it is made to miss them.
            for _ in range(50):
                if nearer.protocol.storage.get(key_id) is not None:
                    del nearer.protocol.storage[key_id]
                    break
                await asyncio.sleep(0.1)
            assert nearer.protocol.storage.get(key_id) is None
            sent = await ReplicaStore(relay).relay(
                roll_key("run"), lambda subkey, value: isinstance(take_roll(subkey, value, [a_id], SPEC), Roll))
            held = nearer.protocol.storage.get(key_id)
            assert sent == 1 and held is not None and len(held.value) == 1, "the anchor's roll, not the other's"
            for node in (first, anchor, other):
                await _shut(node)
                nodes.remove(node)
            reader = await plain(peers=await addrs_of(relay))
            nodes.append(reader)
            found = await read_roll(reader, "run", SPEC, [a_id])
            assert found is not None and (found.anchor, found.round) == (a_id, 7)
        finally:
            for node in nodes:
                await _shut(node)

    asyncio.run(go())


async def _shut(node):
    p2p = node.protocol.p2p
    await node.shutdown()
    await p2p.shutdown()
