"""A swarm peer on py-libp2p, for tests/test_net_dht.py: it joins hivemind DHT nodes through
locoswarm.net in client mode, never importing hivemind (it could not: py-libp2p and hivemind
cannot share a process). It reads a plain value and a signed dictionary that hivemind stored,
stores an entry signed with its own identity (its peer id and owner marker in the subkey, as
locoswarm's records are) and a tampered copy that the nodes must refuse, then serves two unary
calls for hivemind to make (ECHO_PROTO answers a PingRequest with a PingResponse,
FAILING_PROTO raises), printing a JSON line {"ready": maddrs} and waiting for a line on stdin;
last it prints one JSON object of what it saw.

usage: python lp2p_dht.py IDENTITY_FILE BOOTSTRAP_MADDR PLAIN_KEY SIGNED_KEY OWN_KEY
"""

from __future__ import annotations

import json
import sys
import time

import trio

from locoswarm.net.dht import DHTClient, DHTClientConfig
from locoswarm.net.host import key_pair_of, run_host
from locoswarm.net.rpc import serve_unary
from locoswarm.protocol.dhtrecords import dht_id, dumps, sign_record
from locoswarm.protocol.pbmessages import NodeInfo, PingRequest, PingResponse
from locoswarm.protocol.pbwire import decode, encode

LIFETIME_S = 90.0
"""The whole run, bounded: the test waits a little longer than this."""
ECHO_PROTO, FAILING_PROTO = "LocoswarmTest.rpc_ping", "LocoswarmTest.rpc_fail"
ECHO_NODE_ID = bytes(range(20))


def shown(value):
    """A value as JSON can carry it (bytes as text)."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, dict):
        return {shown(k): shown(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [shown(v) for v in value]
    return value


async def main(identity_path: str, bootstrap: str, plain_key: str, signed_key: str, own_key: str) -> dict:
    key_pair, identity = key_pair_of(open(identity_path, "rb").read())
    out: dict = {"peer_id": identity.peer_id}
    with trio.fail_after(LIFETIME_S):
        async with run_host(key_pair) as host:
            dht = DHTClient(host, identity, DHTClientConfig(timeout_s=5.0))
            out["nodes_known"] = await dht.bootstrap([bootstrap])

            plain = await dht.get(plain_key)
            out["plain"] = None if plain is None else shown(plain.value)
            signed = await dht.get(signed_key)
            out["signed"] = None if signed is None else {shown(s): shown(v.value) for s, v in signed.value.items()}

            expiration = time.time() + 300
            subkey = identity.peer_id.encode() + identity.owner_marker
            out["store_own"] = await dht.store(own_key, {"from": "py-libp2p"}, expiration, subkey=subkey)

            # a signature taken from one value and put on another: every node must refuse it
            key_id, tag = dht_id(own_key), dumps(subkey)
            genuine = sign_record(key_id, tag, dumps({"from": "genuine"}), expiration, identity.private_key)
            forged = dumps({"from": "forger"}) + genuine[genuine.index(b"[signature:"):]
            out["store_tampered"] = await dht.store_bytes(key_id, tag, forged, expiration)

            mine = await dht.get(own_key)
            out["own_read_back"] = None if mine is None else {shown(s): shown(v.value) for s, v in mine.value.items()}
            out["failures"] = list(dht.failures)
            out["nodes_after"] = len(dht.nodes)
            await serve_for_hivemind(host, out)
    out["hivemind_loaded"] = any(m == "hivemind" or m.startswith("hivemind.") for m in sys.modules)
    return out


async def serve_for_hivemind(host, out: dict) -> None:
    """Serves ECHO_PROTO and FAILING_PROTO until a line arrives on stdin."""
    callers = out["served_to"] = []

    async def echo(caller, request: bytes) -> bytes:
        ping = decode(PingRequest, request)
        callers.append(str(caller))
        return encode(PingResponse(peer=NodeInfo(node_id=ECHO_NODE_ID), dht_time=time.time(), available=ping.validate))

    async def fail(caller, request: bytes) -> bytes:
        raise RuntimeError("refused on purpose")

    serve_unary(host, ECHO_PROTO, echo)
    serve_unary(host, FAILING_PROTO, fail)
    print(json.dumps({"ready": [str(m).split("/p2p/")[0] for m in host.get_addrs()]}), flush=True)
    await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)


if __name__ == "__main__":
    result = trio.run(main, *sys.argv[1:6])
    print(json.dumps(result), flush=True)
