"""The node's asyncio stream code over py-libp2p (net/bridge.py TrioP2P), against a p2pd peer,
both ways: a process that never imports hivemind (tests/peers/lp2p_bridge.py) serves a delta
with node/exchange.py's own DeltaServer and pulls one with its own call_get_delta and kept
streams, and tells and hears progress with node/progress.py's own bus; the p2pd peer here does
the same. The first steps of issue 22's one round loop on both transports (docs/windows.md)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from harness import json_line, libp2p_missing
from locoswarm.node.statedir import IDENTITY_FILE, ensure_identity

PEERS = os.path.join(os.path.dirname(__file__), "peers")
sys.path.insert(0, PEERS)
import state_fixture as fx  # noqa: E402
from delta_fixture import ROUND, SPEC, good_blob  # noqa: E402

SCRIPT = os.path.join(PEERS, "lp2p_bridge.py")
SPEC_HASH = b"s" * 32
TOKENS = 555
"""What the p2pd peer tells (the bridged one tells 777, done)."""


def sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


async def _both_ways(identity: str, donor_maddr: str) -> dict:
    from hivemind.p2p import P2P, PeerID

    from locoswarm.node.exchange import DeltaServer, call_get_delta, delta_streams
    from locoswarm.node.progress import ProgressBus
    from locoswarm.node.statedownload import download_state
    from locoswarm.protocol.records import PeerRecord, Progress

    p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    client = proc = None
    try:
        server = DeltaServer(p2p, incarnation=3)
        await server.start()
        server.publish(ROUND, good_blob(ROUND, sender="p2pd"))
        maddr = f"{(await p2p.get_visible_maddrs())[0]}"
        proc = subprocess.Popen([sys.executable, SCRIPT, identity, maddr, donor_maddr], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        bridged = (await json_line(proc, "maddr"))["maddr"]
        client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=[bridged])
        streams = delta_streams(client)
        peer = PeerID.from_base58(bridged.split("/p2p/")[1])
        got = {"pulled_from_bridged": []}
        for _ in range(2):
            delta = await call_get_delta(streams, peer, ROUND, SPEC, timeout_s=20.0)
            got["pulled_from_bridged"].append([delta.sender, delta.round, sha(delta.wire)])
        got["p2pd_streams_opened"] = streams.num_opened
        got.update(await json_line(proc, "pulled"))
        # the progress streams: node/progress.py's bus on both sides
        heard: dict = {}
        me = str(p2p.peer_id)  # the peer the bridged one pulled from
        record = PeerRecord(peer_id=me, addrs=(maddr,), device="cpu", tokens_per_s=1.0, round=ROUND,
                            spec_hash=SPEC_HASH, incarnation=3, seq=1)
        bus = ProgressBus(p2p, me, spec_hash=SPEC_HASH, record=lambda: record,
                          on_record=lambda r: heard.setdefault("record", [r.peer_id, r.round]))
        await bus.start()
        bus.open_round(ROUND)
        bus.publish(Progress(tokens=TOKENS, tokens_per_s=1.0, done=False, round=ROUND), [str(peer)])
        got.update(await json_line(proc, "heard"))
        for _ in range(600):
            seen = bus.seen(ROUND).get(str(peer))
            if "record" in heard and seen is not None:
                heard["progress"] = [seen.progress.tokens, seen.progress.done]
                break
            await asyncio.sleep(0.05)
        got["p2pd_heard"] = heard
        got["me"], got["bridged"] = me, str(peer)
        bus.close()
        # the outer state: the bridged peer downloaded the p2pd donor's, and serves its own
        got.update(await json_line(proc, "downloaded"))
        await json_line(proc, "serving")
        joined = await download_state(client, [peer], fx.SPEC, timeout_s=20.0, residual_spec=fx.RESIDUAL_SPEC)
        want = fx.state()
        want_residual = {n: t.to(torch.bfloat16).float() for n, t in fx.state(fx.RESIDUAL_SEED, fx.RESIDUAL_SPEC).items()}
        got["p2pd_downloaded"] = [joined.round, joined.chain, all(torch.equal(joined.tensors[n], want[n]) for n in want),
                                  joined.residual is not None and all(torch.equal(joined.residual[n], want_residual[n])
                                                                      for n in want_residual)]
        proc.stdin.close()
        got.update(await json_line(proc, "bytes_sent"))
        got["exit"] = await asyncio.get_running_loop().run_in_executor(None, lambda: proc.wait(30))
        got["p2pd_sent"] = server.bytes_sent
        return got
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if client is not None:
            await client.shutdown()
        await p2p.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(200, method="signal")
def test_the_nodes_own_stream_code_runs_over_py_libp2p_against_p2pd_peers(tmp_path, spawn_peers):
    why = libp2p_missing()
    if why:
        pytest.skip(why)
    ensure_identity(str(tmp_path))
    _, (donor,) = spawn_peers(os.path.join(PEERS, "serve_state.py"), "good")
    got = asyncio.run(_both_ways(str(tmp_path / IDENTITY_FILE), donor))
    print(json.dumps(got))  # shown when an assertion fails
    assert got["exit"] == 0 and got["hivemind_loaded"] == []
    # p2pd pulled the bridged peer's delta twice on one kept stream, byte for byte
    ours = ["bridged", ROUND, sha(good_blob(ROUND, sender="bridged"))]
    assert got["pulled_from_bridged"] == [ours, ours] and got["p2pd_streams_opened"] == 1
    # the bridged peer pulled ours with the node's own puller, twice on one kept stream
    theirs = ["p2pd", ROUND, sha(good_blob(ROUND, sender="p2pd"))]
    assert got["pulled"] == [theirs, theirs] and got["streams_opened"] == 1
    # a stream that cannot open now is refused as on p2pd (node/pull.py dial_refused): no waiting for the peer
    assert got["refused"] == ["ConnectionRefusedError", "ConnectionRefusedError"], got["refused"]
    assert got["bytes_sent"] >= 2 * len(good_blob(ROUND, sender="bridged")) and got["p2pd_sent"] > 0
    # node/progress.py's bus and outboxes on both sides: each heard the other's record and progress
    assert got["heard"] == {"record": [got["me"], ROUND], "progress": [TOKENS, False]}
    assert got["p2pd_heard"] == {"record": [got["bridged"], ROUND], "progress": [777, True]}
    # node/statedownload.py and node/statesync.py both ways: the very state, chain and residual
    assert got["downloaded"] == got["p2pd_downloaded"] == [fx.ROUND, fx.CHAIN, True, True]
    assert got["state_bytes_sent"] >= fx.SPEC.total_bytes
