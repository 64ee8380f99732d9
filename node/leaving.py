"""Leaving the swarm at --max-rounds (node/roundloop.py calls `finish` after the last round):
linger while peers may still pull what this peer serves of the last round, then evaluate,
write the final model (FINAL_MODEL in the state directory) and report the Final event."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING

from safetensors import SafetensorError

from locoswarm.node.events import Final

if TYPE_CHECKING:
    from locoswarm.node.roundcontext import RoundContext

log = logging.getLogger(__name__)
FINAL_MODEL = "final-model.safetensors"
"""Written to the state directory when the daemon stops at --max-rounds: the replica's parameters."""


async def finish(ctx: RoundContext, *, tree: bool = False) -> None:
    """Leaving at --max-rounds: keep serving the last delta until the peers of the last
    round have moved past it (their records say so) or the deadline, since leaving at
    once would cost them our delta. Those are the peers the round waited for
    (`Membership.expected`): a record further behind is a peer that will not ask (dead,
    its record not expired yet). After a tree round, every live peer in view may still
    ask for our row's aggregate, and only our row hears our progress: we tell them all
    that we are done and wait on each of them (16 peers in rows of 4 on 16 cores,
    2026-12-07, ended on different digests when a row's members left as soon as their
    row had moved on). `tree`: the last round was a tree round. Then evaluate and write the
    final model."""
    trainer = ctx.trainer
    last = trainer.outer_steps - 1  # records carry outer steps: past `last` means done with it
    # Our record is past `last` now: tell it at once, or peers leaving with us (each
    # waiting for the others' records to move on) would all wait out the deadline.
    ctx.progress.show()
    if tree:
        ctx.progress.introduce(ctx.membership.live(last))

    def waited() -> set[str]:
        return ctx.membership.expected(last) | (ctx.membership.behind(last) - {ctx.peer_id} if tree else set())

    linger_until = time.monotonic() + min(10.0, ctx.spec.rounds.deadline_s)
    while time.monotonic() < linger_until and waited() and not ctx.should_exit.is_set():
        await asyncio.sleep(0.1)  # a signal ends the lingering (the peers then drop our delta), not the final model
    unfinished = len(waited())
    ctx.stats.eval_loss = await ctx.pools.train(trainer.evaluate)
    digest = await ctx.pools.train(trainer.state_digest)
    path = os.path.join(ctx.cfg.state_dir, FINAL_MODEL)
    try:
        await ctx.pools.train(trainer.save_model, path)
    except (OSError, SafetensorError) as e:  # a full or read-only disk: the checkpoints hold the state
        log.error("final model not written to %s: %s", ctx.cfg.state_dir, getattr(e, "strerror", None) or e)
    ctx.events(Final(round=trainer.round, eval_loss=ctx.stats.eval_loss, digest=digest, unfinished=unfinished))
