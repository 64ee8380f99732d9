"""Earned weight: a ledger of the work each peer has been seen to contribute, kept in the
consensus so that every peer holding the same outer state weighs peers the same.

A peer id is the hash of a key anyone can make in milliseconds, so no rule may count
identities. What a peer is credited with instead is the weight its deltas were given in the
outer steps of this outer state: after each round, every sender of an aggregated delta is
credited with the tokens it was weighted by, times its clip multiplier (a delta scaled down
to the median norm earns in proportion), and every credit decays by 1/2^DECAY_SHIFT a round,
except a newcomer's in a round it earned something (below the threshold, credit only grows
while the peer works), and the others' in a round of one sender (a peer alone: that says
nothing of their absence). A peer is *established* once its credit reaches `earn_rounds` rounds
of the per-peer plan: 8 rounds of full work by default, about 130 rounds of absence to lose
it again.

The robust rules (optim/screen.py) take their references from established peers, and the
newcomers of a round share one peer's weight between them (a hundred fresh identities weigh
as much as one, and each earns a hundredth of what one would), so minting identities buys
nothing until each has done the work itself. Decisions about whose state to follow
(node/lineage.py) weigh only established peers. In a run's first rounds nobody is
established yet and every peer counts, as before (docs/trust.md says what that leaves open),
unless the run's spec names trust anchors (the organiser's peers): the genesis ledger holds
them with the credit of a peer that has always worked (`founded`), so from round 0 they are
the established peers, every other identity a newcomer that earns its weight beside them.

Excluded peers (optim/check.py: peers holding a majority of the established weight found
their delta failing) stay in the ledger as a negative entry, −(round excluded + 1), neither
decaying nor earning: their deltas are refused, and they do not count as established, for
EXCLUSION_ROUNDS rounds. Then the entry goes and the peer is a newcomer: its deltas pooled
with the round's other newcomers (one peer's weight between them) and checked, its weight to
earn again from nothing. A check is a measurement, and an honest peer can fail one (seen
under churn: a peer restarted from an old checkpoint failed every check in its first full
round after taking the swarm's state, and was excluded for good); an attacker that comes
back does a newcomer's share of damage for a round before it is excluded again. The newest
MAX_BANNED are kept.

Deterministic by construction: the ledger changes only through `credit`, with integer
arithmetic on what the round's screening decided, which every peer that aggregated the same
deltas decided the same; so peers on one round chain hold one ledger, and the ledger travels
with the outer state (the state manifest, checkpoints) like the parameters do.
"""

from __future__ import annotations

from dataclasses import dataclass

from locoswarm.protocol.state import MAX_CREDIT, MAX_LEDGER_ENTRIES, check_ledger

DECAY_SHIFT = 6
"""Each round every credit loses credit >> DECAY_SHIFT (1/64, at least 1): a peer that keeps working
settles at 64 rounds of its work, one that left drops below 8 after about 130 rounds."""
MAX_ENTRIES = MAX_LEDGER_ENTRIES
"""Peers the ledger keeps; past it the smallest credits go (a flood of identities each
credited a sliver cannot push an established peer out)."""
EXCLUSION_ROUNDS = 16
"""Rounds an exclusion lasts (from the round it was decided in)."""
MAX_BANNED = MAX_LEDGER_ENTRIES // 4
"""Excluded peers the ledger remembers, the newest first: identities an attacker gets excluded
on purpose cannot push the established peers out of the ledger."""


@dataclass(frozen=True, slots=True)
class Standing:
    """What a ledger says of one round's senders: who counts as established."""

    established: frozenset[str]
    newcomers: frozenset[str]


class Ledger:
    """Credits by peer id. Replaced whole on every change (`credit` builds a new dict), so
    a reader on another thread always sees one round's ledger, never half of one."""

    def __init__(self, *, earn_rounds: int, per_peer_tokens: int, credits: dict[str, int] | None = None) -> None:
        if earn_rounds < 0 or per_peer_tokens < 1:
            raise ValueError(f"earn_rounds must be >= 0 and per_peer_tokens >= 1, got {earn_rounds}, {per_peer_tokens}")
        self.earn_rounds = earn_rounds
        self.per_peer_tokens = per_peer_tokens
        self.threshold = earn_rounds * per_peer_tokens
        """Credit at which a peer is established."""
        self.credits: dict[str, int] = dict(credits or {})

    @property
    def enabled(self) -> bool:
        return self.earn_rounds > 0

    @classmethod
    def founded(cls, anchors: list[str] | tuple[str, ...], *, earn_rounds: int, per_peer_tokens: int) -> Ledger:
        """A run's genesis ledger: each of `anchors` (the spec's trust anchors) credited as a
        peer that did a full round's work every round settles (per_peer_tokens << DECAY_SHIFT:
        its credit's decay equals its gain), so it is established from round 0 and, if it never
        comes, stops being so after about 130 rounds, as a peer that left does. Every peer
        derives it from the spec alone, so every genesis state holds the same ledger."""
        settled = min(MAX_CREDIT, per_peer_tokens << DECAY_SHIFT)
        ledger = cls(earn_rounds=earn_rounds, per_peer_tokens=per_peer_tokens)
        if ledger.enabled:
            ledger.credits = {peer: settled for peer in sorted(anchors)[:MAX_ENTRIES]}
        return ledger

    def established(self, peer: str) -> bool:
        """Whether `peer` has earned its weight (never, while earned weight is off)."""
        return self.enabled and self.credits.get(peer, 0) >= self.threshold

    def established_peers(self) -> frozenset[str]:
        """Every peer of the ledger that is established."""
        return frozenset(filter(self.established, self.credits))

    def banned(self, peer: str) -> bool:
        """Whether `peer` was excluded (optim/check.py): its deltas are refused."""
        return self.credits.get(peer, 0) < 0

    def banned_at(self, peer: str) -> int:
        """The round in which `peer` was excluded (it must be banned)."""
        return -self.credits[peer] - 1

    @property
    def num_banned(self) -> int:
        return sum(1 for c in self.credits.values() if c < 0)

    def standing(self, senders: list[str]) -> Standing | None:
        """Which of a round's `senders` are established; None when none is (or earned
        weight is off): every sender then counts as before."""
        established = frozenset(s for s in senders if self.established(s))
        if not established:
            return None
        return Standing(established, frozenset(senders) - established)

    def credit(self, earned: dict[str, int], banned: tuple[str, ...] = (), round_: int = 0) -> None:
        """One round's outer step (of round `round_`) is in: every credit decays (in a round of
        one sender, only its own), each sender of
        `earned` gains what it earned (tokens weighted × clip multiplier, >= 0), the peers of
        `banned` are excluded from here on, and entries that fell to nothing, or past
        MAX_ENTRIES the smallest (past MAX_BANNED the oldest exclusions), are dropped, as are
        exclusions EXCLUSION_ROUNDS old: those peers start again as newcomers."""
        if not self.enabled:
            return
        floor = max(1, self.per_peer_tokens >> DECAY_SHIFT)  # a 64th of a round's work
        # A round of one sender is a peer alone (no other peer's delta was there to take): it
        # says nothing of the others' absence, so their credit stands. Decayed there, a peer
        # that trained alone for ~130 rounds (offline, or cut off) ended with a ledger that
        # established nobody but itself, and weighed the swarm's peers at nothing once back.
        alone = len(earned) == 1 and not banned
        out, bans = {}, {}
        for peer, c in self.credits.items():
            if c < 0:
                if round_ - self.banned_at(peer) < EXCLUSION_ROUNDS:
                    bans[peer] = c
                continue
            if alone and peer not in earned:
                out[peer] = c
                continue
            if c >= self.threshold or not earned.get(peer, 0):
                c = max(0, c - max(1, c >> DECAY_SHIFT))  # at least a token: a sliver of credit fades too
            # A newcomer at work keeps what it earned: K of them sharing one peer's weight each
            # earn a K-th of a round's credit a round and are established after K × earn_rounds
            # rounds. Decayed, a K-th settles at 64/K rounds' credit: past 8 newcomers at a
            # time (a crowd of honest volunteers, a run's start beside its anchors) none ever was.
            if c >= floor or earned.get(peer, 0) > 0:
                out[peer] = c
        for peer, gain in earned.items():
            assert gain >= 0, "credit is earned, never taken"
            if gain > 0 and peer not in bans:  # a delta weighted to nothing (clipped or pooled to 0) earns no entry
                out[peer] = min(MAX_CREDIT, out.get(peer, 0) + gain)
        for peer in banned:
            out.pop(peer, None)
            bans.setdefault(peer, -(min(round_, MAX_CREDIT - 1) + 1))
        if len(bans) > MAX_BANNED:  # keep the newest; among equals the smaller peer id
            bans = dict(sorted(bans.items(), key=lambda kv: (kv[1], kv[0]))[:MAX_BANNED])
        if len(out) + len(bans) > MAX_ENTRIES:  # keep the largest; among equals the smaller peer id
            out = dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_ENTRIES - len(bans)])
        self.credits = {**out, **bans}

    def pairs(self) -> tuple[tuple[str, int], ...]:
        """The ledger as (peer id, credit) pairs in peer id order: its wire and file form."""
        return tuple(sorted(self.credits.items()))

    def load(self, pairs: object) -> None:
        """Take a ledger from a donor's state or a checkpoint (untrusted): see
        protocol/state.py check_ledger. MalformedMessage (a ValueError) naming what is
        wrong, with nothing changed."""
        self.credits = dict(check_ledger(pairs))
