"""A fake identity for `locoswarm bench swarm --fakes K`: the cheapest attack on a round's
membership. It joins the swarm's DHT and keeps a validly signed peer record of its own in the
run's registry, copying the swarm's newest round so that it looks like a peer of every round,
but it trains nothing and serves nothing (its p2pd answers no delta request). What it
measures: whether a record alone can hold the honest peers' rounds (node/membership.py: it
must not).

usage: python -m locoswarm.bench.fake_peer MADDR SPEC_PATH   (runs until stdin closes or it is killed;
prints "fake <peer id> announced" once its record is first stored)
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import sys
import tempfile

REFRESH_S = 1.0


async def main(maddr: str, spec_path: str) -> None:
    from hivemind.dht.node import DHTNode

    from locoswarm.node.host import IDENTITY_FILE, identity_key, open_state_dir
    from locoswarm.node.registry import CachedSignatureValidator, PeerRegistry
    from locoswarm.node.spec import load_spec
    from locoswarm.protocol.records import PeerRecord

    spec = load_spec(spec_path)
    state = tempfile.mkdtemp(prefix="locoswarm-fake-")
    try:
        os.close(open_state_dir(state))
        validator = CachedSignatureValidator(identity_key(state))
        dht = await DHTNode.create(initial_peers=[maddr], host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                   record_validator=validator, identity_path=os.path.join(state, IDENTITY_FILE))
        me = dht.protocol.p2p.peer_id.to_base58()
        addrs = tuple(str(a) for a in await dht.protocol.p2p.get_visible_maddrs())[:4]
        registry = PeerRegistry(dht, spec.run_id, spec.hash(), ttl_s=10.0, validator=validator)
        incarnation = secrets.randbelow(2**62) + 1
        stdin_closed = asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        shown = False
        while not stdin_closed.done():
            newest = max((r.round for r in await registry.peers() if r.peer_id != me), default=0)
            stored = await registry.announce(PeerRecord(peer_id=me, addrs=addrs, device="cuda", tokens_per_s=1e5,
                                                        round=newest, spec_hash=spec.hash(), incarnation=incarnation))
            if stored and not shown:
                print(f"fake {me} announced", flush=True)  # the bench's fake phase starts here (bench/churn.py)
                shown = True
            await asyncio.wait([stdin_closed], timeout=REFRESH_S)
        await dht.shutdown()
    finally:
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
