"""The protobuf messages a DHT client or server of the swarm exchanges, for protocol/pbwire.py
to read and write without hivemind: p2pd's PersistentConnectionRequest around one unary call
or its answer (hivemind's p2pd.proto, proto2), hivemind's DHT requests and answers
(dht.proto, proto3) with their auth fields (auth.proto, proto3), and libp2p's key protobufs
(crypto.proto, proto2) that identity files and peer ids are made of.

Field numbers and kinds are those of hivemind 1.1.12's .proto files; names are snake_case
(p2pd's callId is `call_id`). A sub-message or oneof member that is absent is None; an empty
NodeInfo is not the same as none (an empty one says "client mode, don't add me").
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from locoswarm.protocol.errors import MalformedMessage
from locoswarm.protocol.pbwire import MAX_MESSAGE_SIZE, decode, encode, pb, write_delimited

RPC_PING, RPC_STORE, RPC_FIND = "DHTProtocol.rpc_ping", "DHTProtocol.rpc_store", "DHTProtocol.rpc_find"
"""The libp2p protocol ids of hivemind's DHT calls: the handler's `Servicer.method` name (no namespace)."""


# ---------------------------------------------------------------- p2pd.proto: one unary call

@dataclass(frozen=True, slots=True)
class CallUnaryRequest:
    peer: bytes = pb(1, bytes, required=True)
    """The callee's peer id bytes; the receiving daemon overwrites it with the caller's."""
    proto: str = pb(2, str, required=True)
    """The protocol id the call is for, e.g. RPC_PING."""
    data: bytes = pb(3, bytes, required=True)
    """The serialized request (a PingRequest for RPC_PING)."""


@dataclass(frozen=True, slots=True)
class CallUnaryResponse:
    response: bytes | None = pb(1, bytes, oneof="result")
    """The serialized answer."""
    error: bytes | None = pb(2, bytes, oneof="result")
    """Or what went wrong, as text (hivemind sends the handler's exception's repr)."""


@dataclass(frozen=True, slots=True)
class PersistentConnectionRequest:
    """What travels each way on a unary call's stream, uvarint-delimited: the call, then its
    answer with the same call id. p2pd's other oneof members (handler registration, cancel)
    never leave a daemon; one arriving is skipped, leaving both members None."""

    call_id: bytes = pb(1, bytes, required=True)
    """Chosen by the caller (16 random bytes in p2pd), repeated in the answer."""
    call_unary: CallUnaryRequest | None = pb(3, CallUnaryRequest, oneof="message")
    unary_response: CallUnaryResponse | None = pb(4, CallUnaryResponse, oneof="message")


def encode_call(call_id: bytes, proto: str, request: bytes, peer: bytes = b"") -> bytes:
    """The delimited frame a caller writes to open unary call `proto` with `request`."""
    call = PersistentConnectionRequest(call_id=call_id, call_unary=CallUnaryRequest(peer=peer, proto=proto,
                                                                                      data=request))
    return write_delimited(encode(call))


def encode_answer(call_id: bytes, *, response: bytes | None = None, error: bytes | None = None) -> bytes:
    """The delimited frame a callee writes back: exactly one of `response` and `error`."""
    if (response is None) == (error is None):
        raise ValueError("an answer carries exactly one of response and error")
    answer = CallUnaryResponse(response=response, error=error)
    return write_delimited(encode(PersistentConnectionRequest(call_id=call_id, unary_response=answer)))


def decode_frame(message: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> PersistentConnectionRequest:
    """A unary call's message (read_delimited's body) that carries a call or an answer."""
    frame = decode(PersistentConnectionRequest, message, max_size=max_size)
    if frame.call_unary is None and frame.unary_response is None:
        raise MalformedMessage("PersistentConnectionRequest carries neither callUnary nor unaryResponse")
    return frame


# ---------------------------------------------------------------- auth.proto

@dataclass(frozen=True, slots=True)
class AccessToken:
    username: str = pb(1, str)
    public_key: bytes = pb(2, bytes)
    expiration_time: str = pb(3, str)
    signature: bytes = pb(4, bytes)


@dataclass(frozen=True, slots=True)
class RequestAuthInfo:
    client_access_token: AccessToken | None = pb(1, AccessToken)
    service_public_key: bytes = pb(2, bytes)
    time: float = pb(3, float)
    nonce: bytes = pb(4, bytes)
    signature: bytes = pb(5, bytes)


@dataclass(frozen=True, slots=True)
class ResponseAuthInfo:
    service_access_token: AccessToken | None = pb(1, AccessToken)
    nonce: bytes = pb(2, bytes)
    signature: bytes = pb(3, bytes)


# ---------------------------------------------------------------- dht.proto

@dataclass(frozen=True, slots=True)
class NodeInfo:
    node_id: bytes = pb(1, bytes)
    """The sender's 20-byte DHT node id; empty in client mode."""


@dataclass(frozen=True, slots=True)
class PingRequest:
    auth: RequestAuthInfo | None = pb(1, RequestAuthInfo)
    peer: NodeInfo | None = pb(2, NodeInfo)
    validate: bool = pb(3, bool)
    """Asks the callee to dial back and check that the caller is reachable and its clock near."""


@dataclass(frozen=True, slots=True)
class PingResponse:
    auth: ResponseAuthInfo | None = pb(1, ResponseAuthInfo)
    peer: NodeInfo | None = pb(2, NodeInfo)
    dht_time: float = pb(4, float)
    """The callee's clock (seconds since the epoch)."""
    available: bool = pb(5, bool)
    """With `validate`: whether the callee could reach the caller."""


@dataclass(frozen=True, slots=True)
class StoreRequest:
    """Parallel lists, one item per entry. A subkey tag is msgpack nil (b"\\xc0") for a regular
    value, empty for a whole dictionary value in `values`, else the msgpack of the subkey."""

    auth: RequestAuthInfo | None = pb(1, RequestAuthInfo)
    keys: tuple[bytes, ...] = pb(2, bytes, repeated=True)
    subkeys: tuple[bytes, ...] = pb(3, bytes, repeated=True)
    values: tuple[bytes, ...] = pb(4, bytes, repeated=True)
    expiration_time: tuple[float, ...] = pb(5, float, repeated=True)
    in_cache: tuple[bool, ...] = pb(6, bool, repeated=True)
    peer: NodeInfo | None = pb(7, NodeInfo)


@dataclass(frozen=True, slots=True)
class StoreResponse:
    auth: ResponseAuthInfo | None = pb(1, ResponseAuthInfo)
    store_ok: tuple[bool, ...] = pb(2, bool, repeated=True)
    peer: NodeInfo | None = pb(3, NodeInfo)


@dataclass(frozen=True, slots=True)
class FindRequest:
    auth: RequestAuthInfo | None = pb(1, RequestAuthInfo)
    keys: tuple[bytes, ...] = pb(2, bytes, repeated=True)
    peer: NodeInfo | None = pb(3, NodeInfo)


class ResultType(enum.IntEnum):
    NOT_FOUND = 0
    FOUND_REGULAR = 1
    FOUND_DICTIONARY = 2


@dataclass(frozen=True, slots=True)
class FindResult:
    type: ResultType | int = pb(1, ResultType)
    """A ResultType; an unknown number is kept as an int (proto3 enums are open)."""
    value: bytes = pb(2, bytes)
    """The stored bytes (FOUND_REGULAR) or the msgpack of the whole dictionary (FOUND_DICTIONARY)."""
    expiration_time: float = pb(3, float)
    nearest_node_ids: tuple[bytes, ...] = pb(4, bytes, repeated=True)
    nearest_peer_ids: tuple[bytes, ...] = pb(5, bytes, repeated=True)
    """Aligned with nearest_node_ids: the peers the callee knows nearest the key."""


@dataclass(frozen=True, slots=True)
class FindResponse:
    auth: ResponseAuthInfo | None = pb(1, ResponseAuthInfo)
    results: tuple[FindResult, ...] = pb(2, FindResult, repeated=True)
    peer: NodeInfo | None = pb(3, NodeInfo)


# ---------------------------------------------------------------- crypto.proto (libp2p keys)

class KeyType(enum.IntEnum):
    RSA = 0
    Ed25519 = 1
    Secp256k1 = 2
    ECDSA = 3


@dataclass(frozen=True, slots=True)
class PublicKey:
    key_type: KeyType | int = pb(1, KeyType, required=True)
    data: bytes = pb(2, bytes, required=True)
    """For RSA: the SubjectPublicKeyInfo DER."""


@dataclass(frozen=True, slots=True)
class PrivateKey:
    key_type: KeyType | int = pb(1, KeyType, required=True)
    data: bytes = pb(2, bytes, required=True)
    """For RSA: the PKCS#1 DER (what an identity file holds)."""
