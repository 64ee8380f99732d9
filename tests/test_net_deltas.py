"""The delta exchange between a p2pd peer (hivemind, node/exchange.py) and a py-libp2p peer
(locoswarm.net, no hivemind in its process: tests/peers/lp2p_delta.py), both ways: each pulls
the other's published delta intact on one kept stream, a request for a round still trained
is held until its delta is published, and "never" (GONE) comes back for a round passed or an
incarnation that is not the one running. Real processes on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys

import pytest
from hivemind.p2p import P2P, PeerID

from harness import json_line, libp2p_missing
from locoswarm.node.exchange import PROTOCOL, DeltaGone, DeltaServer, call_get_delta, delta_streams
from locoswarm.node.runinfo import call_which_run
from locoswarm.node.statedir import IDENTITY_FILE, ensure_identity

PEERS = os.path.join(os.path.dirname(__file__), "peers")
sys.path.insert(0, PEERS)
from delta_fixture import ROUND, SPEC, good_blob  # noqa: E402

LP2P = os.path.join(PEERS, "lp2p_delta.py")


def sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


async def _closed(reader: asyncio.StreamReader, within_s: float) -> bool:
    """Whether the other end closes the stream within `within_s` (it sends nothing on it)."""
    try:
        return await asyncio.wait_for(reader.read(1), within_s) == b""
    except asyncio.TimeoutError:
        return False
    except ConnectionError:
        return True


async def _exchange(identity: str) -> dict:
    server_p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    client = None
    proc = None
    try:
        server = DeltaServer(server_p2p, incarnation=3)
        await server.start()
        server.publish(ROUND, good_blob(ROUND, sender="p2pd"))
        server.training(ROUND + 1)
        maddr = f"{(await server_p2p.get_visible_maddrs())[0]}"
        proc = subprocess.Popen([sys.executable, LP2P, identity, maddr, "30"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lp2p_maddr = (await json_line(proc, "maddr"))["maddr"]
        client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=[lp2p_maddr])
        peer = PeerID.from_base58(lp2p_maddr.split("/p2p/")[1])
        streams = delta_streams(client)
        got = {}
        for case in ("first", "again"):
            delta = await call_get_delta(streams, peer, ROUND, SPEC, timeout_s=20.0)
            got[case] = (delta.sender, delta.round, sha(delta.wire))
        # a round the py-libp2p peer still trains: the request is held until it publishes
        held = asyncio.ensure_future(call_get_delta(streams, peer, ROUND + 1, SPEC, timeout_s=25.0))
        await asyncio.sleep(0.5)
        assert not held.done(), held
        proc.stdin.write("publish\n")
        proc.stdin.flush()
        delta = await held
        got["held"] = (delta.sender, delta.round, sha(delta.wire))
        for case, round_, incarnation in (("never", ROUND - 1, 0), ("old_life", ROUND, 99)):
            with pytest.raises(DeltaGone):
                await call_get_delta(streams, peer, round_, SPEC, timeout_s=20.0, incarnation=incarnation)
            got[case] = "gone"
        got["streams_opened"] = streams.num_opened
        answer = await call_which_run(client, str(peer))  # node/runinfo.py asking the py-libp2p peer
        got["run"] = None if answer is None else (answer.run_id, answer.spec_hash)
        # one peer's streams beyond 3 (2 at once + 1) close its oldest: the kept one, then the first raw one
        raw = [await client.call_binary_stream_handler(peer, PROTOCOL) for _ in range(4)]
        got["raw_last_closed"] = await _closed(raw[-1][1], 1.0)  # first: the server drops an idle one after 10 s
        got["raw_first_closed"] = await _closed(raw[0][1], 10.0)
        for _, _, writer in raw:
            writer.close()
        delta = await call_get_delta(streams, peer, ROUND, SPEC, timeout_s=20.0)  # a new stream replaces the kept one
        got["after_raw"] = (delta.sender, streams.num_opened)
        got["pulled_by_lp2p"] = (await json_line(proc, "pulled"))["pulled"]
        proc.stdin.close()
        got["end"] = await json_line(proc, "bytes_sent")
        got["exit"] = await asyncio.get_running_loop().run_in_executor(None, lambda: proc.wait(30))
        got["p2pd_sent"] = server.bytes_sent
        return got
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if client is not None:
            await client.shutdown()
        await server_p2p.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(240, method="signal")
def test_a_p2pd_peer_and_a_py_libp2p_peer_pull_each_others_deltas(tmp_path):
    why = libp2p_missing()
    if why:
        pytest.skip(why)
    ensure_identity(str(tmp_path))
    got = asyncio.run(_exchange(str(tmp_path / IDENTITY_FILE)))
    print(json.dumps(got, default=str))  # shown when an assertion fails
    ours = good_blob(ROUND, sender="lp2p")
    # p2pd pulled the py-libp2p peer's deltas: byte for byte, one stream for every request
    assert got["first"] == got["again"] == ("lp2p", ROUND, sha(ours))
    assert got["held"] == ("lp2p", ROUND + 1, sha(good_blob(ROUND + 1, sender="lp2p", seed=12)))
    assert got["never"] == got["old_life"] == "gone"
    assert got["streams_opened"] == 1
    assert got["run"] == (SPEC.run_id, SPEC.spec_hash.hex()[:16])
    assert got["raw_first_closed"] is True and got["raw_last_closed"] is False
    assert got["after_raw"] == ("lp2p", 2)
    # and the py-libp2p peer pulled p2pd's
    theirs = got["pulled_by_lp2p"]
    assert theirs["first"] == theirs["again"] == ["ok", "p2pd", ROUND, sha(good_blob(ROUND, sender="p2pd"))]
    assert theirs["never"][0] == theirs["old_life"][0] == "DeltaGone", theirs
    assert theirs["streams_opened"] == 1
    assert got["end"]["hivemind_loaded"] is False and got["exit"] == 0
    # what each side counts as served: two (then three) deltas, each with its 8-byte header
    assert got["end"]["bytes_sent"] >= 2 * (len(ours) + 8) and got["p2pd_sent"] >= 2 * (len(good_blob()) + 8)


@pytest.mark.slow
@pytest.mark.timeout(240, method="signal")
def test_the_py_libp2p_puller_names_every_bad_answer_and_carries_on(spawn_peers, tmp_path):
    """p2pd peers that answer garbage, a cut body, a length above the spec's limit, a delta
    of another round, or nothing: each pull fails with its named error within its timeout,
    and the good peer pulled after them still gives its delta."""
    why = libp2p_missing()
    if why:
        pytest.skip(why)
    ensure_identity(str(tmp_path))
    modes = ("good", "garbage", "truncated", "oversized", "wrong_round", "silent")
    _, maddrs = spawn_peers(os.path.join(PEERS, "serve_delta.py"), *modes)
    out = subprocess.run([sys.executable, LP2P, str(tmp_path / IDENTITY_FILE), "pull", ",".join(maddrs), "3"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    pulled = json.loads(out.stdout.strip().splitlines()[-1])["pulled"]
    print(json.dumps(dict(zip(modes + ("good again",), pulled))))  # shown when an assertion fails
    good = ["ok", "server", ROUND, sha(good_blob())]
    assert pulled[0] == pulled[-1] == good
    errors = {mode: result[:2] for mode, result in zip(modes[1:], pulled[1:-1])}
    assert errors["garbage"][0] in ("MalformedMessage", "VersionMismatch", "SpecMismatch"), errors
    assert errors["truncated"][0] == "TruncatedBody" and "announced bytes" in errors["truncated"][1]
    assert errors["oversized"][0] == "OversizedMessage" and "above the spec's limit" in errors["oversized"][1]
    assert errors["wrong_round"][0] == "MalformedMessage" and "delta of round" in errors["wrong_round"][1]
    assert errors["silent"][0] == "TimeoutError" and "no answer on locoswarm/delta/4 within 3 s" in errors["silent"][1]
