"""The state download between py-libp2p and p2pd peers (locoswarm.net, no hivemind in the
py-libp2p processes: tests/peers/lp2p_state.py). A py-libp2p joiner against serve_state.py's
donors takes only chunks that check, resumes cut ones, and names a donor that serves nothing;
a p2pd joiner downloads what a py-libp2p donor serves. (A py-libp2p joiner's download from
training daemons is in test_net_swarm.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from harness import libp2p_missing
from locoswarm.node.statedir import IDENTITY_FILE, ensure_identity

LP2P = os.path.join(os.path.dirname(__file__), "peers", "lp2p_state.py")


@pytest.mark.slow
@pytest.mark.timeout(300, method="signal")
@pytest.mark.parametrize("modes, outcome", [(("corrupt", "good"), "ok"), (("cutting",), "ok"),
                                            (("mute",), "StateUnavailable")])
def test_the_py_libp2p_joiner_takes_only_a_state_whose_every_chunk_checks(spawn_peers, tmp_path, modes, outcome):
    """Against tests/peers/serve_state.py's donors: one whose chunks all fail their hash beside
    a good one (the good one's chunks are taken), one that cuts each chunk's first answer in
    the middle (the rest is asked for), one that closes every stream (no state, said so)."""
    why = libp2p_missing()
    if why:
        pytest.skip(why)
    import importlib.util

    from locoswarm.protocol.state import encode_state

    path = os.path.join(os.path.dirname(__file__), "peers", "serve_state.py")
    loaded = importlib.util.spec_from_file_location("serve_state", path)
    serve_state = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(serve_state)
    _, maddrs = spawn_peers(path, *modes)
    ensure_identity(str(tmp_path))
    spec = serve_state.SPEC
    state_json = json.dumps({"run_id": spec.run_id, "spec_hash": spec.spec_hash.hex(),
                             "tensors": [[n, list(s)] for n, s in spec.tensors]})
    out = subprocess.run([sys.executable, LP2P, str(tmp_path / IDENTITY_FILE), state_json, ",".join(maddrs)],
                         capture_output=True, text=True, timeout=150)
    assert out.returncode == 0, out.stderr[-4000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(got))  # shown when an assertion fails
    if outcome != "ok":
        assert got["error"].startswith(outcome), got
        return
    _, body = encode_state(spec, serve_state.state(), serve_state.ROUND, chain=serve_state.CHAIN,
                           ledger=serve_state.LEDGER)
    from locoswarm.protocol.state import state_digest

    assert (got["round"], got["chain"], got["ledger_len"]) == (serve_state.ROUND, serve_state.CHAIN, 2)
    assert got["digest"] == state_digest(body, serve_state.LEDGER)


@pytest.mark.slow
@pytest.mark.timeout(300, method="signal")
def test_a_p2pd_joiner_downloads_the_state_a_py_libp2p_donor_serves(spawn_peers, tmp_path):
    """node/statedownload.py over p2pd, from a py-libp2p donor (net/statesync.py StateServer)
    alone, then from it beside a p2pd donor of the same state: the very tensors, round, chain,
    earned weight and residual, every chunk checked."""
    why = libp2p_missing()
    if why:
        pytest.skip(why)
    import asyncio

    from hivemind.p2p import P2P, PeerID

    from locoswarm.node.statedownload import download_state

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "peers"))
    import state_fixture as fx

    ensure_identity(str(tmp_path))
    donor = subprocess.Popen([sys.executable, LP2P, str(tmp_path / IDENTITY_FILE), "serve"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lp2p_maddr = donor.stdout.readline().strip()
        assert "/p2p/" in lp2p_maddr, donor.stderr.read()[-3000:]
        _, (p2pd_maddr,) = spawn_peers(os.path.join(os.path.dirname(__file__), "peers", "serve_state.py"), "good")

        async def join(maddrs: list[str]):
            p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=maddrs)
            try:
                peers = [PeerID.from_base58(m.split("/p2p/")[1]) for m in maddrs]
                return await download_state(p2p, peers, fx.SPEC, timeout_s=20.0, residual_spec=fx.RESIDUAL_SPEC)
            finally:
                await p2p.shutdown()

        alone = asyncio.run(join([lp2p_maddr]))
        mixed = asyncio.run(join([lp2p_maddr, p2pd_maddr]))
        donor.stdin.close()
        end = json.loads(donor.stdout.read().strip().splitlines()[-1])
        assert donor.wait(30) == 0
    finally:
        if donor.poll() is None:
            donor.kill()
            donor.wait()
    want = fx.state()
    want_residual = {n: t.to(torch.bfloat16).float() for n, t in fx.state(fx.RESIDUAL_SEED, fx.RESIDUAL_SPEC).items()}
    for got in (alone, mixed):
        assert (got.round, got.chain, got.ledger) == (fx.ROUND, fx.CHAIN, fx.LEDGER)
        assert all(torch.equal(got.tensors[n], want[n]) for n in want)
        assert got.residual is not None and all(torch.equal(got.residual[n], want_residual[n]) for n in want_residual)
    # the py-libp2p donor served two manifests and every chunk of the first download at least
    assert end["bytes_sent"] >= fx.SPEC.total_bytes and not end["hivemind_loaded"], end
