"""Crash-safe checkpoints: exact round trip of a trainer's state, fallback past a corrupt
newest checkpoint, refusal of another spec's, pruning to the last K, a read-only folder
reported with the old checkpoints intact, SIGKILL at random moments of repeated writes never
leaving the latest checkpoint corrupt or missing, and a daemon killed with SIGKILL resuming
its round count (and keeping its round chain)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest
import torch

from locoswarm.node import replica_state
from locoswarm.node.checkpoint import CheckpointError, list_checkpoints, load_latest, save_checkpoint
from locoswarm.node.events import EventTail, read_events
from locoswarm.node.spec import RunSpec
from locoswarm.node.trainer import Trainer

SCRIPT = os.path.join(os.path.dirname(__file__), "peers", "write_checkpoints.py")
_spec = importlib.util.spec_from_file_location("write_checkpoints", SCRIPT)
writer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(writer)
HASH = writer.SPEC_HASH


def test_a_restored_trainer_continues_bit_for_bit_like_the_original(tmp_path):
    spec = replace(RunSpec(), num_shards=2, batch_size=2)
    stop = threading.Event()
    a = Trainer(spec, spec.hash(), shard=0, device=torch.device("cpu"))
    a.train_until(stop, lambda n: n >= 3 * a.tokens_per_step)
    work = a.end_round()
    a.apply(work, [a.decode(a.encode(work, "me"))], overlapped=False, earned={"me": work.tokens, "other": 5})
    a.train_until(stop, lambda n: True)
    tensors, meta = replica_state.checkpoint_state(a)
    save_checkpoint(str(tmp_path), a.round, tensors, meta, spec_hash=spec.hash())
    round_, tensors, meta = load_latest(str(tmp_path), spec.hash())
    b = Trainer(spec, spec.hash(), shard=0, device=torch.device("cpu"))
    bad = dict(meta, ledger=[["other", 5], ["me", work.tokens]])
    with pytest.raises(ValueError, match="checkpoint ledger entry 1 .*ascending"):
        replica_state.restore(b, tensors, bad)
    assert b.round == 0 and b.ledger.pairs() == (), "a refused checkpoint changes nothing"
    replica_state.restore(b, tensors, meta)
    assert round_ == a.round == b.round == 1
    assert b.ledger.pairs() == a.ledger.pairs() == (("me", work.tokens), ("other", 5))
    assert b.state_digest() == a.state_digest()
    for t in (a, b):
        t.train_until(stop, lambda n: True)
        work = t.end_round()
        t.apply(work, [t.decode(t.encode(work, "me"))], overlapped=False)
    for x, y in zip(list(a.model.parameters()) + a.outer.params, list(b.model.parameters()) + b.outer.params):
        assert torch.equal(x, y)


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    for r in (1, 2):
        save_checkpoint(str(tmp_path), r, writer.tensors_of(r), {"round": r}, spec_hash=HASH)
    newest = tmp_path / "ckpt-0000000002" / "tensors.safetensors"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    round_, tensors, meta = load_latest(str(tmp_path), HASH)
    assert round_ == 1 and meta == {"round": 1} and bool((tensors["a"] == 1).all())
    assert newest.exists()  # skipped, never deleted


def test_another_specs_checkpoint_is_not_taken(tmp_path):
    save_checkpoint(str(tmp_path), 5, writer.tensors_of(5), {}, spec_hash=HASH)
    assert load_latest(str(tmp_path), b"d" * 32) is None


def test_only_the_last_k_checkpoints_are_kept(tmp_path):
    for r in range(1, 6):
        save_checkpoint(str(tmp_path), r, writer.tensors_of(r), {}, spec_hash=HASH, keep=2)
    assert list_checkpoints(str(tmp_path)) == [4, 5]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]


@contextlib.contextmanager
def tmpfs(path, size: str):
    """A real tmpfs of `size` at `path`: a disk that fills up and can be remounted read-only.
    Skips where mounting is not allowed (it needs root with CAP_SYS_ADMIN)."""
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path) -> int:
    """Write zeros into a file under `path` until the disk is full; returns the bytes written."""
    written = 0
    with open(os.path.join(path, "filler"), "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * (1 << 20))
                fh.flush()
                written += 1 << 20
        except OSError as e:
            assert e.errno == 28, e
    return written


def keep_full(path, stop: threading.Event) -> None:
    """Fill the disk under `path` again, to the last byte, whenever room appears, until `stop`."""
    n = 0
    while not stop.is_set():
        if os.statvfs(path).f_bavail > 0:
            n += 1
            with open(os.path.join(path, f"filler-{n}"), "wb", buffering=0) as fh:
                for block in (1 << 20, 1 << 12, 1):  # down to the last byte
                    try:
                        while True:
                            fh.write(b"\0" * block)
                    except OSError as e:
                        assert e.errno == 28, e
        stop.wait(0.02)


def test_a_full_disk_is_reported_and_the_last_checkpoint_kept(tmp_path):
    with tmpfs(tmp_path / "disk", "16m") as disk:
        save_checkpoint(str(disk), 1, writer.tensors_of(1), {}, spec_hash=HASH)
        fill(disk)
        with pytest.raises(CheckpointError, match="No space left"):
            save_checkpoint(str(disk), 2, writer.tensors_of(2), {}, spec_hash=HASH)
        assert load_latest(str(disk), HASH)[0] == 1
        assert not [n for n in os.listdir(disk) if n.startswith(".tmp")]


def test_a_read_only_disk_is_reported_and_the_last_checkpoint_kept(tmp_path):
    with tmpfs(tmp_path / "disk", "16m") as disk:
        save_checkpoint(str(disk), 1, writer.tensors_of(1), {}, spec_hash=HASH)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        with pytest.raises(CheckpointError, match="Read-only file system"):
            save_checkpoint(str(disk), 2, writer.tensors_of(2), {}, spec_hash=HASH)
        assert load_latest(str(disk), HASH)[0] == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
def test_a_read_only_folder_is_reported_and_the_last_checkpoint_kept(tmp_path):
    save_checkpoint(str(tmp_path), 1, writer.tensors_of(1), {}, spec_hash=HASH)
    os.chmod(tmp_path, 0o500)
    try:
        with pytest.raises(CheckpointError, match="not written"):
            save_checkpoint(str(tmp_path), 2, writer.tensors_of(2), {}, spec_hash=HASH)
    finally:
        os.chmod(tmp_path, 0o700)
    assert load_latest(str(tmp_path), HASH)[0] == 1


@pytest.mark.timeout(120)
def test_sigkill_during_repeated_writes_never_leaves_a_corrupt_or_missing_latest_checkpoint(tmp_path):
    rng = random.Random(7)
    last = 0
    # Each attempt's writer is a fresh fork of one server that imported torch once.
    server = subprocess.Popen([sys.executable, SCRIPT, "--fork"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        for attempt in range(15):
            server.stdin.write(f"{tmp_path}\n")
            server.stdin.flush()
            ready, pid = server.stdout.readline().split()
            assert ready == "ready"
            try:
                time.sleep(rng.uniform(0.05, 0.6))
            finally:
                os.kill(int(pid), signal.SIGKILL)
            assert server.stdout.readline().split() == ["ended", pid, str(int(signal.SIGKILL))]
            found = load_latest(str(tmp_path), HASH)
            if found is None:
                assert last == 0, f"attempt {attempt}: the checkpoints of earlier runs are gone"
                continue
            round_, tensors, meta = found
            assert meta == {"round": round_}
            assert bool((tensors["a"] == round_).all()) and bool((tensors["b"] == round_).all())
            assert round_ >= last, f"attempt {attempt}: latest went back from {last} to {round_}"
            last = round_
    finally:
        server.kill()
        server.wait(timeout=10)
    assert last > 0, "no checkpoint was ever completed"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_daemon_killed_with_sigkill_resumes_its_round_count(tmp_path):
    events = tmp_path / "events.jsonl"
    argv = [sys.executable, "-u", "-m", "locoswarm", "node", "join", "--listen", "/ip4/127.0.0.1/tcp/0",
            "--state-dir", str(tmp_path / "node"), "--threads", "1", "--checkpoint-every", "1", "--eval-every", "0",
            "--events", str(events)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                             start_new_session=True)
    try:
        EventTail(events).wait_for(lambda e: e["event"] == "round" and e["round"] >= 4, 120,
                                   lambda: first.poll() is None)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
    saved = list_checkpoints(str(tmp_path / "node" / "checkpoints"))
    assert saved and max(saved) >= 3, saved
    # The round chain of the checkpointed state is kept (the resumed peer shows it again in
    # its record and so takes part in split verdicts: node/lineage.py).
    from locoswarm.node.spec import RunSpec as Spec

    chain = load_latest(str(tmp_path / "node" / "checkpoints"), Spec().hash())[2]["chain"]
    assert re.fullmatch(r"[0-9a-f]{32}", chain), chain
    events.unlink()
    second = subprocess.run(argv + ["--max-rounds", "1"], capture_output=True, text=True, env=env, timeout=120)
    assert second.returncode == 0, second.stderr[-2000:]
    reported = read_events(events)
    (resumed,) = [e["round"] for e in reported if e["event"] == "resumed"]
    assert resumed == max(saved)
    (trained,) = [e["round"] for e in reported if e["event"] == "round"]
    assert trained == resumed


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_daemon_whose_disk_fills_up_says_so_keeps_training_and_keeps_its_last_checkpoint(tmp_path):
    """The state directory on a real tmpfs, filled to the last byte once round 1 is done:
    the daemon logs why each later checkpoint (and the final model) was not written, trains
    to --max-rounds, exits 0, and its newest checkpoint still loads."""
    with tmpfs(tmp_path / "disk", "128m") as disk:
        state = disk / "node"
        events = tmp_path / "events.jsonl"  # off the full disk
        argv = [sys.executable, "-u", "-m", "locoswarm", "node", "join", "--listen", "/ip4/127.0.0.1/tcp/0",
                "--state-dir", str(state), "--threads", "1", "--checkpoint-every", "1", "--eval-every", "0",
                "--max-rounds", "4", "--events", str(events)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
        try:
            EventTail(events).wait_for(lambda e: e["event"] == "round" and e["round"] >= 1, 120,
                                       lambda: proc.poll() is None)
            # Keep the disk full until the daemon exits: a checkpoint still being written
            # when it first fills fails and deletes its files, which frees room again,
            # enough for the final model to fit.
            stop = threading.Event()
            keeper = threading.Thread(target=keep_full, args=(disk, stop), daemon=True)
            keeper.start()
            try:
                out, err = proc.communicate(timeout=150)
            finally:
                stop.set()
                keeper.join(timeout=10)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        assert proc.returncode == 0, err[-2000:]
        assert re.search(r"checkpoint of round \d+ not written to .*No space left on device", err), err[-2000:]
        assert "final model not written" in err
        assert [e["round"] for e in read_events(events) if e["event"] == "round"] == [0, 1, 2, 3], out
        found = load_latest(str(state / "checkpoints"), RunSpec().hash())
        assert found is not None and 1 <= found[0] <= 4
        assert not [n for n in os.listdir(state / "checkpoints") if n.startswith(".tmp")]
