"""A third-party reader of a live swarm, for the protocol test: it joins the DHT through
argv[1] as a plain hivemind client and reads the run's peer records (from the registry's
bucket keys), knowing only docs/protocol.md. It imports hivemind and msgpack, nothing of
locoswarm, and prints one JSON object: {"modules": [locoswarm modules loaded], "peers":
{peer id: record map}}.

usage: python read_swarm.py MADDR RUN_ID
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
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


BUCKET_ENTRIES, MAX_LEVEL = 32, 24


def in_bucket(peer: str, level: int, bucket: int) -> bool:
    """Whether `peer` belongs in `bucket` of `level`: the first `level` bits of sha256(peer id)."""
    return level == 0 or int.from_bytes(hashlib.sha256(peer.encode()).digest(), "big") >> (256 - level) == bucket


async def read_peers(dht: DHTNode, run_id: str) -> dict[str, object]:
    """Every live peer record, as docs/protocol.md says to find them: level 0's one bucket
    holds everyone in a swarm below ≈45 peers; otherwise (more entries, or none) bucket 0 of
    every level is read, the highest level whose count c is consistent (⌊log2(c·2^L/32)⌋ is
    L − 1 or L) is where the swarm writes, and all its 2^L buckets are read."""
    prefix = f"locoswarm:{run_id}:peers"
    peers = entries(await dht.get(f"{prefix}:0:0", latest=True))
    if 0 < len(peers) < BUCKET_ENTRIES * math.sqrt(2):
        return peers
    probes = await dht.get_many([f"{prefix}:{level}:0" for level in range(MAX_LEVEL + 1)], float("inf"))
    level = 0
    for candidate in range(MAX_LEVEL + 1):
        count = len(entries(probes[f"{prefix}:{candidate}:0"]))
        if count and math.floor(math.log2(max(1.0, count * 2 ** candidate / BUCKET_ENTRIES))) in (candidate - 1,
                                                                                                  candidate):
            level = candidate
    found = await dht.get_many([f"{prefix}:{level}:{b}" for b in range(2 ** level)], float("inf"))
    out = {}
    for b in range(2 ** level):
        out.update({p: r for p, r in entries(found[f"{prefix}:{level}:{b}"]).items() if in_bucket(p, level, b)})
    return out


async def main(maddr: str, run_id: str) -> None:
    # Without the signature validator the entries' signatures are not stripped and checked,
    # and our keys' values are refused (docs/protocol.md).
    dht = await DHTNode.create(initial_peers=[maddr], host_maddrs=["/ip4/127.0.0.1/tcp/0"], client_mode=True,
                               record_validator=RSASignatureValidator())
    try:
        peers = await read_peers(dht, run_id)
    finally:
        await dht.shutdown()
    for record in peers.values():
        record["spec"] = record["spec"].hex()
        record["proof"] = record["proof"].hex()
    print(json.dumps({"modules": sorted(m for m in sys.modules if m.startswith("locoswarm")), "peers": peers}),
          flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
