"""Churn for `locoswarm bench swarm --churn SECONDS` (and fake identities for `--fakes K`): while the swarm trains, a random peer
is SIGKILLed (with its p2pd, as a machine that dies) at exponentially distributed intervals
of mean SECONDS, a Poisson process, and started again at once on its state directory
(bench/swarm.py `LocalSwarm.restart`), so it resumes from its checkpoint and takes the
swarm's state. The same swarm runs a clean phase first and a churn phase after it, and the
rate at which the swarm's round advances is measured in each.

Phases, by the swarm's round (so a small run in a test and a long run on a fast machine
split the same way): with R rounds, the clean phase runs from the end of round 0 (after the
start-up and the wait for every peer) to the end of round C = R // 4, the churn phase from
there to the end of round E = R − R // 4, and the last R // 4 rounds are a tail without
kills in which the last restarted peer catches up and every peer runs on to round R
(`--until-round`), so the swarm ends on one round and one digest.

Rate of a phase from round a to round b: 60 · (b − a) / (t(b) − t(a)) rounds per minute,
where t(r) is the moment the swarm first completed round r: the earliest `time` of a `round`
event for round r or later from any peer (any life of it). The swarm's round is the highest
round any peer completed, so a restarted peer redoing old rounds does not move it.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from locoswarm.bench.fake_peer import waits_to_be_told
from locoswarm.bench.swarm import LocalSwarm
from locoswarm.bench.swarmpeer import Peer
from locoswarm.node.control import read_status

MIN_CHURN_ROUNDS = 8
"""Fewest rounds a churn run takes: two each for the clean phase and the tail, four churned."""


@dataclass(frozen=True, slots=True)
class Phases:
    """Round boundaries of a churn run of `rounds` rounds (see the module docstring)."""

    rounds: int
    clean_end: int
    """C: the clean phase runs from the end of round 0 to the end of round C."""
    churn_end: int
    """E: the churn phase runs from the end of round C to the end of round E."""

    @classmethod
    def of(cls, rounds: int) -> "Phases":
        if rounds < MIN_CHURN_ROUNDS:
            raise ValueError(f"--rounds must be >= {MIN_CHURN_ROUNDS} with --churn, got {rounds}")
        return cls(rounds=rounds, clean_end=rounds // 4, churn_end=rounds - rounds // 4)


def first_completed(peers: list[Peer], round_: int) -> float:
    """t(r): when the swarm first completed round `round_` (Unix s); nan before it has."""
    return min((x.ended_unix_s for p in peers for x in p.rounds if x.round >= round_), default=float("nan"))


def swarm_round(peers: list[Peer]) -> int:
    """The highest round any peer completed so far (−1: none yet)."""
    return max((x.round for p in peers for x in p.rounds), default=-1)


def rate_per_minute(peers: list[Peer], start_round: int, end_round: int) -> float:
    """Rounds per minute from the end of `start_round` to the end of `end_round`."""
    elapsed_s = first_completed(peers, end_round) - first_completed(peers, start_round)
    return 60.0 * (end_round - start_round) / elapsed_s


@dataclass(slots=True)
class Churn:
    """Kills and restarts peers of `swarm` during the churn phase; `poll()` is called by
    `LocalSwarm.follow` after each pass over the peers' events."""

    swarm: LocalSwarm
    phases: Phases
    mean_interval_s: float
    seed: int
    log: Callable[[str], None] = print
    restarts: int = 0
    started_unix_s: float | None = None
    """When the bench saw the churn phase begin (round C completed)."""
    stopped_unix_s: float | None = None
    """When the bench saw it end (round E completed)."""
    restart_s: float = float("nan")
    """The longest a victim took so far from its kill to its first round in the new life;
    before the first restart, the median peer's first start to its first round (set when
    the churn phase begins): a machine's own figure, not a constant that is too long on a
    fast machine (no kill before the end) and too short on a loaded one."""
    _rng: random.Random = field(init=False)
    _next_kill: float = field(init=False, default=float("inf"))
    _victim: tuple[Peer, float] | None = field(init=False, default=None)
    """The last victim and when it was killed (time.monotonic()), until it trained a round."""

    def __post_init__(self) -> None:
        if not self.mean_interval_s > 0:
            raise ValueError(f"--churn must be > 0 seconds, got {self.mean_interval_s}")
        self._rng = random.Random(self.seed)

    def poll(self) -> None:
        peers = self.swarm.peers
        now = time.monotonic()
        current = swarm_round(peers)
        if self.started_unix_s is None:
            if current >= self.phases.clean_end:
                self.started_unix_s = time.time()
                self.restart_s = statistics.median(p.start_s for p in peers)
                self.log(f"  churn starts at round {current} (a peer's start took {self.restart_s:.1f} s here)")
                self._next_kill = now + self._rng.expovariate(1.0 / self.mean_interval_s)
            return
        if self.stopped_unix_s is not None:
            return
        if self._victim is not None and self._victim[0].life_rounds > 0:
            self.restart_s = max(self.restart_s if self.restarts > 1 else 0.0, now - self._victim[1])
            self._victim = None
        if current >= self.phases.churn_end or self._too_late(current):
            self.stopped_unix_s = time.time()
            self.log(f"  churn stops at round {current}: {self.restarts} peers killed and restarted")
            return
        if now < self._next_kill:
            return
        # A kill that comes due while the last victim is still starting or catching up (no
        # round in its new life yet) waits for it: at most one peer is down at a time, and
        # the swarm never loses every copy of its state.
        if any(p.life_rounds == 0 for p in peers):
            return
        victim = self._rng.choice(peers)
        self.log(f"  churn: SIGKILL peer {victim.index} at swarm round {current}, restarting it")
        self.swarm.restart(victim)
        self._victim = (victim, time.monotonic())
        self.restarts += 1
        self._next_kill = time.monotonic() + self._rng.expovariate(1.0 / self.mean_interval_s)

    def check(self) -> None:
        """PhaseTooShort when the churn phase saw no restart: its rate would be a clean one."""
        if self.restarts == 0:
            raise PhaseTooShort(f"no peer was killed: from round {self.phases.clean_end} on, the rounds left took "
                                f"less than twice a peer's restart ({self.restart_s:.1f} s) on this machine, "
                                f"so a victim could not have come back before the end: give more --rounds")

    def _too_late(self, current: int) -> bool:
        """A kill now could not come back before the swarm ends: the swarm runs on without
        its victim (rounds wait for nobody), and a peer restarted after the others left
        would wait for them forever. So kills stop once the rounds left, at the rate so far,
        take less than twice the longest restart seen."""
        rate = rate_per_minute(self.swarm.peers, 0, current) if current > 0 else 0.0
        left_s = (self.phases.rounds - current) * 60.0 / rate if rate > 0 else float("inf")
        return left_s < 2 * self.restart_s


class PhaseTooShort(RuntimeError):
    """The swarm ended before a disturbance had a phase of its own to measure."""


MIN_FAKE_ROUNDS = 4
"""Fewest rounds the fake identities stay once their records are stored: every honest peer
reads the registry (each second) and probes them in its next round."""


@dataclass(slots=True)
class Fakes:
    """`count` fake identities (bench/fake_peer.py: a signed record copying the swarm's round,
    nothing served) present in the registry during the middle phase. They are started when
    round C completes; the fake phase runs from the round the swarm had completed when all of
    them had stored their records (a start takes seconds, more on a loaded machine) to round E,
    and for at least MIN_FAKE_ROUNDS rounds. `stop()` reaps any left (the bench calls it on
    every path)."""

    swarm: LocalSwarm
    phases: Phases
    count: int
    log: Callable[[str], None] = print
    kind: str = "fake"
    """"fake": bench/fake_peer.py; "flood": bench/state_flood.py (identities that ask every
    peer for its state over and over, and report the bytes they received)."""
    mode: str = ""
    """A fake's mode (bench/fake_peer.py; "": a record only, "stall": rounds claimed, no delta served, "keys":
    `count` identities' records from one process, "ahead:K" and "chain": records that would draw the
    honest peers to a state ahead or an invented round chain)."""
    received: list = field(default_factory=list)
    """Bytes each flood identity reported receiving when it left."""
    dropped: int = 0
    """The most fakes an honest peer found gone from the fake phase's start to the swarm's end
    (`node status` peers_found_gone, read every half second): a record that no daemon serves
    is in a view for seconds, out of it once no progress stream opens to it."""
    _gone_before: list = field(default_factory=list)
    _told: bool = False
    """`keys`: told to announce."""
    _next_look: float = 0.0
    started_unix_s: float | None = None
    """When the last fake's record was first stored."""
    stopped_unix_s: float | None = None
    rounds: tuple[int, int] | None = None
    """(a, b): the fake phase, from the end of round a to the end of round b (b is −1 until they left)."""
    _procs: list = field(default_factory=list)
    _announced: list = field(default_factory=list)
    _readers: list = field(default_factory=list)

    def poll(self) -> None:
        current = swarm_round(self.swarm.peers)
        # `keys` (one process holds them all) starts at once and is told to announce when
        # the phase begins: its start (imports, the keys, a DHT node) takes seconds, which a
        # 16-core machine's rounds outran (in 23 rounds after the phase began, 2026-12-06).
        keys = self.kind == "fake" and self.mode == "keys"
        if not self._procs and self.started_unix_s is None and (keys or current >= self.phases.clean_end):
            if not keys:
                self.log(f"  {self.count} {self.kind} identities start at swarm round {current}")
            argv = ([sys.executable, "-m", "locoswarm.bench.fake_peer", self.swarm.peers[0].addr, self.swarm.spec_path,
                     f"keys:{self.count}" if keys else self.mode]
                    if self.kind == "fake" else
                    [sys.executable, "-m", "locoswarm.bench.state_flood", *(p.addr for p in self.swarm.peers)])
            self._procs = [subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
                           for _ in range(1 if keys else self.count)]
            self._announced = [threading.Event() for _ in self._procs]
            self._readers = [threading.Thread(target=_watch, args=(proc, announced, self.received), daemon=True)
                             for proc, announced in zip(self._procs, self._announced)]
            for reader in self._readers:
                reader.start()
            if self.kind == "fake" and not keys and waits_to_be_told(self.mode):
                for proc in self._procs:  # these wait to be told to show themselves: now, the phase begins
                    proc.stdin.write("go\n")
                    proc.stdin.flush()
        elif keys and not self._told and current >= self.phases.clean_end:
            self.log(f"  {self.count} {self.kind} identities start at swarm round {current}")
            self._told = True
            for proc in self._procs:
                try:
                    proc.stdin.write("go\n")
                    proc.stdin.flush()
                except OSError:  # it died: the phase never starts, and the bench says so
                    pass
        elif self.started_unix_s is None and self._announced and all(e.is_set() for e in self._announced):
            if self.kind == "fake":
                self._gone_before = self._found_gone()
            self.started_unix_s = time.time()
            self.rounds = (current, -1)
            self.log(f"  the {self.kind} identities are in at swarm round {current}")
        elif self.rounds is not None and self.stopped_unix_s is None and \
                current >= max(self.phases.churn_end, self.rounds[0] + MIN_FAKE_ROUNDS):
            self.leave(current)
        if self._gone_before and time.monotonic() >= self._next_look:  # to the swarm's end: a drop comes seconds late
            self._next_look = time.monotonic() + 0.5
            counts = zip(self._gone_before, self._found_gone())
            self.dropped = max([self.dropped, *(after - before for before, after in counts
                                                if before is not None and after is not None)])

    def _found_gone(self) -> list[int | None]:
        """Each honest daemon's count of peers found gone (None: not answering now)."""
        out = []
        for peer in self.swarm.peers:
            try:
                out.append(int(read_status(peer.state_dir, timeout_s=2.0)["peers_found_gone"]))
            except (RuntimeError, KeyError, TypeError, ValueError):  # between lives: not counted
                out.append(None)
        return out

    def leave(self, current: int) -> None:
        """End the fake phase at swarm round `current`."""
        self.stopped_unix_s = time.time()
        self.rounds = (self.rounds[0], current)
        self.log(f"  the {self.kind} identities leave at swarm round {current}")
        self.stop()

    def phase(self) -> tuple[int, int]:
        """(a, b) once the swarm has ended; PhaseTooShort when the fakes were never all present for a round."""
        if self.rounds is not None and self.stopped_unix_s is None:
            self.leave(swarm_round(self.swarm.peers))
        if self.rounds is None or self.rounds[1] <= self.rounds[0]:
            raise PhaseTooShort(f"the {self.count} {self.kind} identities were not all in for a whole round "
                             f"before the swarm ended (started at round {self.phases.clean_end}): "
                             f"give more --rounds")
        return self.rounds

    def stop(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.stdin.close()  # the fake peer's signal to leave
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for reader in self._readers:
            reader.join(timeout=5)  # their last line (a flood's bytes) is read
        self._procs, self._readers = [], []


def _watch(proc: subprocess.Popen, announced: threading.Event, received: list) -> None:
    """Set `announced` when the fake peer says its record is stored (a flood identity: that
    it is connected); read its output to the end, noting the bytes a flood received."""
    for line in proc.stdout:
        if line.rstrip().endswith(" announced"):
            announced.set()
        elif line.startswith("flood received "):
            received.append(int(line.split()[-1]))
