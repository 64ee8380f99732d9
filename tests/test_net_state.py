"""The state download between py-libp2p and p2pd peers (locoswarm.net, no hivemind in the
py-libp2p processes: tests/peers/lp2p_state.py). A py-libp2p joiner against serve_state.py's
donors takes only chunks that check, resumes cut ones, and names a donor that serves nothing;
a p2pd joiner downloads what a py-libp2p donor serves. (A py-libp2p joiner's download from
training daemons is in test_net_swarm.py.)"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

from harness import libp2p_missing
from locoswarm.node.statedir import IDENTITY_FILE, ensure_identity

LP2P = os.path.join(os.path.dirname(__file__), "peers", "lp2p_state.py")


@contextlib.contextmanager
def lp2p_donor(tmp_path, *args: str):
    """A py-libp2p donor (lp2p_state.py serve [ARGS]) serving state_fixture.py's state: yields
    (its multiaddr, a function that closes its stdin and returns what it printed last)."""
    ensure_identity(str(tmp_path))
    donor = subprocess.Popen([sys.executable, LP2P, str(tmp_path / IDENTITY_FILE), "serve", *args],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def end() -> dict:
        donor.stdin.close()
        last = json.loads(donor.stdout.read().strip().splitlines()[-1])
        assert donor.wait(30) == 0
        return last

    try:
        maddr = donor.stdout.readline().strip()
        assert "/p2p/" in maddr, donor.stderr.read()[-3000:]
        yield maddr, end
    finally:
        if donor.poll() is None:
            donor.kill()
            donor.wait()


async def p2pd_download(maddrs: list[str], spec, **kwargs):
    """node/statedownload.py's download over a p2pd of its own, from the donors at `maddrs`."""
    from hivemind.p2p import P2P, PeerID

    from locoswarm.node.statedownload import download_state

    p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=maddrs)
    try:
        return await download_state(p2p, [PeerID.from_base58(m.split("/p2p/")[1]) for m in maddrs], spec, **kwargs)
    finally:
        await p2p.shutdown()


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

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "peers"))
    import state_fixture as fx

    with lp2p_donor(tmp_path) as (lp2p_maddr, end_donor):
        _, (p2pd_maddr,) = spawn_peers(os.path.join(os.path.dirname(__file__), "peers", "serve_state.py"), "good")
        alone = asyncio.run(p2pd_download([lp2p_maddr], fx.SPEC, timeout_s=20.0, residual_spec=fx.RESIDUAL_SPEC))
        mixed = asyncio.run(p2pd_download([lp2p_maddr, p2pd_maddr], fx.SPEC, timeout_s=20.0,
                                          residual_spec=fx.RESIDUAL_SPEC))
        end = end_donor()
    want = fx.state()
    want_residual = {n: t.to(torch.bfloat16).float() for n, t in fx.state(fx.RESIDUAL_SEED, fx.RESIDUAL_SPEC).items()}
    for got in (alone, mixed):
        assert (got.round, got.chain, got.ledger) == (fx.ROUND, fx.CHAIN, fx.LEDGER)
        assert all(torch.equal(got.tensors[n], want[n]) for n in want)
        assert got.residual is not None and all(torch.equal(got.residual[n], want_residual[n]) for n in want_residual)
    # the py-libp2p donor served two manifests and every chunk of the first download at least
    assert end["bytes_sent"] >= fx.SPEC.total_bytes and not end["hivemind_loaded"], end


@pytest.mark.slow
@pytest.mark.timeout(300, method="signal")
def test_the_py_libp2p_joiner_takes_the_attested_state_an_attesters_state_and_a_donors_residual(spawn_peers, tmp_path):
    """node/statedownload.py's choices, on py-libp2p (protocol/statepull.py pick_manifest), against
    serve_state.py's p2pd donors: two forged donors agreeing on a newer state on another chain
    win a plain download (what attestation is for); with the target a majority of earned weight
    attests (round, chain) only the good donor's state is taken, and a target no donor serves is
    refused by name; with an attester its (older) state is taken over the others'; an attester
    asked for but not among the donors is refused; a donor's residual comes along, and a donor
    that serves none gives the state without one."""
    why = libp2p_missing()
    if why:
        pytest.skip(why)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "peers"))
    import state_fixture as fx

    from locoswarm.protocol.state import encode_state, state_digest

    _, maddrs = spawn_peers(os.path.join(os.path.dirname(__file__), "peers", "serve_state.py"),
                            "stale", "forged", "forged", "good", "no-residual")
    ensure_identity(str(tmp_path))
    stale, forged, good, bare = [0], [1, 2], [3], [4]
    cases = [{"name": "plain", "donors": forged + good},
             {"name": "target", "donors": forged + good, "target": [fx.ROUND, fx.CHAIN]},
             {"name": "target_absent", "donors": forged + good, "target": [fx.ROUND + 100, fx.CHAIN]},
             {"name": "attester", "donors": stale + forged + good, "attesters": stale},
             {"name": "attester_absent", "donors": forged + good, "attesters": stale},
             {"name": "residual", "donors": good, "residual": True},
             {"name": "no_residual", "donors": bare, "residual": True}]
    out = subprocess.run([sys.executable, LP2P, str(tmp_path / IDENTITY_FILE), "cases", ",".join(maddrs),
                          json.dumps(cases)], capture_output=True, text=True, timeout=200)
    assert out.returncode == 0, out.stderr[-4000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(got))  # shown when an assertion fails
    assert not got["hivemind_loaded"]
    _, body = encode_state(fx.SPEC, fx.state(), fx.ROUND, chain=fx.CHAIN, ledger=fx.LEDGER)
    good_digest = state_digest(body, fx.LEDGER)
    assert (got["plain"]["round"], got["plain"]["chain"]) == (fx.ROUND + fx.FORGED_ROUNDS, fx.FORGED_CHAIN)
    assert sorted(got["plain"]["donors"]) == forged
    assert (got["target"]["round"], got["target"]["chain"], got["target"]["digest"]) == (fx.ROUND, fx.CHAIN,
                                                                                         good_digest)
    assert got["target"]["donors"] == good
    assert got["target_absent"]["error"].startswith("StateUnavailable") and \
        f"attested state of round {fx.ROUND + 100}" in got["target_absent"]["error"]
    assert (got["attester"]["round"], got["attester"]["donors"]) == (fx.ROUND - 1, stale)
    assert "none of the 0 trusted donors" in got["attester_absent"]["error"]
    assert got["residual"]["residual"] == 0.0 and got["residual"]["digest"] == good_digest
    assert got["no_residual"]["residual"] is None and got["no_residual"]["digest"] == good_digest


@pytest.mark.slow
@pytest.mark.timeout(300, method="signal")
def test_a_py_libp2p_donors_upload_budget_holds_for_two_p2pd_joiners_at_once(tmp_path):
    """The py-libp2p donor under an upload budget (net/statesync.py, protocol/admission.py
    ByteBudget, as a p2pd donor keeps it): two p2pd joiners asking at once get the state intact,
    no faster than the budget lets both together (a burst of two chunks, then its rate: a faster
    machine cannot beat this bound, a slower one only takes longer)."""
    why = libp2p_missing()
    if why:
        pytest.skip(why)
    import asyncio
    import time

    from locoswarm.protocol.state import encode_state

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "peers"))
    import state_fixture as fx

    with lp2p_donor(tmp_path, "budget") as (maddr, end_donor):
        async def two():
            return await asyncio.gather(*(p2pd_download([maddr], fx.SPEC, timeout_s=30.0) for _ in range(2)))

        started = time.monotonic()
        got = asyncio.run(two())
        elapsed = time.monotonic() - started
        end = end_donor()
    want = fx.state()
    for joined in got:
        assert (joined.round, joined.chain) == (fx.ROUND, fx.CHAIN)
        assert all(torch.equal(joined.tensors[n], want[n]) for n in want)
    _, body = encode_state(fx.SPEC, want, fx.ROUND, fx.CHUNK_BYTES, fx.CHAIN, fx.LEDGER)
    floor_s = (2 * len(body) - 3 * fx.CHUNK_BYTES) / fx.BUDGET_BYTES_PER_S
    print(f"two joiners in {elapsed:.1f} s (floor {floor_s:.1f} s); donor {end}")
    assert elapsed >= floor_s, (elapsed, floor_s)
    assert end["bytes_sent"] >= 2 * len(body) and not end["hivemind_loaded"], end
