"""Round agreement: when a round ends and who took part in it.

Round boundaries follow global token progress, as hivemind's Optimizer does with its target
batch size: every peer training round r tells the round's peers how many tokens it has
trained on in r and at what rate (node/progress.py). The round ends when
the swarm's tokens reach H · batch · seq_len per participating peer, so on average each
peer does the H inner steps of the algorithm, and a fast GPU and a slow CPU both
contribute to every round they reach (each with its own token count, which weighs its
delta). Between reports a peer extrapolates the others' progress from their rate, for at
most a few report intervals: a peer that vanished stops counting. We chose tokens over
wall-clock windows because the simulation, and the learning-rate schedule, are in tokens;
a window would tie the algorithm to the slowest link. Peers see each other's progress a
report late and a step is indivisible, so a round overshoots its target by about a step
per peer; the swarm's accumulated overshoot (or shortfall), from the token counts in the
rounds' deltas, is taken off the next round's target, so over many rounds the swarm trains
the tokens it planned.

Earned weight (optim/credit.py): while some counted peer is established, the peers without
earned weight count as one peer in the target together, and their claims fill at most one
share: identities reporting a token each cannot make the others train their shares.

The round's participants are the peers that report progress for it. Every live peer that
proved itself (delivered a delta) and should be in the round (its record, the newer of the
registry's and the one it told over its stream, is within two rounds before it) counts in
the target and is waited for even before its first report, so that peers agree on the
participants (a peer seen by some and not by others splits the outer state). Pulling the
round's deltas from them is node/pull.py's.

Progress travels over streams (node/progress.py) to the peers whose records put them near
the round and to every peer that told us its own: each stream is authenticated by its
connection, so no peer can report, inflate or stall the round for another; with an access
policy, the progress of peers not admitted is not taken.
"""

from __future__ import annotations

import time
from typing import Callable

from locoswarm.node.lineage import weigh
from locoswarm.node.progress import ProgressBus, Seen
from locoswarm.optim.screen import median
from locoswarm.protocol.records import Progress

EXTRAPOLATE_INTERVALS = 4
"""Another peer's progress is extrapolated for at most this many report intervals."""
REPORT_SPACING_INTERVALS = EXTRAPOLATE_INTERVALS - 1
"""A changed count (not yet done) is told at most once per this many report intervals: a
reader extrapolates our count from our rate for EXTRAPOLATE_INTERVALS, which spans the gap
to our next report. Done (or given up) is told at once."""
CLAIM_FACTOR = 4.0


class RoundProgress:
    """The swarm's token progress in one round, told and heard over the progress streams."""

    def __init__(self, bus: ProgressBus | None, round_: int, peer_id: str, *, per_peer_tokens: int,
                 interval_s: float, carry: int = 0, expected: Callable[[], set[str]] = frozenset,
                 candidates: Callable[[], set[str]] = frozenset, told: Callable[[], set[str]] = frozenset,
                 incarnation: int = 0, incarnations: Callable[[str], int] = lambda peer: 0,
                 trusted: Callable[[str], bool] | None = None,
                 excluded: Callable[[str], bool] = lambda peer: False) -> None:
        """`bus`: the progress streams (None: a test that sets what was heard itself);
        `told()`: the live peers whose records put them near this round, proven or not:
        told our progress, as is every peer that told us its own. `trusted`: whose weight
        is earned (optim/credit.py): while some counted peer has it, the others together
        count as one peer in the target and their claims as at most one peer's share.
        `excluded`: peers the ledger excludes (optim/check.py): what they report is not heard,
        so they are neither counted nor waited for, and their deltas are not pulled (the
        caller leaves them out of `expected` and `candidates` too)."""
        self.bus = bus
        self.round = round_
        if bus is not None:
            bus.open_round(round_)
        self._reported: tuple[int, bool, float] = (-1, False, 0.0)
        """(tokens, done, when) of our last report."""
        self._message: Progress | None = None
        self.peer_id = peer_id
        self.per_peer_tokens = per_peer_tokens
        self.trusted = trusted
        self.excluded = excluded
        self.carry = carry
        self.expected = expected
        """Proven peers (node/membership.py) that should train this round, reported or not yet."""
        self.candidates = candidates
        """Unproven peers whose record puts them in this round (and, in the daemon, to whom our
        progress stream is open): probed for liveness."""
        self.told = told
        self.incarnation = incarnation
        """This process's incarnation, reported with our progress."""
        self.incarnations = incarnations
        """A peer's incarnation as its record shows it (0: unknown)."""
        self.interval_s = interval_s
        self._others: dict[str, Seen] = {}
        self.train_s = 0.0
        """Seconds this peer trained in the round (set by the round loop when training ends)."""

    def report(self, tokens: int, tokens_per_s: float, done: bool = False) -> None:
        """Tell the round's peers our progress: a changed count at most every
        REPORT_SPACING_INTERVALS (a reader extrapolates in between), done (and given up) at
        once; a peer of the round we have not told yet is told the last report now."""
        now = time.monotonic()
        changed = (tokens, done) != self._reported[:2]
        spaced = done or done != self._reported[1] or now - self._reported[2] >= REPORT_SPACING_INTERVALS * self.interval_s
        if changed and spaced:
            self._message = Progress(tokens=tokens, tokens_per_s=tokens_per_s, done=done,
                                     incarnation=self.incarnation, round=self.round)
            self._reported = (tokens, done, now)
        if self._message is not None and self.bus is not None:
            self.bus.publish(self._message, (set(self.told()) | set(self._others)) - {self.peer_id})

    def refresh(self) -> None:
        """Take what the round's peers told us so far."""
        if self.bus is not None:
            # Merged into what was heard before: a peer heard stays heard for the round when
            # the access policy stops admitting it (it left after telling us; its delta may
            # be in our step already).
            others = {**self._others, **self.bus.seen(self.round)}
            others.pop(self.peer_id, None)
            others = {peer: seen for peer, seen in others.items() if not self.excluded(peer)}
            self._others = others

    def incarnation_of(self, peer: str) -> int:
        """The incarnation to ask `peer`'s delta of: the one that reported progress in this
        round, else the one its record shows, else 0 (any)."""
        seen = self._others.get(peer)
        return seen.progress.incarnation if seen is not None else self.incarnations(peer)

    def participants(self) -> list[str]:
        """Peer ids (not ours) that reported progress in this round."""
        return sorted(self._others)

    def withdrawn(self) -> set[str]:
        """Participants that gave the round up (done with no tokens: no delta will come)."""
        return {peer for peer, seen in self._others.items() if seen.progress.done and seen.progress.tokens == 0}

    def reached(self, own_tokens: int) -> bool:
        """Whether the swarm's tokens, ours plus the others' extrapolated, reach the target."""
        done, target = self.totals(own_tokens)
        return done >= target

    def totals(self, own_tokens: int) -> tuple[float, int]:
        """(the swarm's tokens in this round, ours plus the others' extrapolated; the round's
        target, the per-peer share times the peers counted, less the carry)."""
        now = time.monotonic()
        total = own_tokens
        others = self._others  # replaced whole by refresh(), never mutated: safe from the training thread
        counted = set(self.expected())
        claims = {}
        for peer, seen in others.items():
            p = seen.progress
            if p.tokens == 0:
                continue  # an empty claim neither trains nor raises the target (a bare key reporting cannot stall it)
            counted.add(peer)
            ahead = 0.0 if p.done else p.tokens_per_s * min(now - seen.at, EXTRAPOLATE_INTERVALS * self.interval_s)
            claims[peer] = p.tokens + ahead
        # One peer claiming a huge count must not end everyone's round: each claim counts for
        # at most CLAIM_FACTOR × the median claim (ours included), and never less than the
        # per-peer share, so a fast GPU doing most of the work still counts for it.
        if claims:
            cap = max(self.per_peer_tokens, CLAIM_FACTOR * median(list(claims.values()) + [float(max(0, own_tokens))]))
            claims = {peer: min(c, cap) for peer, c in claims.items()}
        counted.discard(self.peer_id)
        fresh = self._newcomers(counted)
        # Newcomers (no earned weight, while some counted peer has it) raise the target by one
        # peer's share together and fill at most that much of it: identities that report a
        # token each cannot make the established peers train their share, nor a crowd of
        # inflated claims end the round.
        total += sum(c for peer, c in claims.items() if peer not in fresh)
        total += min(self.per_peer_tokens, sum(c for peer, c in claims.items() if peer in fresh))
        return total, self.per_peer_tokens * (1 + len(counted - fresh) + bool(fresh)) - self.carry

    def _newcomers(self, counted: set[str]) -> set[str]:
        """The counted peers without earned weight, when some counted peer (or this one) has it."""
        w = weigh(counted | {self.peer_id}, self.trusted)
        return {peer for peer in counted if not w(peer)}

    def num_peers(self) -> int:
        """Peers counted in this round's target, this one included."""
        return 1 + len((set(self.expected()) | set(self._others)) - {self.peer_id})
