"""A peer's lineage: which outer state it holds (its round chain), whether it went its own
way (diverged), and whose state to take after a partition, a silent split or a discarded
round.

A peer cut off from the swarm aggregates its own deltas alone and its outer state goes its
own way, while the peers left together go on with theirs. Once they see each other again
one side must take the other's state, or their deltas stop fitting. The round number does
not say which side: a peer alone waits for nobody's delta, so it ends its rounds sooner and
runs ahead, and following the runaway would drag the swarm after one peer. Nor does a later
round with everyone's deltas: it adds the same mean to states that differ, and the
difference stays.

What says it: a peer is *diverged* from the round it aggregated its own delta alone while
others trained that round (they reported progress in it), until it takes another peer's
state; its record says so (`PeerRecord.diverged`). A peer that trained alone because no one
else did (the others paused, or gone) has not diverged: its state is the swarm's.

- A diverged peer takes the state of the live peers that have not diverged and stepped past
  the round it diverged in (so a peer that sat paused through the split, with an older
  state, is not followed). Where such a peer shows one of its chains of a round after it
  diverged, that peer took its state, and it is diverged no more.
- When every peer it sees has diverged too (a swarm of two cut in two), the smallest peer id
  keeps its state and the others take it: exactly one side moves, never both.
- A peer that has not diverged and fell more than a round behind (paused, restarted from a
  checkpoint) takes the state of the peers ahead if they are at least as many as those level
  with it, itself included, counting only peers that have not diverged unless all have: one
  peer that ran ahead alone drags no one along.
- A peer that discarded a round before its outer step (node/roundloop.py) missed a step the
  swarm took: it takes the state of the peers that stepped past it.

A silent split: peers that each aggregated two or more deltas, but not the same ones (one
peer's request for a delta timed out), are not diverged by the rules above, yet their outer
states differ from that round on, forever. Each peer therefore keeps a round chain
(node/chains.py) and shows it in its record: equal chains at a round mean the same deltas
since the same start, without hashing a model. When the live peers that have not
diverged all stand at one round and this peer's chain there is not the largest group's
(ties: the group holding the smallest peer id, so every peer picks the same), it takes that
group's state (`whom_to_rejoin`); a peer of that group never moves.

Every count above is of earned weight (optim/credit.py, `weigh`): while some peer in a
decision is established in our outer state's ledger, peers without earned weight count for
nothing there and are never followed, so fresh identities "ahead", a sybil group showing an
invented chain or a bare key holding the smallest peer id move no one. Where nobody in a
decision has earned weight (a run's first rounds, or a ledger that knows none of them) the
rules count peers as they always did. Our own earned weight counts only where others saw it
earned (`Lineage.vouched`): rounds alone credit nobody but us, and a peer restarted offline
would otherwise trust itself alone and never take the swarm's state back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from locoswarm.node.chains import anchor_rounds, chain_start, known_chains, round_chain
from locoswarm.protocol.records import PeerRecord, is_chain


@dataclass(frozen=True, slots=True)
class Follow:
    why: str
    """For the log line: why this peer takes another state."""
    donors: list[PeerRecord]
    split_round: int | None = None
    """The round at which the chains were compared (whom_to_rejoin only)."""


Trusted = Callable[[str], bool]
"""Whether a peer has earned its weight in our outer state (optim/credit.py Ledger.established)."""


def weigh(ids: Iterable[str], trusted: Trusted | None) -> Callable[[str], int]:
    """A peer's weight in a decision among `ids`: 1 with earned weight, 0 without; 1 for
    every peer when none of them has any (a run's first rounds, earned weight off, or a
    peer whose ledger knows nobody here: the rules then count peers, as before)."""
    if trusted is None or not any(trusted(p) for p in ids):
        return lambda peer: 1
    return lambda peer: int(trusted(peer))


def whom_to_follow(me: str, round_: int, records: list[PeerRecord], *, diverged_at: int | None,
                   trusted: Trusted | None = None) -> Follow | None:
    """Whose outer state peer `me` (at outer step `round_`) should take now, None to keep
    its own. `diverged_at`: the round in which it diverged, None when it has not.
    `trusted`: whose weight is earned; peers without it are never followed while some
    peer here has it (however many there are and whatever they show)."""
    live = [r for r in records if r.peer_id != me and not r.paused]
    w = weigh([me] + [r.peer_id for r in live], trusted)
    if diverged_at is not None:
        sound = [r for r in live if not r.diverged and r.round > diverged_at and w(r.peer_id)]
        if sound:
            return Follow(f"{len(sound)} peers trained on without it since round {diverged_at}", sound)
        lone = sorted((r for r in live if r.diverged and w(r.peer_id)), key=lambda r: r.peer_id)
        if lone and lone[0].peer_id < me:
            return Follow(f"every peer seen has diverged too; {lone[0].peer_id} has the smallest peer id", lone[:1])
        return None  # the others come to this one (or there is no one yet)
    # Diverged peers ahead are followed only when every other peer has diverged (the lone
    # survivor of a swarm of two, found by a peer restarted from a checkpoint): following the
    # runaway of a partition, when sound peers are there, was seen to set off a chase of
    # downloads among all three peers in the fault suite.
    pool = [r for r in live if not r.diverged] or live
    ahead = [r for r in pool if r.round > round_ + 1 and w(r.peer_id)]
    level = [r for r in live if abs(r.round - round_) <= 1]
    if ahead and len(ahead) >= w(me) + sum(w(r.peer_id) for r in level):
        return Follow(f"outer step {round_} is behind the swarm's {max(r.round for r in ahead)}", ahead)
    return None


def unearned_ahead(me: str, round_: int, records: list[PeerRecord], trusted: Trusted | None) -> list[PeerRecord]:
    """The live records more than a round ahead of `round_` that the rules above pass over
    because their peers have no earned weight while others here have some: for the log."""
    live = [r for r in records if r.peer_id != me and not r.paused]
    w = weigh([me] + [r.peer_id for r in live], trusted)
    return [r for r in live if r.round > round_ + 1 and not w(r.peer_id)]


@dataclass(frozen=True, slots=True)
class Attested:
    """A state that live peers holding most of the earned weight vouch for (`attested_state`)."""
    round: int
    chain: str
    attesters: list[PeerRecord]
    """The live records showing `chain` at `round`: the state's donors."""
    shown: int
    """The earned weight of the live peers that show some chain: `attesters` hold more than half of it."""


def attested_state(me: str, records: list[PeerRecord], trusted: Trusted | None) -> tuple[Attested | None, int]:
    """The newest (round, chain) that live peers holding more than half of the earned weight
    seen attest, and that weight: what a peer with a ledger may take (docs/trust.md, "No state
    on a count"). A record is a statement its peer signed (the registry's RSA signatures, or
    its own authenticated stream) of its chain at each round it shows (`known_chains`: its
    round, the one before and its anchors), so a peer a round further on still attests the
    round behind it. The majority is of the weight of every live peer that has not diverged
    and shows a chain at all, not of those showing one at that round: peers of weight showing
    a round nobody else has reached are a majority only if they are most of the weight.
    (None, 0) when no peer of weight shows a chain (a run's sampled rounds keep none, node/pull.py)."""
    live = [r for r in records if r.peer_id != me and not r.paused and not r.diverged]
    w = weigh([me] + [r.peer_id for r in live], trusted)
    showing = [(r, known) for r in live if w(r.peer_id) and (known := known_chains(r))]
    shown = len(showing)
    support: dict[tuple[int, str], list[PeerRecord]] = {}
    for r, known in showing:
        for state in known.items():
            support.setdefault(state, []).append(r)
    majority = [state for state, rs in support.items() if 2 * len(rs) > shown]
    if not majority:
        return None, shown
    round_, chain = max(majority)  # one round has at most one chain of a majority
    return Attested(round_, chain, support[round_, chain], shown), shown


def whom_to_rejoin(me: str, chains: dict[int, str], records: list[PeerRecord],
                   trusted: Trusted | None = None) -> Follow | None:
    """Whose outer state peer `me` should take after a silent split, None to keep its own.
    `chains`: its chain at each recent round (outer steps taken → chain). Only a full view
    decides: the latest round at which every live peer that has not diverged shows its chain
    (a record shows the chain at its round and the round before, so peers a round apart still
    meet at one) and at which ours is known. A partial view could pick different winners on
    different peers; the chains stay apart after a split, so a later round decides instead.
    Groups weigh by earned weight (`weigh`): a group of fresh identities showing an invented
    chain, or a bare key holding the smallest peer id, weighs nothing."""
    pool = [(r, known) for r in records
            if r.peer_id != me and not r.paused and not r.diverged and (known := known_chains(r))]
    w = weigh([me] + [r.peer_id for r, _ in pool], trusted)
    # Only peers of weight take part: one without could otherwise keep the full view from
    # ever forming (a record showing no chain at the rounds the others share).
    pool = [(r, known) for r, known in pool if w(r.peer_id)]
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
    winner = _largest(groups, w)
    if winner == mine:
        return None
    donors = [r for r, known in pool if known[round_] == winner]
    return Follow(f"split at round {round_}: {len(donors)} of {len(pool) + 1} peers aggregated other deltas", donors,
                  split_round=round_)


def chain_at(round_: int, records: list[PeerRecord], trusted: Trusted | None = None) -> str:
    """The chain the most weight of `records` shows at round `round_` (ties: the smallest
    peer id's group, as in whom_to_rejoin), "" when none does: what a peer that took the
    state of round `round_` from them takes as its own chain."""
    groups: dict[str, list[str]] = {}
    for r in records:
        chain = known_chains(r).get(round_)
        if chain and not r.diverged:
            groups.setdefault(chain, []).append(r.peer_id)
    return _largest(groups, weigh([p for ids in groups.values() for p in ids], trusted)) if groups else ""


def _largest(groups: dict[str, list[str]], w: Callable[[str], int]) -> str:
    """The chain of the group of the most weight; among equals, the group holding the
    smallest peer id of weight: every peer that sees the same groups picks the same."""
    def rank(chain: str) -> tuple[int, str]:
        weighed = [p for p in groups[chain] if w(p)]
        return -len(weighed), min(weighed, default="\uffff")
    return min(groups, key=rank)


CHAINS_KEPT = 8
"""Round chains kept for comparing with records a few rounds old."""


class Lineage:
    """This peer's side of the rules above: its round chain at each recent outer step, the
    round it diverged in, and the decision whom to follow. Plain inputs and outputs: the
    round loop tells it what each round aggregated, it says what the peer record shows and
    whose state to take."""

    def __init__(self, spec_hash: bytes) -> None:
        self.spec_hash = spec_hash
        self.chains: dict[int, str] = {}
        """Outer steps → the round chain of our outer state then, the last CHAINS_KEPT;
        empty while unknown (a checkpoint without one, a round that pulled a sample of the
        deltas, a state taken at a round its donors' records no longer showed, a discarded
        round)."""
        self.diverged_at: int | None = None
        """The round this peer aggregated alone while others trained it; None while its
        outer state is the swarm's, or since it took another's."""
        self.trusted_then: frozenset[str] = frozenset()
        """The peers established in our ledger when we diverged: while diverged, our ledger's
        later credits are our own rounds alone, and would have us trust ourselves only."""
        self.alone_rounds = 0
        """Outer steps aggregated alone since the last sync (or the start)."""
        self.had_peers = False
        """Some round of ours aggregated another peer's delta."""
        self.behind_at: int | None = None
        """Outer steps we held when we discarded a round the swarm may have stepped; None
        when we discarded none since the last sync."""
        self.vouched = True
        """Whether our ledger established us the last time it held what others saw: at the
        run's genesis (an anchor), when we took a donor's state, and at each round that
        aggregated another peer's delta. Rounds alone credit us for work nobody else saw:
        a peer restarted offline trains its way to being established in its own ledger only,
        and while that made the swarm's peers weigh nothing in its decisions it never took
        the swarm's state again (each side refusing the other's deltas as another outer
        state's). Kept with checkpoints: that peer resumes between its lives."""
        self.me = ""
        """Our peer id (`start`)."""

    def start(self, outer_steps: int, chain: object = None, *, resumed: bool = False, vouched: object = True,
              me: str = "") -> None:
        """A fresh start (the run's initial state) or a resumed checkpoint's `chain`: a
        file on disk, so one that is not a chain leaves ours unknown (this peer then takes
        no part in split verdicts until it takes a donor's state). `vouched`: whether the
        genesis ledger establishes us, or the checkpoint's word (anything but False, from a
        checkpoint written before it was kept: True, as ours was then taken)."""
        if not resumed:
            self.chains = {outer_steps: chain_start(self.spec_hash)}
        else:
            self.chains = {outer_steps: chain} if is_chain(chain) else {}
        self.vouched = vouched is not False
        self.me = me

    def shown(self, outer_steps: int) -> dict:
        """What the peer record shows of the lineage at `outer_steps`."""
        return {"diverged": self.diverged_at is not None, "chain": self.chains.get(outer_steps, ""),
                "prev_chain": self.chains.get(outer_steps - 1, ""),
                "anchors": tuple((k, self.chains[k]) for k in anchor_rounds(outer_steps) if self.chains.get(k))}

    def after_round(self, round_: int, before: int, after: int, aggregated: list[tuple[str, int]], *,
                    others_trained: bool, sampled: bool, established: frozenset[str] = frozenset(),
                    own_sent: bool = True, senders: int | None = None) -> None:
        """Round `round_`'s outer step took the outer steps from `before` to `after` with
        the `aggregated` (sender, tokens) pairs, this peer's own among them.
        `others_trained`: other peers reported progress in the round. `sampled`: the round
        pulled a sample of the participants' deltas (fanout below their number).
        `established`: the peers our ledger counts as established before the round.
        `own_sent`: our own delta is among `aggregated` (not when it was held: node/trainer.py
        Trainer.hold), so a round of one delta is a round alone. `senders`: the peers whose
        deltas the step took, where `aggregated` holds more than one entry each (a tree
        round's rows, node/tree.py); None: one entry each."""
        senders = len(aggregated) if senders is None else senders
        if own_sent and senders == 1 and self.had_peers:
            self.alone_rounds += 1
            if others_trained and self.diverged_at is None:
                # Others trained this round and none of their deltas is in our step (cut
                # off): our outer state goes its own way from here until we take another's;
                # rounds with their deltas later do not undo it.
                self.diverged_at = round_
                self.trusted_then = established
        self.had_peers = self.had_peers or senders > 1
        if senders > 1:
            self.vouched = self.me in established
        previous = self.chains.get(before)
        if sampled:
            # Deltas left out on purpose: peers then differ by design (docs/swarm.md, "Fanout
            # and drift"), and a chain that said so would have them all take one peer's
            # state every round.
            self.chains = {}
        if not previous or sampled:
            return
        self.chains[after] = round_chain(previous, round_, aggregated)
        anchors = anchor_rounds(after)
        for old in sorted(self.chains)[:-CHAINS_KEPT]:
            if old not in anchors:
                del self.chains[old]

    def discarded(self, outer_steps: int) -> None:
        """We gave a round up before its outer step, at `outer_steps`: our outer state is still
        the one our chain names there (kept: the peer catches up from it by the rounds'
        deltas, node/replay.py, instead of downloading a state), and the swarm's next state is
        to be taken (`follow`). (A round that failed inside its outer step leaves a state that
        its chain does not name: a catch-up from it ends on a digest other than its donor's,
        and the state is downloaded.)"""
        self.chains = {k: v for k, v in self.chains.items() if k == outer_steps}
        if self.behind_at is None:
            self.behind_at = outer_steps

    def follow(self, outer_steps: int, records: list[PeerRecord], trusted: Trusted | None = None) -> Follow | None:
        """Whose state to take now, None to keep ours: after a discarded round, the peers
        that have not diverged and stepped past where we stopped (while there are none, our
        state is as good as anyone's: alone, nobody stepped without us); then whom_to_follow
        and whom_to_rejoin. `trusted`: whose weight is earned (see `weigh`)."""
        if self.behind_at is not None:
            live = [r for r in records if r.peer_id != self.me and not r.paused]
            w = weigh([self.me] + [r.peer_id for r in live], self.weighing(trusted))
            ahead = [r for r in live if not r.diverged and r.round > self.behind_at and w(r.peer_id)]
            if ahead:
                return Follow(f"a discarded round left outer step {outer_steps} behind the swarm's "
                              f"{max(r.round for r in ahead)}", ahead)
            if not live:
                self.behind_at = None
        if self.diverged_at is not None and self._taken_from_us(records):
            self.diverged_at, self.trusted_then = None, frozenset()
        trusted = self.weighing(trusted)
        found = whom_to_follow(self.me, outer_steps, records, diverged_at=self.diverged_at, trusted=trusted)
        if found is None and self.diverged_at is None:
            found = whom_to_rejoin(self.me, self.chains, records, trusted)
        return found

    def _taken_from_us(self, records: list[PeerRecord]) -> bool:
        """Whether a live peer that has not diverged shows one of our chains of a round
        after we diverged: it took our state (a peer back from its checkpoint behind us, say),
        so ours is the swarm's lineage again, not a runaway's. Taking its state back would
        put us on our own older state, rounds behind (seen: two peers swapped states that
        way, each taking the other's, and trained apart for rounds)."""
        ours = {k: v for k, v in self.chains.items() if k > self.diverged_at}
        return any(ours.get(k) == v for r in records if r.peer_id != self.me and not r.paused and not r.diverged
                   for k, v in known_chains(r).items())

    def weighing(self, trusted: Trusted | None) -> Trusted | None:
        """Whose weight counts in our decisions now: our ledger's `trusted`, or while diverged
        the peers established when we diverged. Alone, our ledger credits nobody but us
        (nobody established then: every peer counts); without this, a peer cut off for
        earn_rounds rounds would trust only itself and never take the swarm's state. For
        the same reason our own weight counts only where it was `vouched`."""
        if self.diverged_at is not None:
            return self.trusted_then.__contains__
        if trusted is None or self.vouched:
            return trusted
        return lambda peer: peer != self.me and trusted(peer)

    def synced(self, round_: int, donors: list[PeerRecord], fresh: list[PeerRecord], chain: str = "",
               trusted: Trusted | None = None) -> None:
        """We took the state of round `round_` from `donors`: its `chain` as the donors'
        manifests gave it, else their chain at that round from the records read before the
        download, then the `fresh` ones (unknown when they moved on meanwhile); and we are
        the swarm's again."""
        chain = chain or chain_at(round_, donors, trusted) or chain_at(round_, fresh, trusted)
        self.chains = {round_: chain} if chain else {}
        self.alone_rounds, self.diverged_at, self.behind_at = 0, None, None
        self.trusted_then = frozenset()
        self.vouched = trusted is None or trusted(self.me)

    def stay(self) -> None:
        """The state earned weight attests is ours (node/catchup.py `sync`): we are not behind
        after a discarded round, whatever records on other chains show."""
        self.behind_at = None

    def checkpoint_extra(self, outer_steps: int) -> dict:
        """Stored with a checkpoint: the round chain of the state it holds ("" unknown), and
        whether our own weight in its ledger is `vouched`."""
        return {"chain": self.chains.get(outer_steps, ""), "vouched": self.vouched}
