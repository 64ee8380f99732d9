"""A tree round in the round loop (node/roundloop.py; the rows, their messages and their pull
are node/tree.py's): which rows the round is drawn into, whom a peer tells its progress while
it trains, and the round's second half, once its row's deltas are screened and checked: our
row's aggregate served, every other row's pulled, and all of them held to each other for the
outer step."""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Callable

from locoswarm.node.roundcontext import OuterStep
from locoswarm.node.tree import ask_order, check_row, gather_rows, row_count, row_of, take_rows

if TYPE_CHECKING:
    from locoswarm.node.roundcontext import RoundContext
    from locoswarm.node.rounds import RoundProgress
    from locoswarm.optim.screen import Screened
    from locoswarm.protocol import DecodedDelta
    from locoswarm.protocol.rows import RowAggregate

log = logging.getLogger(__name__)


def drawn(ctx: RoundContext, round_: int) -> tuple[int, int]:
    """(the rows round `round_` is drawn into as the outer state we hold draws them, ours):
    (1, 0), a full round, unless the spec asks for tree rounds and the ledger counts two rows'
    worth of established peers."""
    rows = row_count(ctx.trainer.ledger, ctx.spec.rounds)
    return rows, row_of(ctx.spec_hash, round_, ctx.peer_id, rows)


def row_filter(ctx: RoundContext, round_: int) -> Callable[[str], bool]:
    """Whether a peer is told our progress in `round_` and counted in its target: in a tree
    round, the peers of our row; in a full round, every peer. A row ends its round when its
    own peers' tokens reach their share, as a full round does with all of them, and a peer's
    progress messages go to its row, not to every peer in view. (With overlap the ledger may
    be a step behind the one the round's exchange draws with: where the rows' count changes
    between them, the row's pull probes the peers it was not told of, as it probes any.)"""
    rows, mine = drawn(ctx, round_)
    if rows == 1:
        return lambda peer: True
    return lambda peer: row_of(ctx.spec_hash, round_, peer, rows) == mine


async def tree_step(ctx: RoundContext, run, progress: RoundProgress, r: int, rows: int, mine: int, base: str,
                    kept: list[DecodedDelta], screened: Screened) -> OuterStep:
    """A tree round's second half: serve our row's aggregate of its `kept` deltas (none when
    we hold ours and took no other: the row's other members serve it), pull every other
    row's, and say what the outer step takes. `run`: the exchange's compute (Pools)."""
    trainer = ctx.trainer
    own: RowAggregate | None = None
    try:
        if kept and any(d.sender == ctx.peer_id for d in kept):
            blob = await run(functools.partial(trainer.build_row, kept, screened, round_=r, row=mine, rows=rows,
                                               base=base))
            ctx.rows.server.publish(r, blob)
            own = await run(trainer.decode_row, blob)
    finally:
        if own is None:
            ctx.rows.server.give_up(r)

    def members() -> dict[int, list[str]]:
        # Other rows' peers tell us nothing: every live record in view names a member to
        # ask, whatever round it shows (the registry's may be rounds old); one not in the
        # round answers "never" or "not yet", a dead one refuses the dial.
        seen = ((set(progress.participants()) | set(progress.expected()) | ctx.membership.live(r))
                - progress.withdrawn() - {ctx.peer_id})
        out: dict[int, list[str]] = {}
        for peer in seen:
            row = row_of(ctx.spec_hash, r, peer, rows)
            if not (row == mine and own is not None) and not trainer.ledger.banned(peer):
                out.setdefault(row, []).append(peer)
        return out

    got = await gather_rows(ctx.rows.streams, r, members, decode=trainer.decode_row,
                            check=lambda agg, row: check_row(agg, spec_hash=ctx.spec_hash, round_=r, row=row,
                                                             rows=rows, base=base),
                            limit=trainer.row_limit, deadline_s=ctx.spec.rounds.deadline_s,
                            order=lambda peers: ask_order(ctx.spec_hash, r, ctx.peer_id, peers))
    ctx.stats.bytes_received += got.bytes_received
    ctx.stats.delta_requests += got.requests
    for row, why in sorted(got.failed.items()):
        log.warning("round %d: no aggregate of row %d: %s", r, row, why)
    aggregates = sorted(([own] if own is not None else []) + list(got.rows.values()), key=lambda a: a.row)
    held_to = await run(trainer.step.screen, [a.delta for a in aggregates], None, base)
    step, refused = take_rows(aggregates, held_to, trainer.step.kept(held_to))
    for row, why in sorted(refused.items()):
        log.warning("round %d: aggregate of row %d refused: %s", r, row, why)
    for note in held_to.notes:
        log.warning("round %d: rows: %s", r, note)
    return step
