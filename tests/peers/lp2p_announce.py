"""A py-libp2p peer that shows itself in a live swarm's registry, for tests/test_net_registry.py;
no hivemind here. It joins the DHT through one daemon and keeps its record (paused: nobody
waits for it) with the registry a daemon on py-libp2p uses (net/noderegistry.py over
net/bridge.py's TrioP2P); it serves no stream and tells nobody anything, so the daemons can only
find it in the registry. It prints {"announced", "peers", "rejected"} once its record is in,
then waits for a line on stdin, withdraws the record (a tombstone), reads the registry again and
prints {"withdrawn", "listed_after": the peers that read lists, "withdrawn_seen": the tombstones
it found, "me", "hivemind_loaded"}.

usage: python lp2p_announce.py IDENTITY_FILE BOOTSTRAP_MADDR RUN_ID SPEC_HASH_HEX
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys

from locoswarm.net.bridge import TrioP2P
from locoswarm.net.dht import DHTClient, DHTClientConfig
from locoswarm.net.host import key_pair_of
from locoswarm.net.noderegistry import BridgedRegistry
from locoswarm.protocol.records import PeerRecord

LIFETIME_S = 200.0
"""The whole run, bounded: the test waits a little longer than this."""
TTL_S = 60.0
"""The daemons' record TTL (NodeConfig.record_ttl_s)."""


async def main(identity_path: str, bootstrap: str, run_id: str, spec_hex: str) -> dict:
    key_pair, identity = key_pair_of(open(identity_path, "rb").read())
    spec_hash = bytes.fromhex(spec_hex)
    p2p = TrioP2P(key_pair)
    await p2p.start()
    try:
        dht = DHTClient(p2p.host, identity, DHTClientConfig(timeout_s=5.0))
        await p2p.run(dht.bootstrap, [bootstrap])
        registry = BridgedRegistry(p2p, dht, run_id, spec_hash, ttl_s=TTL_S)
        record = PeerRecord(peer_id=identity.peer_id, addrs=tuple(await p2p.get_visible_maddrs()), device="cpu",
                            tokens_per_s=0.0, round=0, spec_hash=spec_hash, paused=True,
                            incarnation=secrets.randbelow(2**62) + 1, seq=1)
        peers = await registry.peers()  # the swarm's size first: where to write (write_levels)
        announced = await registry.announce(record)
        print(json.dumps({"announced": announced, "peers": sorted(r.peer_id for r in peers),
                          "rejected": registry.rejected}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        withdrawn = await registry.withdraw(identity.peer_id)
        after = await registry.peers()
    finally:
        await p2p.shutdown()
    return {"withdrawn": withdrawn, "listed_after": sorted(r.peer_id for r in after),
            "withdrawn_seen": sorted(registry.withdrawn), "me": identity.peer_id,
            "hivemind_loaded": any(m == "hivemind" or m.startswith("hivemind.") for m in sys.modules)}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(asyncio.wait_for(main(*sys.argv[1:5]), LIFETIME_S))), flush=True)
