"""Peer discovery through a real DHT between processes on loopback: a live peer's record is
found; a SIGKILLed peer is forgotten once its record expires; a withdrawn record is gone at
once; records of another spec, garbage, or stored under another peer's id are refused with
the reason; a signed record cannot be overwritten by another peer, and a signing registry
refuses unsigned records."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import time

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from locoswarm.node.registry import PeerRegistry
from locoswarm.protocol.records import PeerRecord, bucket_key, encode_record

SCRIPT = os.path.join(os.path.dirname(__file__), "peers", "announce.py")
_spec = importlib.util.spec_from_file_location("announce", SCRIPT)
announce = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(announce)

pytestmark = pytest.mark.timeout(120)


def _look(addrs: list[str], wait_s: float = 0.0):
    async def go():
        dht = await DHTNode.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=addrs)
        try:
            if wait_s:
                await asyncio.sleep(wait_s)
            reg = PeerRegistry(dht, announce.RUN, announce.SPEC_HASH)
            return await reg.peers(), reg.rejected
        finally:
            await dht.shutdown()

    return asyncio.run(go())


def test_a_live_peer_is_found_and_a_killed_one_forgotten_when_its_record_expires(spawn_peers):
    procs, addrs = spawn_peers(SCRIPT, "good", "good")
    found, rejected = _look(addrs)
    ids = {a.split("/p2p/")[1] for a in addrs}
    assert {r.peer_id for r in found} == ids and rejected == []
    assert all(r.round == 4 and r.device == "cpu" for r in found)
    os.kill(procs[0].pid, signal.SIGKILL)
    killed_id = addrs[0].split("/p2p/")[1]
    deadline = time.monotonic() + 30
    while True:
        found, _ = _look(addrs[1:], wait_s=1.0)
        if killed_id not in {r.peer_id for r in found}:
            break
        assert time.monotonic() < deadline, "killed peer's record never expired"


def test_a_withdrawn_record_is_gone_at_once(spawn_peers):
    _, addrs = spawn_peers(SCRIPT, "withdraw")
    found, rejected = _look(addrs)
    assert found == [] and rejected == []


@pytest.mark.parametrize(("mode", "reason"), [("other_spec", "another run spec"), ("garbage", "msgpack"),
                                              ("impostor", "stored under")])
def test_bad_records_are_refused_with_the_reason(spawn_peers, mode, reason):
    _, addrs = spawn_peers(SCRIPT, mode)
    found, rejected = _look(addrs)
    assert found == []
    assert len(rejected) == 1 and reason in rejected[0][1]


async def _signed_look(addrs: list[str]):
    """(records, rejected) as a registry that signs its own records sees them."""
    validator = RSASignatureValidator(RSAPrivateKey())
    reader = await DHTNode.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=addrs,
                                  record_validator=validator)
    try:
        reg = PeerRegistry(reader, announce.RUN, announce.SPEC_HASH, validator=validator)
        return await reg.peers(), reg.rejected
    finally:
        await reader.shutdown()


def test_a_signed_record_cannot_be_overwritten_by_another_peer(spawn_peers):
    """The owner's record stands after a forger writes a higher round under its subkey:
    every node with the signature validator refuses the unsigned write."""
    _, addrs = spawn_peers(SCRIPT, "signed")
    victim = addrs[0].split("/p2p/")[1]

    async def forge_then_look():
        # The forger runs the validator too (with its own key): a node without it cannot even
        # parse signed values.
        forger = await DHTNode.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=addrs,
                                      record_validator=RSASignatureValidator(RSAPrivateKey()))
        found = await forger.get(bucket_key(announce.RUN, 0, 0), latest=True)
        (subkey,) = [k for k in found.value if isinstance(k, bytes) and k.startswith(victim.encode())]
        forged = PeerRecord(peer_id=victim, addrs=(addrs[0],), device="cpu", tokens_per_s=1.0, round=99,
                            spec_hash=announce.SPEC_HASH)
        await forger.store(bucket_key(announce.RUN, 0, 0), encode_record(forged), get_dht_time() + 30, subkey=subkey)
        await forger.shutdown()
        return await _signed_look(addrs)

    found, rejected = asyncio.run(forge_then_look())
    assert [(r.peer_id, r.round) for r in found] == [(victim, 4)]
    assert rejected == []


def test_a_signed_record_is_taken_only_when_the_signing_key_is_the_peers_identity(spawn_peers):
    """A record signed with the peer's libp2p identity key is taken; one signed validly but
    with another key (anyone can make one and put any peer id in it) is refused, naming
    the key's real peer id."""
    _, good = spawn_peers(SCRIPT, "signed")
    found, rejected = asyncio.run(_signed_look(good))
    assert [r.peer_id for r in found] == [good[0].split("/p2p/")[1]] and rejected == []
    _, bad = spawn_peers(SCRIPT, "wrong_key")
    found, rejected = asyncio.run(_signed_look(bad))
    assert found == []
    assert len(rejected) == 1 and "signed by a key that is not its identity" in rejected[0][1]


def test_an_unsigned_record_is_refused_by_a_signing_registry(spawn_peers):
    _, addrs = spawn_peers(SCRIPT, "good")
    found, rejected = asyncio.run(_signed_look(addrs))
    assert found == []
    assert len(rejected) == 1 and "not signed" in rejected[0][1]


def test_the_cached_validator_verifies_each_signed_entry_once_and_still_refuses_a_forgery():
    from hivemind.dht.validation import DHTRecord

    from locoswarm.node.signers import CachedSignatureValidator

    owner = CachedSignatureValidator(RSAPrivateKey())
    reader = CachedSignatureValidator(RSAPrivateKey())
    key, subkey = b"locoswarm:run:peers", b"QmOwner" + owner.local_public_key
    unsigned = DHTRecord(key=key, subkey=subkey, value=b"record", expiration_time=123.0)
    signed = DHTRecord(key=key, subkey=subkey, value=owner.sign_value(unsigned), expiration_time=123.0)
    for _ in range(20):  # the same entry in twenty answers of one get
        assert reader.validate(signed)
    assert reader.verified == 1
    forged = DHTRecord(key=key, subkey=subkey, value=signed.value.replace(b"record", b"forged"), expiration_time=123.0)
    assert not reader.validate(forged) and not reader.validate(forged)
    assert reader.verified == 2
    # a changed expiry is new content
    later = DHTRecord(key=key, subkey=subkey, value=signed.value, expiration_time=124.0)
    assert not reader.validate(later), "the signature covers the expiration time"
