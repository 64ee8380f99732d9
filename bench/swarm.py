"""A local swarm of real daemon processes on loopback (`locoswarm demo`, `locoswarm bench
swarm`): N `locoswarm node join` processes, the first started alone and the others
through its address, each on its own data shard and state directory. Their stdout lines
are not parsed: each daemon writes its typed events (node/events.py) to a JSON-lines file,
which is followed into per-round records (bench/swarmpeer.py); the bench then trains the
in-process simulation (bench/convergence.py) with the same settings and tokens and compares.

With `alone`, one more daemon trains beside them as the lone-peer baseline: a swarm of one
on peer 0's shard (the same spec but for its run id, so that it can never join the swarm),
the same rounds, token budget and threads; the swarm's peers name its events file as their
dashboard's baseline (`--baseline`). Its rounds are followed like theirs.

Each daemon runs in its own process group (session), so that `kill` takes its p2pd with it,
as a machine that dies does, and `stop` can end both whatever state the daemon is in. A
killed peer is started again with the same command on its state directory (same identity,
same ports, its checkpoint), writing a fresh event file: the churn benchmark
(bench/churn.py) does that.

Bytes are counted at the application by the daemons themselves (their round events carry
cumulative counters) and, where the machine lets them be read, at the transport: the
kernel's per-socket TCP counters (bench/tcpio.py) of each daemon's p2pd, read from its
start at each of its rounds and twice a second between, summed per socket, over a window that
holds the span of the round events the daemons' own counters are taken over, so deltas,
state, DHT traffic, libp2p framing and encryption are all included (bench/swarmbytes.py makes
the figures of both).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable

from locoswarm.bench.swarmpeer import ALONE, Peer, RoundLine, record
from locoswarm.bench.tcpio import Unavailable, socket_bytes
from locoswarm.node.events import EventTail


def _p2pds(pid: int) -> set[int]:
    """The p2pd processes of daemon `pid` (empty: the daemon or its p2pd is not found)."""
    import psutil

    try:
        return {c.pid for c in psutil.Process(pid).children() if c.name() == "p2pd"}
    except psutil.Error:
        return set()


IO_EVERY_S = 0.5
"""How often the peers' p2pds are read between their round events (bench/tcpio.py's one dump
of the machine's sockets, shared by all of them, takes 3–7 ms of kernel time here)."""


class LocalSwarm:
    """Start, watch and stop N daemons on loopback."""

    def __init__(self, num_peers: int, *, spec_path: str | None, max_rounds: int, threads: int, eval_every: int | None,
                 extra: list[str] | None = None, keep_dir: str | None = None, until_round: bool = False,
                 alone: bool = False, libp2p: int = 0) -> None:
        """`until_round`: end the peers with `--until-round max_rounds` (the swarm's round,
        so a restarted peer ends with the others) instead of `--max-rounds` (rounds of one
        process). `alone`: also run the lone-peer baseline (`self.alone`). `libp2p`: the last
        that many peers run on py-libp2p (`--transport libp2p`; peer 0, whose DHT the others
        join, stays on p2pd)."""
        if not 0 <= libp2p < max(1, num_peers):
            raise ValueError(f"libp2p peers must lie in [0, {num_peers - 1}] (peer 0 starts the swarm on p2pd), "
                             f"got {libp2p}")
        self.num_peers = num_peers
        self.libp2p = libp2p
        self.until_round = until_round
        self.spec_path = spec_path
        self.max_rounds = max_rounds
        self.threads = threads
        self.eval_every = eval_every
        self.extra = extra or []
        self.dir = keep_dir or tempfile.mkdtemp(prefix="locoswarm-swarm-")
        os.makedirs(self.dir, exist_ok=True)
        self._own_dir = keep_dir is None
        self.io_unavailable: str | None = None
        """Why transport bytes could not be counted on this machine (None: they were)."""
        self._io_next = 0.0
        """When the p2pds are next read between round events (time.monotonic())."""
        self.peers: list[Peer] = []
        self.with_alone = alone
        self.alone: Peer | None = None
        """The lone-peer baseline once started (with `alone`)."""

    def _name(self, index: int) -> str:
        return "alone" if index == ALONE else f"peer-{index}"

    def _events_path(self, index: int, life: int) -> str:
        suffix = "" if life == 1 else f".life-{life}"
        return os.path.join(self.dir, f"{self._name(index)}{suffix}.events.jsonl")

    def _spawn(self, index: int, argv: list[str], life: int) -> subprocess.Popen:
        with open(os.path.join(self.dir, f"{self._name(index)}.log"), "w" if life == 1 else "a") as log:
            # Its own session: a kill of the group takes its p2pd too, and Ctrl-C in the
            # terminal reaches only the bench, which stops every peer itself.
            return subprocess.Popen([*argv, "--events", self._events_path(index, life)], stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def _eval_flag(self) -> list[str]:
        """The peers' --eval-every (none: the daemon's default)."""
        return [] if self.eval_every is None else ["--eval-every", str(self.eval_every)]

    def _start(self, index: int, peer_addr: str | None) -> Peer:
        state_dir = os.path.join(self.dir, f"peer-{index}")
        limit = "--until-round" if self.until_round else "--max-rounds"
        cmd = [sys.executable, "-u", "-m", "locoswarm", "node", "join", "--listen", "/ip4/127.0.0.1/tcp/0",
               "--state-dir", state_dir, limit, str(self.max_rounds), "--min-peers", str(self.num_peers),
               "--shard", str(index), "--threads", str(self.threads), *self._eval_flag(), *self.extra]
        if self.spec_path:
            cmd += ["--run", self.spec_path]
        if peer_addr:
            cmd += ["--peer", peer_addr]
        if self.on_libp2p(index):
            cmd += ["--transport", "libp2p"]
        if self.with_alone:
            cmd += ["--baseline", self._events_path(ALONE, 1)]
        spawned_unix_s = time.time()
        peer = Peer(index, self._spawn(index, cmd, 1), state_dir, EventTail(self._events_path(index, 1)), cmd,
                    spawned_unix_s=spawned_unix_s)
        self.peers.append(peer)
        return peer

    def on_libp2p(self, index: int) -> bool:
        """Whether peer `index` runs on py-libp2p."""
        return index >= self.num_peers - self.libp2p

    def _start_alone(self) -> Peer:
        """The lone-peer baseline: a swarm of one on peer 0's shard, so that it trains on the
        very tokens peer 0 does, round for round; its spec is the swarm's with another run id
        (a spec hash of its own: neither can ever take the other for a peer of its run)."""
        from dataclasses import replace

        from locoswarm.node.spec import load_spec, write_spec

        spec = load_spec(self.spec_path)
        spec_path = os.path.join(self.dir, "alone.toml")
        write_spec(replace(spec, run_id=spec.run_id[:120] + "-alone", initial_peers=[]), spec_path, force=True)
        cmd = [sys.executable, "-u", "-m", "locoswarm", "node", "join", "--listen", "/ip4/127.0.0.1/tcp/0",
               "--state-dir", os.path.join(self.dir, "alone"), "--max-rounds", str(self.max_rounds),
               "--min-peers", "1", "--shard", "0", "--threads", str(self.threads), *self._eval_flag(), *self.extra,
               "--run", spec_path]
        self.alone = Peer(ALONE, self._spawn(ALONE, cmd, 1), os.path.join(self.dir, "alone"),
                          EventTail(self._events_path(ALONE, 1)), cmd, spawned_unix_s=time.time())
        return self.alone

    @property
    def all_peers(self) -> list[Peer]:
        """The swarm's peers and the lone-peer baseline when there is one."""
        return self.peers + ([self.alone] if self.alone is not None else [])

    def dashboard_url(self, peer: Peer) -> str | None:
        """The address of `peer`'s dashboard (its control.json), None before it serves one."""
        import json

        try:
            with open(os.path.join(peer.state_dir, "control.json")) as fh:
                return f"http://127.0.0.1:{int(json.load(fh)['port'])}/"
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def restart(self, peer: Peer) -> None:
        """SIGKILL `peer` (its process group: the daemon and its p2pd) and start it again at
        once with the same command on its state directory, reporting to a fresh event file."""
        _kill_group(peer.proc)
        for event in peer.events.poll():  # what the killed life wrote before it died
            self._take(peer, event)
        peer.lives += 1
        peer.life_rounds = 0
        peer.io_pids = set()  # the new life's p2pd is looked up at its `listening` event
        peer.events = EventTail(self._events_path(peer.index, peer.lives))
        # A restarted volunteer resumes at once rather than waiting for a quorum: it dials the
        # peers it saw last, and if the swarm has ended meanwhile it trains on alone (and the
        # bench reports its digest apart) instead of waiting forever.
        argv = list(peer.argv)
        if "--min-peers" in argv:
            argv[argv.index("--min-peers") + 1] = "1"
        peer.proc = self._spawn(peer.index, argv, peer.lives)

    def start(self, timeout_s: float = 120.0) -> None:
        first = self._start(0, None)
        if self.with_alone:
            self._start_alone()
        deadline = time.monotonic() + timeout_s
        while first.addr is None:
            self._poll(first)
            if time.monotonic() > deadline:
                raise TimeoutError(f"peer 0 said nothing in time; log: {self.log_tail(first)}")
            time.sleep(0.05)
        for i in range(1, self.num_peers):
            self._start(i, first.addr)

    def _poll(self, peer: Peer) -> None:
        """Take in the events `peer` wrote since the last poll; RuntimeError when it ended
        before its final event."""
        exited = peer.proc.poll() is not None  # before reading: what it wrote before exiting is read
        for event in peer.events.poll():
            self._take(peer, event)
        if exited and peer.final is None:
            who = "the lone peer" if peer.index == ALONE else f"peer {peer.index}"
            raise RuntimeError(f"{who} exited with {peer.proc.returncode}; log: {self.log_tail(peer)}")

    def _read_io(self, peer: Peer, event: dict) -> None:
        """Read the peer's p2pd at one of its events (`listening` or a round, where the p2pd must
        be found); at the run's last round its figure is set, from the reading taken before its
        first round ended to this one (its last round ended before: the event was written)."""
        if self.io_unavailable is not None or peer.io is not None or peer.io_lost:
            return
        if not peer.io_pids:
            peer.io_pids = _p2pds(peer.proc.pid)
        if not peer.io_pids:
            peer.io_lost = True
            return
        try:
            peer.io_meter.read(peer.io_pids)
        except Unavailable as e:
            self.io_unavailable = str(e)
            return
        if event["event"] == "round" and peer.rounds and event["round"] == self.max_rounds - 1:
            peer.io = peer.io_meter.between(peer.rounds[0].ended_unix_s, event["time"])
            peer.io_lost = peer.io is None

    def _read_io_between_rounds(self) -> None:
        """Every IO_EVERY_S, read the p2pd of each peer whose figure is being taken, all from one
        dump: a connection p2pd closes then loses at most that long of its bytes. A restarted
        peer is read again once its new life said where it listens (its p2pd found)."""
        if self.io_unavailable is not None or time.monotonic() < self._io_next:
            return
        self._io_next = time.monotonic() + IO_EVERY_S
        try:
            at, counters = time.time(), socket_bytes()
        except Unavailable as e:
            self.io_unavailable = str(e)
            return
        for p in self.all_peers:
            if p.io_pids and p.io is None and not p.io_lost:
                p.io_meter.read(p.io_pids, counters, at)

    def _take(self, peer: Peer, event: dict) -> None:
        if event["event"] in ("listening", "round"):
            # Before the round is recorded: the last round's reading is taken before the daemon
            # leaves and its sockets close, against the first round's end as recorded.
            self._read_io(peer, event)
        record(peer, event)

    def log_tail(self, peer: Peer, n: int = 2000) -> str:
        with open(os.path.join(self.dir, f"{self._name(peer.index)}.log")) as fh:
            return fh.read()[-n:]

    def follow(self, on_round: Callable[[int, list[RoundLine]], None] | None = None,
               timeout_s: float = 3600.0, on_poll: Callable[[], None] | None = None) -> None:
        """Follow every peer's events until all reported their final state; `on_round(r,
        lines)` once every peer (and the lone peer, with `alone`) finished round r, `lines`
        the swarm's; `on_poll()` after each pass over the peers' events (the churn benchmark
        kills and restarts peers there)."""
        deadline = time.monotonic() + timeout_s
        reported = -1
        while any(p.final is None for p in self.all_peers):
            for p in self.all_peers:
                if p.final is None:
                    self._poll(p)
            done = min((p.rounds[-1].round if p.rounds else -1) for p in self.all_peers)
            while reported < done:
                reported += 1
                if on_round is not None:
                    on_round(reported, [next(x for x in p.rounds if x.round == reported) for p in self.peers
                                        if any(x.round == reported for x in p.rounds)])
            if on_poll is not None:
                on_poll()
            if time.monotonic() > deadline:
                raise TimeoutError("the swarm did not finish in time")
            self._read_io_between_rounds()
            time.sleep(0.05)
        for p in self.all_peers:
            p.proc.wait(timeout=60)

    def stop(self) -> None:
        """End every peer: SIGTERM (a graceful leave), then SIGKILL to the process group of
        any still running after 15 s; the groups of those that left are killed too, for a
        p2pd that outlived its daemon."""
        for p in self.all_peers:
            if p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM)
        for p in self.all_peers:
            try:
                p.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            _kill_group(p.proc)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group `proc` leads and wait for `proc`."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the whole group is gone already
    proc.wait()
