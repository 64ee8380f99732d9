"""Every stop path of a real daemon ends within seconds (issue 21: once a SIGINT did not end
the process within 20 s, the leave checkpoint written, then a hang). One single-peer daemon
on loopback is started ten times on the same state directory, so that later lives resume
from a checkpoint, and SIGINTed at a moment drawn from a seeded RNG: while Python starts
(before the loop's handlers, before p2pd), while it dials an initial peer that refuses, while
it trains, right at a round's end (the boundary and the exchange of the next), and while a
checkpoint is being written. Each time it must exit 0 within STOP_BOUND_S of the signal, by
the graceful path (not StopWatch's forced exit), leaving neither itself nor its p2pd.

The bound is the requirement, so the test times it: the one timed assertion of this kind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from harness import Child, Swarm, assert_clean_exit
from locoswarm.node.control import read_status

NUM_STOPS = 5
"""Each moment once, at a random point inside it: ten lives cost 44–54 s of the 2-core CI's
suite, which runs near its 20-minute mark; twenty cost 81–94 s."""
STOP_BOUND_S = 10.0
"""From the SIGINT to the exit and p2pd's end (issue 21, item 3)."""
MOMENTS = ("startup", "dialling", "training", "round_end", "checkpoint")
REFUSING_PEER = "/ip4/127.0.0.1/tcp/9/p2p/QmVyDn5B191BryxCrR9zNzy1sEB65owr82vwcZjdQKGrwS"
"""An initial peer whose port refuses (discard, nothing listens): the start dials it again and again."""


@pytest.fixture
def swarm(tmp_path: Path):
    s = Swarm(tmp_path)
    yield s
    s.reap()
    for child in s.children[-3:]:  # pytest shows this only when the test failed
        print(child.tail(60))


def _group(pgid: int) -> list[psutil.Process]:
    """The processes of process group `pgid` still running (zombies waiting for a parent to
    reap them have ended): the daemon is its group's leader, p2pd its child in the group."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return found


def _catches_sigint(pid: int) -> bool:
    """Whether process `pid` has a handler for SIGINT (Linux: the SigCgt mask in /proc)."""
    with open(f"/proc/{pid}/status") as fh:
        caught = next(int(line.split()[1], 16) for line in fh if line.startswith("SigCgt:"))
    return bool(caught >> (signal.SIGINT - 1) & 1)


def _state(state_dir: Path) -> str | None:
    try:
        return read_status(str(state_dir), timeout_s=2)["state"]
    except RuntimeError:  # not up yet
        return None


def _reach(moment: str, daemon: Child, state_dir: Path, rng: random.Random) -> None:
    """Wait until the daemon is at `moment` (a random point of it)."""
    if moment == "startup":
        # Python's imports, the lock, hivemind's import, p2pd's start; from the moment the
        # interpreter handles SIGINT at all (before it, the signal kills any program).
        deadline = time.monotonic() + 30
        while not _catches_sigint(daemon.pid):
            assert time.monotonic() < deadline and daemon.proc.poll() is None, daemon.tail()
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 2.5))
    elif moment == "dialling":
        deadline = time.monotonic() + 60
        while _state(state_dir) != "dialling":
            assert time.monotonic() < deadline and daemon.proc.poll() is None, daemon.tail()
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 2.0))
    elif moment == "training":
        daemon.wait_event("round", 60)
        time.sleep(rng.uniform(0.05, 0.5))
    elif moment == "round_end":
        first = daemon.wait_event("round", 60)["round"]
        daemon.wait_event("round", 30, lambda e: e["round"] > first + rng.randrange(2))
    else:  # a checkpoint being written: its temporary directory exists until it is renamed into place
        daemon.wait_event("round", 60)
        checkpoints = state_dir / "checkpoints"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (checkpoints.is_dir() and any(
                p.name.startswith(".tmp-ckpt-") for p in checkpoints.iterdir())):
            time.sleep(0.002)


@pytest.mark.slow
@pytest.mark.timeout(600, method="signal")
def test_sigint_at_random_moments_ends_the_daemon_and_its_p2pd_with_exit_0_within_10_s(swarm: Swarm):
    rng = random.Random(21)
    state_dir = swarm.root / "a"
    took: list[tuple[str, float]] = []
    resumed = 0
    for i in range(NUM_STOPS):
        moment = MOMENTS[i % len(MOMENTS)]
        peer = REFUSING_PEER if moment == "dialling" else None
        daemon = swarm.join("a", "--device", "cpu", "--checkpoint-every", "1", peer=peer)
        _reach(moment, daemon, state_dir, rng)
        assert daemon.proc.poll() is None, (moment, daemon.tail())
        signalled = time.monotonic()
        daemon.proc.send_signal(signal.SIGINT)
        rc = daemon.wait_exit(STOP_BOUND_S)
        while _group(daemon.pid) and time.monotonic() - signalled < STOP_BOUND_S:
            time.sleep(0.05)
        took.append((moment, time.monotonic() - signalled))
        assert not _group(daemon.pid), (moment, _group(daemon.pid), daemon.tail())
        assert_clean_exit(daemon, rc)
        assert "forcing the exit" not in daemon.stderr(), (moment, daemon.tail())
        resumed += bool(daemon.events("resumed"))  # read before the next life's start clears the event file
        daemon.reap()  # its pipes
    print("SIGINT to exit, s:", ", ".join(f"{m} {s:.1f}" for m, s in took))
    assert max(s for _, s in took) < STOP_BOUND_S
    # Later lives took up the checkpoints of earlier ones: the resume path was stopped too.
    assert resumed, "no life resumed from a checkpoint"


@pytest.mark.timeout(60, method="signal")
def test_a_stop_that_hangs_is_forced_after_its_grace_with_the_stacks_shown_and_the_children_killed():
    """StopWatch, the stop's last resort: a process whose stop hangs (here: sleeps) exits with
    the stop's code once the grace is over, its threads' stacks on stderr, its child gone."""
    code = ("import subprocess, sys, time\n"
            "from locoswarm.node.lifecycle import StopWatch\n"
            "child = subprocess.Popen(['sleep', '60'])\n"
            "print(child.pid, flush=True)\n"
            "StopWatch().start(0.5, code=0)\n"
            "time.sleep(60)  # the hang\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=STOP_BOUND_S + 20)  # the import of torch takes seconds on 2 cores
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, err
    assert "the stop overran its grace: forcing the exit" in err, err
    assert "in _watch" in err and "<module>" in err, err  # every thread's stack, the hanging one's among them
    child = int(out.split()[0])
    deadline = time.monotonic() + 5
    while _running(child):
        assert time.monotonic() < deadline, "the child outlived the forced exit"
        time.sleep(0.05)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class ControlClient:
    """Named as hivemind's p2pd client is: the handler knows its reader by the coroutine's qualified name."""

    async def _read_from_persistent_conn(self):
        import asyncio

        raise asyncio.InvalidStateError("invalid state")

    async def _handler(self, reader, writer):
        await reader.readexactly(4)


@contextlib.contextmanager
def _lifecycle_log():
    """The messages node/lifecycle.py logs meanwhile, INFO and up."""
    logged: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: logged.append(record.getMessage())
    logger = logging.getLogger("locoswarm.node.lifecycle")
    level, logger.level = logger.level, logging.INFO
    logger.addHandler(handler)
    try:
        yield logged
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_an_answer_to_a_call_given_up_is_logged_not_shown_as_an_error():
    """hivemind's p2pd client sets the result of a call's future when p2pd answers, even one
    our stop cancelled: its reader task then dies with InvalidStateError, which asyncio
    printed with a traceback as the process ended (one of twenty SIGINTs while p2pd started,
    clean-clone CI). node/lifecycle.py quiet_abandoned_calls logs that one at INFO; any
    other task's exception still reaches the loop's handler."""
    import asyncio
    import gc

    from locoswarm.node.lifecycle import quiet_abandoned_calls

    async def other():
        raise asyncio.InvalidStateError("invalid state")

    seen = []

    async def go():
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda loop, context: seen.append(context["exception"]))
        quiet_abandoned_calls(loop)
        for coro in (ControlClient()._read_from_persistent_conn(), other()):
            task = asyncio.ensure_future(coro)
            await asyncio.wait([task])
            del task  # never retrieved: asyncio reports it when the task is collected
            gc.collect()

    with _lifecycle_log() as logged:
        asyncio.run(go())
    assert any("p2pd answered a call given up" in m for m in logged), logged
    assert len(seen) == 1 and isinstance(seen[0], asyncio.InvalidStateError), "the other task's reaches the handler"


def test_a_stream_closed_before_its_header_is_logged_not_shown_as_an_error():
    """A peer that opens a stream and closes it before sending a header leaves hivemind's p2pd
    stream handler (ControlClient._handler) with IncompleteReadError, which asyncio printed as
    "Unhandled exception in client_connected_cb" with a traceback as peers left at the end of a
    fault case (clean-clone CI). quiet_abandoned_calls logs that one at INFO; the same error from
    another server's handler still reaches the loop's handler."""
    import asyncio
    import tempfile

    from locoswarm.node.lifecycle import quiet_abandoned_calls

    async def other(reader, writer):
        await reader.readexactly(4)

    seen = []

    async def go(tmp: str):
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda loop, context: seen.append(context["exception"]))
        quiet_abandoned_calls(loop)
        for i, handler in enumerate((ControlClient()._handler, other)):
            path = f"{tmp}/{i}.sock"
            server = await asyncio.start_unix_server(handler, path=path)
            _, writer = await asyncio.open_unix_connection(path)
            writer.write(b"\x01")
            writer.close()
            await writer.wait_closed()
            for _ in range(100):  # the handler's task ends on the server's next turns of the loop
                await asyncio.sleep(0.01)
                if len(seen) + len(logged) > i:
                    break
            server.close()
            await server.wait_closed()

    with _lifecycle_log() as logged, tempfile.TemporaryDirectory() as tmp:
        asyncio.run(go(tmp))
    assert any("closed a stream before its header came (1 of 4 bytes read)" in m for m in logged), logged
    assert len(seen) == 1 and isinstance(seen[0], asyncio.IncompleteReadError), "the other server's reaches the handler"
