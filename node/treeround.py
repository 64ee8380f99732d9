"""A tree round in the round loop (node/roundloop.py; the rows, their messages and their pull
are node/tree.py's): which rows the round is drawn into, whom a peer tells its progress while
it trains, and the round's second half, once its row's deltas are screened and checked: our
row's aggregate served, every other row's pulled, and all of them held to each other for the
outer step."""

from __future__ import annotations

import functools
import logging
import time
from typing import TYPE_CHECKING, Callable

from locoswarm.node.chains import delta_content
from locoswarm.node.roundcontext import OuterStep
from locoswarm.node.tree import ask_order, check_row, gather_rows, lead_order, row_count, row_of, take_rows
from locoswarm.protocol import MalformedMessage

if TYPE_CHECKING:
    from locoswarm.node.roundcontext import RoundContext
    from locoswarm.node.rounds import RoundProgress
    from locoswarm.optim.screen import Screened
    from locoswarm.protocol import DecodedDelta
    from locoswarm.protocol.rows import RowAggregate

log = logging.getLogger(__name__)
LEAD_WAIT_S = 3.0
"""The least a member waits for the members ahead of it in its row's lead order to serve
the row's aggregate, once its own is ready; it waits as long as its round's exchange has
taken so far when that is longer (a slower machine waits longer), never past the deadline."""


def drawn(ctx: RoundContext, round_: int) -> tuple[int, int]:
    """(the rows round `round_` is drawn into, ours), as the ledger we hold now draws them:
    (1, 0), a full round, unless the spec asks for tree rounds and the ledger counts two rows'
    worth of established peers. The round loop draws a round's rows once, as its training
    starts, and keeps them for its exchange: with overlap the outer step before takes place
    meanwhile, and where it changed the count the peers had trained (told their progress,
    counted their targets) in one set of rows and exchanged in another; every row then
    aggregated another set and the swarm split into as many chains (16 peers on 16 cores,
    2026-12-07, rows going from 3 to 4). Every peer on one lineage starts a round's training
    on the same ledger (the one before the last outer step, with overlap), so all draw alike."""
    rows = row_count(ctx.trainer.ledger, ctx.spec.rounds)
    return rows, row_of(ctx.spec_hash, round_, ctx.peer_id, rows)


def row_filter(spec_hash: bytes, round_: int, rows: int, mine: int) -> Callable[[str], bool]:
    """Whether a peer is told our progress in `round_` and counted in its target, the round
    drawn into `rows` rows, ours `mine`: in a tree round, the peers of our row; in a full
    round, every peer. A row ends its round when its own peers' tokens reach their share, as
    a full round does with all of them, and a peer's progress messages go to its row, not to
    every peer in view."""
    if rows == 1:
        return lambda peer: True
    return lambda peer: row_of(spec_hash, round_, peer, rows) == mine


def row_leads(ctx: RoundContext, progress: RoundProgress, r: int, rows: int, mine: int,
              built: RowAggregate) -> list[str]:
    """The members of our row whose aggregate it takes, first to last (`agree_row`): its
    established peers (our ledger's, which every member on our lineage holds) that are live
    in our view or took part in the round, in the round's lead order, ourselves among them
    only if established. A member that saw only some of its row's peers must still ask the
    same ones first: with the lead drawn among the peers each member happened to hear from
    in the round, one that had not heard from the first served its own aggregate, and the
    peers that asked it took another than the rest (16 peers on 16 cores, 2026-12-07: 3 of
    16 a member short, two chains). Where the row holds no established peer, the peers we
    heard from in the round and ours."""
    ledger, spec_hash = ctx.trainer.ledger, ctx.spec_hash
    seen = (set(progress.participants()) | {m.sender for m in built.members}) - progress.withdrawn()

    def ours(peers) -> list[str]:
        return sorted(p for p in peers if row_of(spec_hash, r, p, rows) == mine and not ledger.banned(p))

    live = ctx.membership.live(r)
    established = ours(p for p in ledger.established_peers() if p == ctx.peer_id or p in seen or p in live)
    return lead_order(spec_hash, r, established or ours(seen | {ctx.peer_id}))


async def agree_row(ctx: RoundContext, progress: RoundProgress, r: int, rows: int, mine: int, base: str,
                    built: RowAggregate, started: float) -> RowAggregate:
    """The aggregate our row serves and steps with, given the one we `built` of the deltas we
    hold: that of the first of the row's members, in its lead order (node/tree.py
    `lead_order`), that serves one. Each member aggregates the deltas it pulled, and a member
    that missed one of them would otherwise serve other values than the rest, splitting
    every peer that asks it from those that ask the others; so a member asks the members
    ahead of it in that order (those it saw in the round: its deltas' senders and the peers
    that told it their progress) and takes the first one's, waiting on one that is not ready
    yet before asking the next, and serves its own only when none ahead of it serves one. A
    member ahead that aggregates the very deltas we hold to other values is refused as bad.
    `started`: when the round's exchange began (time.monotonic)."""
    trainer = ctx.trainer
    lead = row_leads(ctx, progress, r, rows, mine, built)
    ahead = lead[:lead.index(ctx.peer_id)] if ctx.peer_id in lead else lead
    if not ahead:
        return built
    ours = {(m.sender, m.content) for m in built.members}

    def check(agg: RowAggregate, row: int) -> None:
        check_row(agg, spec_hash=ctx.spec_hash, round_=r, row=row, rows=rows, base=base)
        if {(m.sender, m.content) for m in agg.members} == ours and \
                delta_content(agg.delta) != delta_content(built.delta):
            raise MalformedMessage("aggregates the deltas we hold to other values than ours")

    wait_s = min(ctx.spec.rounds.deadline_s, max(LEAD_WAIT_S, time.monotonic() - started))
    got = await gather_rows(ctx.rows.streams, r, lambda: {mine: ahead}, decode=trainer.decode_row, check=check,
                            limit=trainer.row_limit, deadline_s=wait_s, order=lambda peers: peers, strict=True)
    ctx.stats.bytes_received += got.bytes_received
    ctx.stats.delta_requests += got.requests
    agreed = got.rows.get(mine)
    if agreed is None:
        log.info("round %d: our row's aggregate is ours: no member ahead of us served one (%s)", r,
                 got.failed.get(mine, "none"))
        return built
    theirs = {(m.sender, m.content) for m in agreed.members}
    if theirs != ours:
        log.info("round %d: our row's aggregate is one of %d members' deltas where we held %d (%d of it missing here, "
                 "%d of ours left out)", r, len(theirs), len(ours), len(theirs - ours), len(ours - theirs))
    return agreed


async def tree_step(ctx: RoundContext, run, progress: RoundProgress, r: int, rows: int, mine: int, base: str,
                    kept: list[DecodedDelta], screened: Screened, started: float) -> OuterStep:
    """A tree round's second half: agree with our row on its aggregate (`agree_row`; none
    when we hold ours and took no other: the row's other members serve it) and serve that,
    pull every other row's, and say what the outer step takes. `run`: the exchange's compute
    (Pools); `started`: when the round's exchange began (time.monotonic)."""
    trainer = ctx.trainer
    own: RowAggregate | None = None
    try:
        if kept and any(d.sender == ctx.peer_id for d in kept):
            blob = await run(functools.partial(trainer.build_row, kept, screened, round_=r, row=mine, rows=rows,
                                               base=base))
            own = await agree_row(ctx, progress, r, rows, mine, base, await run(trainer.decode_row, blob), started)
            ctx.rows.server.publish(r, own.wire)
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
