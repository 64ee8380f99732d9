"""A py-libp2p peer (locoswarm.net, issue 22) reads a live swarm's peer registry from the keys
docs/protocol.md gives, with no hivemind in its process: net/registry.py on DHTClient.get finds
every daemon's record, and drops the entries that are not their named peer's (a forged owner, an
unsigned subkey). py-libp2p runs only in a subprocess (tests/peers/lp2p_registry.py): it cannot
share this process with hivemind."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

from harness import Swarm, first_addr, libp2p_missing, node_status, peer_id, wait_round
from locoswarm.node.spec import RunSpec
from locoswarm.node.statedir import IDENTITY_FILE, ensure_identity
from locoswarm.protocol.records import PeerRecord, bucket_key, bucket_of, encode_record

READER = os.path.join(os.path.dirname(__file__), "peers", "lp2p_registry.py")
ANNOUNCER = os.path.join(os.path.dirname(__file__), "peers", "lp2p_announce.py")
SEEN_WITHIN_S = 90.0
"""A daemon reads its registry bucket every third of the record TTL (20 s) and its view holds
a record from that read on; the bound leaves room for a loaded 2-core machine."""
FORGED_ROUND = 10**6
"""The forged record's round: were it taken, it would win over the genuine one (higher round)."""


async def _store_bad_entries(maddr: str, key: str, victim: str, spec_hash: bytes) -> None:
    """Two entries no reader may take: a record naming `victim` signed by another key (hivemind's
    validator accepts it: the signature matches the key in the subkey) and an unsigned one."""
    validator = RSASignatureValidator(RSAPrivateKey())
    dht = await DHTNode.create(initial_peers=[maddr], host_maddrs=["/ip4/127.0.0.1/tcp/0"], client_mode=True,
                               record_validator=validator)
    try:
        forged = PeerRecord(peer_id=victim, addrs=("/ip4/127.0.0.1/tcp/1",), device="cpu", tokens_per_s=1.0,
                            round=FORGED_ROUND, spec_hash=spec_hash)
        expiration = get_dht_time() + 50
        owner_subkey = victim.encode() + validator.local_public_key
        assert await dht.store(key, encode_record(forged), expiration, subkey=owner_subkey)
        assert await dht.store(key, encode_record(replace(forged, peer_id="QmUnsigned")), expiration,
                               subkey=b"QmUnsigned")
    finally:
        await dht.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(300, method="signal")
def test_a_py_libp2p_peer_reads_every_daemons_record_drops_entries_not_their_named_peers_and_shows_its_own(
        swarm: Swarm, tmp_path):
    why = libp2p_missing()
    if why:
        pytest.skip(why)
    spec = RunSpec()
    a = swarm.join("a")
    b = swarm.join("b", peer=a)
    for p in (a, b):
        wait_round(p, 2, 180)
    ids = {peer_id(a), peer_id(b)}
    asyncio.run(_store_bad_entries(first_addr(a), bucket_key(spec.run_id, 0, 0), peer_id(a), spec.hash()))
    ensure_identity(str(tmp_path))
    out = subprocess.run([sys.executable, READER, str(tmp_path / IDENTITY_FILE), first_addr(a), spec.run_id,
                          spec.hash().hex()], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-4000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(seen))  # shown when an assertion fails
    assert not seen["hivemind_loaded"]
    assert set(seen["peers"]) == ids, seen["peers"].keys()
    for peer in ids:
        record = seen["peers"][peer]
        assert record["peer_id"] == peer and record["spec_hash"] == spec.hash().hex() and record["device"] == "cpu"
        assert 2 <= record["round"] < FORGED_ROUND and record["incarnation"] > 0
        assert record["addrs"] and record["addrs"][0].startswith("/ip4/127.0.0.1/tcp/")
    for peer, buckets in seen["buckets"].items():  # net/registry.py repeats node/buckets.py's derivation
        assert buckets == [bucket_of(peer, level) for level in range(len(buckets))], peer
    reasons = {who: why for who, why in seen["rejected"]}
    assert "not its identity" in reasons.get(peer_id(a), ""), seen["rejected"]
    assert any("names no owner key" in why for who, why in seen["rejected"] if "QmUnsigned" in who), seen["rejected"]
    # Then it shows itself: its own record (paused), kept by the registry a daemon on py-libp2p
    # uses (net/noderegistry.py). It tells nobody anything: the daemons find it in the registry
    # alone (their view counts it). Its withdrawal leaves a tombstone that readers take as gone
    # (a daemon reads one as any tombstone, tests/test_registry.py; waiting for their next read
    # costs 20 s).
    _shows_itself_and_withdraws(swarm, tmp_path, first_addr(b), spec, ids)


def _num_peers(swarm: Swarm, names) -> list[int]:
    return [node_status(swarm.root / name)["num_peers"] for name in names]


def _until(check, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(1.0)
    return check()


def _shows_itself_and_withdraws(swarm: Swarm, tmp_path, bootstrap: str, spec: RunSpec, ids: set[str]) -> None:
    proc = subprocess.Popen([sys.executable, ANNOUNCER, str(tmp_path / IDENTITY_FILE), bootstrap, spec.run_id,
                             spec.hash().hex()], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        first = json.loads(proc.stdout.readline() or "{}")
        print(json.dumps(first))  # shown when an assertion fails
        assert first.get("announced") is True and set(first["peers"]) == ids, first
        assert _until(lambda: _num_peers(swarm, "ab") == [2, 2], SEEN_WITHIN_S), _num_peers(swarm, "ab")
        out, err = proc.communicate("withdraw\n", timeout=60)
        assert proc.returncode == 0, err[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    final = json.loads(out.strip().splitlines()[-1])
    print(json.dumps(final))
    assert not final["hivemind_loaded"] and final["withdrawn"]
    assert final["listed_after"] == sorted(ids) and final["me"] not in final["listed_after"]
    assert final["me"] in final["withdrawn_seen"], final  # its tombstone, which readers take as gone
