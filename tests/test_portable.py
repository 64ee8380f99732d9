"""node/portable.py: what differs on Windows, with Windows faked (it is not run here): the
state directory's lock through msvcrt's byte-range lock, stop signals on an event loop that
has no add_signal_handler, and a liveness check that never signals the process. The Unix
paths run for real."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import subprocess
import sys
import time
import types

import pytest

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
