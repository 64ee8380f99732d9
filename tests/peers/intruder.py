"""A stranger to a private run, for the access tests: it knows the run id and spec hash
(both public in the DHT) but not the secret, or has not done the work the run asks of an
identity. It joins the DHT through argv[1], signs a record of its own claiming the spec
(without a valid proof; with WORK_BITS, with a nonce that proves less than that), tells the
run's peers inflated progress for the first rounds, then asks the peer at argv[1] for its
deltas, printing one line per attempt: `delta <round> refused|served|none`. Runs until stdin
closes.

usage: python intruder.py MADDR RUN_ID SPEC_HASH_HEX [WORK_BITS]
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.p2p import PeerID

from locoswarm.node.exchange import PROTOCOL
from locoswarm.node.statedir import IDENTITY_FILE, identity_key, open_state_dir
from locoswarm.node.registry import PeerRegistry
from locoswarm.node.progress import PROTOCOL as PROGRESS_PROTOCOL, progress_frame
from locoswarm.node.streams import call_framed
from locoswarm.protocol.records import PeerRecord, Progress
from locoswarm.protocol.work import meets


async def main(maddr: str, run_id: str, spec_hash: bytes, work_bits: int = 0) -> None:
    state = tempfile.mkdtemp(prefix="intruder-")
    os.close(open_state_dir(state))
    validator = RSASignatureValidator(identity_key(state))
    dht = await DHTNode.create(initial_peers=[maddr], host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                               record_validator=validator, identity_path=os.path.join(state, IDENTITY_FILE))
    p2p = dht.protocol.p2p
    me = p2p.peer_id.to_base58()
    own = str((await p2p.get_visible_maddrs())[0])
    registry = PeerRegistry(dht, run_id, spec_hash, ttl_s=30.0, validator=validator)
    work = next(n for n in range(1 << 20) if not meets(spec_hash, me, n, work_bits)) if work_bits else 0
    await registry.announce(PeerRecord(peer_id=me, addrs=(own,), device="cuda", tokens_per_s=1e9, round=0,
                                       spec_hash=spec_hash, proof=b"\0" * 32, work=work))
    target = PeerID.from_base58(maddr.split("/p2p/")[1])
    claims = b"".join(progress_frame(Progress(tokens=10**9, tokens_per_s=1e9, done=True, round=r)) for r in range(4))
    for peer in {target.to_base58()} | {r.peer_id for r in await registry.peers()} - {me}:
        try:  # a refused stream is what the test expects; one accepted would let the claims in
            _, _, writer = await asyncio.wait_for(
                p2p.call_binary_stream_handler(PeerID.from_base58(peer), PROGRESS_PROTOCOL), 10)
            writer.write(claims)
            await writer.drain()
            writer.close()
        except Exception:  # noqa: BLE001
            pass
    print("ready", flush=True)
    for r in range(4):
        try:
            body = await call_framed(p2p, target, PROTOCOL, r.to_bytes(8, "big") + bytes(8), limit=1 << 26,
                                     limit_name="limit", timeout_s=10)
            print(f"delta {r} {'none' if body is None else 'served'}", flush=True)
        except Exception:  # noqa: BLE001 - a refusal closes the stream: any failure is a refusal here
            print(f"delta {r} refused", flush=True)
        await asyncio.sleep(1.0)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await dht.shutdown()
    shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 0))
