"""The server side of the swarm's DHT over py-libp2p (issue 22): what a py-libp2p peer answers
when it takes part in the DHT as a node, as hivemind's DHTProtocol answers, so that hivemind
nodes put it in their routing tables, store at it and read from it, and so that a swarm can
start from a py-libp2p peer (Windows) and run without any p2pd peer.

- `rpc_ping`: adds a caller that names a node id to the routing table (net/dht.py
  `DHTClient.nodes`), and with `validate` pings it back to say whether it can be reached (a
  hivemind node joining through us checks that, and refuses to start in server mode otherwise).
- `rpc_store`: each entry kept in protocol/dhtstorage.py's `DHTStorage` when it passes hivemind's
  record validator (protocol/dhtrecords.py `check_record`: an entry under an owner marker must
  carry its owner's signature) and is newer than what is held; whole dictionaries (what a
  hivemind node hands a new node near its keys) entry by entry.
- `rpc_find`: each key's value as held (a regular value, or the dictionary with every live
  entry), and the nodes nearest the key that this node knows, without the caller.

Everything a caller sends is untrusted: the storage is bounded (protocol/dhtstorage.py); a
request that does not decode, carries more than MAX_KEYS_PER_CALL keys, or whose lists do not
line up, is answered with an error; so is a caller's call beyond LIMITS (at once, a second).
"""

from __future__ import annotations

import logging
import time

import trio
from libp2p.peer.id import ID

from locoswarm.net.lookup import distance
from locoswarm.net.rpc import serve_unary
from locoswarm.protocol.admission import PeerLimits
from locoswarm.protocol.errors import ProtocolError
from locoswarm.protocol.pbmessages import (RPC_FIND, RPC_PING, RPC_STORE, FindRequest, FindResponse, FindResult,
                                           NodeInfo, PingRequest, PingResponse, ResultType, StoreRequest,
                                           StoreResponse)
from locoswarm.protocol.pbwire import decode, encode

log = logging.getLogger(__name__)
MAX_KEYS_PER_CALL = 128
"""Keys one store or find may carry (hivemind's lookups send a handful): each costs a signature
check or a sort of the table, so a call of thousands would take a core for seconds."""
LIMITS = dict(max_concurrent=16, rate=100.0, burst=200)
"""One caller's DHT calls at once, a second and in a burst (protocol/admission.py PeerLimits):
a hivemind lookup sends a node one find at a time, a daemon's registry reads a few keys a second;
beyond, a call is refused with its reason."""
NEAREST = 20
"""Nodes named in a find answer (hivemind's bucket_size)."""
VALIDATE_S = 5.0
"""How long a ping back to a caller that asked to be validated may take."""


class DHTServer:
    """Answers the DHT's three calls for `client` (net/dht.py), whose `node_id` it names, whose
    routing table (`client.nodes`) it keeps and answers from, and whose `storage` it fills."""

    def __init__(self, client, limits: PeerLimits | None = None) -> None:
        if client.node_id is None or client.storage is None:
            raise ValueError("a DHT server needs a client in server mode (a node id and a storage)")
        self.client = client
        self.limits = limits or PeerLimits(**LIMITS)
        self.calls = 0

    def serve(self) -> None:
        for proto, handler in ((RPC_PING, self.rpc_ping), (RPC_STORE, self.rpc_store), (RPC_FIND, self.rpc_find)):
            serve_unary(self.client.host, proto, self._admitted(handler))

    def _admitted(self, handler):
        """`handler` behind the per-caller limits: a call beyond them is answered with its reason."""
        async def call(caller: ID, request: bytes) -> bytes:
            why = self.limits.admit(str(caller))
            if why is not None:
                raise ProtocolError(f"DHT call refused: {why}")
            try:
                return await handler(caller, request)
            finally:
                self.limits.release(str(caller))
        return call

    def _node_info(self) -> NodeInfo:
        return NodeInfo(node_id=self.client.node_id)

    def _heard(self, caller: ID, info: NodeInfo | None) -> None:
        """A caller that names a node id is a DHT node: into the routing table (bounded)."""
        if info is not None and len(info.node_id) == 20 and info.node_id != self.client.node_id:
            self.client.met(info.node_id, caller)

    async def rpc_ping(self, caller: ID, request: bytes) -> bytes:
        self.calls += 1
        ping = decode(PingRequest, request)
        available = False
        if ping.validate and ping.peer is not None and len(ping.peer.node_id) == 20:
            with trio.move_on_after(VALIDATE_S):
                try:
                    available = await self.client.call_ping(caller) == ping.peer.node_id
                except Exception as e:  # it cannot be reached from here: say so, as hivemind does
                    log.debug("validating DHT node %s failed: %s", caller, e)
        if not ping.validate or available:
            self._heard(caller, ping.peer)
        return encode(PingResponse(peer=self._node_info(), dht_time=time.time(), available=available))

    async def rpc_store(self, caller: ID, request: bytes) -> bytes:
        self.calls += 1
        store = decode(StoreRequest, request)
        n = len(store.keys)
        if n > MAX_KEYS_PER_CALL:
            raise ProtocolError(f"a store of {n} keys, above {MAX_KEYS_PER_CALL}")
        if not (len(store.subkeys) == len(store.values) == len(store.expiration_time) == n):
            raise ProtocolError(f"a store of {n} keys with {len(store.subkeys)} subkeys, {len(store.values)} values "
                                f"and {len(store.expiration_time)} expirations")
        self._heard(caller, store.peer)
        storage = self.client.storage
        ok = tuple(storage.store(k, t, v, float(e))
                   for k, t, v, e in zip(store.keys, store.subkeys, store.values, store.expiration_time))
        return encode(StoreResponse(store_ok=ok, peer=self._node_info()))

    async def rpc_find(self, caller: ID, request: bytes) -> bytes:
        self.calls += 1
        find = decode(FindRequest, request)
        if len(find.keys) > MAX_KEYS_PER_CALL:
            raise ProtocolError(f"a find of {len(find.keys)} keys, above {MAX_KEYS_PER_CALL}")
        self._heard(caller, find.peer)
        results = []
        for key_id in find.keys:
            held = self.client.storage.find(key_id) if len(key_id) == 20 else FindResult(type=ResultType.NOT_FOUND)
            nearest = sorted(((n, p) for n, p in self.client.nodes.items() if p != caller),
                             key=lambda item: distance(item[0], key_id))[:NEAREST]
            results.append(FindResult(type=held.type, value=held.value, expiration_time=held.expiration_time,
                                      nearest_node_ids=tuple(n for n, _ in nearest),
                                      nearest_peer_ids=tuple(p.to_bytes() for _, p in nearest)))
        return encode(FindResponse(results=tuple(results), peer=self._node_info()))
