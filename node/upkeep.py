"""Keeping this peer's record and view up: the registry refresh loop (`keep_record`), which
feeds node/membership.py, and dialing back the peers that vanished or were found gone.

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
import logging
import time
from typing import TYPE_CHECKING, Callable

from locoswarm.protocol.records import PeerRecord

if TYPE_CHECKING:
    from locoswarm.node.membership import Membership

log = logging.getLogger(__name__)
REDIAL_S = 5.0
"""Least time between two dials of the same vanished peer."""
FORGET_S = 600.0
"""A vanished peer is dialed for this long after it was last seen."""
MAX_LOST = 16
"""At most this many vanished peers are remembered (the most recently seen)."""


class LostPeers:
    """Peers whose records vanished without a tombstone (cut off, or killed): their last
    records, to dial them back (`due`)."""

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self._lost: dict[str, tuple[PeerRecord, float, float]] = {}
        """peer id → (last record, when last seen, when next to dial)."""
        self._seen: dict[str, PeerRecord] = {}

    def update(self, records: list[PeerRecord], withdrawn: set[str], out_of_sight: set[str] = frozenset()) -> None:
        """The live records of this refresh, the peer ids that left on purpose, and those
        the partial view let go of without seeing them vanish (not dialed)."""
        now = self.clock()
        live = {r.peer_id: r for r in records}
        for peer, record in self._seen.items():
            if peer not in live and peer not in withdrawn and peer not in out_of_sight:
                self._lost[peer] = (record, now, now)
        for peer in list(self._lost):
            if peer in live or peer in withdrawn or now - self._lost[peer][1] > FORGET_S:
                del self._lost[peer]
        if len(self._lost) > MAX_LOST:
            for peer in sorted(self._lost, key=lambda p: self._lost[p][1])[:len(self._lost) - MAX_LOST]:
                del self._lost[peer]
        self._seen = live

    def add(self, record: PeerRecord) -> None:
        """`record`'s peer vanished otherwise (its streams fail): dialed back from now on."""
        self._seen.pop(record.peer_id, None)
        now = self.clock()
        self._lost[record.peer_id] = (record, now, now)
        if len(self._lost) > MAX_LOST:
            del self._lost[min(self._lost, key=lambda p: self._lost[p][1])]

    def forget(self, peer: str) -> None:
        """`peer` was reached again: no more dials (it is dialed again if it vanishes again)."""
        self._lost.pop(peer, None)

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


REDISCOVER_S = 5.0
"""Least time between two rounds of dialing the initial peers again."""


async def rediscover(dht, initial_peers: list[str]) -> None:
    """Seeing nobody after having had peers (a cut link, now maybe healed): dial the
    initial peers again and ping them back into the DHT's routing table, which dropped them
    while they were unreachable. The caller calls it at most every REDISCOVER_S."""
    from locoswarm.node.host import dial

    for maddr in initial_peers:
        try:
            peer = await dial(dht.protocol.p2p, maddr, 5.0)
            if await asyncio.wait_for(dht.protocol.call_ping(peer), 5.0) is not None:
                log.info("reached initial peer %s again", maddr)
        except Exception as e:  # still cut off (or in libp2p's dial backoff): try again later
            log.info("initial peer %s still unreachable: %s", maddr, (str(e).strip().splitlines() or [type(e).__name__])[0][:200])


EMPTY_VIEW_REFRESH_S = 2.0
"""How often the registry is refreshed and read while the view holds nobody, or too few
peers to start."""
VIEW_KEPT_S = 30.0
"""Least time between two calls of keep_record's `on_view` (it writes a file), unless the
view holds a peer the last call did not."""


async def keep_record(registry, membership: Membership, record: Callable[[], PeerRecord], *, interval_s: float,
                      initial_peers: list[str], had_peers: Callable[[], bool],
                      on_view: Callable[[list[PeerRecord]], None] | None = None,
                      shown: Callable[[], None] | None = None, waiting: Callable[[], bool] = lambda: False) -> None:
    """Show our `record()` in the registry and refresh `membership` from it every
    `interval_s`; dial back the peers that vanished, and the initial peers when we see
    nobody after having had peers (`had_peers()`); hand the view to `on_view` (kept for the
    next start) when it holds a peer the last one did not, else at most every VIEW_KEPT_S;
    call `shown()` after each store (the daemon tells its progress streams' peers the record
    too). Every EMPTY_VIEW_REFRESH_S instead while the view is empty or `waiting()` (for
    enough peers to start). Runs until cancelled; a refresh that fails keeps the last view."""
    redials: set[asyncio.Task] = set()
    next_rediscovery = next_view = next_refresh = 0.0
    kept: set[str] = set()

    def dial_back(lost: list[PeerRecord]) -> None:
        for record in lost:
            task = asyncio.create_task(_redial(registry, membership, record))
            redials.add(task)
            task.add_done_callback(redials.discard)

    try:
        while True:
            # Peers found gone between refreshes (their streams failed) are dialed back
            # within a second, not at the next refresh (a third of the record TTL).
            dial_back(membership.lost.due())
            if time.monotonic() < next_refresh:
                await asyncio.sleep(min(1.0, interval_s))
                continue
            # Seeing nobody (a newcomer whose first read came too early, or cut off), or
            # too few to start: read again soon, not a third of the TTL later.
            soon = not membership.records or waiting()
            next_refresh = time.monotonic() + (min(interval_s, EMPTY_VIEW_REFRESH_S) if soon else interval_s)
            try:
                await registry.announce(record())
                if shown is not None:
                    shown()  # and to the peers we train with, where it changed (a pause)
                view = await registry.peers()
                membership.peers_estimate = registry.peers_estimate
                dial_back(membership.update(view, registry.withdrawn, registry.aged_out))
                now = time.monotonic()
                seen = {r.peer_id for r in membership.records}
                if on_view is not None and seen and (now >= next_view or not seen <= kept):
                    # A peer that joined just before we restart must be among those we dial then.
                    next_view, kept = now + VIEW_KEPT_S, seen
                    on_view(membership.records)
                if not membership.records and had_peers() and initial_peers and now >= next_rediscovery:
                    next_rediscovery = now + REDISCOVER_S
                    await registry.rediscover(initial_peers)
            except Exception as e:  # the DHT is unreachable for now: keep the last view, try again
                log.warning("peer record refresh failed: %s: %s", type(e).__name__, e)
    finally:
        for task in redials:
            task.cancel()


async def _redial(registry, membership: Membership, record: PeerRecord) -> None:
    if await registry.redial(record):
        log.info("reached vanished peer %s again", record.peer_id)
        membership.back(record.peer_id)
