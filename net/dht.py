"""The swarm's DHT (hivemind's DHTProtocol) over py-libp2p. In client mode (the default) it sends
an empty NodeInfo, so hivemind nodes answer it but never put it in their routing tables, and it
serves no DHT calls: the mode of a volunteer behind NAT (issue 22: Windows peers). In server mode
(`server=True`, net/dhtserver.py answering the calls) it names a node id, keeps what is stored at
it, and is a node like hivemind's: a swarm can start from it.

`bootstrap` pings the initial peers; `get` runs the iterative lookup (net/lookup.py) over
rpc_find and merges what several nodes hold (per subkey, the newest expiration wins); `store`
writes to the `num_replicas` nearest nodes, signing an entry whose subkey carries this peer's
owner marker (protocol/dhtrecords.py). Every answer is checked as hivemind's validator checks
it; a peer's timeout or bad answer is kept in `failures` with the peer, and the call carries on.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID

from locoswarm.net.host import dial
from locoswarm.net.lookup import distance, traverse
from locoswarm.net.peerrouting import learn_addresses
from locoswarm.net.rpc import BadAnswer, RpcError, call_unary
from locoswarm.protocol.dhtrecords import (REGULAR_TAG, DictionaryValue, Identity, check_record, dht_id, dumps, loads,
                                           sign_record, strip_signature)
from locoswarm.protocol.dhtstorage import DHTStorage
from locoswarm.protocol.errors import ProtocolError
from locoswarm.protocol.pbmessages import (RPC_FIND, RPC_PING, RPC_STORE, FindRequest, FindResponse, FindResult,
                                           NodeInfo, PingRequest, PingResponse, ResultType, StoreRequest,
                                           StoreResponse)
from locoswarm.protocol.pbwire import decode, encode

logger = logging.getLogger(__name__)
CLIENT_MODE = NodeInfo()
"""An empty NodeInfo: "answer me, but don't add me to your routing table"."""


@dataclass(kw_only=True, slots=True)
class DHTClientConfig:
    num_replicas: int = 5
    """How many of the nearest nodes a store writes to (hivemind's default)."""
    beam_size: int = 20
    """How many nearest nodes a lookup keeps asking (hivemind's bucket_size)."""
    num_workers: int = 4
    """Concurrent calls per lookup round."""
    max_rounds: int = 8
    """Lookup rounds at most."""
    timeout_s: float = 3.0
    """Per call (hivemind's wait_timeout)."""
    max_nodes: int = 256
    """Nodes remembered between lookups."""

    def __post_init__(self) -> None:
        for name in ("num_replicas", "beam_size", "num_workers", "max_rounds", "max_nodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"DHTClientConfig.{name} must be at least 1, got {getattr(self, name)}")
        if not self.timeout_s > 0:
            raise ValueError(f"DHTClientConfig.timeout_s must be positive, got {self.timeout_s}")


class ValueWithExpiration(NamedTuple):
    value: Any
    """The application value; for a dictionary, {subkey: ValueWithExpiration}."""
    expiration: float


class DHTUnreachable(Exception):
    """No initial peer answered a ping."""


class DHTClient:
    """See the module docstring. `failures` holds the latest (peer, what went wrong) pairs."""

    def __init__(self, host: IHost, identity: Identity, config: DHTClientConfig | None = None, *,
                 server: bool = False) -> None:
        """`server`: take part as a node (net/dhtserver.py serves the calls): a node id named
        in every request, so that hivemind nodes put this one in their routing tables, and a
        storage that holds what is stored here, read and written by this client too."""
        self.host, self.identity = host, identity
        self.config = config or DHTClientConfig()
        self.nodes: dict[bytes, ID] = {}
        """Node id -> peer of the DHT nodes that answered lately."""
        self.failures: collections.deque[tuple[str, str]] = collections.deque(maxlen=256)
        self.node_id: bytes | None = os.urandom(20) if server else None
        self.storage = DHTStorage() if server else None
        self.node_info = NodeInfo(node_id=self.node_id) if server else CLIENT_MODE
        """What this peer says of itself in every request."""

    def met(self, node_id: bytes, peer: ID) -> None:
        """A DHT node that called us (net/dhtserver.py): into the table, while there is room."""
        if len(self.nodes) < self.config.max_nodes or node_id in self.nodes:
            self.nodes[node_id] = peer

    def _fail(self, peer: ID | str, what: str) -> None:
        self.failures.append((str(peer), what))
        logger.info("DHT peer %s: %s", peer, what)

    # ------------------------------------------------------------ the three calls

    async def _call(self, peer: ID, proto: str, request: Any, answer_type: type) -> Any:
        raw = await call_unary(self.host, peer, proto, encode(request), timeout_s=self.config.timeout_s)
        try:
            return decode(answer_type, raw)
        except ProtocolError as e:
            raise BadAnswer(peer, proto, f"{type(e).__name__}: {e}") from None

    async def call_ping(self, peer: ID) -> bytes:
        """The node id of `peer` (RpcError when it does not answer as a DHT node)."""
        answer = await self._call(peer, RPC_PING, PingRequest(peer=self.node_info), PingResponse)
        if answer.peer is None or len(answer.peer.node_id) != 20:
            raise BadAnswer(peer, RPC_PING, "the answer names no 20-byte node id (a client-mode node?)")
        return answer.peer.node_id

    async def call_find(self, peer: ID, key_ids: list[bytes]) -> list[FindResult]:
        answer = await self._call(peer, RPC_FIND, FindRequest(keys=tuple(key_ids), peer=self.node_info), FindResponse)
        if len(answer.results) != len(key_ids):
            raise BadAnswer(peer, RPC_FIND, f"{len(answer.results)} results for {len(key_ids)} keys")
        return list(answer.results)

    async def call_store(self, peer: ID, key_id: bytes, tag: bytes, value: bytes, expiration: float) -> bool:
        request = StoreRequest(keys=(key_id,), subkeys=(tag,), values=(value,), expiration_time=(expiration,),
                               in_cache=(False,), peer=self.node_info)
        answer = await self._call(peer, RPC_STORE, request, StoreResponse)
        if len(answer.store_ok) != 1:
            raise BadAnswer(peer, RPC_STORE, f"{len(answer.store_ok)} verdicts for one entry")
        return answer.store_ok[0]

    # ------------------------------------------------------------ joining and looking up

    async def bootstrap(self, initial_maddrs: list[str]) -> int:
        """Dials and pings the initial peers (multiaddrs ending in /p2p/<id>), then looks up a
        random id to meet more nodes; the number of nodes known. DHTUnreachable when none of
        the initial peers answers."""
        async def join(maddr: str) -> None:
            try:
                peer = await dial(self.host, maddr, timeout_s=max(10.0, self.config.timeout_s))
                self.nodes[await self.call_ping(peer)] = peer
            except Exception as e:  # DialError, RpcError, a bad multiaddr: this peer only
                self._fail(maddr, f"{type(e).__name__}: {e}")

        async with trio.open_nursery() as nursery:
            for maddr in initial_maddrs:
                nursery.start_soon(join, maddr)
        if not initial_maddrs and self.node_id is not None:
            return 0  # the first node of a DHT (server mode): others will join through it
        if not self.nodes:
            failures = list(self.failures)[-len(initial_maddrs):]
            raise DHTUnreachable(f"none of {len(initial_maddrs)} initial peers answered a ping: "
                                 + "; ".join(f"{peer}: {what}" for peer, what in failures))
        await self.find_nearest(os.urandom(20), self.config.beam_size)
        return len(self.nodes)

    async def _lookup(self, key_id: bytes):
        async def ask(node_id: bytes, peer: ID, named_by: ID | None):
            if named_by is not None and not self._reachable(peer):
                await learn_addresses(self.host, named_by, peer, timeout_s=self.config.timeout_s)
            (result,) = await self.call_find(peer, [key_id])
            return result, {n: ID(p) for n, p in zip(result.nearest_node_ids, result.nearest_peer_ids)}

        c = self.config
        found = await traverse(key_id, dict(self.nodes), ask, beam_size=c.beam_size, num_workers=c.num_workers,
                               max_rounds=c.max_rounds)
        for peer, what in found.failures:
            self._fail(peer, what)
        for node_id, peer, _ in found.answered:
            if len(self.nodes) < c.max_nodes or node_id in self.nodes:
                self.nodes[node_id] = peer
        answered = {n for n, _, _ in found.answered}
        failed = {str(p) for p, _ in found.failures}
        self.nodes = {n: p for n, p in self.nodes.items() if n in answered or str(p) not in failed}
        return found

    def _reachable(self, peer: ID) -> bool:
        try:
            return bool(self.host.get_peerstore().addrs(peer))
        except Exception:  # py-libp2p raises PeerStoreError for an unknown peer
            return False

    async def find_nearest(self, key_id: bytes, k: int) -> list[tuple[bytes, ID]]:
        """The `k` nodes nearest `key_id` that answered, nearest first; in server mode this
        node among them where it is one of the `k` nearest."""
        nearest = (await self._lookup(key_id)).nearest(k)
        if self.node_id is not None:
            nearest = sorted(nearest + [(self.node_id, self.host.get_id())],
                             key=lambda item: distance(item[0], key_id))[:k]
        return nearest

    # ------------------------------------------------------------ values

    async def get(self, key: Any) -> ValueWithExpiration | None:
        """The live value of `key` as the nodes nearest it hold it, or None: a regular value
        (the newest copy) or, for a dictionary, {subkey: ValueWithExpiration} merging every
        node's entries (the newest expiration of each subkey wins). Entries whose signature
        fails or whose bytes are not hivemind's msgpack are dropped, with the peer's name."""
        key_id = dht_id(key)
        best: tuple[float, bytes, ID] | None = None  # a regular value: (expiration, stored bytes, from)
        entries: dict[bytes, tuple[float, Any, bytes, ID]] = {}  # tag -> (expiration, subkey, stored bytes, from)
        now = time.time()
        answered = list((await self._lookup(key_id)).answered)
        if self.storage is not None:  # server mode: what is stored here counts as one node's copy
            answered.append((self.node_id, self.host.get_id(), self.storage.find(key_id)))
        for _, peer, result in answered:
            if result.type == ResultType.FOUND_REGULAR:
                if result.expiration_time < now:
                    continue
                if not check_record(key_id, REGULAR_TAG, result.value, result.expiration_time):
                    self._fail(peer, f"value of {key!r} fails its signature check")
                elif best is None or result.expiration_time > best[0]:
                    best = (result.expiration_time, result.value, peer)
            elif result.type == ResultType.FOUND_DICTIONARY:
                self._merge_dictionary(peer, key, key_id, result.value, entries, now)
            elif result.type != ResultType.NOT_FOUND:
                self._fail(peer, f"unknown result type {result.type} for {key!r}")
        newest_entry = max((e[0] for e in entries.values()), default=None)
        if best is not None and (newest_entry is None or best[0] >= newest_entry):
            value = self._decode(best[2], key, best[1])
            return None if value is _BAD else ValueWithExpiration(value, best[0])
        if newest_entry is None:
            return None
        out = {}
        for expiration, subkey, stored, peer in entries.values():
            value = self._decode(peer, key, stored)
            if value is not _BAD:
                out[subkey] = ValueWithExpiration(value, expiration)
        return ValueWithExpiration(out, newest_entry)

    def _merge_dictionary(self, peer: ID, key: Any, key_id: bytes, raw: bytes,
                          entries: dict[bytes, tuple[float, Any, bytes, ID]], now: float) -> None:
        try:
            dictionary = loads(raw)
            if not isinstance(dictionary, DictionaryValue):
                raise ProtocolError(f"FOUND_DICTIONARY holds a {type(dictionary).__name__}")
        except ProtocolError as e:
            self._fail(peer, f"dictionary of {key!r}: {e}")
            return
        for entry in dictionary.entries:
            try:
                tag = dumps(entry.subkey)
            except TypeError:
                self._fail(peer, f"dictionary of {key!r}: a subkey hivemind cannot have written")
                continue
            if entry.expiration < now:
                continue
            if not check_record(key_id, tag, entry.value, entry.expiration):
                self._fail(peer, f"entry {entry.subkey!r:.80} of {key!r} fails its signature check")
            elif tag not in entries or entry.expiration > entries[tag][0]:
                entries[tag] = (entry.expiration, entry.subkey, entry.value, peer)

    def _decode(self, peer: ID, key: Any, stored: bytes) -> Any:
        try:
            return loads(strip_signature(stored))
        except ProtocolError as e:
            self._fail(peer, f"value of {key!r} is not hivemind msgpack: {e}")
            return _BAD

    async def store(self, key: Any, value: Any, expiration: float, *, subkey: Any = None) -> dict[str, bool]:
        """Stores `value` under `key` (and `subkey`: one dictionary entry) until `expiration`
        (Unix seconds) on the nearest nodes; their verdicts by peer id (failures aside). An
        entry whose subkey holds this peer's owner marker is signed with its identity key."""
        key_id = dht_id(key)
        tag = REGULAR_TAG if subkey is None else dumps(subkey)
        stored = dumps(value)
        if self.identity.owner_marker in tag:
            stored = sign_record(key_id, tag, stored, expiration, self.identity.private_key)
        return await self.store_bytes(key_id, tag, stored, expiration)

    async def store_bytes(self, key_id: bytes, tag: bytes, stored: bytes, expiration: float) -> dict[str, bool]:
        """`store` of bytes as they go on the wire (tag: REGULAR_TAG or the subkey's msgpack)."""
        verdicts: dict[str, bool] = {}

        async def one(peer: ID) -> None:
            if peer == self.host.get_id():  # server mode: one of the nearest is this node
                verdicts[str(peer)] = self.storage.store(key_id, tag, stored, float(expiration))
                return
            try:
                verdicts[str(peer)] = await self.call_store(peer, key_id, tag, stored, float(expiration))
            except RpcError as e:
                self._fail(peer, str(e))

        nearest = await self.find_nearest(key_id, self.config.num_replicas)
        async with trio.open_nursery() as nursery:
            for _, peer in nearest:
                nursery.start_soon(one, peer)
        return verdicts


_BAD = object()
"""_decode's mark for bytes that are not a value (the failure is already recorded)."""

