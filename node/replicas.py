"""Direct stores into a DHT dictionary key (docs/scale.md, "store = direct"): a signed entry
is sent with `call_store` to the nodes nearest the key, found beforehand by a traversal that
carries no values, instead of hivemind's `DHTNode.store`, whose own traversal asks for the
key itself and so brings the whole dictionary back from every node it asks.

Reads go to the same replicas, one copy a read, taking them in turn: every replica holds
what every writer stored (a writer stores at all of them), so one copy is the whole
dictionary but for a store that some replica missed, and the next reads ask the others. A
`latest=True` get asks every node near the key for its whole copy on every read, k times
the bytes. Always asking the same replica is not enough: a replica that missed a writer
(its store went to replicas found before this one joined) would hide it for good; and our
own storage, when we are a replica, answers with what reached us alone.

How the replicas are found without values: hivemind's `rpc_find` answers a query with the
value it holds under that exact DHTID, if any, and the nearest nodes it knows. Asking
`find_nearest_nodes` for the key's DHTID with its last bit flipped names an id no one stores
anything under (it is not the sha1 of any key we use, but for a 2^-160 chance), so every
answer is nodes only, and the nodes nearest that id are the nodes nearest the key: XOR
distances to the two ids differ in the last bit only, which can reorder only two node ids
that differ in their last bit alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from hivemind.dht.node import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.dht.validation import DHTRecord
from hivemind.utils import ValueWithExpiration

log = logging.getLogger(__name__)
_UNREADABLE = object()

REPLICAS_REFRESH_S = 10.0
"""A key's replicas are looked up again after this long (nodes join and leave), and at once
after a store that no replica took."""
REFIND_MIN_S = 2.0
"""Least time between two look-ups of a key's replicas prompted by a nearer node in the
routing table."""


class ReplicaStore:
    """Stores dictionary entries at the replicas of their keys, remembering the replicas."""

    def __init__(self, dht: DHTNode, clock=time.monotonic, *, signer=None) -> None:
        """`signer`: the validator that signs the entries stored (default: the DHT node's);
        another key's (bench/fake_peer.py's identities without a host of their own) stores
        only at replicas, never through DHTNode.store, which signs with the node's."""
        self.dht = dht
        self.clock = clock
        self.signer = signer
        self._replicas: dict[DHTID, tuple[dict, float]] = {}
        """key id → ({node DHTID: PeerID}, when found)."""
        self.fallbacks = 0
        """Stores that went through DHTNode.store because no replica was known or none took it."""
        self.fallback_reads = 0
        """Reads that went through DHTNode.get because no replica was known or the one asked failed."""
        self._turn: dict[DHTID, int] = {}
        """key id → reads of it so far (which replica answers the next)."""
        self.bytes_stored = 0
        """Signed entry bytes sent to other replicas in store requests (before the RPC's framing)."""

    async def store(self, key: str, subkey: bytes | str, value: bytes, expiration_time: float) -> bool:
        """Store `value` under `key`/`subkey` until `expiration_time` at the key's replicas;
        True when at least one took it."""
        key_id = DHTID.generate(source=key)
        replicas = await self._replicas_of(key_id)
        if replicas and await self._store_at(replicas, key_id, subkey, value, expiration_time):
            return True
        self._replicas.pop(key_id, None)
        if self.signer is not None:
            return False
        self.fallbacks += 1
        return await self.dht.store(key, value, expiration_time, subkey=subkey)

    async def read(self, key: str, *, whole_first: bool = False):
        """A copy of `key` (a ValueWithExpiration, None when none is held): one replica's,
        the next replica each call; with `whole_first`, the first read of a key asks every
        replica and merges their copies (a newcomer's first view of the registry is whole;
        a round's progress key, new each round, is not worth k copies a round). Through
        DHTNode.get (latest) while no replica is known or none answered."""
        key_id = DHTID.generate(source=key)
        replicas = await self._replicas_of(key_id)
        if replicas:
            nodes = sorted(replicas, key=key_id.xor_distance)
            turn = self._turn.get(key_id, 0)
            self._turn[key_id] = turn + 1
            asked = nodes if turn == 0 and whole_first else [nodes[turn % len(nodes)]]
            copies = await asyncio.gather(*(self._copy(key_id, node, replicas[node]) for node in asked))
            answered = [c for c in copies if c is not False]
            if answered:
                return _merged([c for c in answered if c is not None])
            self._replicas.pop(key_id, None)  # look them up again next time
        self.fallback_reads += 1
        return await self.dht.get(key, latest=True)

    async def _copy(self, key_id: DHTID, node: DHTID, peer):
        """`node`'s copy of `key_id`, decoded; None when it holds none, False when it did not answer."""
        if node == self.dht.node_id:
            return self._decoded(key_id, self.dht.protocol.storage.get(key_id))
        answer = await self.dht.protocol.call_find(peer, [key_id])
        if answer is None or key_id not in answer:
            return False
        return self._decoded(key_id, answer[key_id][0])

    async def relay(self, key: str, keep) -> int:
        """Store again at the replicas `key` has now every entry of it that one of them holds
        and `keep(subkey, value)` takes (`value` as DHTNode.get gives it: deserialized, its
        signature stripped), with the signature and expiry its writer gave it: an entry then
        outlives the nodes it was first stored at, while one of them is there to read. A
        replica is sent only the entries it lacks or holds with an earlier expiry. Returns
        how many entries were sent."""
        key_id = DHTID.generate(source=key)
        replicas = await self._replicas_of(key_id)
        if not replicas:
            return 0
        copies = await asyncio.gather(*(self._raw(key_id, node, peer) for node, peer in replicas.items()))
        best: dict = {}  # subkey → (signed value bytes, expiration), the latest expiry of any copy
        for copy in copies:
            for subkey, (value, expiration) in (copy or {}).items():
                if expiration > best.get(subkey, (b"", -1.0))[1]:
                    best[subkey] = (value, expiration)
        protocol = self.dht.protocol
        kept = {subkey: entry for subkey, entry in best.items()
                if (value := self._entry(key_id, subkey, *entry)) is not _UNREADABLE and keep(subkey, value)}
        sent, calls = 0, []
        for (node, peer), copy in zip(replicas.items(), copies):
            if copy is False:
                continue  # it did not answer: not asked to store either
            lacking = [(subkey, value, expiration) for subkey, (value, expiration) in kept.items()
                       if (copy or {}).get(subkey, (b"", -1.0))[1] < expiration]
            sent += len(lacking)
            if node == self.dht.node_id:
                for subkey, value, expiration in lacking:
                    protocol.storage.store(key_id, value, expiration, subkey=subkey)
            elif lacking:
                calls.append(protocol.call_store(peer, keys=[key_id] * len(lacking), values=[v for _, v, _ in lacking],
                                                 expiration_time=[e for *_, e in lacking],
                                                 subkeys=[k for k, *_ in lacking]))
        await asyncio.gather(*calls)
        return sent

    async def _raw(self, key_id: DHTID, node: DHTID, peer):
        """`node`'s copy of `key_id` as stored: {subkey: (signed value bytes, expiration)};
        None when it holds none, False when it did not answer."""
        if node == self.dht.node_id:
            found = self.dht.protocol.storage.get(key_id)
        else:
            answer = await self.dht.protocol.call_find(peer, [key_id])
            if answer is None or key_id not in answer:
                return False
            found = answer[key_id][0]
        if found is None or not isinstance(found.value, DictionaryDHTValue):
            return None
        return {subkey: (value, expiration) for subkey, (value, expiration) in found.value.items()}

    def _decoded(self, key_id: DHTID, found):
        """A stored copy as DHTNode.get returns it: entries deserialized, signatures stripped
        (the protocol validated them on the way in: call_find on answer, our storage on store)."""
        if found is None:
            return None
        if not isinstance(found.value, DictionaryDHTValue):
            return None  # a plain value where a dictionary belongs: nothing of ours
        entries = {}
        for subkey, (value, expiration_time) in found.value.items():
            value = self._entry(key_id, subkey, value, expiration_time)
            if value is not _UNREADABLE:  # not msgpack: the reader sees the entry missing
                entries[subkey] = ValueWithExpiration(value, expiration_time)
        return ValueWithExpiration(entries, found.expiration_time)

    def _entry(self, key_id: DHTID, subkey, value: bytes, expiration_time: float):
        """One stored entry's value deserialized, its signature stripped; _UNREADABLE when it
        is not msgpack."""
        protocol = self.dht.protocol
        if protocol.record_validator is not None:
            record = DHTRecord(key_id.to_bytes(), protocol.serializer.dumps(subkey), value, expiration_time)
            value = protocol.record_validator.strip_value(record)
        try:
            return protocol.serializer.loads(value)
        except Exception:
            return _UNREADABLE

    async def _replicas_of(self, key_id: DHTID) -> dict:
        """The nodes nearest `key_id` (ourselves among them when we are), looked up again
        after REPLICAS_REFRESH_S, or after REFIND_MIN_S when our routing table has met a
        node nearer than the farthest known replica (a newcomer that would otherwise get
        no stores, and answer readers with a copy missing them, until the next lookup)."""
        known = self._replicas.get(key_id)
        k = self.dht.num_replicas
        if known is not None:
            age = self.clock() - known[1]
            if age < REPLICAS_REFRESH_S and (age < REFIND_MIN_S or not self._nearer_known(key_id, known[0], k)):
                return known[0]
        flipped = DHTID(key_id ^ 1)
        found = await self.dht.find_nearest_nodes([flipped], k_nearest=k)
        nearest = dict(found.get(flipped, {}))
        if self.dht.protocol.client_mode:
            nearest.pop(self.dht.node_id, None)  # nobody stores at a client: it is no replica
        if set(nearest) <= {self.dht.node_id}:
            return {}  # nobody else known: DHTNode.store handles the lone node
        self._replicas[key_id] = (nearest, self.clock())
        return nearest

    def _nearer_known(self, key_id: DHTID, replicas: dict, k: int) -> bool:
        """Whether the routing table holds a node that belongs among the k nearest to
        `key_id` and is not a known replica (a local look-up, no request)."""
        table = self.dht.protocol.routing_table.get_nearest_neighbors(key_id, k, exclude=self.dht.node_id)
        nodes = sorted({node for node, _ in table} | set(replicas), key=key_id.xor_distance)[:k]
        return not set(nodes) <= set(replicas)

    async def _store_at(self, replicas: dict, key_id: DHTID, subkey, value: bytes, expiration_time: float) -> bool:
        protocol = self.dht.protocol
        record = DHTRecord(key_id.to_bytes(), protocol.serializer.dumps(subkey), protocol.serializer.dumps(value),
                           expiration_time)
        signer = self.signer or protocol.record_validator
        if signer is not None:
            record = dataclasses.replace(record, value=signer.sign_value(record))
        stored = False
        calls = []
        for node_id, peer in replicas.items():
            if node_id == self.dht.node_id:  # one of the replicas ourselves: into our own storage, as DHTNode.store does
                if protocol.record_validator is None or protocol.record_validator.validate(record):
                    stored |= protocol.storage.store(key_id, record.value, expiration_time, subkey=subkey)
            else:
                self.bytes_stored += len(record.value)
                calls.append(protocol.call_store(peer, keys=[key_id], values=[record.value],
                                                 expiration_time=[expiration_time], subkeys=[subkey]))
        for answer in await asyncio.gather(*calls):
            stored |= bool(answer and answer[0])
        if not stored:
            log.debug("no replica of %s took the entry", key_id)
        return stored


def _merged(copies: list):
    """Copies of one dictionary key merged: per subkey, the entry that expires latest."""
    if not copies:
        return None
    if len(copies) == 1:
        return copies[0]
    entries: dict = {}
    for copy in copies:
        for subkey, item in copy.value.items():
            held = entries.get(subkey)
            if held is None or item.expiration_time > held.expiration_time:
                entries[subkey] = item
    return ValueWithExpiration(entries, max(c.expiration_time for c in copies))
