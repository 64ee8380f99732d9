"""A py-libp2p peer that shows itself in a live swarm's registry, for tests/test_net_registry.py;
no hivemind here. It joins the DHT through one daemon, serves the progress streams and the "which
run?" question, and keeps its record (paused: nobody waits for it) in the registry with
net/registry.py's OwnRecordKeeper; it tells nobody anything itself. The daemons can only find
it in the registry. It prints {"announced", "peers"} once its record is in, then waits for a
line on stdin, withdraws the record (a tombstone), reads the registry again and prints
{"withdrawn", "told_by": the peers that told it their record on a progress stream (none is
expected: daemons tell a paused peer nothing until it tells them), "announced_total",
"listed_after": the peers that read lists after the withdrawal, "me", "hivemind_loaded"}.

usage: python lp2p_announce.py IDENTITY_FILE BOOTSTRAP_MADDR RUN_ID SPEC_HASH_HEX
"""

from __future__ import annotations

import json
import secrets
import sys

import trio

from locoswarm.net.dht import DHTClient, DHTClientConfig
from locoswarm.net.host import key_pair_of, run_host
from locoswarm.net.progress import ProgressStreams
from locoswarm.net.registry import OwnRecordKeeper, read_registry
from locoswarm.net.runinfo import serve_run_info
from locoswarm.protocol.records import PeerRecord

LIFETIME_S = 200.0
"""The whole run, bounded: the test waits a little longer than this."""
TTL_S = 60.0
"""The daemons' record TTL (NodeConfig.record_ttl_s)."""


async def main(identity_path: str, bootstrap: str, run_id: str, spec_hex: str) -> dict:
    key_pair, identity = key_pair_of(open(identity_path, "rb").read())
    spec_hash = bytes.fromhex(spec_hex)
    with trio.fail_after(LIFETIME_S):
        async with run_host(key_pair) as host, trio.open_nursery() as nursery:
            streams = ProgressStreams(host, spec_hash)
            streams.start(nursery)
            serve_run_info(host, run_id, spec_hash, private=False)
            dht = DHTClient(host, identity, DHTClientConfig(timeout_s=5.0))
            await dht.bootstrap([bootstrap])
            addr = str(host.get_addrs()[0])
            record = PeerRecord(peer_id=identity.peer_id, addrs=(addr,), device="cpu", tokens_per_s=0.0, round=0,
                                spec_hash=spec_hash, paused=True, incarnation=secrets.randbelow(2**62) + 1, seq=1)
            keeper = OwnRecordKeeper(dht, run_id, spec_hash, lambda: record, ttl_s=TTL_S)
            await nursery.start(keeper.run)
            print(json.dumps({"announced": keeper.announced, "peers": sorted(keeper.peers),
                              "rejected": keeper.rejected}), flush=True)
            await trio.to_thread.run_sync(sys.stdin.readline)
            told_by = sorted(streams.records)
            withdrawn = await keeper.withdraw()
            after = await read_registry(dht, run_id, spec_hash, ttl_s=TTL_S)
            nursery.cancel_scope.cancel()
    return {"withdrawn": withdrawn, "told_by": told_by, "announced_total": keeper.announced,
            "listed_after": sorted(after), "me": identity.peer_id,
            "hivemind_loaded": any(m == "hivemind" or m.startswith("hivemind.") for m in sys.modules)}


if __name__ == "__main__":
    print(json.dumps(trio.run(main, *sys.argv[1:5])), flush=True)
