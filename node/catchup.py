"""Taking another peer's outer state: a joiner's first download, a peer that fell behind
or was cut off catching up, a peer on the smaller side of a split rejoining (node/lineage.py
decides whom to follow; node/statesync.py moves the bytes). A download that fails is
logged and tried again at the next round boundary: the peer trains on its own state
meanwhile, and a failed download never ends the node.

A peer behind on the swarm's own lineage, by at most REPLAY_ROUNDS, catches up by the
rounds' deltas instead (node/replay.py), and so does a joiner whose download ended rounds
behind the swarm: it used to find itself behind again at its next round boundary and take
a whole state again, for ever on a slow link.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Awaitable, Callable

from locoswarm.node import replay
from locoswarm.node.events import CaughtUp, Synced
from locoswarm.node.host import NodeError
from locoswarm.node.chains import known_chains
from locoswarm.node.lineage import Attested, attested_state, chain_at, unearned_ahead, weigh
from locoswarm.node.handover import served, take_state
from locoswarm.node.statesync import REPLAY_ROUNDS
from locoswarm.node.statedownload import DownloadProgress, StateUnavailable, download_state
from locoswarm.node.streams import peer_id_of
from locoswarm.protocol.records import PeerRecord
from locoswarm.protocol.roll import Roll

if TYPE_CHECKING:
    from locoswarm.node.roundcontext import RoundContext

log = logging.getLogger(__name__)
DOWNLOAD_TRIES = 3
"""Whole-download attempts (each over every donor) before a sync counts as failed, waiting
1 s, 2 s, … between them."""
JOIN_TRIES = 6
"""The same for a joiner, which has nothing to train on meanwhile: about 30 s of waits. A donor
under an upload budget refuses requests while another joiner takes it; three tries in 6 s
ended a joiner that came a second after another (2026-12-05)."""
REPLAY_PASSES = 3
"""Catch-ups by deltas in a row: the swarm steps on while a peer catches up, and a peer that
starts its next round a round or two behind finds the deltas of the round it holds gone
(a joiner in a swarm of half-second rounds, 2026-12-06)."""
REPLAY_TIMEOUT_S = 10.0
"""The longest one request for a round's delta (or the state's manifest) may take."""
REPLAY_DEADLINE_S = 30.0
"""The longest a catch-up's requests may take together: donors that answer each just in time
must not hold a peer for REPLAY_ROUNDS × their count of requests."""
ROLL_READ_TIMEOUT_S = 15.0
"""The longest a joiner waits for the anchors' roll from the DHT."""
INTRODUCE_TIMEOUT_S = 10.0
"""The longest a joiner waits for its record to reach the peers it read in the registry
over the progress streams, and again for theirs to come back, before it decides whether to
download (a private run's donors serve only peers whose record they have)."""


class Unattested(NodeError):
    """Peers of earned weight show their round chains, and no state has a majority of that weight."""


class CatchUp:
    def __init__(self, ctx: RoundContext) -> None:
        self.ctx = ctx
        self._passed_over: set[str] = set()
        """Peers logged as ahead without earned weight (each once)."""
        self._taken_at: int | None = None
        """The outer step of the state we took last (a download)."""
        self.replays = True
        """Whether catching up goes by the rounds' deltas where it can (`by_deltas`)."""

    async def join(self, peers: list[PeerRecord], *, announce: Callable[[], Awaitable[object]]) -> None:
        """Take the swarm's outer state when it is ahead of ours. `peers`: the others'
        records read at start; `announce`: shows our record in the registry. A private
        run's donors serve only peers whose record they have: ours is told to them over the
        progress streams first (the registry's copy reaches them only at their next read,
        up to a third of the record TTL later)."""
        ctx = self.ctx
        if not peers:
            return
        if ctx.spec.access.restricted:
            await announce()
        # The registry's copies are up to a refresh old (a third of the record TTL: many
        # rounds); the peers told our record tell theirs back, as it is now.
        ids = [r.peer_id for r in peers]
        ctx.progress.introduce(ids)
        reached = await ctx.progress.delivered(ids, INTRODUCE_TIMEOUT_S)
        deadline = time.monotonic() + INTRODUCE_TIMEOUT_S
        while not all(ctx.membership.streamed(p) for p in reached) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if ctx.membership.records:
            peers = ctx.membership.records
        # A peer resumed from a checkpoint knows whose weight is earned: it follows only them
        # (a joiner with an empty ledger weighs every peer alike: see node/lineage.py weigh).
        w = weigh([ctx.peer_id] + [r.peer_id for r in peers], ctx.lineage.weighing(ctx.trainer.ledger.established))
        peers = [r for r in peers if w(r.peer_id)]
        vouching = self.vouching(await self.roll())
        ahead = [r for r in peers if r.peer_id in vouching] if vouching else peers
        if not ahead or max(r.round for r in ahead) <= ctx.trainer.outer_steps:
            return
        # Resumed from a checkpoint rounds behind: the rounds since by their deltas, to the
        # state the vouching peers show where earned weight decides nothing yet. Not from the
        # run's start: a new peer takes a donor's residual with its state (node/handover.py).
        if ctx.trainer.outer_steps > 0 and await self.by_deltas(vouching):
            return
        try:
            await self.sync(peers, vouching, tries=JOIN_TRIES)
        except Unattested as e:  # resumed with a ledger: train on ours, decide again at each round boundary
            log.warning("%s; training on from the checkpoint", e)

    async def maybe_follow(self) -> bool:
        """At a round boundary: take another state when lineage.py says so; True when taken."""
        ctx = self.ctx
        lineage, records = ctx.lineage, ctx.membership.records
        trusted = ctx.trainer.ledger.established
        follow = lineage.follow(ctx.trainer.outer_steps, records, trusted)
        if follow is None:
            for r in unearned_ahead(ctx.peer_id, ctx.trainer.outer_steps, records, lineage.weighing(trusted)):
                if r.peer_id not in self._passed_over:
                    self._passed_over.add(r.peer_id)
                    log.warning("%s shows round %d, ahead of our %d, but has no earned weight here: not followed",
                                r.peer_id, r.round, ctx.trainer.outer_steps)
            return False
        if follow.split_round is not None:
            log.warning("%s: downloading the state of the larger group", follow.why)
        elif lineage.diverged_at is not None:
            log.warning("found %d peers again after %d rounds alone: taking the swarm's state (%s)",
                        len(records), lineage.alone_rounds, follow.why)
        else:
            log.warning("round %d: %s: catching up", ctx.trainer.round, follow.why)
        try:
            # Only on the swarm's lineage do its deltas lead to its state.
            if follow.split_round is None and lineage.diverged_at is None and await self.by_deltas():
                return True
            if not await self.sync(follow.donors):
                # Earned weight attests our own state: the records ahead are on other chains.
                # Train on from it (giving the round up and asking again at every boundary
                # kept a peer from training for minutes: 16 peers in tree rows, 2026-12-07).
                lineage.stay()
                return False
        except NodeError as e:
            log.warning("could not take the swarm's state: %s; training on, trying again next round", e)
            return False
        if follow.split_round is not None:
            log.warning("split at round %d: took the state of %d peers", follow.split_round, len(follow.donors))
        return True

    async def roll(self) -> Roll | None:
        """The newest roll one of the run's anchors signed (node/roll.py), read only when the
        spec names anchors, none of them is live and our ledger knows none of the live peers;
        None otherwise, or when none can be read within ROLL_READ_TIMEOUT_S."""
        ctx = self.ctx
        live = ctx.membership.records
        anchors = self._anchors()
        if not anchors or self._known(live) or any(r.peer_id in anchors for r in live):
            return None
        try:
            return await asyncio.wait_for(ctx.registry.read_roll(sorted(anchors)),
                                          ROLL_READ_TIMEOUT_S)
        except Exception as e:  # unreadable now: no state is taken without an anchor's word (vouching)
            log.warning("reading the anchors' roll failed: %s: %s", type(e).__name__, e)
            return None

    def _anchors(self) -> frozenset[str]:
        """The run's anchors (the spec's trust.anchors) but this peer."""
        return frozenset(self.ctx.spec.trust.anchors) - {self.ctx.peer_id}

    def _known(self, live: list[PeerRecord]) -> bool:
        """Whether our ledger knows some of the `live` peers' records as established: earned
        weight then decides whom to follow, and neither anchors nor a roll are asked."""
        return any(self.ctx.trainer.ledger.established(r.peer_id) for r in live)

    def vouching(self, roll: Roll | None = None) -> frozenset[str]:
        """Whose manifest vouches for the state a joiner takes while its ledger knows none
        of the live peers (docs/trust.md): the run's anchors (the spec's trust.anchors);
        while none of them is live, the live peers on the newest `roll` an anchor signed
        that attest a state by a majority of the roll's live peers; without anchors, the
        peers it was told to join through. Empty when its ledger knows some (earned weight
        decides whom to follow, node/lineage.py) or, without anchors, none of those is live
        (the donors' agreement decides, as before). NodeError when the spec names anchors,
        none of them is live and no roll of theirs names a majority that attests a state:
        no state is taken without their word."""
        ctx = self.ctx
        live = ctx.membership.records
        if self._known(live):
            return frozenset()
        anchors = self._anchors()
        present = frozenset(r.peer_id for r in live if r.peer_id in (anchors or ctx.bootstrap))
        if not anchors or present:
            return present
        why = "and no roll of theirs was found"
        if roll is not None:
            on_roll = [r for r in live if r.peer_id in roll.peers]
            found = attested_state(ctx.peer_id, on_roll, roll.peers.__contains__)[0] if on_roll else None
            if found is not None:
                log.warning("none of the run's %d anchors is live: %d live peers on the roll %s signed at round %d "
                            "attest round %d (chain %s…) and vouch for it", len(anchors), len(found.attesters),
                            roll.anchor, roll.round, found.round, found.chain[:12])
                return frozenset(r.peer_id for r in found.attesters)
            why = (f"and of the {len(roll.peers)} peers on the roll {roll.anchor} signed at round {roll.round}, "
                   f"{len(on_roll)} are live, no majority of them attesting one state")
        raise NodeError(f"none of the run's {len(anchors)} anchors (trust.anchors) is live {why}: this peer takes no "
                        f"state that they do not vouch for")

    def attested(self) -> Attested | None:
        """The state a peer whose ledger knows some live peer may take: the newest that live
        peers holding a majority of the earned weight attest (node/lineage.py attested_state,
        docs/trust.md), never the newest that two donors agree on. None where earned weight
        decides nothing (no live peer established here) or no peer of weight shows a chain (a
        swarm of sampled rounds: node/pull.py): the donors' agreement decides, as before.
        Unattested when they show chains and none has a majority."""
        ctx = self.ctx
        live = ctx.membership.records
        trusted = ctx.lineage.weighing(ctx.trainer.ledger.established)
        if trusted is None or not any(trusted(r.peer_id) for r in live):
            return None
        found, shown = attested_state(ctx.peer_id, live, trusted)
        if found is None and shown:
            raise Unattested(f"no state is attested by a majority of the {shown} live peers of earned weight that "
                             f"show their round chains: none taken")
        return found

    def head(self, vouching: frozenset[str] = frozenset()) -> tuple[int, str, list[PeerRecord]] | None:
        """The newest state of the swarm: its round, round chain, and the live records showing
        that chain there. With `vouching` peers (`vouching`), the chain most of them show at
        the newest round one of them shows one; else the attested state where earned weight
        decides (`attested`), or the chain most peers show at the newest round any shows one
        (node/lineage.py chain_at, the count that decides there). None when no peer shows a
        chain, or none is attested."""
        live = [r for r in self.ctx.membership.records if not r.paused and not r.diverged and r.chain]
        if vouching:
            live = [r for r in live if r.peer_id in vouching]
        else:
            try:
                attested = self.attested()
            except Unattested:
                return None
            if attested is not None:
                return attested.round, attested.chain, attested.attesters
        if not live:
            return None
        round_ = max(r.round for r in live)
        chain = chain_at(round_, live)
        return round_, chain, [r for r in live if known_chains(r).get(round_) == chain]

    async def by_deltas(self, vouching: frozenset[str] = frozenset()) -> bool:
        """Catch up from our outer state to the swarm's newest (`head`, of `vouching` peers
        where given) by the deltas of the rounds between (node/replay.py), where ours is of
        the swarm's lineage (its chain known) and at most REPLAY_ROUNDS behind; again while the
        swarm stepped on meanwhile (up to REPLAY_PASSES times). Over replay.RESIDUAL_AFTER
        steps the donor's residual is offered too, once, and not from the state we took last
        (its residual came with it: fetched again at 4 Mbit/s it took as long as the rounds it
        caught up). True when caught up; False, with nothing changed, when not tried or
        refused (logged): the caller then downloads the state. A state that comes out other
        than the donor's manifest is downloaded here (NodeError when that fails), and no later
        catch-up of this process goes by deltas."""
        caught = False
        for _ in range(REPLAY_PASSES):
            if not await self._replay(vouching, offer_residual=not caught):
                break
            caught = True
        return caught

    async def _replay(self, vouching: frozenset[str], *, offer_residual: bool) -> bool:
        ctx, trainer = self.ctx, self.ctx.trainer
        first = trainer.outer_steps
        offer_residual = offer_residual and first != self._taken_at
        chain = ctx.lineage.chains.get(first)
        head = self.head(vouching) if chain and self.replays else None
        if head is None or not 0 < head[0] - first <= REPLAY_ROUNDS:
            return False
        last, target, records = head
        donors = [peer_id_of(ctx.p2p, r.peer_id) for r in records if r.round >= last]
        ctx.rng.shuffle(donors)
        why = None
        try:
            got = await asyncio.wait_for(replay.fetch(ctx.p2p, donors, trainer, first, last, target,
                                                      timeout_s=REPLAY_TIMEOUT_S, residual=offer_residual,
                                                      base=chain),
                                         REPLAY_DEADLINE_S)
            reached, steps = await ctx.pools.train(replay.verify, trainer, chain, first, got.steps)
            if reached != target:
                why = f"its deltas make round chain {reached[:12]}…, the swarm's is {target[:12]}…"
        except asyncio.TimeoutError:
            why = f"the deltas took longer than {REPLAY_DEADLINE_S:g} s"
        except replay.ReplayRefused as e:
            why = str(e)
        if why is not None:
            log.warning("could not catch up from round %d to %d by the rounds' deltas: %s", first, last, why)
            return False
        ctx.stats.bytes_received += got.nbytes
        digest, start = await ctx.pools.train(replay.take_steps, trainer, steps, got.manifest, got.residual)
        ctx.lineage.synced(last, records, ctx.membership.records, chain=target, trusted=trainer.ledger.established)
        ctx.states.rounds.clear()
        if digest is None:
            self.replays = False
            log.warning("caught up to round %d by its deltas, but the state differs from its donor's (digest or "
                        "ledger): downloading it, and no more catching up by deltas", last)
            await self.sync(records, vouching)
            return True
        for step, wires in enumerate(got.steps, start=first):  # ours to serve now
            ctx.states.rounds.keep(step, wires)
        state, residual = served(trainer)
        ctx.states.publish(state, last, target, trainer.ledger.pairs(), residual)
        deltas = sum(len(w) for w in got.steps)
        log.info("caught up from round %d to %d by %d deltas of %d donors (%d bytes; a state is %d); the replica "
                 "starts %s", first, last, deltas, len(got.donors), got.nbytes, trainer.state_spec.total_bytes,
                 start.describe())
        ctx.events(CaughtUp(start=first, round=last, deltas=deltas, bytes=got.nbytes, digest=digest,
                            residual_bytes=trainer.residual_spec.total_bytes if got.residual is not None else 0))
        return True

    async def sync(self, records: list[PeerRecord], vouching: frozenset[str] = frozenset(), *,
                   tries: int = DOWNLOAD_TRIES) -> bool:
        """Download the newest outer state the peers of `records` serve and take it; with
        `vouching` peers (a joiner: `vouching`), the newest one of those serve. False when
        the state earned weight attests is ours already (nothing taken); NodeError when no
        donor could give it. After a join, whom to follow is decided by earned
        weight where the ledger knows some peer, else by counting (node/lineage.py): a
        vouching peer is no reason to refuse a split's or the swarm's verdict."""
        ctx = self.ctx
        trainer = ctx.trainer
        attested = None if vouching else self.attested()
        if attested is not None:
            if (attested.round == trainer.outer_steps
                    and ctx.lineage.chains.get(attested.round) == attested.chain):
                log.info("the state %d of %d peers of earned weight attest is ours already", len(attested.attesters),
                         attested.shown)
                return False
            # Those still serving it: a donor keeps its last two rounds (statesync._ROUNDS_KEPT).
            records = [r for r in attested.attesters if r.round - attested.round in (0, 1)]
            if not records:
                raise NodeError(f"the state of round {attested.round} that {len(attested.attesters)} of "
                                f"{attested.shown} peers of earned weight attest is no longer served")
        ctx.stats.state = "syncing"
        if vouching:
            # Their state, whatever the others show: a record ahead of theirs is no reason.
            records = [r for r in ctx.membership.records if r.peer_id in vouching] + [
                r for r in records if r.peer_id not in vouching]
            newest = max(r.round for r in records if r.peer_id in vouching)
        else:
            newest = max(r.round for r in records)
        donors = [peer_id_of(ctx.p2p, r.peer_id) for r in records if r.round >= newest - 1 or r.peer_id in vouching]
        ctx.rng.shuffle(donors)  # newcomers spread over the donors instead of all picking one
        kept: dict = {}  # what an attempt verified, for the next one (download_state `kept`)
        with DownloadProgress(trainer.state_spec.total_bytes) as progress:
            for attempt in range(tries):
                try:
                    got = await download_state(ctx.p2p, donors, trainer.state_spec, on_progress=progress.update,
                                               attesters=vouching,
                                               target=attested and (attested.round, attested.chain),
                                               residual_spec=trainer.residual_spec, kept=kept)
                    break
                except StateUnavailable as e:
                    failure = e
                    if attempt + 1 < tries:
                        log.warning("state download failed (%s); retrying", e)
                        await asyncio.sleep(min(2**attempt, 16))
            else:
                raise NodeError(f"could not download the swarm's state from any donor in {tries} tries, the last: "
                                f"{failure}")
        ctx.stats.bytes_received += trainer.state_spec.total_bytes
        if got.residual is not None:
            ctx.stats.bytes_received += trainer.residual_spec.total_bytes
        start = await ctx.pools.train(take_state, trainer, got.round, got.tensors, got.ledger, got.residual)
        ctx.states.rounds.clear()  # the rounds we kept led to our old state, not to this one
        self._taken_at = got.round
        log.info("took the state of round %d; the replica starts %s", got.round, start.describe())
        ctx.lineage.synced(got.round, records, ctx.membership.records, chain=got.chain,
                           trusted=trainer.ledger.established)
        state, residual = served(trainer)
        ctx.states.publish(state, got.round, ctx.lineage.chains.get(got.round, ""), trainer.ledger.pairs(), residual)
        digest = await ctx.pools.train(trainer.state_digest)
        ctx.events(Synced(round=got.round, donors=len(donors), digest=digest))
        # A download on a slow link ends rounds behind the swarm: the rounds since, by their deltas.
        try:
            await self.by_deltas()
        except NodeError as e:
            log.warning("could not take the swarm's state after catching up by deltas: %s", e)
        return True

