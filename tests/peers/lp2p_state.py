"""A py-libp2p joiner's state download from daemons (tests/test_net_state.py), with no
hivemind in its process: it dials the donors, downloads their newest outer state with
net/statesync.py and prints one JSON object: {"round", "digest", "donors", "chain",
"ledger_len", "max_abs", "hivemind_loaded"} or {"error"}.

usage: python lp2p_state.py IDENTITY_FILE STATE_SPEC_JSON MADDR[,MADDR…]
(STATE_SPEC_JSON: {"run_id", "spec_hash" (hex), "tensors": [[name, shape], …]})
       python lp2p_state.py IDENTITY_FILE serve [budget]
       python lp2p_state.py IDENTITY_FILE cases MADDR[,MADDR…] CASES_JSON
The second form is a donor: it serves state_fixture.py's state of ROUND with its residual,
prints its multiaddr, and when stdin closes prints {"bytes_sent", "refused", "hivemind_loaded"};
with `budget`, under an upload budget of state_fixture.py's BUDGET_BYTES_PER_S.
The third downloads state_fixture.py's SPEC once per case (CASES_JSON: [{"name", "donors":
[indices into the MADDRs], "attesters": [indices], "target": [round, chain] or null,
"residual": bool}, …]) and prints {name: {"round", "chain", "digest", "donors", "residual":
max |residual − the fixture's residual of RESIDUAL_SEED| or null} or {"error"}, …,
"hivemind_loaded"}.
"""

from __future__ import annotations

import json
import sys

import torch
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


async def cases(identity_path: str, maddrs: str, cases_json: str) -> dict:
    from state_fixture import RESIDUAL_SEED, RESIDUAL_SPEC, SPEC, state

    key_pair, _ = key_pair_of(open(identity_path, "rb").read())
    want = {n: t.to(torch.bfloat16).float() for n, t in state(RESIDUAL_SEED, RESIDUAL_SPEC).items()}
    out: dict = {}
    with trio.fail_after(150):
        async with run_host(key_pair) as host:
            donors = [await dial(host, m) for m in maddrs.split(",")]
            for case in json.loads(cases_json):
                try:
                    got = await download_state(
                        host, [donors[i] for i in case["donors"]], SPEC, timeout_s=20.0,
                        attesters=frozenset(str(donors[i]) for i in case.get("attesters", ())),
                        target=tuple(case["target"]) if case.get("target") else None,
                        residual_spec=RESIDUAL_SPEC if case.get("residual") else None)
                except Exception as e:
                    out[case["name"]] = {"error": f"{type(e).__name__}: {e}"}
                    continue
                off = None if got.residual is None else max(float((got.residual[n] - want[n]).abs().max())
                                                            for n in want)
                out[case["name"]] = {"round": got.round, "chain": got.chain, "digest": got.digest,
                                     "donors": [[str(d) for d in donors].index(p) for p in got.donors],
                                     "residual": off}
    out["hivemind_loaded"] = any(m == "hivemind" or m.startswith("hivemind.") for m in sys.modules)
    return out


async def serve(identity_path: str, budget: str = "") -> dict:
    from locoswarm.net.statesync import StateServer
    from state_fixture import (BUDGET_BYTES_PER_S, CHAIN, CHUNK_BYTES, LEDGER, RESIDUAL_SEED, RESIDUAL_SPEC, ROUND,
                               SPEC, state)

    key_pair, _ = key_pair_of(open(identity_path, "rb").read())
    async with run_host(key_pair) as host:
        server = StateServer(host, SPEC, chunk_bytes=CHUNK_BYTES, residual_spec=RESIDUAL_SPEC,
                             upload_bytes_per_s=BUDGET_BYTES_PER_S if budget == "budget" else 0.0)
        server.start()
        residual = {n: t.to(torch.bfloat16) for n, t in state(RESIDUAL_SEED, RESIDUAL_SPEC).items()}
        server.publish(state(), ROUND, CHAIN, LEDGER, residual)
        maddr = str(host.get_addrs()[0])
        print(maddr if "/p2p/" in maddr else f"{maddr}/p2p/{host.get_id()}", flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)
    return {"bytes_sent": server.bytes_sent, "refused": server.limits.refused,
            "hivemind_loaded": any(m == "hivemind" or m.startswith("hivemind.") for m in sys.modules)}


if __name__ == "__main__":
    if sys.argv[2] == "serve":
        print(json.dumps(trio.run(serve, sys.argv[1], *sys.argv[3:4])), flush=True)
    elif sys.argv[2] == "cases":
        print(json.dumps(trio.run(cases, sys.argv[1], sys.argv[3], sys.argv[4])), flush=True)
    else:
        print(json.dumps(trio.run(main, *sys.argv[1:4])), flush=True)
