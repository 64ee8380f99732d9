"""Crash-safe checkpoints: tensors as safetensors plus JSON metadata, never pickle, since a
checkpoint is a file we read back and files are untrusted.

A checkpoint is a directory `ckpt-<round>` under `<state-dir>/checkpoints` holding
`tensors.safetensors` and `meta.json` (format version, round, spec hash, SHA-256 of the
tensors file, and the caller's metadata). It is written into a temporary directory beside
it, each file fsynced, then renamed into place and the parent fsynced: a SIGKILL or power
loss at any moment leaves either the previous checkpoints alone or the new one complete.
Loading walks from the newest down and takes the first whose metadata parses, whose spec
hash is ours and whose tensors match their digest; anything else is logged and skipped,
never deleted. The last `keep` complete checkpoints are kept.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from locoswarm.node import replica_state

FORMAT_VERSION = 1
TENSORS, META = "tensors.safetensors", "meta.json"
_NAME = re.compile(r"^ckpt-(\d{10})$")
log = logging.getLogger(__name__)


class CheckpointError(Exception):
    """A checkpoint could not be written; the previous ones are intact."""


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(root: str, round_: int, tensors: dict[str, torch.Tensor], meta: dict, *,
                    spec_hash: bytes, keep: int = 3) -> str:
    """Write checkpoint `round_` atomically under `root`; returns its directory. Raises
    CheckpointError (naming the cause: disk full, read-only …) with nothing half-written."""
    final = os.path.join(root, f"ckpt-{round_:010d}")
    tmp = None
    try:
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=root, prefix=".tmp-ckpt-")
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(tmp, TENSORS))
        with open(os.path.join(tmp, TENSORS), "rb+") as fh:
            os.fsync(fh.fileno())
        body = {"format": FORMAT_VERSION, "round": round_, "spec_hash": spec_hash.hex(),
                "tensors_sha256": _sha256(os.path.join(tmp, TENSORS)), "meta": meta}
        with open(os.path.join(tmp, META), "w") as fh:
            json.dump(body, fh)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if os.path.exists(final):
            shutil.rmtree(final)  # the same round again (after a resume): replace it whole
        os.rename(tmp, final)
        tmp = None
        _fsync_dir(root)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error
        why = getattr(e, "strerror", None) or str(e)
        raise CheckpointError(f"checkpoint of round {round_} not written to {root}: {why}") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(os.path.join(root, f"ckpt-{old:010d}"), ignore_errors=True)
    return final


def list_checkpoints(root: str) -> list[int]:
    """Rounds of the complete-looking checkpoint directories, oldest first."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    return sorted(int(m[1]) for m in map(_NAME.match, names) if m)


def load_latest(root: str, spec_hash: bytes) -> tuple[int, dict[str, torch.Tensor], dict] | None:
    """(round, tensors, meta) of the newest valid checkpoint of this spec, or None."""
    for round_ in reversed(list_checkpoints(root)):
        path = os.path.join(root, f"ckpt-{round_:010d}")
        try:
            with open(os.path.join(path, META)) as fh:
                body = json.load(fh)
            if not isinstance(body, dict) or body.get("format") != FORMAT_VERSION:
                raise ValueError(f"format {body.get('format') if isinstance(body, dict) else '?'!r}")
            if body.get("spec_hash") != spec_hash.hex():
                raise ValueError("written under another run spec")
            if body.get("round") != round_:
                raise ValueError(f"meta says round {body.get('round')!r}")
            if _sha256(os.path.join(path, TENSORS)) != body.get("tensors_sha256"):
                raise ValueError("tensors do not match their digest")
            try:
                tensors = load_file(os.path.join(path, TENSORS))
            except Exception as e:  # safetensors' own error types: the file is unusable either way
                raise ValueError(f"tensors unreadable: {e}") from None
            if not isinstance(body.get("meta"), dict):
                raise ValueError("no metadata")
            return round_, tensors, body["meta"]
        except (OSError, ValueError, json.JSONDecodeError) as e:
            log.warning("checkpoint %s skipped: %s", path, e)
    return None


class Checkpointer:
    """The daemon's use of checkpoints: resume at start, write at round boundaries. The
    state is copied on the training thread (`in_pool`), at a boundary where nothing else
    runs, and written by a worker thread while training goes on; a write still running
    when the next is due makes that one skip."""

    def __init__(self, root: str, spec_hash: bytes, *, keep: int) -> None:
        self.root = root
        self.spec_hash = spec_hash
        self.keep = keep
        self.round: int | None = None
        """Round of the last checkpoint written or resumed from."""
        self.error: str | None = None
        """Why the last write failed (None: it did not)."""
        self.resumed_meta: dict = {}
        """The metadata of the checkpoint resumed from (empty: none)."""
        self._task: asyncio.Future | None = None

    async def resume(self, trainer, in_pool: Callable) -> int | None:
        """Restore the newest valid checkpoint into `trainer`; its round, or None."""
        found = await asyncio.to_thread(load_latest, self.root, self.spec_hash)
        if found is None:
            return None
        round_, tensors, meta = found
        try:
            await in_pool(replica_state.restore, trainer, tensors, meta)
        except ValueError as e:
            log.warning("checkpoint of round %d not used: %s; starting from the swarm's state", round_, e)
            return None
        self.round, self.resumed_meta = round_, meta
        return round_

    async def write(self, trainer, in_pool: Callable, *, wait: bool = False, extra: dict | None = None) -> None:
        """`extra`: metadata of the caller's, stored beside the trainer's (the daemon's round chain)."""
        if self._task is not None and not self._task.done():
            if not wait:
                return
            await self._task
        tensors, meta = await in_pool(replica_state.checkpoint_state, trainer)
        meta = {**(extra or {}), **meta}

        async def go() -> None:
            try:
                await asyncio.to_thread(save_checkpoint, self.root, meta["round"], tensors, meta,
                                        spec_hash=self.spec_hash, keep=self.keep)
                self.round, self.error = meta["round"], None
            except CheckpointError as e:
                # A full or read-only disk: say so, keep the last good checkpoint, keep training.
                self.error = str(e)
                log.error("%s; the last good checkpoint is kept", e)

        self._task = asyncio.ensure_future(go())
        if wait:
            await self._task
