"""The volunteer daemon, `locoswarm node join`: starts the parts, wires them, stops them.

One asyncio loop (uvloop where installed) does all the networking: p2pd, the DHT node on
our own loop (no forked hivemind.DHT process), the delta and state servers, the peer
record, the control API; torch work runs on the training and exchange threads
(node/threads.py says which runs what). The parts, each in its own module:

| module | concern |
|---|---|
| roundloop.py | the rounds: train, exchange, outer step; a failed round is discarded, never the node |
| roundcontext.py | what the daemon wires into the round loop: its collaborators, the node's figures, the fault hooks |
| rounds.py | a round's progress in the DHT, its end and participants |
| pull.py | the delta pull from a round's participants |
| tree.py, treeround.py | tree rounds: rows, their aggregates and their pull; a tree round in the round loop |
| membership.py | who is live, who should train a round, who vanished or is gone |
| ownrecord.py | the record this peer shows of itself, and its sequence number |
| upkeep.py | the registry refresh loop, and dialing back the peers that vanished or are gone |
| lineage.py | round chains, divergence, whom to follow after a partition or a split |
| catchup.py | joining and catching up: taking another peer's outer state |
| replay.py | catching up by the rounds' deltas instead of a whole state |
| trainer.py | the replica and its side of the round (optim/round.py) |
| lifecycle.py | the stop's bounds: a step that gives way to a stop, StopWatch |

Lifecycle after uvicorn's: a first SIGINT/SIGTERM sets `should_exit` (training stops after
its current step, the round is abandoned, the record withdrawn, exit 0 within seconds; a
step of the start, a dial or the state download, is cancelled); a second forces the exit.
A stop that overruns STOP_GRACE_S is forced too (StopWatch). The control API is up from the
moment the state directory is locked, before p2pd starts, so `node status` tells a start
that dials its initial peers for minutes from a daemon that is not there.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import secrets
import signal
import sys
import threading
import time
import zlib
from typing import Callable

from locoswarm.node.checkpoint import Checkpointer
from locoswarm.node.config import NodeConfig
from locoswarm.node.console import RoundBar
from locoswarm.node.control import ControlServer, RecentWarnings
from locoswarm.node.events import EventSink, Listening, Resumed, ServingState
from locoswarm.node.governor import Governor, IdleWatch
from locoswarm.node.gpuwatch import GpuWatch
from locoswarm.node.hardware import gpu_id, pick_device
from locoswarm.node.invite import keep_spec
from locoswarm.node.joining import join_swarm, wait_for_peers
from locoswarm.node.host import Dialling, NodeError
from locoswarm.node.statedir import ensure_identity, lock_state_dir
from locoswarm.node.lifecycle import (OWN_STOP_GRACE_S, STOP_GRACE_S, STOP_STEP_S, StopWatch, kill_children,
                                      quiet_abandoned_calls, unless_stopped)
from locoswarm.node.lineage import Lineage
from locoswarm.node.localpeers import PeerListing
from locoswarm.node.membership import Membership
from locoswarm.node.ownrecord import OwnRecord
from locoswarm.node.portable import on_stop_signals
from locoswarm.node.ports import remember_peers
from locoswarm.node.report import history_of, status_of
from locoswarm.node.dashboard import Baseline
from locoswarm.node.roundcontext import NodeStats, RoundContext, RoundFaults
from locoswarm.node.roundloop import RoundLoop
from locoswarm.node.spec import RunSpec
from locoswarm.node.threads import Pools
from locoswarm.node.upkeep import keep_record
from locoswarm.node.work import prove_work
from locoswarm.protocol.work import WorkCheck

log = logging.getLogger(__name__)
class _Stopped(Exception):
    """A stop came while the daemon was starting: the start's step in progress was cancelled."""


class Daemon:
    def __init__(self, spec: RunSpec, cfg: NodeConfig, emit: Callable[[str], None] = print, *,
                 events_path: str | None = None, faults: RoundFaults | None = None, keep_spec: bool = False) -> None:
        """`emit`: where the plain output lines go; `events_path`: a file for the JSON-lines
        event stream (node/events.py); `faults`: a test's fault injector (none in production);
        `keep_spec`: write the spec into the state directory once it is locked (node/invite.py)."""
        spec.validate()
        cfg.validate()
        cfg.check_against(spec)
        self.spec, self.cfg = spec, cfg
        self._keep_spec = keep_spec
        self._emit = emit
        self.spec_hash = spec.hash()
        self.bar = RoundBar()
        """The swarm's tokens of the current round, on a terminal only."""
        self.events = EventSink.open(self._print, events_path)
        self.faults = faults or RoundFaults()
        self.should_exit = asyncio.Event()
        self.stats = NodeStats()
        self.baseline = None if cfg.baseline is None else Baseline(cfg.baseline)
        """The lone-peer run the dashboard draws beside this node's loss (--baseline)."""
        self.initial_peers: list[str] = []
        """The peers p2pd bootstrapped from: the given ones, and those seen last time if none answered."""
        self.incarnation = secrets.randbelow(2**63 - 1) + 1
        """This life of the process (PeerRecord.incarnation): a restart shows a new one."""
        self.shard: int | None = None
        self.trainer = None
        self.streams = None
        """The streams served and pulled on p2pd (node/services.py PeerStreams), once started."""
        self.membership: Membership | None = None
        self.lineage = Lineage(self.spec_hash)
        self.loop: RoundLoop | None = None
        self.idle = IdleWatch(Governor(cfg.idle), cfg.idle_check_s, on_pause=self._stop_round)
        """The idle governor: `idle.paused` says why training is paused (None: it is not)."""
        self.record = OwnRecord(spec, self.spec_hash, self.incarnation, self.lineage, self.idle)
        """Our peer record, as the registry, the progress streams and the join are told it."""
        self.pools = Pools(cfg.threads)
        self.checkpoints = Checkpointer(os.path.join(cfg.state_dir, "checkpoints"), self.spec_hash,
                                        keep=cfg.checkpoint_keep)
        self._tasks: set[asyncio.Task] = set()
        self.dialling = Dialling()
        """The start's attempts to reach the initial peers (node status: dialling since …)."""
        self.warnings = RecentWarnings()
        """The last warnings logged, for node status."""
        self.stop_watch = StopWatch()
        self.transport: str | None = None
        """"p2pd" or "libp2p" once the network has started (node/network.py)."""

    # ------------------------------------------------------------------ lifecycle

    def handle_signal(self, signum: int) -> None:
        if self.should_exit.is_set():
            log.warning("second %s: forcing exit", signal.Signals(signum).name)
            kill_children()
            os._exit(130)
        log.info("%s: leaving after the current step (again to force)", signal.Signals(signum).name)
        self.stop_watch.start(STOP_GRACE_S, code=0)
        self.should_exit.set()
        self.stats.state = "stopping"
        self._stop_round()

    def _stop_round(self) -> None:
        if self.loop is not None:
            self.loop.stop_round()

    async def serve(self, stopped: threading.Event | None = None) -> int:
        """Run until stopped; `stopped`: see run_daemon."""
        loop = asyncio.get_running_loop()
        quiet_abandoned_calls(loop)
        release_signals = on_stop_signals(loop, self.handle_signal)
        logging.getLogger().addHandler(self.warnings)
        try:
            if stopped is not None and stopped.is_set():
                log.info("stopped before the daemon started")
                return 0
            lock = lock_state_dir(self.cfg.state_dir)
            control = ControlServer(self.cfg.state_dir, functools.partial(status_of, self),
                                    functools.partial(history_of, self))
            try:
                # Up before anything slow (importing hivemind, p2pd, the dials, the state
                # download), so that `node status` can tell what the start waits for.
                await control.start()
                ensure_identity(self.cfg.state_dir)
                if self._keep_spec:
                    try:
                        log.info("run spec kept in %s: a restart without the invite goes on with this run",
                                 keep_spec(self.cfg.state_dir, self.spec))
                    except OSError as e:
                        raise NodeError(f"state directory {self.cfg.state_dir}: cannot write the run spec "
                                        f"({e.strerror or e})") from None
                with PeerListing():  # other peers of this machine do not pause for our use of a GPU
                    return await self._serve()
            finally:
                await control.stop()
                os.close(lock)
        finally:
            release_signals()
            logging.getLogger().removeHandler(self.warnings)
            self.events.close()

    async def _unless_stopped(self, aw):
        """`aw`'s result; a stop that comes first cancels `aw` and ends the start (_Stopped)."""
        done, result = await unless_stopped(aw, self.should_exit)
        if not done:
            raise _Stopped
        return result

    async def _serve(self) -> int:
        from locoswarm.node.network import NetworkStopped, start_network
        from locoswarm.node.services import PeerStreams

        access = self.spec.access
        check_work = WorkCheck(self.spec_hash, access.work_bits) if access.work_bits else None
        refuse = ((lambda r: access.refuse(self.spec_hash, r.peer_id, r.proof, r.work, check_work))
                  if access.restricted else None)
        try:
            network = await start_network(self.cfg, self.spec, self.spec_hash, should_stop=self.should_exit,
                                          dialling=self.dialling, refuse=refuse)
        except NetworkStopped:
            log.info("stopped while %s", self.stats.state)
            network = None
        if network is None:
            return 0  # stopped (Ctrl-C, SIGTERM) while still trying to reach the initial peers
        p2p, registry, self.initial_peers = network.p2p, network.registry, network.initial_peers
        self.transport = network.transport
        try:
            self.record.peer_id = p2p.peer_id.to_base58()
            self.record.addrs = [str(a) for a in await p2p.get_visible_maddrs()]
            self.membership = Membership(self.peer_id, restricted=access.restricted, refuse=refuse,
                                         heard_ttl_s=self.cfg.record_ttl_s)
            self.shard = self.cfg.shard
            if self.shard is None:
                self.shard = zlib.crc32(self.peer_id.encode()) % self.spec.num_shards
            trainer = self.trainer = self.record.trainer = await self._unless_stopped(
                self.pools.train(self._build_trainer, self.shard))
            log.info("training on %s in %s, micro-batch %d of %d", trainer.device, trainer.precision,
                     trainer.micro_batch, self.spec.batch_size)
            gpu = gpu_id(trainer.device)  # None on the CPU or MPS: the governor then watches no GPU
            self.idle.gpu = None if gpu is None else GpuWatch(gpu)
            resumed = await self._unless_stopped(self.checkpoints.resume(trainer, self.pools.train))
            if resumed is not None:
                self.events(Resumed(round=resumed))
            meta = self.checkpoints.resumed_meta
            self.lineage.start(trainer.outer_steps, meta.get("chain"), resumed=resumed is not None, me=self.peer_id,
                               vouched=meta.get("vouched", True) if resumed is not None
                               else trainer.ledger.established(self.peer_id))
            streams = self.streams = await PeerStreams.start(
                p2p, self.spec, self.spec_hash, peer_id=self.peer_id, incarnation=self.incarnation,
                membership=self.membership, record=self.record, trainer=trainer,
                upload_bytes_per_s=self.cfg.net.state_upload_mbit * 1e6 / 8,
                on_state_encoded=lambda r, digest: self.events(ServingState(round=r, digest=digest)))
            if access.work_bits:
                self.stats.state = "proving"  # node status says why nothing trains yet (minutes at 16 bits)
                work = await prove_work(self.cfg.state_dir, self.spec_hash, self.peer_id, access.work_bits,
                                        self.should_exit)
                if work is None:
                    return 0  # stopped (Ctrl-C, SIGTERM) while proving work
                self.record.work, self.stats.state = work, "starting"
            self.events(Listening(peer_id=self.peer_id, addrs=tuple(self.addrs)))
            self.stats.started_unix_s = time.time()  # as a baseline's clock starts: at its first event
            ctx = RoundContext(spec=self.spec, spec_hash=self.spec_hash, cfg=self.cfg, peer_id=self.peer_id,
                               incarnation=self.incarnation, p2p=p2p, registry=registry, trainer=trainer,
                               pools=self.pools,
                               membership=self.membership, progress=streams.progress, lineage=self.lineage,
                               deltas=streams.deltas, states=streams.states, checkpoints=self.checkpoints,
                               idle=self.idle, events=self.events, stats=self.stats, bar=self.bar,
                               should_exit=self.should_exit, faults=self.faults, bytes_sent=lambda: self.bytes_sent,
                               delta_streams=streams.pulls, rows=streams.rows,
                               registry_sent=network.registry_sent,
                               bootstrap=frozenset(a.rsplit("/p2p/", 1)[1] for a in self.initial_peers if "/p2p/" in a))
            self.loop = RoundLoop(ctx)
            await self._unless_stopped(join_swarm(ctx, registry, self.loop.catch_up, self.initial_peers, self.record))
            self.record.joining = False
            self._spawn(keep_record(registry, self.membership, self.record, interval_s=self._refresh_s,
                                    initial_peers=self.initial_peers, had_peers=lambda: self.lineage.had_peers,
                                    on_view=functools.partial(remember_peers, self.cfg.state_dir),
                                    shown=streams.progress.show, waiting=lambda: self.stats.state == "waiting"))
            if self.spec.trust.anchors and trainer.ledger.enabled:
                # The anchors' rolls: whose word joiners take while no anchor is live (node/roll.py).
                for task in network.roll_tasks(self.spec, self.spec_hash, self.peer_id, streams.states.newest,
                                               trainer.ledger.threshold):
                    self._spawn(task)
            await self.idle.check()  # before the first step: a fresh start must not train during a game
            self._spawn(self.idle.watch())
            await wait_for_peers(ctx)
            self.bar.start()
            await self.loop.run()
            return 0
        except _Stopped:
            log.info("stopped while %s", self.stats.state)
            return 0
        finally:
            self.stop_watch.start(OWN_STOP_GRACE_S, code=1)  # a signal's sooner deadline stays
            self.bar.stop()
            self.stats.state = "stopping"
            self._stop_round()
            if self.streams is not None:
                self.streams.close()
            for task in self._tasks:
                task.cancel()
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=STOP_STEP_S)
            if self.membership is not None:
                # The view now, with the peers heard over streams since the last registry
                # refresh (every few seconds): a short life would otherwise keep only the
                # peers of its first read, and a restart could dial nobody alive.
                remember_peers(self.cfg.state_dir, self.membership.records)
            try:
                await asyncio.wait_for(registry.withdraw(self.peer_id), STOP_STEP_S)
            except Exception as e:  # leaving anyway: the record expires on its own
                log.info("could not withdraw the peer record: %s", e)
            # Queued work is dropped; a step still running ends on its own (the process
            # waits for it at exit, StopWatch bounds that).
            self.pools.shutdown()
            await network.close()

    @property
    def _refresh_s(self) -> float:
        """How often our record is refreshed and our own registry bucket read: a third of the
        record's lifetime (20 s by default; every upkeep.EMPTY_VIEW_REFRESH_S while the view
        is empty or too small to start). What changes every round (round, chains) and a pause reach the peers we
        train with over the progress streams at once."""
        return self.cfg.record_ttl_s / 3

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _print(self, line: str) -> None:
        """One line of the daemon's plain output (stdout): above the round bar while it is drawn."""
        if not self.bar.print(line):
            self._emit(line)

    def _build_trainer(self, shard: int):
        from locoswarm.node.trainer import Trainer

        cfg = self.cfg
        return Trainer(self.spec, self.spec_hash, shard=shard, device=pick_device(cfg.device),
                       eval_sequences=cfg.eval_sequences, precision=cfg.precision, micro_batch=cfg.micro_batch,
                       memory_fraction=cfg.max_gpu_memory_percent / 100,
                       activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile)

    # ------------------------------------------------------------------ status

    @property
    def peer_id(self) -> str:
        """Our base58 peer id ("" until p2pd is up)."""
        return self.record.peer_id

    @property
    def addrs(self) -> list[str]:
        return self.record.addrs

    @property
    def bytes_sent(self) -> int:
        return 0 if self.streams is None else self.streams.bytes_sent


def run_daemon(spec: RunSpec, cfg: NodeConfig, emit: Callable[[str], None] = print, *,
               events_path: str | None = None, faults: RoundFaults | None = None, keep_spec: bool = False,
               stopped: threading.Event | None = None) -> int:
    """Run a daemon until it is stopped or reaches max_rounds; returns the exit code.
    `keep_spec`: write the spec into the state directory (a run joined by invite);
    `stopped`: set by a signal that came before the daemon's loop handles signals (the CLI's
    start): the daemon then leaves before it begins."""
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # uvloop is optional (no wheel on Windows)
        runner = asyncio.run
    try:
        daemon = Daemon(spec, cfg, emit, events_path=events_path, faults=faults, keep_spec=keep_spec)
    except ValueError as e:  # a setting found bad before anything started
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return runner(daemon.serve(stopped))
    except NodeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # A Ctrl-C before the loop's handlers are in place (asyncio turns it into this) or
        # after they are gone: a stop like any other.
        log.info("stopped before the daemon started or after it stopped")
        return 0
