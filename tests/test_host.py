"""The state directory's identity key: created before p2pd starts, owner-only (0600) from
the first byte, a valid libp2p key, stable across restarts; one found readable by others is
restricted."""

from __future__ import annotations

import os
import stat

from hivemind.p2p import PeerID

from locoswarm.node.files import TEMP_SUFFIX
from locoswarm.node.statedir import IDENTITY_FILE, open_state_dir


def _open(path) -> int:
    fd = open_state_dir(str(path))
    os.close(fd)  # releases the lock
    return fd


def test_a_new_identity_is_owner_only_and_stable(tmp_path):
    _open(tmp_path / "s")
    key = tmp_path / "s" / IDENTITY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    first = PeerID.from_identity(key.read_bytes())
    _open(tmp_path / "s")
    assert PeerID.from_identity(key.read_bytes()) == first
    assert not [n for n in os.listdir(tmp_path / "s") if n.endswith(".tmp")]


def test_an_identity_readable_by_others_is_restricted(tmp_path):
    _open(tmp_path / "s")
    key = tmp_path / "s" / IDENTITY_FILE
    os.chmod(key, 0o644)
    _open(tmp_path / "s")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_a_leftover_temporary_key_from_a_crash_is_replaced(tmp_path):
    state = tmp_path / "s"
    state.mkdir()
    leftover = state / f".{IDENTITY_FILE}.k1ll3d{TEMP_SUFFIX}"  # as files.atomic_path names them
    leftover.write_bytes(b"half a key")
    _open(state)
    PeerID.from_identity((state / IDENTITY_FILE).read_bytes())
    assert sorted(os.listdir(state)) == [IDENTITY_FILE, "lock"]


def test_a_start_whose_initial_peers_are_all_gone_dials_the_peers_seen_last_whatever_p2pds_last_line(tmp_path,
                                                                                                        monkeypatch):
    """hivemind's start error carries p2pd's last line: the bootstrap failure itself, or on a
    fast machine the routing table's refresh that found no peer, logged as p2pd went down.
    Both mean no initial peer answered: the peers seen last are dialed too (on 16 cores the
    second used to end the daemon, "p2pd did not start"). Any other failure ends it."""
    import asyncio
    import json

    import pytest
    from hivemind.p2p import P2P
    from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError

    from locoswarm.node import ports
    from locoswarm.node.host import NetworkConfig, NodeError, start_p2p

    state = tmp_path / "s"
    _open(state)
    seen = "/ip4/127.0.0.1/tcp/4002/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
    (state / ports.PEERS_FILE).write_text(json.dumps([seen]))
    gone = "/ip4/127.0.0.1/tcp/4001/p2p/QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN"
    net = NetworkConfig(listen=["/ip4/127.0.0.1/tcp/0"], peers=[gone], keep_ports=False)
    tried: list[list[str]] = []

    def starting(*errors: str):
        async def create(*, initial_peers=None, **kw):
            tried.append(list(initial_peers or []))
            if len(tried) <= len(errors):
                raise P2PDaemonError(f"Daemon failed to start: {errors[len(tried) - 1]}")
            return "p2pd"
        return create

    refresh = ('{"level":"warn","logger":"dht/RtRefreshManager","msg":"failed when refreshing routing table",'
               '"error":"failed to query for self, err=failed to find any peer in table"}')
    for last_line in ("failed to connect to bootstrap peers", refresh):
        tried.clear()
        monkeypatch.setattr(P2P, "create", starting(last_line))
        assert asyncio.run(start_p2p(str(state), net, asyncio.Event())) == ("p2pd", [gone, seen])
        assert tried == [[gone], [gone, seen]]
    tried.clear()
    monkeypatch.setattr(P2P, "create", starting("some other failure"))
    with pytest.raises(NodeError, match="p2pd did not start: .*some other failure"):
        asyncio.run(start_p2p(str(state), net, asyncio.Event()))


def test_a_stop_while_p2pd_starts_cancels_the_start_and_the_dial_attempts_are_counted(tmp_path, monkeypatch):
    """p2pd's start waits up to 15 s for a bootstrap peer that does not answer: a stop must
    not wait it out. The attempts are counted for node status (dialling since …, N attempts)."""
    import asyncio

    from hivemind.p2p import P2P

    from locoswarm.node.host import Dialling, NetworkConfig, start_p2p

    state = tmp_path / "s"
    _open(state)
    silent = "/ip4/127.0.0.1/tcp/4001/p2p/QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN"
    net = NetworkConfig(listen=["/ip4/127.0.0.1/tcp/0"], peers=[silent], keep_ports=False)
    cancelled = []

    async def go():
        started = asyncio.Event()

        async def create(**kw):
            started.set()
            try:
                await asyncio.sleep(3600)  # a bootstrap peer that never answers
            except asyncio.CancelledError:
                cancelled.append(kw["initial_peers"])
                raise

        monkeypatch.setattr(P2P, "create", create)
        stop, dialling = asyncio.Event(), Dialling()
        task = asyncio.ensure_future(start_p2p(str(state), net, stop, dialling))
        await started.wait()
        assert dialling.attempts == 1 and dialling.since is not None
        stop.set()
        return await asyncio.wait_for(task, 5)

    assert asyncio.run(go()) is None
    assert cancelled == [[silent]]
