"""The node's own delta server and puller (node/exchange.py, node/streams.py: asyncio code
written for p2pd) running over py-libp2p through net/bridge.py's TrioP2P, in a process that
never imports hivemind, for tests/test_net_bridge.py. It serves delta_fixture.py's delta of
ROUND (sender "bridged") with node/exchange.py's DeltaServer, prints {"maddr"}, pulls the p2pd
peer's delta of ROUND with node/exchange.py's call_get_delta twice on one kept stream, prints
{"pulled": [[sender, round, sha256], …], "streams_opened", "refused": the error types of a
stream for a protocol the p2pd peer does not serve and of one to a peer of no known address}. Then on the progress streams, with
node/progress.py's own ProgressBus (and its outboxes): it tells the p2pd peer its record and
its progress in ROUND and prints {"heard": {"record": [peer, round] or null, "progress": [tokens,
done] or null}} once it has heard the p2pd peer's (or after 30 s). Then the outer state, with
node/statedownload.py's own download from the p2pd donor at DONOR_MADDR (serve_state.py) and
node/statesync.py's own StateServer serving state_fixture.py's state: it prints {"downloaded":
[round, chain, state equal, residual equal]} and {"serving": true}. When stdin closes it prints
{"bytes_sent", "state_bytes_sent", "hivemind_loaded"}.

usage: python lp2p_bridge.py IDENTITY_FILE P2PD_MADDR DONOR_MADDR
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys

from delta_fixture import ROUND, SPEC, good_blob

from locoswarm.net.bridge import TrioP2P
from locoswarm.net.host import key_pair_of
from locoswarm.node.exchange import DeltaServer, call_get_delta, delta_streams
from locoswarm.node.progress import ProgressBus
from locoswarm.node.statedownload import download_state
from locoswarm.node.statesync import StateServer
from locoswarm.protocol.records import PeerRecord, Progress

SPEC_HASH = b"s" * 32
TOKENS = 777
NOBODY = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
"""A peer id nobody here has: no address of it is known."""


def say(**fields) -> None:
    print(json.dumps(fields), flush=True)


async def state_both_ways(p2p: TrioP2P, donor_maddr: str) -> StateServer:
    import state_fixture as fx
    import torch

    donor = await p2p.connect(donor_maddr)
    got = await download_state(p2p, [donor], fx.SPEC, timeout_s=20.0, residual_spec=fx.RESIDUAL_SPEC)
    residual = got.residual
    want = fx.state()
    want_residual = {n: t.to(torch.bfloat16).float() for n, t in fx.state(fx.RESIDUAL_SEED, fx.RESIDUAL_SPEC).items()}
    say(downloaded=[got.round, got.chain, all(torch.equal(got.tensors[n], want[n]) for n in want),
                    residual is not None and all(torch.equal(residual[n], want_residual[n]) for n in want_residual)])
    server = StateServer(p2p, fx.SPEC, chunk_bytes=fx.CHUNK_BYTES, residual_spec=fx.RESIDUAL_SPEC)
    await server.start()
    residual = {n: t.to(torch.bfloat16) for n, t in fx.state(fx.RESIDUAL_SEED, fx.RESIDUAL_SPEC).items()}
    server.publish(want, fx.ROUND, fx.CHAIN, fx.LEDGER, residual)
    say(serving=True)
    return server


async def main(identity_path: str, p2pd_maddr: str, donor_maddr: str) -> None:
    key_pair, _ = key_pair_of(open(identity_path, "rb").read())
    p2p = TrioP2P(key_pair)
    await p2p.start()
    try:
        server = DeltaServer(p2p, incarnation=5)
        await server.start()
        server.publish(ROUND, good_blob(ROUND, sender="bridged"))
        say(maddr=(await p2p.get_visible_maddrs())[0])
        peer = await p2p.connect(p2pd_maddr)
        streams = delta_streams(p2p)
        pulled = []
        for _ in range(2):
            delta = await call_get_delta(streams, peer, ROUND, SPEC, timeout_s=20.0)
            pulled.append([delta.sender, delta.round, hashlib.sha256(delta.wire).hexdigest()])
        # Streams that cannot open now are refused as such (node/pull.py stops waiting for the
        # peer): a protocol the peer does not serve, and a peer of which no address is known.
        refused = []
        for target, protocol in ((peer, "locoswarm/none/1"), (NOBODY, "locoswarm/delta/4")):
            try:
                await p2p.call_binary_stream_handler(target, protocol)
                refused.append("opened")
            except Exception as e:
                refused.append(type(e).__name__)
        say(pulled=pulled, streams_opened=streams.num_opened, refused=refused)
        heard: dict = {}
        record = PeerRecord(peer_id=str(p2p.peer_id), addrs=tuple(await p2p.get_visible_maddrs()), device="cpu",
                            tokens_per_s=1.0, round=ROUND, spec_hash=SPEC_HASH, incarnation=5, seq=1)
        bus = ProgressBus(p2p, str(p2p.peer_id), spec_hash=SPEC_HASH, record=lambda: record,
                          on_record=lambda r: heard.setdefault("record", [r.peer_id, r.round]))
        await bus.start()
        bus.open_round(ROUND)
        bus.publish(Progress(tokens=TOKENS, tokens_per_s=1.0, done=True, round=ROUND), [str(peer)])
        for _ in range(600):
            seen = bus.seen(ROUND).get(str(peer))
            if "record" in heard and seen is not None:
                heard["progress"] = [seen.progress.tokens, seen.progress.done]
                break
            await asyncio.sleep(0.05)
        say(heard={"record": heard.get("record"), "progress": heard.get("progress")})
        state_server = await state_both_ways(p2p, donor_maddr)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        bus.close()
        say(bytes_sent=server.bytes_sent, state_bytes_sent=state_server.bytes_sent,
            hivemind_loaded=sorted(m for m in sys.modules if m.startswith("hivemind.")))
    finally:
        await p2p.shutdown()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
