"""A py-libp2p DHT node (net/dht.py in server mode, net/dhtserver.py answering), for
tests/test_net_dht.py: the first node of a DHT, which hivemind nodes join through. It prints
{"ready": maddr, "node_id": hex}, waits for a line on stdin, then prints {"keys", "refused",
"nodes", "calls", "hivemind_loaded"}: what its storage holds and refused, the DHT nodes its table
knows, the calls it answered. No hivemind here.

usage: python lp2p_dhtnode.py IDENTITY_FILE [RATE BURST]   (the per-caller limits: net/dhtserver.py LIMITS
by default)
"""

from __future__ import annotations

import json
import sys

import trio

from locoswarm.net.dht import DHTClient
from locoswarm.net.dhtserver import LIMITS, DHTServer
from locoswarm.net.host import key_pair_of, run_host
from locoswarm.protocol.admission import PeerLimits

LIFETIME_S = 120.0


async def main(identity_path: str, rate: str = "", burst: str = "") -> dict:
    key_pair, identity = key_pair_of(open(identity_path, "rb").read())
    with trio.fail_after(LIFETIME_S):
        async with run_host(key_pair) as host:
            client = DHTClient(host, identity, server=True)
            limits = dict(LIMITS, **({"rate": float(rate), "burst": int(burst)} if rate else {}))
            server = DHTServer(client, PeerLimits(**limits))
            server.serve()
            assert await client.bootstrap([]) == 0  # the first node: nobody to join through
            maddr = str(host.get_addrs()[0])
            print(json.dumps({"ready": maddr if "/p2p/" in maddr else f"{maddr}/p2p/{host.get_id()}",
                              "node_id": client.node_id.hex()}), flush=True)
            await trio.to_thread.run_sync(sys.stdin.readline)
    return {"keys": len(client.storage), "refused": client.storage.refused, "nodes": len(client.nodes),
            "calls": server.calls, "calls_refused": server.limits.refused,
            "hivemind_loaded": any(m == "hivemind" or m.startswith("hivemind.") for m in sys.modules)}


if __name__ == "__main__":
    print(json.dumps(trio.run(main, *sys.argv[1:4])), flush=True)
