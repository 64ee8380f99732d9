"""The daemon's peer registry on py-libp2p (issue 22): what node/registry.py's `PeerRegistry` is
to a p2pd daemon (`announce`, `withdraw`, `peers`, `peers_estimate`, `rejected`, `withdrawn`,
`aged_out`, `redial`, `rediscover`, `read_roll`), for the same round loop and upkeep
(node/upkeep.py), over net/dht.py's `DHTClient` on `TrioP2P`'s trio thread. Called from the
daemon's asyncio loop; each call runs on the trio thread (`TrioP2P.run`).

The records, their checks and the bucket levels are net/registry.py's (those of node/registry.py,
in protocol/records.py). What differs from a p2pd daemon's registry:
- **Its own DHT.** net/dht.py's client, a node of the DHT unless --dht-client (net/dhtserver.py
  answering the DHT's calls); where it is among a key's nearest nodes it stores and reads there too.
- **Whole reads.** `peers()` reads every bucket of the level the swarm writes at (`read_registry`),
  where a p2pd daemon reads its own bucket and a sample of the others: one read below ≈45 peers,
  2^L reads above (bounded at 2^10 buckets). Nobody leaves the view for age or room (`aged_out` is
  empty); a record leaves it when it expires or is withdrawn.
- **Addresses from records.** Each record's addresses go into the host's peerstore, so that the
  node's streams open to every peer the registry lists (a hivemind node knows its neighbours by
  peer id; p2pd finds addresses through its own Kademlia, which py-libp2p does not serve).
- **Rolls read, not kept.** `read_roll` reads the anchors' rolls; an anchor keeps its roll and
  peers relay rolls on p2pd only.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import multiaddr

from locoswarm.net.bridge import TrioP2P
from locoswarm.net.dht import DHTClient, DHTUnreachable
from locoswarm.net.host import dial
from locoswarm.net.registry import read_registry, store_own
from locoswarm.protocol.records import PeerRecord, encode_record, write_levels
from locoswarm.protocol.roll import Roll, newest_roll, roll_key

log = logging.getLogger(__name__)
ADDRESS_TTL_S = 600.0
"""How long a record's addresses stay in the host's peerstore (a record refreshes them)."""


class BridgedRegistry:
    """See the module docstring. `refuse(record)`: why a valid record's peer is not admitted (a
    private run's access policy), None to take it."""

    def __init__(self, p2p: TrioP2P, client: DHTClient, run_id: str, spec_hash: bytes, *, ttl_s: float,
                 refuse: Callable[[PeerRecord], str | None] | None = None) -> None:
        self.p2p, self.client, self.run_id, self.spec_hash = p2p, client, run_id, spec_hash
        self.ttl_s, self.refuse = ttl_s, refuse
        self.peer_id = client.identity.peer_id
        self.rejected: list[tuple[str, str]] = []
        """(who, why) of the entries the last `peers()` refused."""
        self.withdrawn: set[str] = set()
        """Peers whose tombstone the last `peers()` found (left on purpose)."""
        self.aged_out: set[str] = set()
        self.bytes_stored = 0
        """Encoded record bytes stored so far, once per level (node/replicas.py counts replicas' copies)."""
        self._estimate = 1.0
        self._written: dict[int, float] = {}

    @property
    def peers_estimate(self) -> float:
        """How many peers the last read found, this one included."""
        return self._estimate

    async def announce(self, record: PeerRecord) -> bool:
        """Store or refresh our record, valid for `ttl_s`, at the levels the swarm's size calls for."""
        levels = write_levels(self._estimate)
        now = time.monotonic()
        for level in levels:
            self._written[level] = now
        value = encode_record(record)
        ok = await self.p2p.run(self._store, value, levels)
        self.bytes_stored += len(value) * len(levels)
        return ok

    async def withdraw(self, peer_id: str) -> bool:
        """A tombstone at every level written within a TTL (else where the swarm's size says)."""
        now = time.monotonic()
        levels = tuple(sorted(level for level, at in self._written.items() if now - at <= self.ttl_s)) or \
            write_levels(self._estimate)
        return await self.p2p.run(self._store, b"", levels)

    async def _store(self, value: bytes, levels: tuple[int, ...]) -> bool:
        return await store_own(self.client, self.run_id, self.peer_id, value, ttl_s=self.ttl_s, levels=levels)

    async def peers(self) -> list[PeerRecord]:
        """Every live record of the run that passes the checks (ours among them); refused entries
        go to `rejected`, tombstones to `withdrawn`; each record's addresses to the peerstore."""
        rejected: list[tuple[str, str]] = []
        withdrawn: set[str] = set()
        found = await self.p2p.run(self._read, rejected, withdrawn)
        out = []
        for peer, record in found.items():
            why = None if self.refuse is None or peer == self.peer_id else self.refuse(record)
            if why:
                rejected.append((peer, why))
            else:
                out.append(record)
        self.rejected, self.withdrawn = rejected, withdrawn - set(found)
        self._estimate = float(max(1, len(out) + (self.peer_id not in found)))
        return out

    async def _read(self, rejected: list, withdrawn: set) -> dict[str, PeerRecord]:
        found = await read_registry(self.client, self.run_id, self.spec_hash, ttl_s=self.ttl_s, rejected=rejected,
                                    withdrawn=withdrawn)
        store = self.client.host.get_peerstore()
        for peer, record in found.items():
            if peer != self.peer_id:
                _remember(store, peer, record.addrs)
        return found

    async def redial(self, record: PeerRecord) -> bool:
        """Dial a vanished peer at its record's addresses; True when one connected."""
        return await self.p2p.run(self._redial, record)

    async def _redial(self, record: PeerRecord) -> bool:
        for addr in record.addrs:
            full = addr if "/p2p/" in addr else f"{addr}/p2p/{record.peer_id}"
            try:
                await dial(self.client.host, full, timeout_s=5.0)
                return True
            except Exception as e:  # this address is dead or refused: the next one
                log.debug("peer %s not reached at %s: %s", record.peer_id, addr, e)
        return False

    async def rediscover(self, initial_peers: list[str]) -> None:
        """Dial and ping the initial peers again (the DHT client's bootstrap)."""
        try:
            known = await self.p2p.run(self.client.bootstrap, initial_peers)
            log.info("reached the initial peers again: %d DHT nodes known", known)
        except DHTUnreachable as e:
            log.info("initial peers still unreachable: %s", e)

    async def read_roll(self, anchors: list[str]) -> Roll | None:
        """The newest roll (by round) one of `anchors` signed, None when none is found; entries
        not signed by the peer their subkey names, signed by a non-anchor, or malformed are
        logged and skipped (protocol/roll.py `newest_roll`, as node/roll.py reads them)."""
        found = await self.p2p.run(self.client.get, roll_key(self.run_id))
        if found is None or not isinstance(found.value, dict):
            return None
        roll, skipped = newest_roll({k: item.value for k, item in found.value.items()}, anchors, self.spec_hash)
        for why in skipped:
            log.warning("%s: skipped", why)
        return roll


def _remember(store, peer: str, addrs: list[str]) -> None:
    """Put a record's TCP addresses (the ones py-libp2p dials) into the peerstore."""
    from libp2p.peer.id import ID

    maddrs = []
    for addr in addrs:
        bare = addr.rpartition("/p2p/")[0] if "/p2p/" in addr else addr
        if "/tcp/" not in bare or "/p2p-circuit" in bare:
            continue
        try:
            maddrs.append(multiaddr.Multiaddr(bare))
        except Exception:  # a malformed address in a signed record: not dialed
            continue
    if maddrs:
        try:
            store.add_addrs(ID.from_base58(peer), maddrs, ADDRESS_TTL_S)
        except Exception as e:  # an id py-libp2p cannot read: the record's other checks passed
            log.debug("peer %s: addresses not kept: %s", peer, e)
