"""Peer discovery through the DHT (issue 3): each peer keeps its record (protocol/records)
under the run's key, one subkey per peer id, with an expiry it refreshes; a peer that
vanishes (SIGKILL, cut network) is forgotten when its record expires, and one that leaves
cleanly withdraws it with an empty tombstone that outlives the record. Runs on the
caller's event loop through hivemind's DHTNode (no forked DHT process).

Until records are signed (issue 6), a record whose subkey is not its own peer id is
refused: it is the one check that does not need signatures.
"""

from __future__ import annotations

import logging

from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time

from locoswarm.protocol import ProtocolError
from locoswarm.protocol.records import PeerRecord, decode_record, encode_record

log = logging.getLogger(__name__)


def run_key(run_id: str) -> str:
    return f"locoswarm:{run_id}:peers"


class PeerRegistry:
    def __init__(self, dht: DHTNode, run_id: str, spec_hash: bytes, *, ttl_s: float = 30.0) -> None:
        self.dht = dht
        self.key = run_key(run_id)
        self.spec_hash = spec_hash
        self.ttl_s = ttl_s
        self.rejected: list[tuple[str, str]] = []
        """(subkey, reason) of the records refused by the last `peers()` call."""

    async def announce(self, record: PeerRecord) -> bool:
        """Store or refresh this peer's record, valid for `ttl_s` from now."""
        return await self.dht.store(self.key, encode_record(record), get_dht_time() + self.ttl_s,
                                    subkey=record.peer_id)

    async def withdraw(self, peer_id: str) -> bool:
        """Replace this peer's record by a tombstone that outlives it."""
        return await self.dht.store(self.key, b"", get_dht_time() + 2 * self.ttl_s, subkey=peer_id)

    async def peers(self) -> list[PeerRecord]:
        """The valid, live records of this run, by peer id; refused ones go to `rejected`."""
        found = await self.dht.get(self.key, latest=True)
        self.rejected = []
        if found is None or not isinstance(found.value, dict):
            return []
        records = []
        for subkey, item in sorted(found.value.items(), key=lambda kv: str(kv[0])):
            value = item.value
            if value == b"":
                continue  # withdrawn
            try:
                record = decode_record(value, self.spec_hash)
            except ProtocolError as e:
                self._reject(subkey, str(e))
                continue
            if record.peer_id != subkey:
                self._reject(subkey, f"record names peer {record.peer_id}, stored under {subkey}")
                continue
            records.append(record)
        return records

    def _reject(self, subkey: object, reason: str) -> None:
        log.warning("peer record under %s refused: %s", subkey, reason)
        self.rejected.append((str(subkey), reason))
