"""The harness for tests with real daemons: each `locoswarm node join` runs in its own
process group (killing the group at teardown takes its p2pd with it, whatever the test did
to the daemon itself), its stdout and stderr collected line by line, and its typed events
(node/events.py, `--events FILE`) followed from its event file: tests read what a daemon
reports from those events, not from its human output. Its logs (stderr) are read where a
test checks that something was logged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema

from locoswarm.node.control import STATUS_SCHEMA
from locoswarm.node.events import EventTail

LISTEN = "/ip4/127.0.0.1/tcp/0"
CLEAN_ROUNDS = 6
"""Rounds of the suite's one clean run of three peers (conftest.py `clean_three_peers`):
test_daemon.py checks it and test_faults.py compares its faulty runs, of this length, to it."""
EVIL_SCRIPT = os.path.join(os.path.dirname(__file__), "peers", "evil_delta.py")
FAULTY_SCRIPT = os.path.join(os.path.dirname(__file__), "peers", "faulty_node.py")
class Child:
    """A child process in its own process group, its stdout and stderr collected line by
    line by two threads; `wait_for` blocks until a stdout line matches."""

    def __init__(self, name: str, argv: list[str], *, stdin: int = subprocess.DEVNULL,
                 env: dict[str, str] | None = None, events: Path | None = None) -> None:
        """`events`: the daemon's event file (`--events`), None for a process without one."""
        self.name = name
        self._tail = None if events is None else EventTail(events)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env, start_new_session=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self._changed = threading.Condition()
        self._open = 2
        self._readers = [threading.Thread(target=self._read, args=(s, lines), daemon=True)
                         for s, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._readers:
            t.start()

    def _read(self, stream, lines: list[str]) -> None:
        for line in stream:
            with self._changed:
                lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._open -= 1
            self._changed.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def find(self, pattern: str) -> list[re.Match]:
        """Every stdout line so far that matches `pattern`."""
        rx = re.compile(pattern)
        with self._changed:
            return [m for m in map(rx.search, self.out) if m]

    def events(self, kind: str | None = None) -> list[dict]:
        """The daemon's events so far (of `kind`, e.g. "round"), in order."""
        assert self._tail is not None, f"{self.name} writes no events"
        self._tail.poll()
        return [e for e in self._tail.seen if kind is None or e["event"] == kind]

    def wait_event(self, kind: str, timeout_s: float, where=lambda e: True) -> dict:
        """The first event of `kind` for which `where(event)` holds, waiting up to `timeout_s`."""
        assert self._tail is not None, f"{self.name} writes no events"
        try:
            return self._tail.wait_for(lambda e: e["event"] == kind and where(e), timeout_s,
                                       lambda: self.proc.poll() is None)
        except (RuntimeError, TimeoutError) as e:
            raise AssertionError(f"{self.name} (exit {self.proc.poll()}): no fitting {kind} event: {e}\n"
                                 f"{self.tail()}") from None

    def wait_for(self, pattern: str, timeout_s: float, *, stderr: bool = False) -> re.Match:
        """The first stdout (or stderr) line matching `pattern`, waiting up to `timeout_s` for it."""
        rx = re.compile(pattern)
        lines = self.err if stderr else self.out
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for m in map(rx.search, lines):
                    if m:
                        return m
                if self._open == 0:
                    raise AssertionError(f"{self.name} ended (exit {self.proc.poll()}) without a line "
                                         f"/{pattern}/\n{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.name}: no line /{pattern}/ within {timeout_s} s\n{self.tail()}")
                self._changed.wait(left)

    def wait_exit(self, timeout_s: float) -> int:
        """The exit code, once the process has ended and its output is read to the end."""
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout_s} s\n{self.tail()}") from None
        for t in self._readers:
            t.join(10)
        return rc

    def stderr(self) -> str:
        with self._changed:
            return "\n".join(self.err)

    def tail(self, n: int = 30, warnings: int = 20) -> str:
        """The last `n` lines of each stream, and before them the last `warnings` WARNING and
        ERROR lines of stderr: a failure's reason is often a warning that a run of INFO
        lines (a round each) has pushed out of the tail."""
        with self._changed:
            said = [line for line in self.err[:-n] if " WARNING " in line or " ERROR " in line][-warnings:]
            return ((f"--- {self.name} warnings before the tail\n" + "\n".join(said) + "\n" if said else "") +
                    f"--- {self.name} stdout\n" + "\n".join(self.out[-n:]) +
                    f"\n--- {self.name} stderr\n" + "\n".join(self.err[-n:]))

    def reap(self) -> None:
        """Kill the whole process group (the daemon and its p2pd) and wait for the daemon."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


class Swarm:
    """Starts daemons (and other peer processes) for one test; `reap` ends them all."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.children: list[Child] = []

    def join(self, name: str, *args: str, peer: Child | str | None = None, run: Path | None = None,
             listen: str = LISTEN, env: dict[str, str] | None = None, faults: list[str] | None = None,
             wrap=lambda argv: argv) -> Child:
        """`locoswarm node join` with state directory root/name; `peer`: a multiaddr, or a
        daemon whose first address to join through; `env`: added to its environment;
        `faults`: run it through tests/peers/faulty_node.py with these faults injected;
        `wrap(argv)`: the command that runs it (e.g. inside a network namespace)."""
        command = ["-m", "locoswarm"] if faults is None else [FAULTY_SCRIPT, *faults, "--"]
        events = self.root / f"{name}.events.jsonl"
        events.unlink(missing_ok=True)  # a restart on the same state directory reports afresh
        argv = [sys.executable, "-u", *command, "node", "join", "--listen", listen,
                "--state-dir", str(self.root / name), "--threads", "1", "--events", str(events), *args]
        if peer is not None:
            argv += ["--peer", peer if isinstance(peer, str) else first_addr(peer)]
        if run is not None:
            argv += ["--run", str(run)]
        return self.start(name, wrap(argv), env=env, events=events)

    def start(self, name: str, argv: list[str], **kw) -> Child:
        child = Child(name, argv, **kw)
        self.children.append(child)
        return child

    def reap(self) -> None:
        for child in self.children:
            child.reap()


def first_addr(child: Child, timeout_s: float = 60) -> str:
    return child.wait_event("listening", timeout_s)["addrs"][0]


def peer_id(child: Child, timeout_s: float = 60) -> str:
    return child.wait_event("listening", timeout_s)["peer_id"]


def rounds(child: Child) -> list[tuple[int, int, int, float]]:
    """(round, deltas aggregated, participants, eval_loss) of each round the daemon ended."""
    nan = float("nan")
    return [(e["round"], e["deltas"], e["participants"], nan if e["eval_loss"] is None else e["eval_loss"])
            for e in child.events("round")]


def wait_round(child: Child, round_: int, timeout_s: float) -> dict:
    """The daemon's event for ending round `round_` (or a later one)."""
    return child.wait_event("round", timeout_s, lambda e: e["round"] >= round_)


def final(child: Child) -> tuple[int, float, str]:
    e = child.wait_event("final", 0)
    return e["round"], e["eval_loss"], e["digest"]


def served_digests(children: list[Child], round_: int) -> set[str]:
    """The digests of round `round_`'s outer state the daemons served."""
    return {e["digest"] for c in children for e in c.events("serving_state") if e["round"] == round_}


def wait_any(children: list[Child], kind: str, timeout_s: float, where=lambda e: True) -> tuple[Child, dict]:
    """The first of `children` to report an event of `kind` for which `where` holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        for child in children:
            found = [e for e in child.events(kind) if where(e)]
            if found:
                return child, found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no peer reported a fitting {kind} event within {timeout_s} s\n" +
                                 "\n".join(c.tail(10) for c in children))
        time.sleep(0.1)


def write_spec(path: Path, *, seed: int = 0, deadline_s: float | None = None, earn_rounds: int | None = None,
               check_agreement: float | None = None, anchors: list[str] | None = None,
               row_size: int | None = None) -> Path:
    """The default run spec with these changes, written as `locoswarm run init` writes it;
    `row_size`: tree rounds (rounds.exchange "tree") with rows of that size."""
    from locoswarm.node.spec import RoundPolicy, RunSpec, TrustPolicy
    from locoswarm.node.spec import write_spec as write

    spec = dataclasses.replace(RunSpec(), seed=seed, trust=TrustPolicy(anchors=list(anchors or [])))
    if deadline_s is not None:
        spec = dataclasses.replace(spec, rounds=RoundPolicy(deadline_s=deadline_s))
    if row_size is not None:
        spec = dataclasses.replace(spec, rounds=dataclasses.replace(spec.rounds, exchange="tree", row_size=row_size))
    robust = {k: v for k, v in (("earn_rounds", earn_rounds), ("check_agreement", check_agreement)) if v is not None}
    if robust:
        robust = dataclasses.replace(spec.diloco.robust, **robust)
        spec = dataclasses.replace(spec, diloco=dataclasses.replace(spec.diloco, robust=robust))
    write(spec, str(path))
    return path


def write_private_spec(path: Path, secret: str = "", work_bits: int = 0) -> Path:
    from locoswarm.node.spec import AccessPolicy, RunSpec
    from locoswarm.node.spec import write_spec as write

    write(dataclasses.replace(RunSpec(), access=AccessPolicy(secret=secret, work_bits=work_bits)), str(path))
    return path


def node_status(state_dir: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "locoswarm", "node", "status", "--state-dir", str(state_dir),
                           "--json"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    jsonschema.validate(status, STATUS_SCHEMA)  # the documented schema, on a live daemon's answer
    return status


def three_peers(swarm: Swarm, *args: str, run: Path | None = None) -> list[Child]:
    a = swarm.join("a", "--min-peers", "3", *args, run=run)
    return [a] + [swarm.join(n, "--min-peers", "3", *args, peer=a, run=run) for n in ("b", "c")]


def three_peers_faults(swarm: Swarm, faults: dict[str, list[str]], *args: str) -> list[Child]:
    """three_peers, with `faults[name]` injected into that peer (tests/peers/faulty_node.py)."""
    a = swarm.join("a", "--min-peers", "3", *args, faults=faults.get("a"))
    return [a] + [swarm.join(n, "--min-peers", "3", *args, peer=a, faults=faults.get(n)) for n in ("b", "c")]


def assert_clean_exit(child: Child, rc: int) -> None:
    assert rc == 0, f"{child.name} exited {rc}\n{child.tail()}"
    assert "Traceback" not in child.stderr(), child.tail()


@functools.lru_cache(maxsize=1)
def libp2p_missing() -> str | None:
    """Why py-libp2p cannot be used here, or None. Asked of a subprocess: importing it beside
    hivemind in the test process would collide protobuf descriptors."""
    try:
        out = subprocess.run([sys.executable, "-c", "import libp2p, trio"], capture_output=True, text=True,
                             timeout=120)
    except subprocess.TimeoutExpired:
        return "importing libp2p took over 120 s"
    return None if out.returncode == 0 else f"py-libp2p is not importable: {out.stderr.strip().splitlines()[-1:]}"


async def json_line(proc: subprocess.Popen, key: str, timeout_s: float = 60.0) -> dict:
    """The next JSON line of a helper process's stdout that holds `key` (read off the event
    loop); fails naming its exit and stderr when it ended first."""
    loop = asyncio.get_running_loop()
    while True:
        line = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), timeout_s)
        assert line, f"{proc.args[1] if len(proc.args) > 1 else proc.args} ended (exit {proc.poll()}): " \
                     f"{proc.stderr.read()[-3000:]}"
        fields = json.loads(line)
        if key in fields:
            return fields
