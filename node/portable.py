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
  is not installed on Windows (pyproject.toml's environment marker), where py-libp2p is: there
  `node join`, `demo` and `bench swarm` run their peers on py-libp2p (`transport_of`,
  node/network.py); with neither installed they stop before anything starts, saying so
  (`transport_problem`); `doctor`, `node status` and `config check` work (settings are checked
  without hivemind's multiaddr parser, node/checks.py).

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


TRANSPORTS = ("auto", "p2pd", "libp2p")
"""The `net.transport` setting's values: "p2pd" is hivemind's daemon (Linux, macOS); "libp2p"
is py-libp2p in this process (net/, any system, Windows among them); "auto" takes p2pd where
hivemind is installed, else py-libp2p."""
TRANSPORT_MISSING = ("no transport for a peer is installed here: neither hivemind 1.1.12 with its p2pd ({why}), which "
                     "builds for Linux and macOS, nor py-libp2p ({why_lp2p}); pip install locoswarm installs the one "
                     "this system takes (py-libp2p on Windows)")


def _found(module: str) -> str | None:
    """None when `module` can be imported here, else why not. Found, not imported: `demo`
    and `bench swarm` ask in a process that only starts daemons (importing hivemind.p2p
    costs 1.5 s), and hivemind and py-libp2p cannot both be imported in one process."""
    import importlib.util

    try:
        return None if importlib.util.find_spec(module) is not None else f"no module named {module!r}"
    except ImportError as e:  # its parent package missing
        return f"{type(e).__name__}: {e}"


def transport_of(setting: str = "auto") -> str:
    """The transport `setting` ("auto", "p2pd" or "libp2p") means on this machine: "auto"
    is "p2pd" where hivemind is installed, else "libp2p"."""
    if setting not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {setting!r}")
    if setting != "auto":
        return setting
    return "p2pd" if _found("hivemind.p2p") is None else "libp2p"


_HIVEMIND_KEPT_OUT = False


def keep_hivemind_out() -> None:
    """This process runs the py-libp2p transport: nothing may import hivemind from now on
    (its protobufs and py-libp2p's collide). The settings' checks then read multiaddrs
    without hivemind's parser (node/checks.py), as where hivemind is not installed."""
    global _HIVEMIND_KEPT_OUT
    _HIVEMIND_KEPT_OUT = True


def hivemind_kept_out() -> bool:
    return _HIVEMIND_KEPT_OUT


def transport_problem(setting: str = "auto") -> str | None:
    """Why this machine cannot start a peer on the transport `setting` names, None when it can."""
    hivemind, lp2p = _found("hivemind.p2p"), _found("libp2p") or _found("trio")
    if setting == "p2pd" and hivemind:
        return (f"the p2pd transport needs hivemind 1.1.12 with its p2pd ({hivemind}), which builds for Linux and "
                "macOS only: pip install hivemind==1.1.12, or choose --transport libp2p")
    if setting == "libp2p" and lp2p:
        return f"the libp2p transport needs py-libp2p ({lp2p}): pip install libp2p==0.8.1"
    if setting == "auto" and hivemind and lp2p:
        return TRANSPORT_MISSING.format(why=hivemind, why_lp2p=lp2p)
    return None
