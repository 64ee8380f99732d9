"""The daemon's round loop: train until the swarm's tokens reach the round's target, take
the round boundary, then exchange: encode and serve this peer's delta, pull the
participants' deltas (node/rounds.py says how a round's end and its participants are
agreed), screen, aggregate and take the outer step (optim/round.py's RoundStep, through the
Trainer), serve the new outer state for joiners. With `rounds.overlap` the exchange of round
r runs on the exchange thread while round r + 1 trains (node/threads.py).

A round that fails (a non-finite pseudo-gradient, a DHT error, a peer or a disk that fails
in a way nothing below caught) is discarded, logged and reported as an event, and the node
trains on: `_guarded` is the one place that decides it. A round discarded before its outer
step leaves this peer a step behind the swarm, so it takes the swarm's state at the next
boundary (node/lineage.py). Only a failure that repeats MAX_FAILED_IN_A_ROW times ends the
node: something is broken for good then (a device that fails every step).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from typing import TYPE_CHECKING, Awaitable, Callable

from locoswarm.node.catchup import CatchUp
from locoswarm.node.evaluation import EvalSchedule, timed
from locoswarm.node.events import RoundDiscarded
from locoswarm.node.handover import served
from locoswarm.node.host import NodeError
from locoswarm.node.leaving import finish
from locoswarm.node.lifecycle import unless_stopped
from locoswarm.node.chains import delta_content
from locoswarm.node.pull import UNPROVEN_WAIT_S, gather_deltas
from locoswarm.node.roundreport import ExchangePhases, RoundReport
from locoswarm.node.roundcontext import OuterStep, RoundContext
from locoswarm.node.rounds import RoundProgress
from locoswarm.node.tree import row_of
from locoswarm.node.treeround import drawn, row_filter, tree_step

if TYPE_CHECKING:
    from locoswarm.node.trainer import RoundWork

log = logging.getLogger(__name__)
MAX_FAILED_IN_A_ROW = 3
"""Rounds that may fail one after another before the node gives up."""


class RoundLoop:
    def __init__(self, ctx: RoundContext) -> None:
        self.ctx = ctx
        self.catch_up = CatchUp(ctx)
        self.round_stop = threading.Event()
        """Ends the current round's training early: leaving, or the owner needs the machine."""
        self.carry = 0
        """Tokens the swarm trained beyond its plan so far (negative: short of it), as this peer saw it."""
        self.report = RoundReport(ctx)
        self._rows: dict[int, tuple[int, int]] = {}
        """round → (its rows, ours), drawn as its training started (treeround.py `drawn`)."""
        self._last_rows = 1
        """The rows of the last round exchanged."""
        self._failed_in_a_row = 0
        self.evals = EvalSchedule(ctx.cfg.eval_every)

    def stop_round(self) -> None:
        self.round_stop.set()

    async def run(self) -> None:
        ctx, trainer = self.ctx, self.ctx.trainer
        cfg, overlap = ctx.cfg, ctx.spec.rounds.overlap
        exchange: asyncio.Future | None = None
        trained = 0
        while not ctx.should_exit.is_set() and not self._reached_limit(trained):
            await self._wait_while_paused()
            if ctx.should_exit.is_set():
                break
            round_ = trainer.round
            progress = await self._guarded(round_, self._train)
            if ctx.should_exit.is_set():
                break  # abandon the round: peers waiting for our delta drop us when our streams close
            boundary_t0 = time.perf_counter()
            if exchange is not None:
                # Round r's outer step must be in before round r + 1's delta is taken; a stop
                # meanwhile must not wait out the delta pull's deadline (30 s by default).
                done, _ = await unless_stopped(exchange, ctx.should_exit)  # cancelled if not done
                exchange = None
                if not done:
                    break
            wait_s = time.perf_counter() - boundary_t0
            if progress is None:  # training failed: take the round's boundary and drop it
                await self._discard(await ctx.pools.train(trainer.end_round), overlapped=False)
                continue
            if await self.catch_up.maybe_follow():
                self._give_up(round_)  # what was trained on the old state is not sent
                continue
            if cfg.checkpoint_every and trained and trained % cfg.checkpoint_every == 0:
                await ctx.checkpoints.write(trainer, ctx.pools.train,
                                            extra=ctx.lineage.checkpoint_extra(trainer.outer_steps))
            work = await ctx.pools.train(trainer.end_round)
            self.report.boundary(work.round, wait_s, time.perf_counter() - boundary_t0 - wait_s)
            trained += 1
            ctx.faults.trained(work.round, work, trainer.outer.params)
            step = self._guarded(work.round, functools.partial(self._exchange, progress, work, overlap), work,
                                 overlapped=overlap)
            if overlap:
                exchange = asyncio.ensure_future(step)
            else:  # awaited here, and as at the boundary above a stop does not wait out the pull's deadline
                await unless_stopped(step, ctx.should_exit)
        if exchange is not None:
            if ctx.should_exit.is_set():
                exchange.cancel()
            await asyncio.gather(exchange, return_exceptions=True)
        await ctx.pools.close_exchange()  # nothing may touch the outer state while the last checkpoint copies it
        if cfg.checkpoint_every:
            await ctx.checkpoints.write(trainer, ctx.pools.train, wait=True,
                                        extra=ctx.lineage.checkpoint_extra(trainer.outer_steps))
        if self._reached_limit(trained) and not ctx.should_exit.is_set():
            await finish(self.ctx, tree=self._last_rows > 1)

    def _reached_limit(self, trained: int) -> bool:
        """--max-rounds rounds trained by this process, or --until-round reached by the
        outer state (a round in flight on the exchange thread counts once it is applied)."""
        cfg = self.ctx.cfg
        return bool(cfg.max_rounds and trained >= cfg.max_rounds
                    or cfg.until_round and self.ctx.trainer.round >= cfg.until_round)

    async def _guarded(self, round_: int, phase: Callable[[], Awaitable], work: RoundWork | None = None, *,
                       overlapped: bool = False):
        """The one place a round's failure is decided: run one phase of round `round_` (made
        here, so that a step cancelled before it starts, as at SIGTERM, leaves no coroutine
        never awaited); on failure discard the round (never the node) and return None.
        `work`: the round's boundary, for the exchange phase (a failure before the outer step
        drops it; after, the round stands and only its bookkeeping failed)."""
        try:
            return await phase()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._failed_in_a_row += 1
            reason = f"{type(e).__name__}: {e}"
            log.error("round %d discarded: %s", round_, reason, exc_info=log.isEnabledFor(logging.DEBUG))
            if self._failed_in_a_row >= MAX_FAILED_IN_A_ROW:
                raise NodeError(f"{MAX_FAILED_IN_A_ROW} rounds failed in a row, the last with {reason}") from e
            await self._dropped(round_, reason, work, overlapped=overlapped)
            return None

    async def _dropped(self, round_: int, reason: str, work: RoundWork | None, *, overlapped: bool) -> None:
        """Count and report round `round_` as discarded for `reason`; before its outer step
        (`work` not applied), drop it (`_discard`)."""
        self.ctx.stats.rounds_discarded += 1
        self.ctx.events(RoundDiscarded(round=round_, reason=reason))
        if work is not None and not work.applied:
            await self._discard(work, overlapped=overlapped)

    async def _discard(self, work: RoundWork, *, overlapped: bool) -> None:
        """Drop round `work.round` before its outer step: our outer state missed a step the
        swarm took, so our chain is unknown and we take the swarm's state at the next
        boundary (lineage.py); the replica restarts where it would have without the round."""
        ctx = self.ctx
        self._give_up(work.round)
        ctx.lineage.discarded(ctx.trainer.outer_steps)
        await ctx.pools.exchange_compute(overlapped)(functools.partial(ctx.trainer.discard, work, overlapped=overlapped))

    async def _train(self) -> RoundProgress:
        ctx, trainer, cfg = self.ctx, self.ctx.trainer, self.ctx.cfg
        t0 = time.perf_counter()
        round_ = trainer.round
        held = trainer.holds == round_  # joined late: the peers that took part may be past it (Membership.candidates)
        self.report.started(round_, t0)
        rows, mine = self._rows[round_] = drawn(ctx, round_)
        for old in [r for r in self._rows if r < round_ - 2]:  # rounds given up before their exchange
            del self._rows[old]
        ours = row_filter(ctx.spec_hash, round_, rows, mine)
        # A tree round's row is new every round: a row-mate's record may be rounds old here
        # (the registry's, or the last one it told us when we last shared a row), and told
        # only the peers whose records put them in the round, a member heard from part of its
        # row and pulled only those (16 peers: leaders built their row's aggregate of 5 of 8
        # deltas). Every live row-mate in view is told our progress and asked for its delta.
        mates = ((lambda: {peer for peer in ctx.membership.live(round_) if ours(peer)} - {ctx.peer_id})
                 if rows > 1 else frozenset)
        # The carry is the swarm's overshoot; a tree round's row takes back its share of it
        # (each of R rows counts only its own peers in its target). Taking all of it in every
        # row took it back R times over: 16 peers in rows of 4 trained 30 % more tokens a
        # round than planned (2026-12-07).
        progress = RoundProgress(ctx.progress, round_, ctx.peer_id,
                                 per_peer_tokens=trainer.round_tokens, interval_s=cfg.report_interval_s,
                                 carry=int(self.carry / rows),
                                 expected=lambda: {peer for peer in ctx.membership.expected(round_)
                                                   if not trainer.ledger.banned(peer) and ours(peer)},
                                 candidates=lambda: {peer for peer in ctx.membership.candidates(round_, late=held)
                                                     | mates() if ctx.progress.reachable(peer)
                                                     and not trainer.ledger.banned(peer)},
                                 told=lambda: {peer for peer in ctx.membership.told(round_) if ours(peer)} | mates(),
                                 incarnation=ctx.incarnation, incarnations=ctx.membership.incarnation,
                                 trusted=trainer.ledger.established, excluded=trainer.ledger.banned)
        ctx.stats.state = "training"
        ctx.deltas.training(round_)
        if ctx.rows is not None:
            ctx.rows.server.training(round_)
        self.round_stop = threading.Event()
        if ctx.should_exit.is_set():
            self.round_stop.set()
        train = asyncio.ensure_future(ctx.pools.train(trainer.train_until, self.round_stop, progress.reached))
        while not train.done():
            now = trainer.progress
            progress.report(now.tokens, now.tokens_per_s)
            progress.refresh()
            ctx.bar.update(round_, *progress.totals(now.tokens), progress.num_peers(), ctx.stats.state)
            await asyncio.wait([train], timeout=cfg.report_interval_s)
        train.result()
        progress.train_s = time.perf_counter() - t0
        return progress

    async def _exchange(self, progress: RoundProgress, work: RoundWork, overlap: bool) -> None:
        ctx, trainer, r = self.ctx, self.ctx.trainer, work.round
        started = time.monotonic()
        run = ctx.pools.exchange_compute(overlap)
        if not overlap:
            ctx.stats.state = "exchanging"
        ctx.stats.loss = work.loss
        # The round chain of the outer state the delta is taken from: peers on another one
        # leave it out (optim/screen.py), and it tells what our checks judge.
        base = ctx.lineage.chains.get(trainer.outer_steps, "")
        held = trainer.holds == r
        # A tree round's rows, drawn as its training started (treeround.py `drawn`); 1: a full round.
        rows, mine = self._rows.pop(r)
        self._last_rows = rows
        if held:  # the first round in a state we took (Trainer.hold): nobody waits for a delta of ours
            log.info("round %d: our delta is held, not sent: we joined the round late, in a state we took", r)
            self._withdraw(progress, r)
        else:
            blob = await self._send(run, progress, work, base)
        sent, sent_at = time.monotonic(), time.time()
        got = await gather_deltas(ctx.delta_streams, progress, r, trainer.step.spec,
                                  deadline_s=ctx.spec.rounds.deadline_s,
                                  fanout=ctx.cfg.fanout, rng=ctx.rng,
                                  keep=lambda sender, others: ctx.faults.keep_delta(r, sender, others),
                                  gone=ctx.membership.is_gone,
                                  skip=lambda peer: ctx.membership.withheld(peer, r),
                                  unproven_wait_s=max(UNPROVEN_WAIT_S, progress.train_s),
                                  member=(lambda peer: row_of(ctx.spec_hash, r, peer, rows) == mine) if rows > 1
                                  else None)
        pulled = time.monotonic()
        ctx.stats.bytes_received += got.bytes_received
        ctx.stats.delta_requests += got.requests
        ctx.stats.deltas_rejected += got.rejected
        ctx.membership.prove([d.sender for d in got.deltas])
        for peer in got.unreachable:
            ctx.membership.unprove(peer)
        for peer in got.silent:
            ctx.membership.mark_silent(peer, r)
        for peer in got.withheld:
            ctx.membership.mark_withholding(peer, r)
        for peer, why in got.failed.items():
            # A peer that held the round to its deadline, or an unproven one that held it
            # LIVENESS_S, is a stall worth a warning; one found gone or restarted is churn.
            stall = peer in got.stalled or peer in got.silent or peer in got.unserved
            log.log(logging.WARNING if stall else logging.INFO, "round %d: no delta from %s: %s", r, peer, why)
        if held:
            await run(trainer.hold, work)
        # Our own delta goes through the same decode every receiver runs, so all peers
        # aggregate the same values (the residual was committed against that decode).
        own = [] if held else [await run(trainer.decode, blob)]
        screened = await run(trainer.screen, own + got.deltas, base)
        for rejection in screened.rejected:
            log.warning("round %d: delta of %s refused: %s", r, rejection.sender, rejection.reason)
        for note in screened.notes:
            log.warning("round %d: %s", r, note)
        ctx.stats.deltas_rejected += len(screened.rejected)
        t_check = time.perf_counter()
        checks = await run(trainer.check, work, screened.deltas, ctx.peer_id)
        self.report.checked(r, checks, time.perf_counter() - t_check)
        kept = trainer.step.kept(screened)
        participants = progress.participants()
        checked = time.monotonic()
        if rows > 1:
            step = await tree_step(ctx, run, progress, r, rows, mine, base, kept, screened, started)
            rows_s = time.monotonic() - checked
        else:
            rows_s = 0.0
            # A round that pulled a sample of the participants (fanout below their number)
            # left deltas out on purpose (lineage.py says what that does to the chain).
            step = OuterStep(deltas=kept, earned=screened.earned, banned=screened.banned, shares=screened.shares,
                             accepted={d.sender: screened.tokens.get(d.sender, d.num_tokens) for d in kept},
                             chain=[(d.sender, d.num_tokens, delta_content(d)) for d in kept],
                             wires=[d.wire for d in own + got.deltas], sampled=len(participants) > ctx.cfg.fanout)
        if not step.deltas or (not held and not kept):
            # Nothing to step with: we held our delta and the others' are gone (we took a state
            # rounds behind them) or none came; or the screening refused ours with theirs (ours
            # excluded by the swarm's checks, theirs taken from another outer state: we are
            # not on the swarm's lineage). Not a failure of the node, which three in a row
            # would end (seen on 16 cores, 2026-12-06): the round is dropped and the swarm's
            # state taken at the next boundary; the replica keeps what it trained.
            why = ("held, and no other peer's delta came" if held else
                   f"every delta refused, ours among them ({len(screened.rejected)} refused)")
            log.warning("round %d: nothing to aggregate (%s): discarded, we take the swarm's state at the next "
                        "boundary", r, why)
            await self._dropped(r, why, work, overlapped=overlap)
            return
        before = trainer.outer_steps
        established = trainer.ledger.established_peers()
        await run(functools.partial(trainer.apply, work, step.deltas, overlapped=overlap, earned=step.earned,
                                    banned=step.banned))
        # What the round took from whom, refused or missed: the dashboard's contributions.
        ctx.stats.contributions.round(r, accepted=step.accepted,
                                      refused=got.refused | {x.sender for x in screened.rejected},
                                      missing=set(got.failed))
        ctx.lineage.after_round(r, before, trainer.outer_steps, step.chain, others_trained=bool(participants),
                                sampled=step.sampled, established=established, own_sent=not held,
                                senders=len(step.accepted))
        ctx.states.rounds.keep(before, step.wires)  # for peers catching up (replay.py)
        self.carry = trainer.step.carry(self.carry, step.deltas, trainer.round_tokens, step.shares)
        state, residual = await run(served, trainer)
        ctx.states.publish(state, r + 1, ctx.lineage.chains.get(trainer.outer_steps, ""), trainer.ledger.pairs(),
                           residual)
        ctx.stats.rounds_completed += 1
        ctx.stats.last_round_at = time.time()
        phases = ExchangePhases(sent - started, pulled - sent, time.monotonic() - pulled, sent_at=sent_at,
                                screen_s=checked - pulled, rows_s=rows_s)
        if self.evals.due(ctx.stats.rounds_completed):
            # On the training thread: evaluating while it trains would read half-updated weights.
            ctx.stats.eval_loss, took_s = await ctx.pools.train(functools.partial(timed, trainer.evaluate))
            self.evals.took(took_s)
        self._failed_in_a_row = 0  # a whole round went through
        self.report.ended(work, len(step.accepted), len(participants) + 1, progress.train_s, overlap, rows=rows,
                          phases=phases)

    async def _send(self, run, progress: RoundProgress, work: RoundWork, base: str) -> bytes:
        """Encode our delta of the round (on `run`, the exchange's compute), serve it and
        report the round done; the encoded delta."""
        ctx, r = self.ctx, work.round
        try:
            blob = await run(ctx.trainer.encode, work, ctx.peer_id, base)
        except ValueError:
            # No delta of ours will come (a non-finite replica): say so, so that nobody
            # waits for it until the deadline (node/rounds.py, withdrawn peers).
            self._withdraw(progress, r)
            raise
        ctx.deltas.publish(r, blob)
        try:
            ctx.faults.reporting(r)
            progress.report(work.tokens, ctx.trainer.tokens_per_s, done=True)
            progress.refresh()
        except Exception as e:  # the others still see our last report, and pull our delta
            log.warning("round %d: reporting the round done failed: %s: %s", r, type(e).__name__, e)
        return blob

    def _give_up(self, r: int) -> None:
        """No delta, and no row aggregate, of round `r` will come from us."""
        self.ctx.deltas.give_up(r)
        if self.ctx.rows is not None:
            self.ctx.rows.server.give_up(r)

    def _withdraw(self, progress: RoundProgress, r: int) -> None:
        self._give_up(r)
        progress.report(0, 0.0, done=True)

    async def _wait_while_paused(self) -> None:
        while self.ctx.idle.paused is not None and not self.ctx.should_exit.is_set():
            self.ctx.stats.state = "paused"
            await asyncio.sleep(0.2)
