"""A third-party reader of a live swarm, for the protocol test: it joins the DHT through
argv[1] as a plain hivemind client and reads the run's peer records and one round's
progress, knowing only docs/protocol.md. It imports hivemind and msgpack, nothing of
locoswarm, and prints one JSON object: {"modules": [locoswarm modules loaded], "peers":
{peer id: record map}, "progress": {peer id: progress map}}.

usage: python read_swarm.py MADDR RUN_ID SPEC_HASH_HEX ROUND
"""

from __future__ import annotations

import asyncio
import json
import sys

import msgpack
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode


def entries(found) -> dict[str, object]:
    """A DHT dictionary value's live entries, by the peer id that opens each subkey (the rest
    of the subkey is the owner's public key, which hivemind's validator checked)."""
    out = {}
    if found is None or not isinstance(found.value, dict):
        return out
    for subkey, item in found.value.items():
        peer = subkey.split(b"[owner:")[0].decode() if isinstance(subkey, bytes) else str(subkey)
        if item.value != b"":  # b"": a withdrawn record (tombstone)
            out[peer] = msgpack.unpackb(item.value, raw=False)
    return out


async def main(maddr: str, run_id: str, spec_hex: str, round_: int) -> None:
    # Without the signature validator the entries' signatures are not stripped and checked,
    # and our keys' values are refused (docs/protocol.md).
    dht = await DHTNode.create(initial_peers=[maddr], host_maddrs=["/ip4/127.0.0.1/tcp/0"], client_mode=True,
                               record_validator=RSASignatureValidator())
    try:
        peers = entries(await dht.get(f"locoswarm:{run_id}:peers", latest=True))
        progress = entries(await dht.get(f"locoswarm:{run_id}:{spec_hex[:16]}:progress:{round_}", latest=True))
    finally:
        await dht.shutdown()
    for record in peers.values():
        record["spec"] = record["spec"].hex()
        record["proof"] = record["proof"].hex()
    print(json.dumps({"modules": sorted(m for m in sys.modules if m.startswith("locoswarm")), "peers": peers,
                      "progress": progress}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
