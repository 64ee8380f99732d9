"""A py-libp2p joiner's state download from daemons (tests/test_net_state.py), with no
hivemind in its process: it dials the donors, downloads their newest outer state with
net/statesync.py and prints one JSON object: {"round", "digest", "donors", "chain",
"ledger_len", "max_abs", "hivemind_loaded"} or {"error"}.

usage: python lp2p_state.py IDENTITY_FILE STATE_SPEC_JSON MADDR[,MADDR…]
(STATE_SPEC_JSON: {"run_id", "spec_hash" (hex), "tensors": [[name, shape], …]})
       python lp2p_state.py IDENTITY_FILE serve
The second form is a donor: it serves state_fixture.py's state of ROUND with its residual,
prints its multiaddr, and when stdin closes prints {"bytes_sent", "hivemind_loaded"}.
"""

from __future__ import annotations

import json
import sys

import trio

from locoswarm.net.host import dial, key_pair_of, run_host
from locoswarm.net.statesync import download_state
from locoswarm.protocol.state import StateSpec


async def main(identity_path: str, spec_json: str, maddrs: str) -> dict:
    fields = json.loads(spec_json)
    spec = StateSpec(run_id=fields["run_id"], spec_hash=bytes.fromhex(fields["spec_hash"]),
                     tensors=tuple((n, tuple(s)) for n, s in fields["tensors"]))
    key_pair, _ = key_pair_of(open(identity_path, "rb").read())
    with trio.fail_after(120):
        async with run_host(key_pair) as host:
            donors = [await dial(host, m) for m in maddrs.split(",")]
            try:
                got = await download_state(host, donors, spec, timeout_s=20.0)
            except Exception as e:
                return {"error": f"{type(e).__name__}: {e}"}
    return {"round": got.round, "digest": got.digest, "donors": sorted(got.donors), "chain": got.chain,
            "ledger_len": len(got.ledger), "max_abs": max(float(t.abs().max()) for t in got.tensors.values()),
            "hivemind_loaded": any(m == "hivemind" or m.startswith("hivemind.") for m in sys.modules)}


async def serve(identity_path: str) -> dict:
    import torch

    from locoswarm.net.statesync import StateServer
    from state_fixture import CHAIN, CHUNK_BYTES, LEDGER, RESIDUAL_SEED, RESIDUAL_SPEC, ROUND, SPEC, state

    key_pair, _ = key_pair_of(open(identity_path, "rb").read())
    async with run_host(key_pair) as host:
        server = StateServer(host, SPEC, chunk_bytes=CHUNK_BYTES, residual_spec=RESIDUAL_SPEC)
        server.start()
        residual = {n: t.to(torch.bfloat16) for n, t in state(RESIDUAL_SEED, RESIDUAL_SPEC).items()}
        server.publish(state(), ROUND, CHAIN, LEDGER, residual)
        maddr = str(host.get_addrs()[0])
        print(maddr if "/p2p/" in maddr else f"{maddr}/p2p/{host.get_id()}", flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)
    return {"bytes_sent": server.bytes_sent,
            "hivemind_loaded": any(m == "hivemind" or m.startswith("hivemind.") for m in sys.modules)}


if __name__ == "__main__":
    if sys.argv[2] == "serve":
        print(json.dumps(trio.run(serve, sys.argv[1])), flush=True)
    else:
        print(json.dumps(trio.run(main, *sys.argv[1:4])), flush=True)
