"""Who is in the swarm, as this peer sees it: the live peers' records (refreshed from the
registry, each replaced by a newer one its peer told us over the progress streams), the
peers the access policy admits, who should train a round, and the peers found gone or
vanished, which node/upkeep.py dials back."""

from __future__ import annotations

import logging
import time
from typing import Callable

from locoswarm.node.upkeep import MAX_LOST, LostPeers
from locoswarm.protocol.records import PeerRecord

log = logging.getLogger(__name__)
SILENT_ROUNDS = 10
"""Rounds for which a peer that did not answer a liveness probe is not asked again (unless
it restarts or reports progress); doubled at each probe it leaves unanswered in a row, up to
MAX_SILENT_ROUNDS: a record with nothing behind it then costs a round LIVENESS_S (node/pull.py)
ever more rarely, probed at rounds 0, 10, 30, 70, 150 and 310 where a fixed 10 probed 32 times
(with one such record among six peers the fixed 10 measured 0.93× the clean throughput on 2
cores, 0.90× on 16)."""
MAX_SILENT_ROUNDS = 320
WITHHELD_ROUNDS = 40
"""Rounds for which a peer that withheld its delta (`Membership.mark_withholding`) is left
alone, doubled each time it does it again, up to MAX_SILENT_ROUNDS: it answered, so it is
no dead record but an identity that serves nothing (or a newcomer too slow for the bound of
node/pull.py UNPROVEN_WAIT_S), and each probe of it costs a round that bound."""
TOLD_BEHIND = 8
"""A peer whose record is at most this many rounds behind a round is told our progress in it."""
LATE_AHEAD = 2
"""A held round (`Membership.candidates`, late) also asks the peers whose record is up to this
many rounds past it: a peer keeps the delta of a round until it publishes the one two rounds
on (node/exchange.py)."""
BARE_QUIET_S = 5.0
"""A peer found gone that never served us (no stream to it ever opened: a record with nothing
behind it) stays out of the view this long, doubled each time it is found gone again, up to
MAX_BARE_QUIET_S, whatever newer record it publishes (`Membership.gone`). Before, each refresh
of such a record (a new sequence number, every second) put it back in the view, to be dialled
and found gone again 1.5 s later: 40 keys signed by one process were found gone 120 times by
one honest peer in 27 rounds (2 cores, 2026-12-06)."""
MAX_BARE_QUIET_S = 320.0
MAX_QUIET = 4096
"""Bare peers whose quiet time is remembered at most (the newest kept)."""
MAX_HEARD = 256
"""Records told over streams kept at most (a view holds at most 200 peers)."""


class Membership:
    """This peer's view of the others (plain inputs and outputs; the daemon feeds it each
    registry refresh)."""

    def __init__(self, me: str, *, restricted: bool, clock: Callable[[], float] = time.monotonic,
                 refuse: Callable[[PeerRecord], str | None] | None = None, heard_ttl_s: float = 10.0) -> None:
        """`restricted`: a private run, whose peers serve only the peers they admit;
        `refuse(record)`: why its access policy does not admit a record's peer (None: it
        does), for records told over streams; `heard_ttl_s`: how long a peer the registry
        does not list stays in the view after it last told us its record."""
        self.me, self.clock = me, clock
        self.restricted = restricted
        self.records: list[PeerRecord] = []
        """The live records of the other peers: those of the last registry refresh, each the
        newer of its registry entry and what its peer last told us (`heard`)."""
        self._listed: dict[str, tuple[PeerRecord, float]] = {}
        """Peer id → its record as the last registry refresh read it, and when (clock) it
        was first read as it is."""
        self._heard: dict[str, tuple[PeerRecord, float, float]] = {}
        """Peer id → the record it told us over its progress stream, when (clock) we heard
        it first, and when we last heard a record of it."""
        self._gone: dict[str, float] = {}
        """Peer id → when (clock) our progress stream to it could not be opened (node/outbox.py
        GONE_S): its records seen before then are out of the view; a record first seen after,
        anything it tells us, or a dial that reaches it (`back`) puts it in again."""
        self.found_gone = 0
        """Peers found gone so far (`gone`), a bare one once while its quiet time is remembered:
        `node status` tells it (a record that no daemon serves is in a view for seconds; this count keeps it)."""
        self._quiet: dict[str, tuple[int, float]] = {}
        """Peer id → (times found gone without ever serving us, until when (clock) a record of
        it is not taken): BARE_QUIET_S."""
        self._streamed: set[str] = set()
        """Peers whose record in `records` is the one they told us (fresh, where the registry's
        copy can be a refresh period old)."""
        self.refuse, self.heard_ttl_s = refuse, heard_ttl_s
        self.admitted: set[str] = set()
        """Peer ids of `records`: each passed the run's access policy (in the registry, or
        when it was told over its stream)."""
        self.lost = LostPeers(clock)
        self.proven: dict[str, int] = {}
        """Peer id → the incarnation in which it delivered a delta to us: only these are
        waited for before they report progress (`expected`). A record costs nothing to make;
        a delivered delta shows a live peer that serves."""
        self.silent: dict[str, tuple[int, int, int]] = {}
        """Peer id → (incarnation, round, rounds left alone from there) where a liveness probe
        of it found no answer."""
        self.withholding: dict[str, tuple[int, int, int]] = {}
        """The same, where a peer withheld its delta (`mark_withholding`)."""
        self.peers_estimate = 1.0
        """The registry's estimate of the swarm's size (node/buckets.py), this peer included."""

    def update(self, records: list[PeerRecord], withdrawn: set[str] = frozenset(),
               out_of_sight: set[str] = frozenset()) -> list[PeerRecord]:
        """Take a refresh of the registry (`records`: the partial view, which passed its
        checks, ours may be among them; `withdrawn`: peer ids that left on purpose;
        `out_of_sight`: peers the view let go of for age or room, not seen to vanish);
        returns the vanished peers to dial now."""
        now = self.clock()
        listed: dict[str, tuple[PeerRecord, float]] = {}
        for r in records:
            if r.peer_id != self.me:
                old = self._listed.get(r.peer_id)
                listed[r.peer_id] = old if old is not None and old[0] == r else (r, now)
        self._listed = listed
        self._heard = {peer: heard for peer, heard in self._heard.items()
                       if peer not in withdrawn and (peer in listed or now - heard[2] <= self.heard_ttl_s)}
        self._gone = {peer: at for peer, at in self._gone.items() if peer in listed or peer in self._heard}
        self._merge()
        # A peer out of the view because its streams fail was handed to `lost` then, if at all.
        self.lost.update(self.records, withdrawn, set(out_of_sight) | set(self._gone))
        for peer in withdrawn:
            self.proven.pop(peer, None)
        live = {r.peer_id: r.incarnation for r in self.records}
        for peer, incarnation in list(self.proven.items()):
            if live.get(peer, incarnation) != incarnation:
                del self.proven[peer]  # restarted: the new life proves itself again
        return self.lost.due()

    def heard(self, record: PeerRecord) -> None:
        """`record` came from its peer over its progress stream (node/progress.py; the
        connection authenticated it): it replaces the registry's record of the peer when
        newer (`_newer`), and puts a peer the registry does not list (yet: it reads every
        few seconds; or it is out of our partial view) in the view until heard_ttl_s after
        it last told us one, if the access policy admits it."""
        peer, now = record.peer_id, self.clock()
        if peer == self.me:
            return
        if peer not in self._listed and self.restricted and (self.refuse is None or self.refuse(record) is not None):
            return
        old = self._heard.get(peer)
        back = self._gone.pop(peer, None) is not None  # it talks to us: there
        self._quiet.pop(peer, None)
        if old is not None and old[0] == record:
            self._heard[peer] = (old[0], old[1], now)
            if back:
                self._merge()
            return
        self._heard[peer] = (record, now, now)
        if len(self._heard) > MAX_HEARD:  # bounded: forget the longest silent
            del self._heard[min(self._heard, key=lambda p: self._heard[p][2])]
        self._merge()

    def live(self, round_: int) -> set[str]:
        """The peers of every record in view that is not paused nor gone, and whose record
        is not past `round_` by more than 2: whom a tree round may ask for a row's aggregate
        (node/tree.py)."""
        return self._live_up_to(round_ + 2)

    def behind(self, round_: int) -> set[str]:
        """The peers of `live(round_)` whose record shows they have not stepped past
        `round_` yet: those that may still ask for its rows' aggregates."""
        return self._live_up_to(round_)

    def _live_up_to(self, round_: int) -> set[str]:
        """The peers of every record in view that is not paused nor gone and shows at most `round_`."""
        return {r.peer_id for r in self.records if not r.paused and r.peer_id not in self._gone and r.round <= round_}

    def is_gone(self, peer: str) -> bool:
        """Whether `peer` is out of the view because its progress streams fail (`gone`)."""
        return peer in self._gone

    def streamed(self, peer: str) -> bool:
        """Whether the record of `peer` in the view is one it told us over its stream."""
        return peer in self._streamed

    def gone(self, peer: str, served: bool) -> None:
        """Our progress stream to `peer` could not be opened for a while (node/outbox.py
        GONE_S): it is out of the view at once (not told, not waited for, no donor), where
        its record would stay listed until it expires. `served`: a stream to it opened
        before, so a daemon of ours ran there (killed, or cut off): it is dialed back like
        a peer whose record vanished (`LostPeers`). One that never served (a bare record)
        is not, and its newer records stay out of the view for its quiet time (BARE_QUIET_S)
        unless it talks to us (`heard`) or a dial reaches it (`back`)."""
        record = next((r for r in self.records if r.peer_id == peer), None)
        if record is None:
            return
        now = self.clock()
        self._gone[peer] = now
        self.found_gone += peer not in self._quiet  # a bare peer once, however often its records come back
        self.proven.pop(peer, None)
        if served:
            self.lost.add(record)
        else:
            times = self._quiet.get(peer, (0, 0.0))[0] + 1
            self._quiet[peer] = (times, now + min(MAX_BARE_QUIET_S, BARE_QUIET_S * 2 ** (times - 1)))
            if len(self._quiet) > MAX_QUIET:  # bounded: forget the one whose quiet ends first
                del self._quiet[min(self._quiet, key=lambda p: self._quiet[p][1])]
        self._merge()
        log.info("peer %s is gone: no progress stream opens to it", peer)

    def back(self, peer: str) -> None:
        """A dial reached `peer` again (after `gone`, or after its record vanished): in the
        view again where a record of it is, and not dialed again."""
        self.lost.forget(peer)
        self._quiet.pop(peer, None)
        if self._gone.pop(peer, None) is not None:
            self._merge()

    def _merge(self) -> None:
        out, streamed, now = [], set(), self.clock()
        # What its peer told us unless the registry's copy is newer (an equal sequence
        # number: the same record, which the stream gave fresh).
        chosen = [(peer, heard[:2] if heard is not None and not _newer(listed, heard[:2]) else listed, heard is not None)
                  for peer, listed in self._listed.items() for heard in [self._heard.get(peer)]]
        chosen += [(peer, heard[:2], True) for peer, heard in self._heard.items() if peer not in self._listed]
        for peer, (record, first_seen), was_heard in chosen:
            gone_at = self._gone.get(peer)
            if gone_at is not None and first_seen <= gone_at:
                continue
            quiet = self._quiet.get(peer)
            if quiet is not None and now < quiet[1] and not was_heard:
                continue  # a bare record again: out until its quiet time ends (BARE_QUIET_S)
            out.append(record)
            if was_heard and record is self._heard[peer][0]:
                streamed.add(peer)
        self.records, self._streamed = out, streamed
        self.admitted = {r.peer_id for r in out}

    def incarnation(self, peer: str) -> int:
        """The incarnation `peer`'s live record shows, 0 when none is in the view."""
        return next((r.incarnation for r in self.records if r.peer_id == peer), 0)

    def prove(self, peers: list[str]) -> None:
        """`peers` delivered a delta to us: live and serving, in the incarnation their record shows."""
        live = {r.peer_id: r.incarnation for r in self.records}
        for peer in peers:
            self.silent.pop(peer, None)
            self.withholding.pop(peer, None)
            if peer in live:
                self.proven[peer] = live[peer]
        if len(self.proven) > len(live) + MAX_LOST:  # expired records: forget the oldest proofs
            for peer in [p for p in self.proven if p not in live][:len(self.proven) - len(live) - MAX_LOST]:
                del self.proven[peer]

    def candidates(self, round_: int, *, late: bool = False) -> set[str]:
        """Peers whose record puts them in `round_` but that have not proven themselves (a
        newcomer, or a record with nothing behind it): each is asked for its delta and
        waited for only if it answers within a liveness bound (node/pull.py); one that
        did not is left alone for SILENT_ROUNDS rounds.

        `late`: for a round we hold (we joined it late, in a state we took: node/trainer.py
        `hold`), whose peers may have stepped past it before we heard their progress: also
        the peers whose record is up to LATE_AHEAD rounds on, proven or not. They still serve
        the round's delta (node/exchange.py keeps two rounds), and the round must aggregate
        what they did: a joiner that pulled only the peers still training it took 1 delta
        where the swarm took 3, and split from it (CI, 2026-12-06)."""
        return {r.peer_id for r in self._in_round(round_, ahead=LATE_AHEAD if late else 0)
                if (late or self.proven.get(r.peer_id) != r.incarnation)
                and not _left_alone(self.silent, r.peer_id, r.incarnation, round_)
                and not self.withheld(r.peer_id, round_)}

    def mark_silent(self, peer: str, round_: int) -> None:
        """`peer` did not answer a liveness probe in `round_`: left alone for SILENT_ROUNDS,
        twice as long as last time when it was silent at its last probe too (same incarnation)."""
        self._leave_alone(self.silent, peer, round_, SILENT_ROUNDS)

    def mark_withholding(self, peer: str, round_: int) -> None:
        """`peer` answered "not yet" long after the round's end and delivered no delta in
        `round_` (node/pull.py `Gathered.withheld`): not proven any more, and left alone like
        a silent peer (`withheld`) even while it reports progress."""
        self.unprove(peer)
        self._leave_alone(self.withholding, peer, round_, WITHHELD_ROUNDS)

    def withheld(self, peer: str, round_: int) -> bool:
        """Whether `peer` is left alone in `round_` for withholding its delta in a recent
        round (in the life its record shows). Asked of every peer at each pass of a round's
        pulls: the view is searched for its life only when it is marked."""
        return peer in self.withholding and _left_alone(self.withholding, peer, self.incarnation(peer), round_)

    def _leave_alone(self, book: dict[str, tuple[int, int, int]], peer: str, round_: int, first: int) -> None:
        incarnation, last = self.incarnation(peer), book.get(peer)
        alone = first if last is None or last[0] != incarnation else min(MAX_SILENT_ROUNDS, 2 * last[2])
        book[peer] = (incarnation, round_, alone)
        if len(book) > 4 * MAX_LOST + len(self.records):  # bounded: forget the oldest verdicts
            for old in sorted(book, key=lambda p: book[p][1])[:len(book) // 2]:
                del book[old]

    def unprove(self, peer: str) -> None:
        """`peer` could not be reached, or said it will not serve: it is not waited for again
        until it delivers a delta."""
        self.proven.pop(peer, None)

    @property
    def num_peers(self) -> int:
        """Other live peers."""
        return len(self.records)

    @property
    def admit(self) -> Callable[[str], bool] | None:
        """In a private run, whether a peer id is admitted (its record passed the access
        policy at the last refresh); None in an open run (everyone with the spec)."""
        if not self.restricted:
            return None
        return lambda peer: peer in self.admitted

    def expected(self, round_: int) -> set[str]:
        """Peers that should train `round_` and are waited for before they report progress:
        proven (they delivered a delta to us in the incarnation their record shows), their
        record's round (the outer steps they have taken; one behind the round trained when
        rounds overlap, and possibly one more stale) within two rounds before it, and not
        paused. A record alone never holds a round."""
        return {r.peer_id for r in self._in_round(round_) if self.proven.get(r.peer_id) == r.incarnation}

    def told(self, round_: int) -> set[str]:
        """Peers told our progress in `round_`: proven or not, not paused, their record's
        round within TOLD_BEHIND rounds before it to 2 after. Wider than the peers waited
        for: a record read from the registry can be several fast rounds old, and a peer not
        told would not tell back, so neither would hear of the other (each then ends the
        round alone: a split). Once they talk, their records travel with their progress
        and stay fresh. A record only the registry gave us is told whatever round it shows:
        it is up to a refresh period old, which is many fast rounds (a dead peer's is
        dropped once its stream fails to open, `gone`)."""
        return {r.peer_id for r in self.records
                if (round_ - TOLD_BEHIND <= r.round or r.peer_id not in self._streamed)
                and r.round <= round_ + 2 and not r.paused}

    def _in_round(self, round_: int, ahead: int = 0) -> list[PeerRecord]:
        """Records that put their peer in `round_`: within two rounds before it (to `ahead`
        rounds past it), not paused."""
        return [r for r in self.records if round_ - 2 <= r.round <= round_ + ahead and not r.paused]


def _left_alone(book: dict[str, tuple[int, int, int]], peer: str, incarnation: int, round_: int) -> bool:
    """Whether `book` (peer → (incarnation, round marked, rounds left alone)) leaves `peer`,
    in its life `incarnation`, alone in `round_`."""
    mark = book.get(peer)
    return mark is not None and mark[0] == incarnation and round_ - mark[1] < mark[2]


def _newer(a: tuple[PeerRecord, float], b: tuple[PeerRecord, float]) -> bool:
    """Whether (record, when first seen here) `a` is newer than `b`: within one incarnation
    the larger sequence number; across two (a restart), the one seen here last, the other
    being the dead life's (its last record lingers in the registry until it expires)."""
    (ra, at_a), (rb, at_b) = a, b
    if ra.incarnation == rb.incarnation:
        return ra.seq > rb.seq
    return at_a > at_b
