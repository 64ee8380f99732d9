"""The node's delta puller (node/exchange.py call_get_delta, node/streams.py's kept streams:
asyncio code written for p2pd) over py-libp2p (net/bridge.py TrioP2P), against bad delta
servers, for tests/test_net_deltas.py, with no hivemind in its process: it pulls round ROUND
once from each peer in turn (tests/peers/serve_delta.py's bad answers among them), then from
the first again, and prints {"pulled": [outcome, …], "hivemind_loaded"}, an outcome being
["ok", sender, round, sha256] or [exception type, message, seconds it took].

usage: python lp2p_delta.py IDENTITY_FILE MADDR[,MADDR…] TIMEOUT_S
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time

from delta_fixture import ROUND, SPEC

from locoswarm.net.bridge import TrioP2P
from locoswarm.net.host import key_pair_of
from locoswarm.node.exchange import call_get_delta, delta_streams

LIFETIME_S = 120.0


async def outcome(call) -> list:
    started = time.monotonic()
    try:
        delta = await call
        return ["ok", delta.sender, delta.round, hashlib.sha256(delta.wire).hexdigest()]
    except Exception as e:
        return [type(e).__name__, str(e), round(time.monotonic() - started, 2)]


async def pull_each(identity_path: str, maddrs: str, timeout_s: str) -> None:
    key_pair, _ = key_pair_of(open(identity_path, "rb").read())
    p2p = TrioP2P(key_pair)
    await p2p.start()
    try:
        streams = delta_streams(p2p)
        targets = maddrs.split(",")
        results = []
        for maddr in targets + targets[:1]:
            async def pull(maddr: str = maddr):
                peer = await p2p.connect(maddr)
                return await call_get_delta(streams, peer, ROUND, SPEC, timeout_s=float(timeout_s))
            results.append(await outcome(pull()))
    finally:
        await p2p.shutdown()
    print(json.dumps({"pulled": results,
                      "hivemind_loaded": sorted(m for m in sys.modules if m.startswith("hivemind."))}), flush=True)


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(pull_each(*sys.argv[1:4]), LIFETIME_S))
