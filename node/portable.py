"""What differs between the systems a volunteer's node runs on (Linux, macOS, Windows), in one
place: the signals that stop it, the lock on its state directory, and whether a process is
alive. Everything else of the node is written once for all of them.

- **Stop signals.** SIGINT (Ctrl-C) and SIGTERM everywhere, and on Windows SIGBREAK too
  (Ctrl-Break, what a console's close and service wrappers send). An asyncio loop takes them
  with `add_signal_handler` on Unix; Windows' loops do not have it, so there the handler is
  a plain `signal.signal` one that hands the signal to the loop's thread.
- **The state directory's lock.** `flock` on Unix; `msvcrt.locking` on Windows, which locks a
  byte range (mandatory: nobody else may read it while held), so the byte locked lies past
  the pid the lock file holds, which `node status` reads while a daemon runs.
- **Is a process alive.** `os.kill(pid, 0)` asks that on Unix, but on Windows it terminates
  the process (any signal number but the console events calls TerminateProcess): psutil
  asks instead.

- **The transport.** hivemind (with its p2pd binary) builds for Linux and macOS only, and
  is not installed on Windows (pyproject.toml's environment marker): there `node join`, `demo`
  and `bench swarm` stop before anything starts, saying so (`transport_problem`), and
  `doctor`, `node status` and `config check` work (settings are checked without hivemind's
  multiaddr parser, node/checks.py). Until the py-libp2p transport exists, Windows runs the
  node under WSL.

Windows is not run here: the tests fake it (tests/test_portable.py), what each path does on
the real system is from Python's documentation of `msvcrt`, `signal` and `asyncio`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Callable

LOCK_OFFSET = 1 << 20
"""The byte of the lock file Windows locks: past anything written there (the holder's pid)."""


def windows() -> bool:
    return sys.platform == "win32"


def stop_signals() -> tuple[int, ...]:
    """The signals that stop a node here."""
    extra = (signal.SIGBREAK,) if windows() and hasattr(signal, "SIGBREAK") else ()
    return (signal.SIGINT, signal.SIGTERM) + extra


def on_stop_signals(loop: asyncio.AbstractEventLoop, handler: Callable[[int], None]) -> Callable[[], None]:
    """Have `handler(signum)` called on `loop`'s thread at each stop signal; returns what undoes
    it (the handlers before restored)."""
    sigs = stop_signals()
    try:
        for sig in sigs:
            loop.add_signal_handler(sig, handler, sig)
    except NotImplementedError:  # Windows' event loops (they refuse the first one)
        previous = {sig: signal.signal(sig, lambda signum, frame: loop.call_soon_threadsafe(handler, signum))
                    for sig in sigs}

        def undo() -> None:
            for sig, before in previous.items():
                signal.signal(sig, before)

        return undo

    def remove() -> None:
        for sig in sigs:
            loop.remove_signal_handler(sig)

    return remove


def try_lock(fd: int) -> bool:
    """Lock the open file `fd` for this process, without waiting; False when another holds it.
    The lock goes with the file descriptor's close (or the process's end)."""
    if windows():
        import msvcrt

        os.lseek(fd, LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def read_head(fd: int, size: int) -> bytes:
    """Up to `size` bytes from the start of the open file `fd`."""
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, size)


def replace_head(fd: int, data: bytes) -> None:
    """Make the open file `fd` hold `data` from its start, and nothing after it."""
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, data)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (any user's), without signalling it."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # alive, another user's
        return True


TRANSPORT_MISSING = ("the node's transport, hivemind 1.1.12 with its p2pd, is not installed here ({why}); it builds "
                     "for Linux and macOS only. On Windows, run locoswarm under WSL until the py-libp2p transport "
                     "lands (docs/hardware.md#operating-systems); elsewhere: pip install hivemind==1.1.12")


def transport_problem() -> str | None:
    """Why this machine cannot start a peer (hivemind, the one transport built, is not
    installed, as on Windows), None when it is. Found, not imported: `demo` and `bench swarm`
    ask in a process that only starts daemons, where importing hivemind.p2p cost 1.5 s."""
    import importlib.util

    try:
        found = importlib.util.find_spec("hivemind.p2p") is not None
        why = "no module named 'hivemind.p2p'"
    except ImportError as e:  # hivemind itself missing
        found, why = False, f"{type(e).__name__}: {e}"
    return None if found else TRANSPORT_MISSING.format(why=why)
