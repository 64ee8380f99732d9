"""Where a peer listens, asked of another peer. A hivemind DHT node names its neighbours by
peer id only (FindResult.nearest_peer_ids); p2pd finds their addresses through libp2p's own
Kademlia DHT (go-libp2p-kad-dht, `/ipfs/kad/1.0.0`, which p2pd serves by default) and so does
this module: a FIND_NODE for the peer sent to the node that named it, which is connected to
it and answers with its addresses (go-libp2p-kad-dht's handleFindPeer adds a connected target).

The Kademlia message is written with protocol/pbwire.py (field numbers of go-libp2p-kad-dht's
pb/dht.proto); one request and one answer per stream, uvarint-delimited.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from locoswarm.net.rpc import BadAnswer, RpcError, RpcTimeout, close_stream, read_message
from locoswarm.protocol.errors import ProtocolError
from locoswarm.protocol.pbwire import decode, encode, pb, write_delimited

KAD_PROTOCOL = "/ipfs/kad/1.0.0"
MAX_KAD_MESSAGE = 1 << 20
ADDRESS_TTL_S = 3600


class KadType(enum.IntEnum):
    PUT_VALUE = 0
    GET_VALUE = 1
    ADD_PROVIDER = 2
    GET_PROVIDERS = 3
    FIND_NODE = 4
    PING = 5


@dataclass(frozen=True, slots=True)
class KadPeer:
    id: bytes = pb(1, bytes)
    addrs: tuple[bytes, ...] = pb(2, bytes, repeated=True)
    """Binary multiaddrs."""
    connection: int = pb(3, bool)
    """ConnectionType (0 not connected, 1 connected); only read as a hint, so kept as a flag."""


@dataclass(frozen=True, slots=True)
class KadMessage:
    type: KadType | int = pb(1, KadType)
    key: bytes = pb(2, bytes)
    closer_peers: tuple[KadPeer, ...] = pb(8, KadPeer, repeated=True)


async def call_find_node(host: IHost, via: ID, target: ID, *, timeout_s: float = 3.0) -> list[multiaddr.Multiaddr]:
    """The addresses `via` knows for `target` (empty when it knows none); RpcError naming
    `via` when it cannot be asked or answers nonsense."""
    request = write_delimited(encode(KadMessage(type=KadType.FIND_NODE, key=target.to_bytes())))
    stream = None
    ok = False
    try:
        with trio.fail_after(timeout_s):
            stream = await host.new_stream(via, [TProtocol(KAD_PROTOCOL)])
            await stream.write(request)
            answer = decode(KadMessage, await read_message(stream, max_size=MAX_KAD_MESSAGE), max_size=MAX_KAD_MESSAGE)
        ok = True
    except trio.TooSlowError:
        raise RpcTimeout(via, KAD_PROTOCOL, f"no answer within {timeout_s} s") from None
    except ProtocolError as e:
        raise BadAnswer(via, KAD_PROTOCOL, f"{type(e).__name__}: {e}") from None
    except Exception as e:  # py-libp2p's dial and stream errors
        raise RpcError(via, KAD_PROTOCOL, f"{type(e).__name__}: {e}") from None
    finally:
        await close_stream(stream, reset=not ok)
    found = []
    for peer in answer.closer_peers:
        if peer.id != target.to_bytes():
            continue
        for raw in peer.addrs:
            try:
                found.append(multiaddr.Multiaddr(raw))
            except Exception:  # an address this py-libp2p cannot parse (a transport it lacks) is skipped
                continue
    return found


async def learn_addresses(host: IHost, via: ID, target: ID, *, timeout_s: float = 3.0) -> int:
    """Asks `via` where `target` listens and puts the TCP addresses into the host's peerstore,
    so that a call to `target` can dial it; the number of addresses learned (RpcError when
    `via` cannot be asked)."""
    addrs = [a for a in await call_find_node(host, via, target, timeout_s=timeout_s)
             if "/tcp/" in str(a) and "/p2p-circuit" not in str(a) and "/ws" not in str(a)]
    if addrs:
        host.get_peerstore().add_addrs(target, addrs, ADDRESS_TTL_S)
    return len(addrs)
