"""A real peer process for the registry tests: joins the DHT through the address given on
stdin's first line (or starts one), announces a record (or a bad one, by MODE) with a 3 s
lifetime, prints its multiaddr, and runs until stdin closes or it is killed.

usage: python announce.py MODE   (MODE: good | signed | wrong_key | other_spec | garbage | impostor | withdraw)

signed: signed with the peer's libp2p identity key, as daemons sign; wrong_key: signed
with another RSA key than the identity its peer id comes from.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils import get_dht_time

from locoswarm.node.statedir import IDENTITY_FILE, identity_key, open_state_dir
from locoswarm.node.registry import PeerRegistry
from locoswarm.protocol.records import PeerRecord, bucket_key, encode_record

RUN, SPEC_HASH, TTL_S = "registry-test", b"r" * 32, 3.0


async def main(mode: str) -> None:
    state = tempfile.mkdtemp(prefix="announce-")
    os.close(open_state_dir(state))  # creates the identity key
    validator = {"signed": lambda: RSASignatureValidator(identity_key(state)),
                 "wrong_key": lambda: RSASignatureValidator(RSAPrivateKey())}.get(mode, lambda: None)()
    dht = await DHTNode.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validator=validator,
                               identity_path=os.path.join(state, IDENTITY_FILE))
    maddr = str((await dht.protocol.p2p.get_visible_maddrs())[0])
    me = maddr.split("/p2p/")[1]
    registry = PeerRegistry(dht, RUN, SPEC_HASH, ttl_s=TTL_S, validator=validator)
    record = PeerRecord(peer_id=me, addrs=(maddr,), device="cpu", tokens_per_s=1000.0, round=4,
                        spec_hash=b"x" * 32 if mode == "other_spec" else SPEC_HASH)
    level0 = bucket_key(RUN, 0, 0)  # the bucket every reader of a small swarm reads
    if mode == "garbage":
        await dht.store(level0, b"\xc1garbage", get_dht_time() + TTL_S, subkey=me)
    elif mode == "impostor":
        await dht.store(level0, encode_record(record), get_dht_time() + TTL_S, subkey="SomeoneElse")
    else:
        await registry.announce(record)
        if mode == "withdraw":
            await registry.withdraw(me)
    print(maddr, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await dht.shutdown()
    shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
