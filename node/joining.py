"""Joining a swarm, after p2pd, the DHT and the servers are up and before the first round:
serve our own state (a swarm may be starting from it), read the registry through the initial
peers, refuse a swarm of another spec or run (exit 2, naming it), take the swarm's state if
it is ahead (node/catchup.py), and wait until --min-peers peers that train are in the view.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Callable

from locoswarm.node.handover import served
from locoswarm.node.host import NodeError
from locoswarm.protocol.records import PeerRecord

if TYPE_CHECKING:
    from locoswarm.node.catchup import CatchUp
    from locoswarm.node.registry import PeerRegistry
    from locoswarm.node.roundcontext import RoundContext

log = logging.getLogger(__name__)


async def join_swarm(ctx: RoundContext, registry: PeerRegistry, catch_up: CatchUp, initial_peers: list[str],
                     record: Callable[[], PeerRecord]) -> None:
    """Serve our state, then take the swarm's if there is a swarm ahead; refuse a swarm
    of another spec or run (NodeError)."""
    trainer, membership = ctx.trainer, ctx.membership
    state, residual = served(trainer)
    ctx.states.publish(state, trainer.round, ctx.lineage.chains.get(trainer.outer_steps, ""), trainer.ledger.pairs(),
                       residual)
    if not initial_peers:
        return
    membership.update(await registry.peers())
    ours = f"this node runs run {ctx.spec.run_id!r} with spec hash {ctx.spec_hash.hex()[:16]}"
    if not membership.records and registry.rejected:
        reasons = "; ".join(reason for _, reason in registry.rejected)
        raise NodeError(f"refused: the swarm at {initial_peers[0]} is not ours ({reasons}); {ours}")
    if not membership.records:
        await _check_initial_peers_run(ctx, initial_peers, ours)
    await catch_up.join(membership.records, announce=lambda: registry.announce(record()))


async def _check_initial_peers_run(ctx: RoundContext, initial_peers: list[str], ours: str) -> None:
    """No record of our run came through the initial peers: ask them which run they
    train (node/runinfo.py), and stop when none of those that answer trains ours, rather
    than train alone beside them."""
    from locoswarm.node.runinfo import not_ours, runs_of

    spec = ctx.spec
    peers = sorted({a.rsplit("/p2p/", 1)[1] for a in initial_peers if "/p2p/" in a} - {ctx.peer_id})
    why = not_ours(await runs_of(ctx.p2p, peers), spec.run_id, ctx.spec_hash, private=spec.access.restricted)
    if why is not None:
        raise NodeError(f"refused: the peers you joined through train another run ({why}); {ours}. Join with "
                        "the run's spec (--run) or the organiser's invite (--invite)")
    log.info("no record of run %r yet at the initial peers: training and waiting for them", spec.run_id)


async def wait_for_peers(ctx: RoundContext) -> None:
    """Until `min_peers` that train (not paused, not joining) are in the view. Those we
    see are told our record over the progress streams, so that a peer that has not read
    us in the registry yet (it reads every third of the record TTL) sees us at once."""
    membership = ctx.membership
    while sum(not r.paused for r in membership.records) + 1 < ctx.cfg.min_peers and not ctx.should_exit.is_set():
        ctx.stats.state = "waiting"
        ctx.progress.introduce([r.peer_id for r in membership.records])
        await asyncio.sleep(0.1)
