"""The daemon's file handling in one place: crash-safe writes (a temporary file beside the
target, fsync, then rename, so a reader sees the old file or the new one, never half of
one) and the one TOML reader, whose errors name the file and the line."""

from __future__ import annotations

import contextlib
import glob
import os
import sys
import tempfile
from typing import Any, Iterator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

TEMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside `path` for a writer that wants a file name (safetensors'
    `save_file`, say): created empty and owner-only (0600, as mkstemp makes it), fsynced
    and renamed onto `path` when the block ends, removed when it raises. `path`'s folder
    must exist. The name is unique, so two writers of one target never share a file."""
    target = os.path.abspath(path)
    directory = os.path.dirname(target)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(target)}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    try:
        yield tmp
        _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # The rename itself lives in the folder: without this a power cut could undo it.
    with contextlib.suppress(OSError):
        _fsync(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path: str, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` (text is written as UTF-8) to `path` atomically; its folder must exist."""
    payload = data.encode() if isinstance(data, str) else data
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(payload)


def leftover_temps(path: str | os.PathLike) -> list[str]:
    """Temporary files `atomic_path` made for `path` and never renamed (the writer was
    killed). Only the owner of `path` may remove them, when it knows no writer is active."""
    target = os.path.abspath(path)
    pattern = f".{glob.escape(os.path.basename(target))}.*{TEMP_SUFFIX}"
    return sorted(glob.glob(os.path.join(glob.escape(os.path.dirname(target)), pattern)))


def read_toml(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The table in the TOML file at `path`; a missing, unreadable or malformed file is a
    ValueError that names `what` (e.g. "run spec"), the file and, for bad TOML, the line."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        # tomllib's message ends with "(at line L, column C)".
        raise ValueError(f"{what} {path}: not valid TOML: {e}") from None
