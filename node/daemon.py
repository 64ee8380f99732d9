"""The volunteer daemon (issue 3): `locoswarm node join`.

One asyncio loop (uvloop where installed) does all the networking: p2pd, the DHT node on
our own loop (no forked hivemind.DHT process), the delta and state servers, the peer
record, the control API. Torch work runs on one training thread. Lifecycle after uvicorn's:
a first SIGINT/SIGTERM sets `should_exit` (training stops after its current step, the round
is abandoned, the record withdrawn, exit 0 within seconds); a second forces the exit.

A round (rounds.py says how its end is agreed): train until the swarm's tokens reach the
target; encode this round's delta and serve it; pull the participants' deltas until all
are in or the deadline passes; token-weighted aggregate and outer step; serve the new outer
state for joiners. A joiner first downloads the newest outer state from the live peers
(statesync.py), then trains from that round on; a peer that finds itself behind the swarm
does the same.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import logging
import math
import os
import random
import signal
import sys
import threading
import time
import zlib
from typing import Callable

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, PeerID
from safetensors import SafetensorError

from locoswarm.node.checkpoint import Checkpointer
from locoswarm.node.config import NodeConfig
from locoswarm.node.console import RoundBar
from locoswarm.node.control import ControlServer
from locoswarm.node.exchange import DeltaServer
from locoswarm.node.governor import Governor, IdleWatch
from locoswarm.node.host import NodeError, dial, identity_key, open_state_dir, start_p2p
from locoswarm.node.registry import PeerRegistry
from locoswarm.node.reunion import (LostPeers, chain_at, chain_start, redial, round_chain, whom_to_follow,
                                   whom_to_rejoin)
from locoswarm.node.rounds import RoundProgress, gather_deltas
from locoswarm.node.spec import RunSpec
from locoswarm.node.statesync import DownloadProgress, StateServer, StateUnavailable, download_state
from locoswarm.optim.screen import apply_screen, screen
from locoswarm.protocol.records import PeerRecord, is_chain

log = logging.getLogger(__name__)
FINAL_MODEL = "final-model.safetensors"
"""Written to the state directory when the daemon stops at --max-rounds: the replica's parameters."""
CHAINS_KEPT = 8
"""Round chains kept for comparing with records a few rounds old."""


def _training_thread_init(threads: int) -> None:
    import torch

    # Per thread on x86 (MXCSR): AdamW's denormal second moments slow CPU steps ~10×.
    torch.set_flush_denormal(True)
    if threads > 0:
        torch.set_num_threads(threads)


class Daemon:
    def __init__(self, spec: RunSpec, cfg: NodeConfig, emit: Callable[[str], None] = print) -> None:
        spec.validate()
        cfg.validate()
        self.spec = spec
        self.cfg = cfg
        self.spec_hash = spec.hash()
        self._emit = emit
        self.bar = RoundBar()
        """The swarm's tokens of the current round, on a terminal only."""
        """Where the daemon's stdout lines go (addresses, one line per round)."""
        self.should_exit = asyncio.Event()
        self.state = "starting"
        self.rounds_completed = 0
        self.loss: float | None = None
        self.eval_loss: float | None = None
        self.num_peers = 0
        self.bytes_received = 0
        self.deltas_rejected = 0
        self.peer_id = ""
        self.shard: int | None = None
        self.addrs: list[str] = []
        self.trainer = None
        self.deltas: DeltaServer | None = None
        self.states: StateServer | None = None
        self._round_stop = threading.Event()
        """Ends the current round's training early: leaving, or the owner needs the machine."""
        self.idle = IdleWatch(Governor(cfg.idle), cfg.idle_check_s, on_pause=lambda: self._round_stop.set())
        """The idle governor: `idle.paused` says why training is paused (None: it is not)."""
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "locoswarm-train", _training_thread_init,
                                                           (cfg.threads,))
        self._xpool = concurrent.futures.ThreadPoolExecutor(1, "locoswarm-exchange", _training_thread_init,
                                                            (cfg.threads,))
        """Exchange compute (encode, decode, outer step) when it overlaps training."""
        self._round_started: dict[int, float] = {}
        self._tasks: set[asyncio.Task] = set()
        self._records: list[PeerRecord] = []
        self._admitted: set[str] = set()
        self._had_peers = False
        """Some round of ours aggregated another peer's delta."""
        self._alone_rounds = 0
        """Outer steps aggregated alone since the last sync (or the start)."""
        self._diverged_at: int | None = None
        """The round this peer aggregated alone while others trained it (reunion.py); None
        while its outer state is the swarm's, or since it took another's."""
        self._chains: dict[int, str] = {}
        """Outer steps → the round chain of our outer state then (reunion.py), the last
        CHAINS_KEPT; empty while unknown (a checkpoint without one, a round that pulled a
        sample of the deltas, a state taken at a round its donors' records no longer showed)."""
        self._lost = LostPeers()
        """Peers whose records vanished without a tombstone: dialed back from their last records."""
        self._next_rediscovery = 0.0
        """Peer ids whose records passed the run's access policy at the last refresh."""
        self._validator: RSASignatureValidator | None = None
        self._rng = random.Random()
        self._carry = 0
        self._history: collections.deque = collections.deque(maxlen=2000)
        self.checkpoints = Checkpointer(os.path.join(cfg.state_dir, "checkpoints"), self.spec_hash,
                                        keep=cfg.checkpoint_keep)
        """Tokens the swarm trained beyond its plan so far (negative: short of it), as this peer saw it."""

    # ------------------------------------------------------------------ lifecycle

    def handle_signal(self, signum: int) -> None:
        if self.should_exit.is_set():
            log.warning("second %s: forcing exit", signal.Signals(signum).name)
            os._exit(130)
        log.info("%s: leaving after the current step (again to force)", signal.Signals(signum).name)
        self.should_exit.set()
        self._round_stop.set()

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_signal, sig)
        lock = open_state_dir(self.cfg.state_dir)
        try:
            return await self._serve()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            os.close(lock)

    async def _serve(self) -> int:
        p2p = await start_p2p(self.cfg.state_dir, self.cfg.net, self.should_exit)
        if p2p is None:
            return 0  # stopped (Ctrl-C, SIGTERM) while still trying to reach the initial peers
        dht = control = registry = None
        try:
            self.peer_id = p2p.peer_id.to_base58()
            self.addrs = [str(a) for a in await p2p.get_visible_maddrs()]
            validator = self._validator = RSASignatureValidator(identity_key(self.cfg.state_dir))
            dht = await DHTNode.create(p2p=p2p, initial_peers=self.cfg.net.peers or None, record_validator=validator)
            access = self.spec.access
            refuse = (lambda r: access.refuse(self.spec_hash, r.peer_id, r.proof)) if access.restricted else None
            registry = PeerRegistry(dht, self.spec.run_id, self.spec_hash, ttl_s=self.cfg.record_ttl_s,
                                    validator=validator, refuse=refuse)
            shard = self.cfg.shard
            if shard is None:
                shard = zlib.crc32(self.peer_id.encode()) % self.spec.num_shards
            self.shard = shard
            self.trainer = await self._in_pool(self._build_trainer, shard)
            t = self.trainer
            log.info("training on %s in %s, micro-batch %d of %d", t.device, t.precision, t.micro_batch,
                     self.spec.batch_size)
            resumed = await self.checkpoints.resume(self.trainer, self._in_pool)
            if resumed is not None:
                self.emit(f"resumed from checkpoint round {resumed}")
                chain = self.checkpoints.resumed_meta.get("chain")
                # Written by us, but a file on disk: a bad one leaves the chain unknown (this
                # peer takes no part in split verdicts until it takes a donor's state).
                if is_chain(chain):
                    self._chains = {self.trainer.outer.num_steps: chain}
            else:
                self._chains = {self.trainer.outer.num_steps: chain_start(self.spec_hash)}
            self.deltas = DeltaServer(p2p, admit=self._admit)
            self.states = StateServer(p2p, self.trainer.state_spec, admit=self._admit)
            self.states.on_encoded = lambda r, digest: self.emit(f"serving state round {r} digest {digest}")
            await self.deltas.start()
            await self.states.start()
            control = ControlServer(self.cfg.state_dir, self.status, self.history)
            await control.start()
            self.emit(f"peer {self.peer_id}")
            for addr in self.addrs:
                self.emit(f"listening {addr}")
            await self._join(p2p, registry)
            self._spawn(self._keep_record(registry))
            await self.idle.check()  # before the first step: a fresh start must not train during a game
            self._spawn(self.idle.watch())
            await self._wait_for_peers()
            self.bar.start()
            await self._run_rounds(p2p, dht)
            return 0
        finally:
            self.bar.stop()
            self.state = "stopping"
            self._round_stop.set()
            for task in self._tasks:
                task.cancel()
            if registry is not None:
                try:
                    await asyncio.wait_for(registry.withdraw(self.peer_id), 3.0)
                except Exception as e:  # leaving anyway: the record expires on its own
                    log.info("could not withdraw the peer record: %s", e)
            if control is not None:
                await control.stop()
            self._pool.shutdown(wait=True)
            self._xpool.shutdown(wait=True)
            if dht is not None:
                await dht.shutdown()
            await p2p.shutdown()

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def emit(self, line: str) -> None:
        """One line of the daemon's plain output (stdout): above the round bar while it is drawn."""
        if not self.bar.print(line):
            self._emit(line)

    def _in_pool(self, fn, *args):
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _build_trainer(self, shard: int):
        from locoswarm.node.trainer import Trainer, pick_device

        cfg = self.cfg
        return Trainer(self.spec, self.spec_hash, shard=shard, device=pick_device(cfg.device),
                       eval_sequences=cfg.eval_sequences, precision=cfg.precision, micro_batch=cfg.micro_batch,
                       memory_fraction=cfg.max_gpu_memory_percent / 100,
                       activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile)

    # ------------------------------------------------------------------ peers

    def _record(self) -> PeerRecord:
        return PeerRecord(peer_id=self.peer_id, addrs=tuple(self.addrs[:16]), device=self.trainer.device.type,
                          tokens_per_s=float(self.trainer.tokens_per_s), round=self.trainer.outer.num_steps,
                          spec_hash=self.spec_hash, paused=self.idle.paused is not None,
                          proof=self.spec.access.proof(self.spec_hash, self.peer_id),
                          diverged=self._diverged_at is not None,
                          chain=self._chains.get(self.trainer.outer.num_steps, ""),
                          prev_chain=self._chains.get(self.trainer.outer.num_steps - 1, ""))

    async def _keep_record(self, registry: PeerRegistry) -> None:
        while True:
            try:
                await registry.announce(self._record())
                self._records = [r for r in await registry.peers() if r.peer_id != self.peer_id]
                self._admitted = {r.peer_id for r in self._records}
                self.num_peers = len(self._records)
                self._lost.update(self._records, registry.withdrawn)
                for record in self._lost.due():
                    self._spawn(self._redial(registry.dht, record))
                if not self._records and self._had_peers:
                    await self._rediscover(registry.dht)
            except Exception as e:  # the DHT is unreachable for now: keep the last view, try again
                log.warning("peer record refresh failed: %s: %s", type(e).__name__, e)
            await asyncio.sleep(min(1.0, self.cfg.record_ttl_s / 3))

    @property
    def _admit(self) -> Callable[[str], bool] | None:
        """In a private run, whether a peer id is admitted: its record passed the access
        policy at the last refresh. None in an open run (everyone with the spec)."""
        if not self.spec.access.restricted:
            return None
        return lambda peer: peer in self._admitted

    async def _rediscover(self, dht: DHTNode) -> None:
        """Seeing nobody after having had peers (a cut link, now maybe healed): dial the
        initial peers again, at most every 5 s, and ping them back into the DHT's routing
        table, which dropped them while they were unreachable."""
        now = time.monotonic()
        if now < self._next_rediscovery or not self.cfg.net.peers:
            return
        self._next_rediscovery = now + 5.0
        for maddr in self.cfg.net.peers:
            try:
                peer = await dial(dht.protocol.p2p, maddr, 5.0)
                if await asyncio.wait_for(dht.protocol.call_ping(peer), 5.0) is not None:
                    log.info("reached initial peer %s again", maddr)
            except Exception as e:  # still cut off (or in libp2p's dial backoff): try again later
                log.info("initial peer %s still unreachable: %s", maddr, str(e).strip().splitlines()[0][:200])

    async def _redial(self, dht: DHTNode, record: PeerRecord) -> None:
        if await redial(dht.protocol.p2p, dht, record):
            log.info("reached vanished peer %s again", record.peer_id)

    async def _join(self, p2p: P2P, registry: PeerRegistry) -> None:
        """Take the swarm's outer state if there is a swarm; refuse a swarm of another spec."""
        self.states.publish(self.trainer.state_snapshot(), self.trainer.round)
        if not self.cfg.net.peers:
            return
        records = [r for r in await registry.peers() if r.peer_id != self.peer_id]
        if not records and registry.rejected:
            reasons = "; ".join(reason for _, reason in registry.rejected)
            raise NodeError(f"refused: the swarm at {self.cfg.net.peers[0]} is not ours ({reasons}); this node runs "
                            f"run {self.spec.run_id!r} with spec hash {self.spec_hash.hex()[:16]}")
        self._records = records
        self._admitted = {r.peer_id for r in records}
        if records and max(r.round for r in records) > self.trainer.outer.num_steps:
            if self.spec.access.restricted:
                # Donors serve only peers whose record they have seen: show ours and give them a
                # refresh (they read records every second) before asking for the state.
                await registry.announce(self._record())
                await asyncio.sleep(2.5)
            await self._sync(p2p, records)

    async def _sync(self, p2p: P2P, records: list[PeerRecord]) -> None:
        self.state = "syncing"
        newest = max(r.round for r in records)
        donors = [PeerID.from_base58(r.peer_id) for r in records if r.round >= newest - 1]
        self._rng.shuffle(donors)  # newcomers spread over the donors instead of all picking one

        with DownloadProgress(self.trainer.state_spec.total_bytes) as progress:
            for attempt in range(3):
                try:
                    round_, tensors = await download_state(p2p, donors, self.trainer.state_spec,
                                                           on_progress=progress.update)
                    break
                except StateUnavailable as e:
                    log.warning("state download failed (%s); retrying", e)
                    await asyncio.sleep(1 + attempt)
            else:
                raise NodeError("could not download the swarm's state from any donor")
        self.bytes_received += self.trainer.state_spec.total_bytes
        await self._in_pool(self.trainer.load_state, round_, tensors)
        # The donors' chain at that round, from their records (those we read before the
        # download, then the fresh ones): unknown when they moved on meanwhile.
        chain = chain_at(round_, records) or chain_at(round_, self._records)
        self._chains = {round_: chain} if chain else {}
        self.states.publish(self.trainer.state_snapshot(), round_)
        digest = await self._in_pool(self.trainer.state_digest)
        self.emit(f"synced round {round_} from {len(donors)} donors digest {digest}")

    def _expected(self, round_: int) -> set[str]:
        """Live peers that should train `round_`: their record's round (the outer steps they
        have taken; one behind the round trained when rounds overlap, and refreshed every
        second, so possibly one more stale) is within two rounds before it."""
        return {r.peer_id for r in self._records if round_ - 2 <= r.round <= round_ and not r.paused}

    async def _catch_up(self, p2p: P2P) -> bool:
        """Take another state when reunion.whom_to_follow says so: after rounds aggregated
        alone (cut off by a partition), or more than a round behind the swarm. A download
        that fails is logged and tried again at the next round: the peer trains on its own
        state meanwhile, and a failed exchange never ends the node."""
        follow = whom_to_follow(self.peer_id, self.trainer.outer.num_steps, self._records,
                                diverged_at=self._diverged_at)
        if follow is None and self._diverged_at is None:
            follow = whom_to_rejoin(self.peer_id, self._chains, self._records)
        if follow is None:
            return False
        if follow.split_round is not None:
            log.warning("%s: downloading the state of the larger group", follow.why)
        elif self._diverged_at is not None:
            log.warning("found %d peers again after %d rounds alone: taking the swarm's state (%s)",
                        len(self._records), self._alone_rounds, follow.why)
        else:
            log.warning("round %d: %s: downloading its state", self.trainer.round, follow.why)
        try:
            await self._sync(p2p, follow.donors)
        except NodeError as e:
            log.warning("could not take the swarm's state: %s; training on, trying again next round", e)
            return False
        if follow.split_round is not None:
            log.warning("split at round %d: took the state of %d peers", follow.split_round, len(follow.donors))
        self._alone_rounds, self._diverged_at = 0, None
        return True

    async def _wait_while_paused(self) -> None:
        while self.idle.paused is not None and not self.should_exit.is_set():
            self.state = "paused"
            await asyncio.sleep(0.2)

    async def _wait_for_peers(self) -> None:
        while self.num_peers + 1 < self.cfg.min_peers and not self.should_exit.is_set():
            self.state = "waiting"
            await asyncio.sleep(0.1)

    # ------------------------------------------------------------------ rounds

    async def _run_rounds(self, p2p: P2P, dht: DHTNode) -> None:
        trainer = self.trainer
        overlap = self.spec.rounds.overlap
        exchange: asyncio.Future | None = None
        trained = 0
        while not self.should_exit.is_set() and not (self.cfg.max_rounds and trained >= self.cfg.max_rounds):
            await self._wait_while_paused()
            if self.should_exit.is_set():
                break
            progress, train_s = await self._train(dht)
            if self.should_exit.is_set():
                break  # abandon the round: peers waiting for our delta drop us when our streams close
            if exchange is not None:
                await exchange  # round r's outer step must be in before round r + 1's delta is taken
                exchange = None
            if await self._catch_up(p2p):
                continue  # what was trained on the old state is not sent
            if self.cfg.checkpoint_every and trained and trained % self.cfg.checkpoint_every == 0:
                await self.checkpoints.write(self.trainer, self._in_pool, extra=self._checkpoint_extra())
            work = await self._in_pool(trainer.end_round)
            trained += 1
            step = self._exchange(p2p, progress, work, train_s, overlap)
            if overlap:
                exchange = asyncio.ensure_future(step)
            else:
                await step
        if exchange is not None:
            if self.should_exit.is_set():
                exchange.cancel()
            await asyncio.gather(exchange, return_exceptions=True)
        # Nothing may touch the outer state while the last checkpoint copies it.
        await asyncio.to_thread(self._xpool.shutdown, True)
        if self.cfg.checkpoint_every:
            await self.checkpoints.write(self.trainer, self._in_pool, wait=True, extra=self._checkpoint_extra())
        if self.cfg.max_rounds and trained >= self.cfg.max_rounds and not self.should_exit.is_set():
            await self._finish()

    async def _train(self, dht: DHTNode) -> tuple[RoundProgress, float]:
        trainer, cfg = self.trainer, self.cfg
        t0 = time.perf_counter()
        self._round_started[trainer.round] = t0
        progress = RoundProgress(dht, self.spec.run_id, self.spec_hash, trainer.round, self.peer_id,
                                 per_peer_tokens=trainer.round_tokens, interval_s=cfg.report_interval_s,
                                 ttl_s=max(60.0, 2 * self.spec.rounds.deadline_s), carry=self._carry,
                                 expected=functools.partial(self._expected, trainer.round),
                                 validator=self._validator, admit=self._admit)
        self.state = "training"
        self._round_stop = threading.Event()
        if self.should_exit.is_set():
            self._round_stop.set()
        train = asyncio.ensure_future(self._in_pool(trainer.train_until, self._round_stop, progress.reached))
        while not train.done():
            try:
                await progress.report(trainer.tokens, trainer.tokens_per_s)
                await progress.refresh()
            except Exception as e:  # a DHT hiccup: train on and report next time
                log.info("progress report failed: %s", e)
            self.bar.update(trainer.round, *progress.totals(trainer.tokens), progress.num_peers(), self.state)
            await asyncio.wait([train], timeout=cfg.report_interval_s)
        train.result()
        return progress, time.perf_counter() - t0

    async def _exchange(self, p2p: P2P, progress: RoundProgress, work, train_s: float, overlap: bool) -> None:
        trainer, r = self.trainer, work.round
        compute = self._xpool if overlap else self._pool
        run = lambda fn, *args: asyncio.get_running_loop().run_in_executor(compute, fn, *args)  # noqa: E731
        if not overlap:
            self.state = "exchanging"
        self.loss = work.loss
        blob = await run(trainer.encode, work, self.peer_id)
        self.deltas.publish(r, blob)
        await progress.report(work.tokens, trainer.tokens_per_s, done=True)
        await progress.refresh()
        got = await gather_deltas(p2p, progress, r, trainer.delta_spec,
                                  deadline_s=self.spec.rounds.deadline_s, fanout=self.cfg.fanout, rng=self._rng)
        self.bytes_received += got.bytes_received
        self.deltas_rejected += got.rejected
        for peer, why in got.failed.items():
            log.info("round %d: no delta from %s: %s", r, peer, why)
        # Our own delta goes through the same decode every receiver runs, so all peers
        # aggregate the same values (the residual was committed against that decode).
        screened = await run(screen, [trainer.decode(blob)] + got.deltas, self.spec.diloco.robust)
        for rejection in screened.rejected:
            log.warning("round %d: delta of %s refused: %s", r, rejection.sender, rejection.reason)
        for note in screened.notes:
            log.warning("round %d: %s", r, note)
        self.deltas_rejected += len(screened.rejected)
        deltas = apply_screen(screened)
        if len(deltas) == 1 and self._had_peers:
            self._alone_rounds += 1
            if progress.participants() and self._diverged_at is None:
                # Others trained this round and none of their deltas is in our step (cut
                # off): our outer state goes its own way from here until we take another's;
                # rounds with their deltas later do not undo it.
                self._diverged_at = r
        self._had_peers = self._had_peers or len(deltas) > 1
        before = trainer.outer.num_steps
        await run(functools.partial(trainer.apply, work, deltas, overlapped=overlap))
        # A round that pulled a sample of the participants (fanout below their number) left
        # deltas out on purpose: peers then differ by design (README, "Fanout and drift"), and
        # a chain that said so would have them all take one peer's state every round.
        sampled = len(progress.participants()) > self.cfg.fanout
        self._advance_chain(before, r, deltas, sampled=sampled)
        planned = trainer.round_tokens * len(deltas)
        # Integral control: the accumulated overshoot, so a steady bias is cancelled, not halved.
        self._carry = max(-planned // 2, min(planned // 2, self._carry + sum(d.num_tokens for d in deltas) - planned))
        self.states.publish(await run(trainer.state_snapshot), r + 1)
        self.rounds_completed += 1
        if self.cfg.eval_every and self.rounds_completed % self.cfg.eval_every == 0:
            # On the training thread: evaluating while it trains would read half-updated weights.
            self.eval_loss = await self._in_pool(trainer.evaluate)
        started = self._round_started.pop(r, None) or time.perf_counter()
        ended = self._round_started.get(r + 1) if overlap else None
        round_s = (ended or time.perf_counter()) - started
        ev = "nan" if self.eval_loss is None else f"{self.eval_loss:.4f}"
        self._history.append({"round": r, "loss": None if math.isnan(work.loss) else work.loss,
                              "eval_loss": self.eval_loss, "deltas": len(deltas), "tokens": work.tokens})
        self.emit(f"round {r} deltas {len(deltas)}/{len(progress.participants()) + 1} tokens {work.tokens} "
                  f"loss {work.loss:.4f} eval_loss {ev} train_s {train_s:.3f} round_s {round_s:.3f} "
                  f"sent {self.bytes_sent} received {self.bytes_received}")

    def _checkpoint_extra(self) -> dict:
        """Stored with a checkpoint: the round chain of the state it holds ("" unknown)."""
        return {"chain": self._chains.get(self.trainer.outer.num_steps, "")}

    def _advance_chain(self, before: int, r: int, deltas, *, sampled: bool) -> None:
        """Our chain after round `r`'s outer step (which took the outer steps from `before`):
        unknown when the chain before it was, or the round pulled a sample of the deltas."""
        previous = self._chains.get(before)
        if sampled:
            self._chains = {}
        if not previous or sampled:
            return
        self._chains[self.trainer.outer.num_steps] = round_chain(previous, r, [(d.sender, d.num_tokens)
                                                                              for d in deltas])
        for old in sorted(self._chains)[:-CHAINS_KEPT]:
            del self._chains[old]

    async def _finish(self) -> None:
        # Keep serving the last delta until the peers of the last round have moved past it
        # (their records say so) or the deadline: leaving at once would cost them our delta.
        # Those are the peers the round waited for (`_expected`): a record further behind is
        # a peer that will not ask (dead, its record not expired yet; waiting for it kept the
        # survivors of a SIGKILL the whole deadline).
        last = self.trainer.outer.num_steps - 1  # records carry outer steps: past `last` means done with it
        linger_until = time.monotonic() + min(10.0, self.spec.rounds.deadline_s)
        while time.monotonic() < linger_until and self._expected(last):
            await asyncio.sleep(0.1)
        self.eval_loss = await self._in_pool(self.trainer.evaluate)
        digest = await self._in_pool(self.trainer.state_digest)
        try:
            await self._in_pool(self.trainer.save_model, os.path.join(self.cfg.state_dir, FINAL_MODEL))
        except (OSError, SafetensorError) as e:  # a full or read-only disk: the checkpoints hold the state
            log.error("final model not written to %s: %s", self.cfg.state_dir, getattr(e, "strerror", None) or e)
        self.emit(f"final round {self.trainer.round} eval_loss {self.eval_loss:.4f} digest {digest}")

    # ------------------------------------------------------------------ status

    @property
    def bytes_sent(self) -> int:
        return sum(s.bytes_sent for s in (self.deltas, self.states) if s is not None)

    def history(self) -> dict:
        """The last rounds (for the dashboard's chart) and the live peers' records."""
        peers = [{"peer_id": r.peer_id, "device": r.device, "tokens_per_s": r.tokens_per_s, "round": r.round,
                  "paused": r.paused} for r in self._records]
        return {"rounds": list(self._history), "peers": peers}

    def status(self) -> dict:
        t = self.trainer
        return {
            "state": self.state,
            "round": 0 if t is None else t.round,
            "loss": self.loss,
            "eval_loss": self.eval_loss,
            "num_peers": self.num_peers,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "peer_id": self.peer_id,
            "addrs": self.addrs,
            "device": None if t is None else t.device.type,
            "precision": None if t is None else t.precision,
            "micro_batch": None if t is None else t.micro_batch,
            "tokens_per_s": 0.0 if t is None else t.tokens_per_s,
            "rounds_completed": self.rounds_completed,
            "shard": self.shard,
            "deltas_rejected": self.deltas_rejected,
            "requests_refused": sum(s.limits.refused for s in (self.deltas, self.states) if s is not None),
            "paused": self.idle.paused,
            "checkpoint_round": self.checkpoints.round,
            "checkpoint_error": self.checkpoints.error,
        }


def run_daemon(spec: RunSpec, cfg: NodeConfig, emit: Callable[[str], None] = print) -> int:
    """Run a daemon until it is stopped or reaches max_rounds; returns the exit code."""
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # uvloop is optional (no wheel on Windows)
        runner = asyncio.run
    daemon = Daemon(spec, cfg, emit)
    try:
        return runner(daemon.serve())
    except NodeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
