"""How locoswarm.net's DHT client merges what several nodes hold, for tests/test_net_dht.py:
three fake DHT nodes (py-libp2p hosts serving rpc_ping and rpc_find) hold different copies of
a dictionary and of a regular value, one with a forged signature, one with an expired entry,
and a fourth answers with a result count that does not match its request. No hivemind here.
Prints one JSON object: what `get` returned and the failures it kept.

usage: python lp2p_merge.py
"""

from __future__ import annotations

import json
import os
import sys
import time

import trio

from locoswarm.net.dht import DHTClient
from locoswarm.net.host import key_pair_of, run_host
from locoswarm.net.rpc import serve_unary
from locoswarm.protocol.dhtrecords import DictionaryEntry, DictionaryValue, dht_id, dumps, sign_record
from locoswarm.protocol.pbmessages import (RPC_FIND, RPC_PING, FindRequest, FindResponse, FindResult, NodeInfo,
                                           PingResponse, ResultType)
from locoswarm.protocol.pbwire import decode, encode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lp2p_rpc import identity_file  # noqa: E402

DICT_KEY, PLAIN_KEY = "merge:dict", "merge:plain"


def fake_node(node_id: bytes, holdings: dict[bytes, FindResult], extra_result: bool = False):
    async def rpc_ping(caller, request: bytes) -> bytes:
        return encode(PingResponse(peer=NodeInfo(node_id=node_id), dht_time=time.time()))

    async def rpc_find(caller, request: bytes) -> bytes:
        keys = decode(FindRequest, request).keys
        results = [holdings.get(k, FindResult(type=ResultType.NOT_FOUND)) for k in keys]
        return encode(FindResponse(results=tuple(results + [FindResult()] * extra_result),
                                   peer=NodeInfo(node_id=node_id)))
    return rpc_ping, rpc_find


def dictionary(*entries: DictionaryEntry) -> FindResult:
    value = DictionaryValue(entries=entries, latest_expiration=max(e.expiration for e in entries))
    return FindResult(type=ResultType.FOUND_DICTIONARY, value=dumps(value), expiration_time=value.latest_expiration)


async def main() -> dict:
    now = time.time()
    owner = key_pair_of(identity_file())[1]
    signed_subkey = owner.peer_id.encode() + owner.owner_marker
    dict_id, plain_id = dht_id(DICT_KEY), dht_id(PLAIN_KEY)

    def signed(value, expiration: float) -> bytes:
        return sign_record(dict_id, dumps(signed_subkey), dumps(value), expiration, owner.private_key)

    forged = dumps("forged") + signed("genuine", now + 300)[len(dumps("genuine")):]
    holdings = [
        {dict_id: dictionary(DictionaryEntry(b"s1", dumps("old"), now + 100),
                             DictionaryEntry(signed_subkey, signed("signed-old", now + 100), now + 100)),
         plain_id: FindResult(type=ResultType.FOUND_REGULAR, value=dumps("a"), expiration_time=now + 100)},
        {dict_id: dictionary(DictionaryEntry(b"s1", dumps("new"), now + 200),
                             DictionaryEntry(b"s2", dumps(2), now + 150),
                             DictionaryEntry(signed_subkey, signed("signed-new", now + 200), now + 200)),
         plain_id: FindResult(type=ResultType.FOUND_REGULAR, value=dumps("b"), expiration_time=now + 200)},
        {dict_id: dictionary(DictionaryEntry(signed_subkey, forged, now + 300),
                             DictionaryEntry(b"s3", dumps("expired"), now - 10)),
         plain_id: FindResult(type=ResultType.FOUND_REGULAR, value=dumps("stale"), expiration_time=now - 5)},
        {},
    ]
    out: dict = {}
    with trio.fail_after(60):
        async with run_host(key_pair_of(identity_file())[0]) as a, run_host(key_pair_of(identity_file())[0]) as b, \
                run_host(key_pair_of(identity_file())[0]) as c, run_host(key_pair_of(identity_file())[0]) as d, \
                run_host(key_pair_of(identity_file())[0]) as client:
            maddrs = []
            for i, host in enumerate((a, b, c, d)):
                ping, find = fake_node(bytes([i + 1]) * 20, holdings[i], extra_result=(host is d))
                serve_unary(host, RPC_PING, ping)
                serve_unary(host, RPC_FIND, find)
                maddrs.append(f"{str(host.get_addrs()[0]).split('/p2p/')[0]}/p2p/{host.get_id()}")
            out["hosts"] = [str(h.get_id()) for h in (a, b, c, d)]
            dht = DHTClient(client, owner)
            out["nodes_known"] = await dht.bootstrap(maddrs)
            found = await dht.get(DICT_KEY)
            out["dict"] = {k.decode(errors="replace"): [v.value, round(v.expiration - now, 3)]
                           for k, v in found.value.items()}
            out["dict_expiration"] = round(found.expiration - now, 3)
            plain = await dht.get(PLAIN_KEY)
            out["plain"] = [plain.value, round(plain.expiration - now, 3)]
            out["missing"] = await dht.get("merge:nothing")
            out["failures"] = list(dht.failures)
            out["signed_subkey"] = signed_subkey.decode()
    return out


if __name__ == "__main__":
    print(json.dumps(trio.run(main)), flush=True)
