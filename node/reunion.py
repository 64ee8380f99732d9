"""After a partition heals (issue 6): which peers take whose outer state, and dialing back
the peers that vanished.

A peer cut off from the swarm aggregates its own deltas alone and its outer state goes its
own way, while the peers left together go on with theirs. Once they see each other again
one side must take the other's state, or their deltas stop fitting. The round number does
not say which side: a peer alone waits for nobody's delta, so it ends its rounds sooner and
runs ahead (in the fault suite a cut-off peer was 11 rounds ahead 9 s after the heal, and
the two peers still together, each once missing the other's delta on the lossy link, took
its state: the swarm followed the runaway, and both crashed when its rounds outran their
download). Nor does a later round with everyone's deltas: it adds the same mean to states
that differ, and the difference stays (seen: a healed peer aggregating 3 of 3 again,
on its own state, because it met the others between two round boundaries).

What says it: a peer is *diverged* from the round it aggregated its own delta alone while
others trained that round (they reported progress in it), until it takes another peer's
state; its record says so (`PeerRecord.diverged`). A peer that trained alone because no one
else did (the others paused, or gone) has not diverged: its state is the swarm's.

- A diverged peer takes the state of the live peers that have not diverged and stepped past
  the round it diverged in (so a peer that sat paused through the split, with an older
  state, is not followed).
- When every peer it sees has diverged too (a swarm of two cut in two), the smallest peer id
  keeps its state and the others take it: exactly one side moves, never both.
- A peer that has not diverged and fell more than a round behind (paused, restarted from a
  checkpoint) takes the state of the peers ahead if they are at least as many as those level
  with it, itself included, counting only peers that have not diverged unless all have: one
  peer that ran ahead alone drags no one along.

A silent split: peers that each aggregated two or more deltas, but not the same ones (one
peer's request for a delta timed out on a loaded machine; seen in the fault suite's
malicious-peer case), are not diverged by the rule above, yet their outer states differ from
that round on, forever. Each peer therefore keeps a round chain, h_r+1 = BLAKE2b(h_r ‖ r ‖
the sorted (sender, tokens) pairs it aggregated), from h_0 = BLAKE2b(spec hash), and shows
it in its record: equal chains at a round mean the same deltas since the same start, without
hashing a model (trainer.state_digest hashes every tensor). When the live peers that have not
diverged all stand at one round and this peer's chain there is not the largest group's
(ties: the group holding the smallest peer id, so every peer picks the same), it takes that
group's state (`whom_to_rejoin`); a peer of that group never moves.

Dialing back: a cut-off peer sees nobody and dials its initial peers again, but p2pd's
dial backoff (5 s, growing with the square of the failed dials; hivemind gives no way to
clear it) holds its dials back for tens of seconds after the link is back. A dial from the
other side does not wait on that backoff, and a connection made by either side serves
both (libp2p reuses a live connection before it looks at the backoff): so every peer also
dials the peers that vanished without withdrawing their record, from their last record's
addresses, and pings them, which puts each in the other's DHT routing table.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass

from locoswarm.protocol.records import PeerRecord

log = logging.getLogger(__name__)
REDIAL_S = 5.0
"""Least time between two dials of the same vanished peer."""
FORGET_S = 600.0
"""A vanished peer is dialed for this long after it was last seen."""
MAX_LOST = 16
"""At most this many vanished peers are remembered (the most recently seen)."""


@dataclass(frozen=True, slots=True)
class Follow:
    why: str
    """For the log line: why this peer takes another state."""
    donors: list[PeerRecord]
    split_round: int | None = None
    """The round at which the chains were compared (whom_to_rejoin only)."""


def whom_to_follow(me: str, round_: int, records: list[PeerRecord], *, diverged_at: int | None) -> Follow | None:
    """Whose outer state peer `me` (at outer step `round_`) should take now, None to keep
    its own. `diverged_at`: the round in which it diverged, None when it has not."""
    live = [r for r in records if r.peer_id != me and not r.paused]
    if diverged_at is not None:
        sound = [r for r in live if not r.diverged and r.round > diverged_at]
        if sound:
            return Follow(f"{len(sound)} peers trained on without it since round {diverged_at}", sound)
        lone = sorted((r for r in live if r.diverged), key=lambda r: r.peer_id)
        if lone and lone[0].peer_id < me:
            return Follow(f"every peer seen has diverged too; {lone[0].peer_id} has the smallest peer id", lone[:1])
        return None  # the others come to this one (or there is no one yet)
    # Diverged peers ahead are followed only when every other peer has diverged (the lone
    # survivor of a swarm of two, found by a peer restarted from a checkpoint): following the
    # runaway of a partition, when sound peers are there, was seen to set off a chase of
    # downloads among all three peers in the fault suite.
    pool = [r for r in live if not r.diverged] or live
    ahead = [r for r in pool if r.round > round_ + 1]
    level = [r for r in live if abs(r.round - round_) <= 1]
    if ahead and len(ahead) >= 1 + len(level):
        return Follow(f"outer step {round_} is behind the swarm's {max(r.round for r in ahead)}", ahead)
    return None


def round_chain(previous: str, round_: int, aggregated: list[tuple[str, int]]) -> str:
    """The chain after aggregating round `round_`: `aggregated` is the (sender, token count)
    of each delta in the outer step, in any order. `previous` is the chain before it
    (`chain_start` at round 0)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(bytes.fromhex(previous))
    h.update(round_.to_bytes(8, "big"))
    for sender, tokens in sorted(aggregated):
        h.update(sender.encode() + b"\0" + tokens.to_bytes(8, "big"))
    return h.hexdigest()


def chain_start(spec_hash: bytes) -> str:
    """The chain of a run's initial outer state (round 0)."""
    return hashlib.blake2b(b"locoswarm round chain\0" + spec_hash, digest_size=16).hexdigest()


def known_chains(r: PeerRecord) -> dict[int, str]:
    """The round chains record `r` shows: at its round and at the round before, where known."""
    return {k: v for k, v in ((r.round, r.chain), (r.round - 1, r.prev_chain)) if v}


def whom_to_rejoin(me: str, chains: dict[int, str], records: list[PeerRecord]) -> Follow | None:
    """Whose outer state peer `me` should take after a silent split, None to keep its own.
    `chains`: its chain at each recent round (outer steps taken → chain). Only a full view
    decides: the latest round at which every live peer that has not diverged shows its chain
    (a record shows the chain at its round and the round before, so peers a round apart still
    meet at one) and at which ours is known. A partial view could pick different winners on
    different peers; the chains stay apart after a split, so a later round decides instead."""
    pool = [(r, known) for r in records
            if r.peer_id != me and not r.paused and not r.diverged and (known := known_chains(r))]
    if not pool:
        return None
    common = {k for k, v in chains.items() if v}.intersection(*(known for _, known in pool))
    if not common:
        return None  # no round known to all (some a round further apart, or we synced past it)
    round_ = max(common)
    mine = chains[round_]
    groups: dict[str, list[str]] = {mine: [me]}
    for r, known in pool:
        groups.setdefault(known[round_], []).append(r.peer_id)
    winner = _largest(groups)
    if winner == mine:
        return None
    donors = [r for r, known in pool if known[round_] == winner]
    return Follow(f"split at round {round_}: {len(donors)} of {len(pool) + 1} peers aggregated other deltas", donors,
                  split_round=round_)


def chain_at(round_: int, records: list[PeerRecord]) -> str:
    """The chain the most of `records` show at round `round_` (ties: the smallest peer id's
    group, as in whom_to_rejoin), "" when none does: what a peer that took the state of
    round `round_` from them takes as its own chain."""
    groups: dict[str, list[str]] = {}
    for r in records:
        chain = known_chains(r).get(round_)
        if chain and not r.diverged:
            groups.setdefault(chain, []).append(r.peer_id)
    return _largest(groups) if groups else ""


def _largest(groups: dict[str, list[str]]) -> str:
    """The chain of the group with the most peers; among equals, the group holding the
    smallest peer id: every peer that sees the same groups picks the same."""
    return min(groups, key=lambda chain: (-len(groups[chain]), min(groups[chain])))


class LostPeers:
    """Peers whose records vanished without a tombstone (cut off, or killed): their last
    records, to dial them back (`due`)."""

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self._lost: dict[str, tuple[PeerRecord, float, float]] = {}
        """peer id → (last record, when last seen, when next to dial)."""
        self._seen: dict[str, PeerRecord] = {}

    def update(self, records: list[PeerRecord], withdrawn: set[str]) -> None:
        """The live records of this refresh, and the peer ids that left on purpose."""
        now = self.clock()
        live = {r.peer_id: r for r in records}
        for peer, record in self._seen.items():
            if peer not in live and peer not in withdrawn:
                self._lost[peer] = (record, now, now)
        for peer in list(self._lost):
            if peer in live or peer in withdrawn or now - self._lost[peer][1] > FORGET_S:
                del self._lost[peer]
        if len(self._lost) > MAX_LOST:
            for peer in sorted(self._lost, key=lambda p: self._lost[p][1])[:len(self._lost) - MAX_LOST]:
                del self._lost[peer]
        self._seen = live

    def due(self) -> list[PeerRecord]:
        """The vanished peers to dial now (each at most every REDIAL_S)."""
        now = self.clock()
        out = []
        for peer, (record, seen, next_at) in self._lost.items():
            if now >= next_at:
                self._lost[peer] = (record, seen, now + REDIAL_S)
                out.append(record)
        return out

    def __len__(self) -> int:
        return len(self._lost)


async def redial(p2p, dht, record: PeerRecord, timeout_s: float = 5.0) -> bool:
    """Dial a vanished peer at its last record's addresses and ping it into the DHT's
    routing table; True when it answered."""
    from hivemind.p2p import PeerID

    from locoswarm.node.host import dial_addrs

    peer = PeerID.from_base58(record.peer_id)
    try:
        await dial_addrs(p2p, peer, record.addrs, timeout_s)
        return await asyncio.wait_for(dht.protocol.call_ping(peer), timeout_s) is not None
    except Exception as e:  # still cut off, gone, or in libp2p's dial backoff: next time
        log.debug("peer %s still unreachable: %s", record.peer_id, str(e).strip().splitlines()[0][:200] if str(e)
                  else type(e).__name__)
        return False
