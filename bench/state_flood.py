"""A state flood for `locoswarm bench swarm --flood K`: one identity (its own p2pd) that asks
the swarm's peers for their state over and over, two requests in flight per peer, chunk
after chunk, as fast as they answer. It takes nothing apart and breaks no limit a peer
applies to one identity; K of them are the attack that took 5.4 GB off one peer in 30 s
before peers budgeted what they serve in bytes (node/streams.py ByteBudget).

usage: python -m locoswarm.bench.state_flood MADDR...   (runs until stdin closes;
prints "flood <peer id> announced" once connected, "flood received <bytes>" when it leaves)
"""

from __future__ import annotations

import asyncio
import sys

IN_FLIGHT = 2
"""Requests kept in flight per peer: what a peer admits of one identity."""


async def main(maddrs: list[str]) -> None:
    import msgpack
    from hivemind.p2p import P2P, PeerID

    from locoswarm.node.statedownload import _request
    from locoswarm.node.statesync import CHUNK, LATEST, MANIFEST

    p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=maddrs)
    received = 0
    stop = asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    async def drain(peer: PeerID) -> None:
        nonlocal received
        while not stop.done():
            try:
                blob = await _request(p2p, peer, MANIFEST, LATEST, 0, 1 << 20, 10.0)
                manifest = msgpack.unpackb(blob)  # trusted enough for a flood: nothing is kept
                received += len(blob)
                for index in range(len(manifest["chunks"])):
                    received += len(await _request(p2p, peer, CHUNK, manifest["round"], index, 1 << 26, 10.0))
                    if stop.done():
                        return
            except Exception:  # noqa: BLE001 - refused, cut or busy: ask again, as a flood does
                await asyncio.sleep(0.01)

    peers = [PeerID.from_base58(m.split("/p2p/")[1]) for m in maddrs]
    print(f"flood {p2p.peer_id.to_base58()} announced", flush=True)
    tasks = [asyncio.ensure_future(drain(peer)) for peer in peers for _ in range(IN_FLIGHT)]
    await stop
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(f"flood received {received}", flush=True)
    await p2p.shutdown()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
