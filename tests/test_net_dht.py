"""locoswarm.net (py-libp2p, no hivemind) against three live hivemind DHT nodes on loopback:
a py-libp2p peer in another process bootstraps through one node, reads a plain value and a
signed dictionary entry hivemind stored, stores an entry signed with its own identity that
hivemind reads back and locoswarm attributes to that peer, and a tampered entry every node
refuses; then hivemind calls unary handlers it serves. Also the unary calls' failure paths
between two py-libp2p hosts, and the lookup's beam search on a fake network. py-libp2p cannot
share hivemind's process, so it runs in subprocesses; those tests skip, naming why, where
py-libp2p is not installed for this interpreter."""

from __future__ import annotations

import asyncio
import json
import random
import os
import subprocess
import sys
import time

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, P2PHandlerError, PeerID
from hivemind.proto import dht_pb2
from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

from harness import libp2p_missing
from locoswarm.protocol.dhtrecords import subkey_author
from locoswarm.node.statedir import IDENTITY_FILE, ensure_identity

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers", "lp2p_dht.py")
PLAIN_KEY, SIGNED_KEY, OWN_KEY = "net-test:plain", "net-test:signed", "net-test:from-lp2p"
PEER_TIMEOUT_S = 150


async def _swarm_and_peer(identity_path: str) -> tuple[dict, dict]:
    """Three hivemind nodes, the py-libp2p peer run against them, and what hivemind reads after."""
    validator = RSASignatureValidator(RSAPrivateKey())
    p2ps, nodes = [], []
    proc = None
    try:
        for _ in range(3):  # as the daemon does: one P2P, then a DHTNode on it (node/host.py)
            initial = [str(m) for m in await p2ps[0].get_visible_maddrs()] if p2ps else []
            p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=initial)
            p2ps.append(p2p)
            nodes.append(await DHTNode.create(p2p=p2p, initial_peers=initial, record_validator=validator))
        expiration = get_dht_time() + 300
        assert await nodes[1].store(PLAIN_KEY, "plain-from-hivemind", expiration)
        hm_subkey = p2ps[1].peer_id.to_base58().encode() + validator.local_public_key
        assert await nodes[1].store(SIGNED_KEY, {"round": 7}, expiration, subkey=hm_subkey)

        bootstrap = next(str(m) for m in await p2ps[2].get_visible_maddrs() if "/tcp/" in str(m))
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, PEER, identity_path, bootstrap, PLAIN_KEY, SIGNED_KEY, OWN_KEY,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
        ready = await asyncio.wait_for(proc.stdout.readline(), PEER_TIMEOUT_S)
        served = await _call_the_peer(p2ps[0], json.loads(ready or b"{}").get("ready"), identity_path) if ready else {}
        proc.stdin.write(b"done\n")
        stdout, stderr = await asyncio.wait_for(proc.communicate(), PEER_TIMEOUT_S)
        assert proc.returncode == 0 and ready, stderr.decode()[-4000:]
        seen = json.loads(stdout.decode().strip().splitlines()[-1])
        found = await nodes[0].get(OWN_KEY, latest=True)
        own = {} if found is None else {subkey: item.value for subkey, item in found.value.items()}
        return seen, {"own": own, "hm_subkey": hm_subkey, "served": served, "caller": p2ps[0].peer_id.to_base58()}
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        for node in nodes:
            await node.shutdown()
        for p2p in p2ps:
            await p2p.shutdown()


async def _call_the_peer(p2p: P2P, maddrs: list[str], identity_path: str) -> dict:
    """hivemind (p2pd) calling the py-libp2p peer's served unary calls."""
    peer = PeerID.from_identity(open(identity_path, "rb").read())
    await p2p._client.connect(peer, [Multiaddr(m) for m in maddrs])
    answer = await asyncio.wait_for(p2p.call_protobuf_handler(
        peer, "LocoswarmTest.rpc_ping", dht_pb2.PingRequest(validate=True), dht_pb2.PingResponse), 30)
    try:
        await asyncio.wait_for(p2p.call_protobuf_handler(
            peer, "LocoswarmTest.rpc_fail", dht_pb2.PingRequest(), dht_pb2.PingResponse), 30)
        refused = ""
    except P2PHandlerError as e:
        refused = str(e)
    return {"node_id": answer.peer.node_id, "available": answer.available, "skew_s": abs(answer.dht_time - time.time()),
            "refused": refused}


@pytest.mark.timeout(300)
def test_a_py_libp2p_peer_reads_stores_and_is_refused_a_forgery_by_live_hivemind_nodes(tmp_path):
    why = libp2p_missing()
    if why:
        pytest.skip(why)
    peer_id = ensure_identity(str(tmp_path))
    seen, hivemind_read = asyncio.run(_swarm_and_peer(str(tmp_path / IDENTITY_FILE)))

    print(json.dumps(seen))  # shown when an assertion fails
    assert seen["peer_id"] == peer_id
    assert not seen["hivemind_loaded"]
    assert seen["nodes_known"] >= 2, seen  # met beyond its one bootstrap node
    assert seen["plain"] == "plain-from-hivemind"
    assert seen["signed"] == {hivemind_read["hm_subkey"].decode(): {"round": 7}}
    # all three nodes took it: the lookup reached the two it was never given an address of
    assert sorted(seen["store_own"].values()) == [True] * 3, seen
    assert sorted(seen["store_tampered"].values()) == [False] * 3, seen

    own = hivemind_read["own"]
    assert len(own) == 1, own
    (subkey, value), = own.items()
    named, has_owner, signer = subkey_author(subkey)
    assert (named, has_owner, signer) == (peer_id, True, peer_id)
    assert value == {"from": "py-libp2p"}

    # and the other way: hivemind's p2pd calls unary handlers the py-libp2p peer serves
    served = hivemind_read["served"]
    assert served["node_id"] == bytes(range(20)) and served["available"] and served["skew_s"] < 30, served
    assert "refused on purpose" in served["refused"], served
    assert seen["served_to"] == [hivemind_read["caller"]]


def _run_peer_script(name: str, *args: str, timeout_s: float = 120) -> dict:
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(PEER), name), *args], capture_output=True,
                         text=True, timeout=timeout_s)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(200)
def test_each_failed_unary_call_is_its_named_error_naming_the_peer_and_the_caller_carries_on():
    why = libp2p_missing()
    if why:
        pytest.skip(why)
    seen = _run_peer_script("lp2p_rpc.py")
    print(json.dumps(seen))  # shown when an assertion fails
    assert not seen["hivemind_loaded"]
    assert seen["echo"][:2] == ["ok", "cba"]
    expected = {"raise": "RemoteError", "garbage": "BadAnswer", "oversized": "BadAnswer", "missing": "RpcError",
                "silent": "RpcTimeout"}
    for case, error in expected.items():
        assert seen[case][0] == error and seen["server"] in seen[case][1], (case, seen[case])
    assert "ValueError('this handler refuses')" in seen["raise"][1]
    assert "OversizedMessage" in seen["oversized"][1]
    assert seen["silent"][2] < 10  # bounded by its timeout (1 s), with room for a loaded machine
    # a "DHT node" answering nonsense to a ping: no node joined, the failure kept with its peer
    assert seen["dht_nonsense"][0] == "DHTUnreachable" and seen["server"] in seen["dht_nonsense"][1]
    assert len(seen["dht_failures"]) == 1 and "BadAnswer" in seen["dht_failures"][0][1]
    assert seen["echo_after_faults"][:2] == ["ok", "zyx"]


@pytest.mark.timeout(200)
def test_get_merges_nodes_copies_newest_expiration_per_subkey_dropping_forged_expired_and_bad_answers():
    why = libp2p_missing()
    if why:
        pytest.skip(why)
    seen = _run_peer_script("lp2p_merge.py")
    print(json.dumps(seen))  # shown when an assertion fails
    a, b, c, d = seen["hosts"]
    signed = seen["signed_subkey"]
    # per subkey the newest live copy; the forged one (newest of all) and the expired one are gone
    assert seen["dict"] == {"s1": ["new", 200.0], "s2": [2, 150.0], signed: ["signed-new", 200.0]}
    assert seen["dict_expiration"] == 200.0
    assert seen["plain"] == ["b", 200.0]  # the newest regular copy; an expired newer one is ignored
    assert seen["missing"] is None
    failures = {peer: what for peer, what in seen["failures"]}
    assert set(failures) == {c, d}, failures
    assert "fails its signature check" in failures[c] and "2 results for 1 keys" in failures[d]
    assert seen["nodes_known"] == 3  # the node that answered nonsense is no longer asked


# ---------------------------------------------------------------- the lookup, on a fake network

def _fake_network(seed: int, num_nodes: int = 300, num_known: int = 30):
    rng = random.Random(seed)
    ids = [rng.randbytes(20) for _ in range(num_nodes)]
    known = {n: rng.sample(ids, num_known) for n in ids}
    return rng, ids, known


def _traverse(key_id, start, ask, **kw):
    import trio

    from locoswarm.net.lookup import traverse  # trio only: no py-libp2p in this process
    return trio.run(lambda: traverse(key_id, start, ask, **kw))


def test_the_lookup_finds_the_keys_nearest_nodes_by_xor_distance_from_one_starting_node():
    from locoswarm.net.lookup import distance
    rng, ids, known = _fake_network(1)
    key_id = rng.randbytes(20)

    async def ask(node_id, peer, named_by):  # a node answers with the 20 it knows nearest the key
        nearest = sorted(known[node_id], key=lambda n: distance(n, key_id))[:20]
        return "answer", {n: f"peer-{n.hex()[:6]}" for n in nearest}

    found = _traverse(key_id, {ids[0]: "start"}, ask, beam_size=20, num_workers=4, max_rounds=30)
    truly_nearest = sorted(ids, key=lambda n: distance(n, key_id))[:5]
    assert [n for n, _ in found.nearest(5)] == truly_nearest
    assert all(found.referrer[n] is not None for n, _ in found.nearest(5) if n != ids[0])


def test_the_lookup_keeps_each_failing_node_with_its_error_and_stays_within_its_rounds():
    from locoswarm.net.lookup import distance
    rng, ids, known = _fake_network(2)
    key_id = rng.randbytes(20)
    broken = set(ids[1::2])
    asked = []

    async def ask(node_id, peer, named_by):
        asked.append(node_id)
        if node_id in broken:
            raise TimeoutError(f"{peer} is silent")
        return "answer", {n: n.hex() for n in sorted(known[node_id], key=lambda n: distance(n, key_id))[:20]}

    found = _traverse(key_id, {ids[0]: ids[0].hex()}, ask, beam_size=8, num_workers=3, max_rounds=5)
    assert len(asked) <= 5 * 3 and len(set(asked)) == len(asked)
    assert found.answered and not {n for n, _, _ in found.answered} & broken
    assert found.failures and all(what == f"TimeoutError: {peer} is silent" for peer, what in found.failures)


NODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers", "lp2p_dhtnode.py")


async def _hivemind_through_a_py_libp2p_node(identity_path: str) -> dict:
    """Two hivemind nodes join a DHT whose first node is py-libp2p (tests/peers/lp2p_dhtnode.py),
    store and read through it, and call it with what it must refuse."""
    from hivemind.dht.routing import DHTID

    # Limits of one call in 2 s, 40 in a burst: the joins and this test's calls fit in the burst,
    # the 60 pings after them do not.
    proc = await asyncio.create_subprocess_exec(sys.executable, NODE, identity_path, "0.5", "40",
                                                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    p2ps, out = [], {}
    try:
        ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), PEER_TIMEOUT_S) or b"{}")
        assert "ready" in ready, (await proc.stderr.read()).decode()[-3000:]
        validator = RSASignatureValidator(RSAPrivateKey())
        nodes = []
        for _ in range(2):
            p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=[ready["ready"]])
            p2ps.append(p2p)
            # ensure_bootstrap_success: hivemind pings the py-libp2p node with `validate`, which
            # it must answer "available" after dialing back, or this node refuses to start
            nodes.append(await DHTNode.create(p2p=p2p, initial_peers=[ready["ready"]], record_validator=validator,
                                              ensure_bootstrap_success=True))
        node_peer = PeerID.from_base58(ready["ready"].split("/p2p/")[1])
        out["in_table"] = [n.protocol.routing_table.get(peer_id=node_peer) is not None for n in nodes]
        expiration = get_dht_time() + 300
        subkey = p2ps[0].peer_id.to_base58().encode() + validator.local_public_key
        out["stored"] = await nodes[0].store(OWN_KEY, {"round": 3}, expiration, subkey=subkey)
        found = await nodes[1].get(OWN_KEY, latest=True)
        out["read"] = None if found is None else {k.decode(errors="replace")[:46]: v.value for k, v in
                                                  found.value.items()}
        # straight at the py-libp2p node: its own copy, a forgery, and a find of too many keys
        (own,) = (await nodes[1].protocol.call_find(node_peer, [DHTID.generate(source=OWN_KEY)])).values()
        out["node_holds"] = own is not None and own[0] is not None
        forged = validator.sign_value(DHTRecord(key=DHTID.generate(source=OWN_KEY).to_bytes(),
                                                subkey=dumps_subkey(subkey), value=b"\x01",
                                                expiration_time=expiration))
        forged = forged.replace(b"\x01[signature:", b"\x02[signature:", 1)
        out["forged_ok"] = await nodes[0].protocol.call_store(node_peer, [DHTID.generate(source=OWN_KEY)], [forged],
                                                              expiration, subkeys=[subkey])
        out["many_keys"] = await nodes[0].protocol.call_find(node_peer, [DHTID.generate() for _ in range(200)])
        pings = [await nodes[1].protocol.call_ping(node_peer) for _ in range(60)]  # one caller, one at a time
        out["pings_answered"] = sum(p is not None for p in pings)
        proc.stdin.write(b"done\n")
        await proc.stdin.drain()
        out["node"] = json.loads((await asyncio.wait_for(proc.stdout.readline(), 60)) or b"{}")
        out["exit"] = await asyncio.wait_for(proc.wait(), 30)
        return out
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for p2p in p2ps:
            await p2p.shutdown()


def dumps_subkey(subkey: bytes) -> bytes:
    from hivemind.utils.serializer import MSGPackSerializer

    return MSGPackSerializer.dumps(subkey)


@pytest.mark.timeout(180, method="signal")
def test_hivemind_nodes_join_store_and_read_through_a_py_libp2p_dht_node_which_refuses_forgeries(tmp_path):
    """net/dhtserver.py as hivemind's nodes meet it: they join through it (with the dial-back check
    hivemind makes of an initial peer), put it in their routing tables, store a signed entry one
    reads back through the DHT, and its own copy is there; a forged entry, a find of 200 keys and
    one caller's calls beyond the per-caller limits are refused."""
    why = libp2p_missing()
    if why:
        pytest.skip(why)
    ensure_identity(str(tmp_path))
    got = asyncio.run(_hivemind_through_a_py_libp2p_node(str(tmp_path / IDENTITY_FILE)))
    print(json.dumps(got, default=str))  # shown when an assertion fails
    assert got["in_table"] == [True, True]
    assert got["stored"] and got["read"] and list(got["read"].values()) == [{"round": 3}]
    assert got["node_holds"], "the py-libp2p node keeps the entry it is nearest to"
    assert got["forged_ok"] == [False] and got["many_keys"] is None
    assert got["node"]["keys"] >= 1 and got["node"]["refused"] >= 1 and got["node"]["nodes"] == 2
    assert got["node"]["hivemind_loaded"] is False and got["exit"] == 0
    # one caller's calls beyond its limits (here 40 at once, then one in 2 s) are refused, not served
    assert got["pings_answered"] < 60 and got["node"]["calls_refused"] >= 60 - got["pings_answered"], got
