"""Tree rounds (`rounds.exchange = "tree"`): one consensus from two small exchanges a round,
instead of every peer pulling every peer's delta (docs/scale.md "Group rounds", measured in
docs/convergence.md "Rotating-group exchange").

A round's peers fall into rows drawn afresh every round from the spec hash, the round and
each peer id (`row_of`), R rows for R = the established peers over `rounds.row_size`
(`row_count`) of the ledger the round's training starts on (node/treeround.py `drawn`: with
overlap, the one before the outer step that lands while the round trains): every peer on one
lineage holds the same ledger (optim/credit.py), so all draw the same rows, a joiner takes
the ledger with the state, and identities that never worked cannot split the swarm into more
rows. While R is 1 (a run's first rounds, a small swarm) a round is a full round as before.

In a round of R > 1 rows a peer
0. tells its progress to its row only and ends the round when its row's tokens reach the
   row's share (node/treeround.py `row_filter`);
1. pulls, screens and checks the deltas of its own row only (node/pull.py, as a full round
   does among fewer peers);
2. aggregates them by the run's rule and compresses the aggregate again at the deltas'
   density, its error dropped (a row lives one round and keeps no state: measured to cost
   0.009 of eval loss against a row that keeps its error), and serves it on ROW_PROTOCOL
   with a header naming the row's senders, their tokens, credits and delta digests
   (protocol/rows.py), once its row agrees on one aggregate: each member takes that of the
   first member ahead of it in the round's lead order (`lead_order`) that serves one, so a
   member that missed one of its row's deltas serves what the others serve
   (node/treeround.py `agree_row`);
3. pulls every other row's aggregate from one of its members (`gather_rows`: each peer asks
   the members in an order of its own, so a row's askers spread over its members), checks
   that each member it names belongs to that row, and
4. holds the rows' aggregates to each other as a full round holds its deltas (the median
   row's norm and token claim bound the others, from three rows on: `take_rows`) and takes
   the outer step with them.

Every peer that takes the same rows' aggregates steps alike. The round chain hashes every
member's (sender, tokens, content) and each row aggregate's content, so peers that took
different aggregates of a row (a member that missed a delta of its row) show different
chains and heal as after any silent split (node/lineage.py): the agreement leaves that to a
member ahead that is slower than the wait or dies while it serves.

What a tree round gives up, stated where it is decided: to other rows a row's header is its
server's word (a row whose members are mostly sybils may claim credit for them, bounded by
the tokens and the norm of the median row; its own members check it where they hold the same
deltas); a failed check is told to the row of the sender's next round
only, so exclusions need a majority of that row's established weight.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from locoswarm.node.chains import delta_content
from locoswarm.node.exchange import GONE, DeltaServer, delta_streams
from locoswarm.node.pull import LOST_CHECK_S, RETRY_S, dial_refused
from locoswarm.node.roundcontext import OuterStep
from locoswarm.node.streams import KeptStreams, peer_id_of
from locoswarm.node.spec import RoundPolicy
from locoswarm.optim.credit import Ledger
from locoswarm.optim.screen import Screened
from locoswarm.protocol import DecodedDelta, MalformedMessage, ProtocolError
from locoswarm.protocol.framing import HEADER
from locoswarm.protocol.rows import RowAggregate

if TYPE_CHECKING:
    from hivemind.p2p import P2P

log = logging.getLogger(__name__)
ROW_PROTOCOL = "locoswarm/row/1"
STREAM_FAILURES = 3
"""Failed streams after which a member is not asked for its row's aggregate again this round."""


def row_count(ledger: Ledger, rounds: RoundPolicy) -> int:
    """Rows of a round taken from the outer state `ledger` holds under the spec's `rounds`:
    with tree rounds its established peers over the row size, at least 1; 1 (a full round)
    with the full exchange."""
    if rounds.exchange != "tree":
        return 1
    return max(1, len(ledger.established_peers()) // rounds.row_size)


def _draw(spec_hash: bytes, round_: int, what: bytes, peer: str) -> int:
    h = hashlib.blake2b(spec_hash + round_.to_bytes(8, "big") + what + b"\0" + peer.encode(), digest_size=8)
    return int.from_bytes(h.digest(), "big")


def row_of(spec_hash: bytes, round_: int, peer: str, rows: int) -> int:
    """The row `peer` belongs to in round `round_` of `rows` rows."""
    return _draw(spec_hash, round_, b"row", peer) % rows


def ask_order(spec_hash: bytes, round_: int, me: str, members: list[str]) -> list[str]:
    """The order `me` asks a row's `members` for the row's aggregate: a draw of its own, so
    the peers of other rows spread their requests over the row's members."""
    return sorted(members, key=lambda m: (_draw(spec_hash, round_, b"ask " + me.encode(), m), m))


def lead_order(spec_hash: bytes, round_: int, members: list[str]) -> list[str]:
    """The order a row's members take its aggregate in (node/treeround.py `agree_row`): one
    draw of the round, the same at every peer, so that a row serves the aggregate of its
    first member that has one and every member of it steps with that one."""
    return sorted(members, key=lambda m: (_draw(spec_hash, round_, b"lead", m), m))


def check_row(agg: RowAggregate, *, spec_hash: bytes, round_: int, row: int, rows: int, base: str) -> None:
    """What a row aggregate must satisfy beyond its format: the round and row asked for, our
    row count, members that all belong to the row, the outer state of ours (`base`, the
    round chain; "" unknown). MalformedMessage naming what is wrong."""
    if agg.round != round_ or agg.row != row:
        raise MalformedMessage(f"asked for row {row} of round {round_}, got row {agg.row} of round {agg.round}")
    if agg.rows != rows:
        raise MalformedMessage(f"the round is drawn into {rows} rows here, the aggregate says {agg.rows}: "
                               "taken from another outer state")
    for m in agg.members:
        if row_of(spec_hash, round_, m.sender, rows) != row:
            raise MalformedMessage(f"names member {m.sender}, who belongs to row "
                                   f"{row_of(spec_hash, round_, m.sender, rows)}, not {row}")
    if base and agg.delta.base and agg.delta.base != base:
        raise MalformedMessage(f"taken from another outer state (round chain {agg.delta.base[:12]}…, "
                               f"ours {base[:12]}…)")


def take_rows(aggregates: list[RowAggregate], screened: Screened, kept: list[DecodedDelta]
              ) -> tuple[OuterStep, dict[int, str]]:
    """The outer step of the rows' `aggregates` once their deltas are `screened` against
    each other (optim/screen.py with no ledger: a row has no earned weight of its own, so
    the median row's norm and token claim bound the others, from MIN_FOR_MEDIAN rows on) and
    `kept` (RoundStep.kept of it), and row → why it was refused. A row refused there is left
    out, members and all; a clipped or capped row's members are credited in proportion. The
    round chain's entries are every member's (sender, tokens, content) and each row's as
    (row label, tokens, content), so that two recompressions of one row's deltas do not pass
    as one state; the messages kept for peers catching up are all the `aggregates`, which
    they hold to each other again."""
    by_sender = {a.delta.sender: a for a in aggregates}
    refused = {by_sender[r.sender].row: r.reason for r in screened.rejected if r.sender in by_sender}
    taken = [by_sender[d.sender] for d in kept]
    out = OuterStep(deltas=kept, earned={}, banned=tuple(sorted({p for a in taken for p in a.banned})),
                    shares=sum(a.shares for a in taken), accepted={}, chain=[], wires=[a.wire for a in aggregates],
                    sampled=False)
    for agg, delta in zip(taken, kept):
        factor = min(1.0, screened.scales[delta.sender]) * delta.num_tokens / max(1, agg.delta.num_tokens)
        for m in agg.members:
            out.earned[m.sender] = int(m.earned * factor)
            out.accepted[m.sender] = m.tokens
            out.chain.append((m.sender, m.tokens, m.content))
        out.chain.append((f"~row {agg.row}", delta.num_tokens, delta_content(delta)))
    return out, refused


class RowExchange:
    """A peer's side of the rows' aggregates: the server of its own row's, and the kept
    streams it asks other rows' members on."""

    def __init__(self, p2p: P2P, *, incarnation: int, admit: Callable[[str], bool] | None = None) -> None:
        self.server = DeltaServer(p2p, incarnation=incarnation, admit=admit, protocol=ROW_PROTOCOL)
        self.streams: KeptStreams = delta_streams(p2p, ROW_PROTOCOL)

    async def start(self) -> None:
        await self.server.start()

    def close(self) -> None:
        self.server.stop()
        self.streams.close()


@dataclass(slots=True)
class GatheredRows:
    rows: dict[int, RowAggregate] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    """row → why its aggregate is not in this round."""
    bytes_received: int = 0
    requests: int = 0
    refused: dict[str, str] = field(default_factory=dict)
    """peer → why its answer was refused as bad."""


async def gather_rows(streams: KeptStreams, round_: int, members: Callable[[], dict[int, list[str]]], *,
                      decode: Callable[[bytes], RowAggregate], check: Callable[[RowAggregate, int], None],
                      limit: int, deadline_s: float, order: Callable[[list[str]], list[str]],
                      strict: bool = False) -> GatheredRows:
    """Pull round `round_`'s aggregate of every row `members()` names (row → the peers of the
    round seen in it; called again while waiting, for peers seen late), each from the first
    of its members, in `order`, that serves one: a member that answers "not yet" is asked
    again after the others (a request is held LONG_POLL_S there), one that says "never", whose
    dials are refused, whose streams fail STREAM_FAILURES times, or whose answer is bad
    (`decode`, `check(aggregate, row)`) is not asked again. A row is left out once none of its
    members is left to ask, or at `deadline_s`. `strict`: a member that answers "not yet" is
    asked again before any after it (a row's own members agreeing on its aggregate)."""
    out = GatheredRows()
    stop_at = time.monotonic() + deadline_s
    dropped: dict[int, dict[str, str]] = {}
    """row → member → why it is not asked again."""
    failures: dict[str, int] = {}

    async def ask(row: int, peer: str) -> RowAggregate | None:
        request = round_.to_bytes(HEADER, "big") + (0).to_bytes(8, "big")
        out.requests += 1
        try:
            blob = await streams.call(peer_id_of(streams.p2p, peer), request, limit=limit, limit_name="a row's limit",
                                      timeout_s=max(0.05, min(8.0, stop_at - time.monotonic())))
        except asyncio.TimeoutError:
            return None  # asked again in its turn
        except Exception as e:
            failures[peer] = failures.get(peer, 0) + 1
            if dial_refused(e) or failures[peer] >= STREAM_FAILURES:
                dropped.setdefault(row, {})[peer] = f"{type(e).__name__}: {str(e).strip()[:160]}"
            else:
                await asyncio.sleep(min(LOST_CHECK_S, max(0.0, stop_at - time.monotonic())))
            return None
        if blob is None:
            return None  # not yet
        if blob == GONE:
            dropped.setdefault(row, {})[peer] = "serves no aggregate of the round"
            return None
        out.bytes_received += len(blob) + 8
        try:
            agg = decode(blob)
            check(agg, row)
        except ProtocolError as e:
            log.warning("round %d: aggregate of row %d from %s refused: %s: %s", round_, row, peer, type(e).__name__, e)
            out.refused[peer] = f"{type(e).__name__}: {e}"
            dropped.setdefault(row, {})[peer] = f"bad aggregate ({e})"
            return None
        return agg

    async def pull(row: int) -> None:
        turn = 0
        wait = RETRY_S[0]
        while time.monotonic() < stop_at:
            left = [m for m in order(members().get(row, [])) if m not in dropped.get(row, {})]
            if not left:
                why = "; ".join(f"{p}: {w}" for p, w in sorted(dropped.get(row, {}).items())) or "no member seen"
                out.failed[row] = f"no member served it ({why})"
                return
            agg = await ask(row, left[0 if strict else turn % len(left)])
            if agg is not None:
                out.rows[row] = agg
                return
            turn += 1
            if strict or turn % len(left) == 0:  # every member asked once more: a short pause before the next pass
                await asyncio.sleep(min(wait, max(0.0, stop_at - time.monotonic())))
                wait = min(RETRY_S[2], wait * RETRY_S[1])
        out.failed.setdefault(row, f"no aggregate before the {deadline_s:g} s deadline")

    tasks: dict[int, asyncio.Task] = {}
    try:
        while True:
            for row in sorted(set(members()) - set(tasks)):
                tasks[row] = asyncio.create_task(pull(row))
            pending = [t for t in tasks.values() if not t.done()]
            if not pending or time.monotonic() >= stop_at:
                break
            await asyncio.wait(pending, timeout=0.25)
        for row, task in tasks.items():
            if not task.done():
                out.failed.setdefault(row, f"no aggregate before the {deadline_s:g} s deadline")
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    return out
