"""The locoswarm peers of this machine, so that the idle governor does not take another
peer for the volunteer's game: each daemon lists itself in a small per-user directory
while it runs, one file per process, named by its pid and holding its start time.

Why a registry and not the processes' command lines: a peer may be started as
`locoswarm node join`, `python -m locoswarm`, a service wrapper, a test script or a
frozen executable, and a command line can say "locoswarm" without being a peer; reading
another process's command line also needs /proc or platform calls that fail across users.
A file the daemon writes itself says exactly "this pid is a peer". A daemon killed with
SIGKILL leaves its file behind; the start time in it tells a live peer from a stale file or
a reused pid, and stale files are removed by the next reader. Where the directory cannot be
written the daemon logs it and runs on: other peers on its GPU then see it as a process
like any other and pause for it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

START_TIME_TOLERANCE_S = 0.01
"""psutil's start times are rounded differently on some platforms: within this they match."""


def registry_dir() -> Path | None:
    """This user's directory of running peers: under $XDG_RUNTIME_DIR (Linux's per-user
    runtime directory, emptied at logout) where set, else under the temporary directory in a
    folder named for the user (on macOS and Windows that directory is the user's own). A
    folder another user owns is passed over: it could list any pid as a peer. None where
    no folder is usable."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    bases = [Path(runtime) / "locoswarm"] if runtime else []
    bases.append(Path(tempfile.gettempdir()) / f"locoswarm-{_user()}")
    for base in bases:
        path = base / "peers"
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not hasattr(os, "getuid") or path.stat().st_uid == os.getuid():
                return path
        except OSError:
            continue
    return None


def _user() -> str:
    try:
        return str(os.getuid())
    except AttributeError:  # Windows
        return os.environ.get("USERNAME", "user")


def _start_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


class PeerListing:
    """This process listed as a peer of the machine while it runs (`with PeerListing(dir):`)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        self.path: Path | None = None

    def __enter__(self) -> PeerListing:
        directory = self.directory or registry_dir()
        if directory is None:
            log.warning("no folder to list this peer in: other peers on its GPU will pause for it")
            return self
        started = _start_time(os.getpid())
        path = directory / str(os.getpid())
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            path.write_text(f"{started!r}\n" if started is not None else "\n")
            self.path = path
        except OSError as e:
            log.warning("could not list this peer in %s (%s): other peers on its GPU will pause for it",
                        directory, e)
        return self

    def __exit__(self, *exc) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


def local_peer_pids(directory: Path | None = None) -> set[int]:
    """The pids of the peers of this machine that are running now (this one included if
    listed). A file whose process is gone, or whose pid now names a process started at
    another time, is stale: it is removed and its pid is not a peer."""
    directory = directory or registry_dir()
    if directory is None:
        return set()
    try:
        entries = list(directory.iterdir())
    except OSError:
        return set()
    pids = set()
    for entry in entries:
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            text = entry.read_text().strip()
        except OSError:
            continue
        started = _start_time(pid)
        if started is None:  # gone
            entry.unlink(missing_ok=True)
            continue
        try:
            listed = float(text) if text else None
        except ValueError:
            continue
        if listed is None or abs(listed - started) <= START_TIME_TOLERANCE_S:
            pids.add(pid)
        else:  # the pid was reused by another process since the peer listed it
            entry.unlink(missing_ok=True)
    return pids
