"""node/portable.py: what differs on Windows, with Windows faked (it is not run here): the
state directory's lock through msvcrt's byte-range lock, stop signals on an event loop that
has no add_signal_handler, and a liveness check that never signals the process. The Unix
paths run for real. Without hivemind (as Windows installs the package) the commands that
start peers stop naming the missing transport, and the others work."""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import signal
import subprocess
import sys
import time
import types

import pytest

from harness import libp2p_missing

from locoswarm.node import portable
from locoswarm.node.control import lock_holder
from locoswarm.node.statedir import NodeError, lock_state_dir


class _Msvcrt(types.ModuleType):
    """msvcrt.locking as Windows documents it: a non-blocking lock of `nbytes` from the file's
    current position that raises OSError while another open file holds it (modelled with
    flock, which is exclusive across open files of one process too)."""

    LK_NBLCK = 2

    def __init__(self) -> None:
        super().__init__("msvcrt")
        self.locked: list[tuple[int, int]] = []

    def locking(self, fd: int, mode: int, nbytes: int) -> None:
        assert mode == self.LK_NBLCK
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError is an OSError, as Windows raises
        self.locked.append((os.lseek(fd, 0, os.SEEK_CUR), nbytes))


@pytest.fixture
def on_windows(monkeypatch):
    fake = _Msvcrt()
    monkeypatch.setattr(portable, "windows", lambda: True)
    monkeypatch.setitem(sys.modules, "msvcrt", fake)
    return fake


def test_a_state_directory_locked_on_windows_refuses_a_second_daemon_naming_the_first_and_frees_on_close(
        tmp_path, on_windows, monkeypatch):
    def no_signals(pid, sig):  # on Windows os.kill(pid, 0) would terminate the process
        raise AssertionError(f"os.kill({pid}, {sig}) called")

    monkeypatch.setattr(os, "kill", no_signals)
    fd = lock_state_dir(str(tmp_path))
    try:
        pid = str(os.getpid()).encode()
        assert (tmp_path / "lock").read_bytes() == pid
        # The locked byte lies past the pid, which `node status` reads while the daemon runs.
        assert on_windows.locked == [(portable.LOCK_OFFSET, 1)] and portable.LOCK_OFFSET >= len(pid)
        assert lock_holder(str(tmp_path)) == os.getpid()
        with pytest.raises(NodeError, match=rf"in use by another running node \(pid {os.getpid()}\)"):
            lock_state_dir(str(tmp_path))
    finally:
        os.close(fd)
    os.close(lock_state_dir(str(tmp_path)))  # free again once the holder closed it


def test_a_lock_file_of_a_dead_daemon_names_nobody_and_a_zombie_is_not_alive(tmp_path):
    import psutil

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 60
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:  # exited, not yet reaped
        assert time.monotonic() < deadline, "the child never exited"
        time.sleep(0.01)
    assert not portable.pid_alive(child.pid)
    child.wait()
    assert not portable.pid_alive(child.pid) and portable.pid_alive(os.getpid())
    (tmp_path / "lock").write_text(str(child.pid))
    assert lock_holder(str(tmp_path)) is None


class _WindowsLoop(asyncio.SelectorEventLoop):
    """An event loop without signal handlers, as Windows' are."""

    def add_signal_handler(self, sig, callback, *args):
        raise NotImplementedError


@pytest.mark.parametrize("loop_kind", ["unix", "windows"])
def test_a_stop_signal_reaches_the_loops_handler_and_the_handlers_before_come_back(loop_kind):
    loop = _WindowsLoop() if loop_kind == "windows" else asyncio.new_event_loop()
    before = {sig: signal.getsignal(sig) for sig in portable.stop_signals()}
    got: list[int] = []

    async def main() -> None:
        release = portable.on_stop_signals(loop, got.append)
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                os.kill(os.getpid(), sig)
                for _ in range(200):
                    if len(got) and got[-1] == sig:
                        break
                    await asyncio.sleep(0.01)
        finally:
            release()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert got == [signal.SIGTERM, signal.SIGINT]
    assert {sig: signal.getsignal(sig) for sig in portable.stop_signals()} == before


def test_ctrl_break_stops_a_node_on_windows(monkeypatch):
    monkeypatch.setattr(signal, "SIGBREAK", 21, raising=False)
    assert portable.stop_signals() == (signal.SIGINT, signal.SIGTERM)
    monkeypatch.setattr(portable, "windows", lambda: True)
    assert portable.stop_signals() == (signal.SIGINT, signal.SIGTERM, 21)


_HIDDEN = """
import sys

HIDDEN = tuple(sys.argv[1].split(","))


class Hide:
    def find_spec(self, name, path=None, target=None):  # as where these packages are not installed
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Hide())
from locoswarm.cli.main import main

sys.argv = ["locoswarm"] + sys.argv[2:]
main()
"""


def _cli_without(tmp_path, hidden: str):
    script = tmp_path / "hidden.py"
    script.write_text(_HIDDEN)
    state = tmp_path / "state"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), hidden, *args], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path, env={**os.environ, "LOCOSWARM_STATE_DIR": str(state)})
    return cli, state


@pytest.mark.timeout(240)
def test_without_any_transport_the_commands_that_start_peers_stop_naming_both_and_the_others_work(tmp_path):
    """Neither hivemind nor py-libp2p installed: `node join` and `demo` exit 2 naming both
    before anything is made, `doctor` checks the settings and the device and says it cannot
    join yet (exit 1), `node status` answers."""
    cli, state = _cli_without(tmp_path, "hivemind,libp2p")
    for args in (("node", "join", "--max-rounds", "1"), ("demo", "--peers", "1", "--rounds", "1")):
        out = cli(*args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert "hivemind 1.1.12 with its p2pd" in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert args[0] == "demo" or "nor py-libp2p" in out.stderr, out.stderr
    assert not state.exists(), "a state directory was made for a daemon that cannot start"
    doctor = cli("doctor")
    assert doctor.returncode == 1 and "Traceback" not in doctor.stderr, doctor.stderr
    assert "once it has a transport" in doctor.stdout and "not checked: no transport" in doctor.stdout, doctor.stdout
    assert re.search(r"^transport +no transport for a peer is installed here", doctor.stdout, re.M), doctor.stdout
    status = cli("node", "status")
    assert status.returncode == 1 and "no daemon is running" in status.stderr and str(state) in status.stderr, \
        status.stderr


@pytest.mark.timeout(240)
def test_without_hivemind_as_on_windows_a_peer_runs_on_py_libp2p_and_a_dht_client_needs_a_swarm_to_join(tmp_path):
    """hivemind not installed, py-libp2p installed (Windows): `node join` takes py-libp2p; as a
    DHT client only (--dht-client) and given no peer to join through, it exits 2 saying it
    cannot start a swarm, before anything is made; `doctor` names py-libp2p. (A py-libp2p
    peer that serves the DHT starts a swarm: tests/test_net_daemon.py.)"""
    if libp2p_missing():
        pytest.skip(libp2p_missing())
    cli, state = _cli_without(tmp_path, "hivemind")
    out = cli("node", "join", "--max-rounds", "1", "--dht-client")
    assert out.returncode == 2 and "cannot start one" in out.stderr and "--peer" in out.stderr, out.stderr
    assert not state.exists(), "a state directory was made for a daemon that cannot start"
    doctor = cli("doctor", "--no-network")
    assert doctor.returncode == 0 and re.search(r"^transport +py-libp2p \d", doctor.stdout, re.M), doctor.stdout


@pytest.mark.parametrize("maddr", [
    "/ip4/203.0.113.5/tcp/31337", "/ip4/0.0.0.0/udp/0/quic-v1", "/ip6/::1/tcp/4001/ws", "/dns4/example.org/tcp/443/wss",
    "/ip4/127.0.0.1/tcp/5/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",
    "/ip4/127.0.0.1/tcp/5/ipfs/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",
    "/ip4/127.0.0.1/tcp/5/p2p/12D3KooWQYV9dGMFoRzNStwpXztXaBUjtPqi6aU76ZgUriHhKust/p2p-circuit",
    "/ip4/1.2.3/tcp/5", "/ip4/127.0.0.1/sctp/5", "/ip4/127.0.0.1/xyz/5", "/ip4/127.0.0.1/tcp/5/p2p/not-a-peer",
    "/ip4/127.0.0.1/tcp",
    "/ip6/1.2.3.4/tcp/5", "/ip4/127.0.0.1/tcp/5/p2p/Qm0OIl",
])
def test_multiaddrs_read_without_hivemind_as_hiveminds_parser_reads_them(maddr):
    """Settings are checked where hivemind is missing too (node/checks.py `_plain_names`):
    the same protocol names as hivemind's parser for the addresses a swarm uses, and an
    error for every address it refuses."""
    from hivemind.utils.multiaddr import Multiaddr

    from locoswarm.node.checks import SettingError, _plain_names

    try:
        expected = [p.name for p in Multiaddr(maddr).protocols()]
    except Exception:
        expected = None
    if expected is None:
        with pytest.raises(SettingError):
            _plain_names("peers", maddr)
    else:
        assert _plain_names("peers", maddr) == expected
