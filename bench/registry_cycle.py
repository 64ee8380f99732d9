"""What one registry refresh costs on real DHT nodes: N hivemind DHTNodes in this process
on loopback, each with its own p2pd and signature validator, refresh a peer record every
second for a warm-up, then for a measured stretch as long; prints the bytes the p2pd sent
per peer per refresh (from `ss`, as bench/scale_validate.py measures the progress loop), for
the registry before buckets (`single`: DHTNode.store on one key, then get(latest=True)) and
the bucketed one (`buckets`: PeerRegistry.announce, then peers(), as the daemon runs them).

usage: python -m locoswarm.bench.registry_cycle 3,6,10   (a few minutes on 2 cores)
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time

SPEC = b"m" * 32
KEY_BEFORE_BUCKETS = "locoswarm:m:peers"


async def measure(num_nodes: int, design: str, seconds: float = 8.0) -> float:
    """Bytes the p2pd sent per peer per refresh, `design` one of single, buckets."""
    import psutil
    from hivemind.dht.node import DHTNode
    from hivemind.p2p import P2P
    from hivemind.utils import get_dht_time

    from locoswarm.bench.tcpio import TcpMeter
    from locoswarm.node.host import DHT_OPTIONS
    from locoswarm.node.statedir import IDENTITY_FILE, identity_key, open_state_dir
    from locoswarm.node.registry import PeerRegistry
    from locoswarm.node.signers import CachedSignatureValidator
    from locoswarm.protocol.records import PeerRecord, encode_record

    peers, p2ps, first = [], [], None
    states = tempfile.mkdtemp(prefix="locoswarm-registry-cycle-")
    for i in range(num_nodes):
        state = os.path.join(states, str(i))
        os.close(open_state_dir(state))  # an identity key, signing records as a daemon's does
        validator = CachedSignatureValidator(identity_key(state))
        p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=first or [],
                               identity_path=os.path.join(state, IDENTITY_FILE))
        node = await DHTNode.create(p2p=p2p, initial_peers=first, record_validator=validator, **DHT_OPTIONS)
        first = first or [str(a) for a in await p2p.get_visible_maddrs()]
        me = node.peer_id.to_base58()
        record = PeerRecord(peer_id=me, addrs=(f"/ip4/127.0.0.1/tcp/4000/p2p/{me}",
                                               f"/ip4/127.0.0.1/udp/4000/quic-v1/p2p/{me}"),
                            device="cpu", tokens_per_s=1000.0, round=3, spec_hash=SPEC, chain="a" * 32,
                            prev_chain="b" * 32)
        registry = PeerRegistry(node, "m", SPEC, ttl_s=10.0, validator=validator, read_period_s=1.0, peer_id=me)
        peers.append((node, validator, record, registry))
        p2ps.append(p2p)
    p2pds = {c.pid for c in psutil.Process().children() if c.name() == "p2pd"}
    refreshes = [0]

    async def loop(node, validator, record, registry, until: float) -> None:
        subkey = record.peer_id.encode() + validator.local_public_key
        while time.monotonic() < until:
            if design == "single":
                await node.store(KEY_BEFORE_BUCKETS, encode_record(record), get_dht_time() + 10, subkey=subkey)
                await node.get(KEY_BEFORE_BUCKETS, latest=True)
            else:
                await registry.announce(record)
                await registry.peers()
            refreshes[0] += 1
            await asyncio.sleep(1.0)

    try:
        await asyncio.gather(*(loop(*p, time.monotonic() + seconds) for p in peers))  # warm-up: levels, replicas
        refreshes[0] = 0
        meter = TcpMeter()
        meter.read(p2pds)
        await asyncio.gather(*(loop(*p, time.monotonic() + seconds) for p in peers))
        sent = meter.read(p2pds)[0]
    finally:
        for node, *_ in peers:
            await node.shutdown()
        for p2p in p2ps:
            await p2p.shutdown()
        shutil.rmtree(states, ignore_errors=True)
    views = [len(p[3].view.records()) for p in peers]
    assert design == "single" or min(views) == num_nodes, f"a peer's view held {min(views)} of {num_nodes} records"
    return sent / max(1, refreshes[0])


def main(sizes: str) -> None:
    for num_nodes in (int(n) for n in sizes.split(",")):
        for design in ("single", "buckets"):
            print(f"{num_nodes} peers, {design}: {asyncio.run(measure(num_nodes, design)):,.0f} bytes sent per peer "
                  f"per refresh", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "3,6,10")
