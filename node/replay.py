"""Catching up by the rounds' deltas instead of a whole state.

A peer a few rounds behind on the swarm's own lineage (a joiner whose download took longer
than a round, a peer back from a pause) need not download a state again: each outer step it
missed is a deterministic function of the outer state before it and the deltas the swarm
screened in that round (optim/round.py), and those deltas are small. Every peer keeps the
delta messages its last REPLAY_ROUNDS outer steps screened, as they came over the wire,
and serves them beside its state (node/statesync.py RoundLog, request kind ROUND_DELTAS).
A peer catching up from outer step k to t:

1. takes t and the round chain h_t that the swarm attests there (node/catchup.py: a majority
   of earned weight, as for a download), and from a donor showing h_t the manifest of its
   state at t (its digest and ledger);
2. asks the donors for the messages of steps k … t − 1, screens each round's with a copy of
   its ledger and computes the round chain from its own chain at k (node/lineage.py
   round_chain: sender, tokens and content of every screened delta): a chain other than h_t
   means other deltas than the swarm's, and nothing is applied (`ReplayRefused`);
3. takes the t − k outer steps, and compares its state (body digest and ledger) with the
   manifest: on a mismatch it downloads the state as before.

A tree round's step (node/tree.py) is kept and replayed as the rows' aggregates it took;
the messages say what kind of round took a step, and the attested chain checks them.

A donor cannot make a peer take deltas the swarm did not aggregate: the chain it checks
against is attested by most of the earned weight, which a download's manifest is not. The
bytes are each round's compressed deltas (about (F + 1)/1000 of the parameters' float32
bytes at the default compression), where a download moves twice the parameters' bytes.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor

from locoswarm.node.handover import StartFrom, offer_residual
from locoswarm.node.chains import delta_content, round_chain
from locoswarm.node.statedownload import ask, fetch_manifest, fetch_residual
from locoswarm.node.statesync import ROUND_DELTAS
from locoswarm.node.roundcontext import OuterStep
from locoswarm.node.tree import check_row, take_rows
from locoswarm.optim.credit import Ledger
from locoswarm.protocol import DecodedDelta, ProtocolError
from locoswarm.protocol.state import Manifest, encode_state, state_digest

if TYPE_CHECKING:
    from hivemind.p2p import P2P, PeerID
    from locoswarm.node.trainer import Trainer

log = logging.getLogger(__name__)
RESIDUAL_AFTER = 4
"""Steps caught up beyond which the donor's residual is offered too (`take_steps`): the
peer's own was left where it last trained, and a peer back from its checkpoint 24 rounds
on, restarting with its own, sent a delta that failed a check (0.13 of the agreement,
2026-12-06)."""
MAX_STEP_DELTAS = 256
"""The most deltas a peer takes of one step (a round screens its fanout's and its own)."""
class ReplayRefused(Exception):
    """The deltas could not be had, or are not the swarm's: nothing was applied (or, after a
    digest mismatch, the state is to be downloaded)."""


@dataclass(slots=True)
class Fetched:
    steps: list[list[bytes]] = field(default_factory=list)
    """The messages of each step, from the first."""
    manifest: Manifest | None = None
    residual: dict[str, Tensor] | None = None
    """The donor's residual at the last step, where asked for and served."""
    nbytes: int = 0
    donors: set[PeerID] = field(default_factory=set)
    """The donors that served a step."""


async def fetch(p2p: P2P, donors: list[PeerID], trainer: Trainer, first: int, last: int, chain: str, *,
                timeout_s: float, residual: bool = True, base: str = "") -> Fetched:
    """From `donors` (showing `chain` at outer step `last`): the manifest of their state at
    `last`, then the messages each of steps `first` … `last` − 1 screened, each step from the
    first donor that serves it whole; over RESIDUAL_AFTER steps and where `residual`, with
    them the residual of the manifest's donor at `last` (None where none is served). ReplayRefused when some step
    or the manifest could not be had, or when no message of step `first` was taken from `base`
    (our round chain there, "" unknown): ours is then another lineage's state than the swarm's
    (a peer back from training alone), and no more of its deltas, nor a residual as large as a
    state, is fetched in vain before the state is."""
    out = Fetched()
    for i, peer in enumerate(donors):
        m = await fetch_manifest(p2p, peer, trainer.state_spec, timeout_s, round_=last)
        if m is not None and m.round == last and m.chain == chain:
            out.manifest = m
            donors = [peer] + donors[:i] + donors[i + 1:]
            break
    else:
        raise ReplayRefused(f"none of {len(donors)} donors serves the manifest of round {last} with its chain")
    # The first step before the residual (it says whether ours is the swarm's lineage), the
    # residual while the donor still serves it (a donor keeps its last two rounds), the rest.
    await _fetch_steps(p2p, donors, trainer, first, first + 1, timeout_s, out)
    taken = _bases(trainer, out.steps[0], first) if base else set()
    if taken and base not in taken:
        raise ReplayRefused(f"the deltas of outer step {first} were taken from round chain {min(taken)[:12]}…, "
                            f"ours there is {base[:12]}…: our state is another lineage's")
    if residual and last - first > RESIDUAL_AFTER and trainer.residual_spec is not None:
        out.residual = await fetch_residual(p2p, donors, trainer.residual_spec, last, timeout_s)
        if out.residual is not None:
            out.nbytes += trainer.residual_spec.total_bytes
    await _fetch_steps(p2p, donors, trainer, first + 1, last, timeout_s, out)
    return out


async def _fetch_steps(p2p: P2P, donors: list[PeerID], trainer: Trainer, start: int, stop: int, timeout_s: float,
                       out: Fetched) -> None:
    """Steps `start` … `stop` − 1 into `out`, each from the first donor that serves it whole."""
    # A tree round's step is its rows' aggregates, each a little larger than a delta (protocol/rows.py).
    limit = (trainer.row_limit if trainer.spec.rounds.exchange == "tree" else trainer.step.spec.max_message_bytes) + 2
    for step in range(start, stop):
        for peer in donors:
            try:
                wires = await _step(p2p, peer, step, limit, timeout_s)
            except Exception as e:  # whatever a donor does wrong, another is asked
                log.info("donor %s has not the deltas of outer step %d: %s: %s", peer, step, type(e).__name__, e)
                continue
            out.steps.append(wires)
            out.nbytes += sum(len(w) + 10 for w in wires)
            out.donors.add(peer)
            break
        else:
            raise ReplayRefused(f"none of {len(donors)} donors serves the deltas of outer step {step}")
        if out.nbytes > trainer.state_spec.total_bytes:
            raise ReplayRefused(f"the deltas of {len(out.steps)} rounds outweigh the state ({out.nbytes} bytes)")


def _bases(trainer: Trainer, wires: list[bytes], step: int) -> set[str]:
    """The round chains the messages of outer step `step` name as taken from (none known: empty)."""
    decoded, rows = _decode_step(trainer, wires, step)
    return {(d.delta if rows > 1 else d).base for d in decoded} - {""}


async def _step(p2p: P2P, peer: PeerID, step: int, limit: int, timeout_s: float) -> list[bytes]:
    """One step's messages from `peer`, one request each (a message can be as large as a
    request may answer)."""
    wires: list[bytes] = []
    count = 1
    while len(wires) < count:
        answer = await ask(p2p, peer, ROUND_DELTAS, step, len(wires), limit, timeout_s)
        told = int.from_bytes(answer[:2], "big")
        if len(answer) < 3 or not 0 < told <= MAX_STEP_DELTAS or (wires and told != count):
            raise ProtocolError(f"a malformed answer ({len(answer)} bytes, {told} deltas after {count})")
        count = told
        wires.append(answer[2:])
    return wires


@dataclass(slots=True)
class Step:
    """One outer step to take: the screened deltas and what the ledger is credited with."""
    deltas: list[DecodedDelta]
    earned: dict[str, int]
    banned: tuple[str, ...]


def verify(trainer: Trainer, chain: str, first: int, steps: list[list[bytes]]) -> tuple[str, list[Step]]:
    """Screen each step's messages as the donor did (from outer step `first`, whose round
    chain is `chain`), against a copy of the trainer's ledger credited step by step: the
    round chain after the last, and the steps to take. Changes nothing; ReplayRefused when
    a message is malformed or a step keeps no delta."""
    ledger = Ledger(earn_rounds=trainer.ledger.earn_rounds, per_peer_tokens=trainer.ledger.per_peer_tokens,
                    credits=trainer.ledger.credits)
    out = []
    for step, wires in enumerate(steps, start=first):
        decoded, rows = _decode_step(trainer, wires, step)
        named = {d.round for d in decoded}
        if len(named) != 1:
            what = "row aggregates" if rows > 1 else "deltas"
            raise ReplayRefused(f"the {what} of outer step {step} name rounds {sorted(named)}")
        round_ = named.pop()
        if rows > 1:
            taken, _ = _tree_step(trainer, decoded, round_, rows, chain, step)
            deltas, earned, banned, entries = taken.deltas, taken.earned, taken.banned, taken.chain
        else:
            screened = trainer.step.screen(decoded, ledger, chain)
            deltas, earned, banned = trainer.step.kept(screened), screened.earned, screened.banned
            entries = [(d.sender, d.num_tokens, delta_content(d)) for d in deltas]
        if not deltas:
            raise ReplayRefused(f"no delta of outer step {step} passes the screening")
        chain = round_chain(chain, round_, entries)
        ledger.credit(earned, banned, step)
        out.append(Step(deltas, earned, banned))
    return chain, out


def _decode_step(trainer: Trainer, wires: list[bytes], step: int) -> tuple[list, int]:
    """The messages of outer step `step`, decoded, and the rows of the round that took it:
    row aggregates all naming one row count (a tree round), or deltas (1: a full round).
    What kind a round was is the swarm's draw when its training started (node/treeround.py
    `drawn`: with overlap, one outer step before the one its deltas are taken from), which a
    peer catching up may not hold; the messages say it, and the chain they must lead to
    (attested by earned weight) and the state digest after them check it.
    ReplayRefused naming what is wrong."""
    if not wires:
        raise ReplayRefused(f"outer step {step} has no message")
    try:
        first = trainer.decode_row(wires[0])
    except ProtocolError:
        try:
            return [trainer.decode(w) for w in wires], 1
        except ProtocolError as e:
            raise ReplayRefused(f"a delta of outer step {step}: {e}") from e
    try:
        decoded = [first] + [trainer.decode_row(w) for w in wires[1:]]
    except ProtocolError as e:
        raise ReplayRefused(f"a row aggregate of outer step {step}: {e}") from e
    counts = {a.rows for a in decoded}
    if len(counts) != 1 or first.rows < 2:
        raise ReplayRefused(f"the row aggregates of outer step {step} name row counts {sorted(counts)}")
    return decoded, first.rows


def _tree_step(trainer: Trainer, aggregates: list, round_: int, rows: int, chain: str, step: int
               ) -> tuple[OuterStep, dict[int, str]]:
    """A tree round's step from its rows' aggregates (node/tree.py), checked and held to each
    other as the round loop did; ReplayRefused naming a bad one."""
    for agg in aggregates:
        try:
            check_row(agg, spec_hash=trainer.step.spec.spec_hash, round_=round_, row=agg.row, rows=rows, base=chain)
        except ProtocolError as e:
            raise ReplayRefused(f"row {agg.row}'s aggregate of outer step {step}: {e}") from e
    held = trainer.step.screen([a.delta for a in aggregates], None, chain)
    return take_rows(aggregates, held, trainer.step.kept(held))


def take_steps(trainer: Trainer, steps: list[Step], manifest: Manifest,
               residual: dict[str, Tensor] | None = None) -> tuple[str | None, StartFrom]:
    """Take `steps` (from `verify`) on the training thread, as the round loop would have:
    outer steps, ledger, the residual forgotten where a masked round moved on, the replica
    restarted from the new outer state (holding its next delta, as after taking a state:
    node/handover.py), from the donor's `residual` where that scores better than its own.
    The state's digest (Trainer.state_digest) when it then matches `manifest` bit for bit,
    else None; and where the replica starts."""
    for st in steps:
        trainer.step.apply(trainer.outer, st.deltas, [trainer.compressor], trainer.ledger, st.earned, st.banned)
    round_ = trainer.outer.num_steps
    trainer.handoff.publish_outer_steps(round_)
    trainer.round = round_
    trainer.holds = round_
    trainer.handoff.put_shift(None)
    start = offer_residual(trainer, residual, own=True)
    trainer.tokens = 0
    trainer.losses = []
    _, body = encode_state(trainer.state_spec, trainer.state_snapshot(), round_)
    ledger = trainer.ledger.pairs()
    if hashlib.sha256(body).digest() != manifest.digest or ledger != tuple(manifest.ledger):
        return None, start
    return state_digest(body, ledger), start
