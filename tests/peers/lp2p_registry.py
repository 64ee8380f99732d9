"""A reader of a live swarm's peer registry on py-libp2p, for tests/test_net_registry.py: it
joins the DHT through one daemon's multiaddr with locoswarm.net's DHTClient, never importing
hivemind (it could not: py-libp2p and hivemind cannot share a process), reads the run's records
with net/registry.py and prints one JSON object: {"peers": {peer id: record fields}, "buckets":
{peer id: its bucket at levels 0 … 24}, "rejected": [[who, why], …], "failures": [[peer, what], …],
"hivemind_loaded": bool}.

usage: python lp2p_registry.py IDENTITY_FILE BOOTSTRAP_MADDR RUN_ID SPEC_HASH_HEX
"""

from __future__ import annotations

import dataclasses
import json
import sys

import trio

from locoswarm.net.dht import DHTClient, DHTClientConfig
from locoswarm.net.host import key_pair_of, run_host
from locoswarm.net.registry import bucket_of, read_registry

LIFETIME_S = 90.0
"""The whole run, bounded: the test waits a little longer than this."""


async def main(identity_path: str, bootstrap: str, run_id: str, spec_hex: str) -> dict:
    key_pair, identity = key_pair_of(open(identity_path, "rb").read())
    rejected: list[tuple[str, str]] = []
    with trio.fail_after(LIFETIME_S):
        async with run_host(key_pair) as host:
            dht = DHTClient(host, identity, DHTClientConfig(timeout_s=5.0))
            await dht.bootstrap([bootstrap])
            peers = await read_registry(dht, run_id, bytes.fromhex(spec_hex), rejected=rejected)
    shown = {}
    for peer, record in peers.items():
        fields = dataclasses.asdict(record)
        fields["spec_hash"], fields["proof"] = record.spec_hash.hex(), record.proof.hex()
        shown[peer] = fields
    return {"peers": shown, "buckets": {p: [bucket_of(p, level) for level in range(25)] for p in peers},
            "rejected": rejected, "failures": list(dht.failures),
            "hivemind_loaded": any(m == "hivemind" or m.startswith("hivemind.") for m in sys.modules)}


if __name__ == "__main__":
    print(json.dumps(trio.run(main, *sys.argv[1:5])), flush=True)
