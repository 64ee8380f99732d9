"""The hivemind-free DHT wire (protocol/pbwire.py, pbmessages.py, dhtrecords.py) against the
real hivemind 1.1.12 in this process: protobuf messages cross its generated classes both ways
byte for byte, msgpack values and DHT ids equal its serializer's, records signed on either side
pass the other's validator and the same tampering fails both, identity files give its peer
ids; malformed input is a ProtocolError naming what is wrong; the modules import no hivemind."""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import subprocess
import sys

import msgpack
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import given, settings, strategies as st
from hivemind.dht.crypto import DHTRecord, RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.p2p import P2P, PeerID
from hivemind.proto import auth_pb2, crypto_pb2, dht_pb2, p2pd_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

import locoswarm
from locoswarm.node.signers import peer_id_of_owner
from locoswarm.node.statedir import IDENTITY_FILE, ensure_identity
from locoswarm.protocol import MalformedMessage, OversizedMessage, ProtocolError
from locoswarm.protocol import dhtrecords as rec
from locoswarm.protocol import pbmessages as pm
from locoswarm.protocol.pbwire import MAX_MESSAGE_SIZE, decode, encode, encode_uvarint, read_delimited, write_delimited

PB2 = {pm.PersistentConnectionRequest: p2pd_pb2.PersistentConnectionRequest,
       pm.CallUnaryRequest: p2pd_pb2.CallUnaryRequest, pm.CallUnaryResponse: p2pd_pb2.CallUnaryResponse,
       pm.AccessToken: auth_pb2.AccessToken, pm.RequestAuthInfo: auth_pb2.RequestAuthInfo,
       pm.ResponseAuthInfo: auth_pb2.ResponseAuthInfo, pm.NodeInfo: dht_pb2.NodeInfo,
       pm.PingRequest: dht_pb2.PingRequest, pm.PingResponse: dht_pb2.PingResponse,
       pm.StoreRequest: dht_pb2.StoreRequest, pm.StoreResponse: dht_pb2.StoreResponse,
       pm.FindRequest: dht_pb2.FindRequest, pm.FindResult: dht_pb2.FindResult, pm.FindResponse: dht_pb2.FindResponse,
       pm.PublicKey: crypto_pb2.PublicKey, pm.PrivateKey: crypto_pb2.PrivateKey}
PB2_NAME = {"call_id": "callId", "call_unary": "callUnary", "unary_response": "unaryResponse"}
"""p2pd.proto's camelCase names; every other field is named as in hivemind's .proto files."""


def _meta(f: dataclasses.Field) -> tuple:
    return f.metadata["pb"]  # (number, kind, repeated, required, oneof)


def to_pb2(msg):
    out = PB2[type(msg)]()
    for f in dataclasses.fields(msg):
        _, kind, repeated, _, _ = _meta(f)
        value, name = getattr(msg, f.name), PB2_NAME.get(f.name, f.name)
        if repeated:
            getattr(out, name).extend(map(to_pb2, value) if dataclasses.is_dataclass(kind) else value)
        elif value is None:
            continue
        elif dataclasses.is_dataclass(kind):
            getattr(out, name).SetInParent()
            getattr(out, name).CopyFrom(to_pb2(value))
        else:
            setattr(out, name, value)
    return out


def from_pb2(message, cls):
    values = {}
    for f in dataclasses.fields(cls):
        _, kind, repeated, _, oneof = _meta(f)
        name = PB2_NAME.get(f.name, f.name)
        value = getattr(message, name)
        if repeated:
            values[f.name] = tuple(from_pb2(v, kind) for v in value) if dataclasses.is_dataclass(kind) else tuple(value)
        elif (oneof or dataclasses.is_dataclass(kind)) and not message.HasField(name):
            values[f.name] = None
        else:
            values[f.name] = from_pb2(value, kind) if dataclasses.is_dataclass(kind) else value
    return cls(**values)


def _scalars(kind):
    if isinstance(kind, type) and issubclass(kind, enum.IntEnum):
        return st.sampled_from(list(kind))
    if dataclasses.is_dataclass(kind):
        return messages(kind)
    return {bytes: st.binary(max_size=24), str: st.text(max_size=12), bool: st.booleans(),
            float: st.floats(allow_nan=False)}[kind]


def messages(cls) -> st.SearchStrategy:
    """Any message of `cls`: every field drawn, sub-messages present or not, at most one
    member of a oneof."""
    plain, oneof = {}, []
    for f in dataclasses.fields(cls):
        _, kind, repeated, _, group = _meta(f)
        if group is not None:
            oneof.append(st.builds(lambda v, n=f.name: {n: v}, _scalars(kind)))
        elif repeated:
            plain[f.name] = st.lists(_scalars(kind), max_size=3).map(tuple)
        elif dataclasses.is_dataclass(kind):
            plain[f.name] = st.none() | st.deferred(lambda k=kind: messages(k))
        else:
            plain[f.name] = _scalars(kind)
    return st.tuples(st.fixed_dictionaries(plain), st.one_of(st.just({}), *oneof)).map(lambda t: cls(**t[0], **t[1]))


# ---------------------------------------------------------------- protobuf

@pytest.mark.parametrize("cls", list(PB2), ids=lambda c: c.__name__)
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_messages_cross_hiveminds_protobuf_both_ways_byte_for_byte(cls, data):
    msg = data.draw(messages(cls))
    ours = encode(msg)
    theirs = to_pb2(msg).SerializeToString()
    assert ours == theirs
    assert from_pb2(PB2[cls].FromString(ours), cls) == msg
    assert decode(cls, theirs) == msg


@pytest.mark.parametrize("cls", [pm.StoreRequest, pm.FindResponse, pm.PersistentConnectionRequest, pm.PingResponse],
                         ids=lambda c: c.__name__)
@settings(max_examples=50, deadline=None)
@given(data=st.data(), number=st.integers(8, 2**29 - 1), wire=st.sampled_from([0, 1, 2, 5]),
       payload=st.binary(max_size=12), at_start=st.booleans())
def test_unknown_fields_of_every_wire_type_are_skipped_as_hivemind_skips_them(cls, data, number, wire, payload,
                                                                              at_start):
    msg = data.draw(messages(cls))
    tag = encode_uvarint(number << 3 | wire)
    body = {0: encode_uvarint(int.from_bytes(payload[:9], "little") & (2**64 - 1)), 1: payload.ljust(8, b"\0")[:8],
            2: encode_uvarint(len(payload)) + payload, 5: payload.ljust(4, b"\0")[:4]}
    extra = tag + body[wire]
    blob = extra + encode(msg) if at_start else encode(msg) + extra
    assert decode(cls, blob) == msg == from_pb2(PB2[cls].FromString(blob), cls)


def test_repeated_numbers_are_read_packed_and_unpacked_alike():
    unpacked = bytes([0x10, 1, 0x10, 0]) + bytes([0x12, 2, 1, 1])  # two loose bools, then a packed pair
    assert decode(pm.StoreResponse, unpacked).store_ok == (True, False, True, True)
    assert list(dht_pb2.StoreResponse.FromString(unpacked).store_ok) == [True, False, True, True]
    doubles = bytes([0x29]) + b"\0" * 7 + b"\x40" + bytes([0x2A, 8]) + b"\0" * 6 + b"\xf0\x3f"
    assert decode(pm.StoreRequest, doubles).expiration_time == (2.0, 1.0)


def test_a_unary_call_frames_as_p2pd_sends_it_between_daemons():
    ping = encode(pm.PingRequest(peer=pm.NodeInfo(node_id=b"n" * 20), validate=True))
    frame = pm.encode_call(b"c" * 16, pm.RPC_PING, ping, peer=b"\x12\x20" + b"p" * 32)
    body, used = read_delimited(frame)
    assert used == len(frame) and frame[0] == len(body)  # a one-byte uvarint, then the message: no marker byte
    theirs = p2pd_pb2.PersistentConnectionRequest.FromString(body)
    assert theirs.callId == b"c" * 16 and theirs.callUnary.proto == "DHTProtocol.rpc_ping"
    assert dht_pb2.PingRequest.FromString(theirs.callUnary.data).validate
    answer = pm.encode_answer(b"c" * 16, response=b"")
    assert pm.decode_frame(read_delimited(answer)[0]).unary_response == pm.CallUnaryResponse(response=b"")
    with pytest.raises(MalformedMessage, match="neither callUnary nor unaryResponse"):
        pm.decode_frame(encode(pm.PersistentConnectionRequest(call_id=b"x")))
    with pytest.raises(ValueError, match="exactly one"):
        pm.encode_answer(b"x", response=b"a", error=b"b")


def test_a_oneof_keeps_the_last_member_read_as_protobuf_does():
    both = encode(pm.PersistentConnectionRequest(call_id=b"i", call_unary=pm.CallUnaryRequest(proto="p"))) + \
        bytes([0x22, 2, 0x12, 0])  # then an unaryResponse carrying error=b""
    ours = decode(pm.PersistentConnectionRequest, both)
    assert ours.call_unary is None and ours.unary_response == pm.CallUnaryResponse(error=b"")
    assert p2pd_pb2.PersistentConnectionRequest.FromString(both).WhichOneof("message") == "unaryResponse"


@pytest.mark.parametrize(("cls", "blob", "message"), [
    (pm.NodeInfo, b"\x0a\x05ab", r"NodeInfo.node_id at offset 0: length 5 runs past the end \(2 bytes left\)"),
    (pm.NodeInfo, b"\x0a", r"NodeInfo.node_id: varint at offset 1 runs past the end"),
    (pm.NodeInfo, b"\x08" + b"\xff" * 10 + b"\x01", r"NodeInfo.node_id: varint at offset 1 is longer than 10 bytes"),
    (pm.NodeInfo, b"\x08\x01", r"NodeInfo.node_id at offset 0: wire type 0, expected 2"),
    (pm.NodeInfo, b"\x00\x00", r"field number 0 at offset 0"),
    (pm.NodeInfo, b"\x0b", r"NodeInfo.node_id at offset 0: wire type 3 is not supported"),
    (pm.PingResponse, b"\x21\0\0\0", r"PingResponse.dht_time at offset 0: 8-byte value runs past the end"),
    (pm.StoreRequest, b"\x2a\x03\0\0\0", r"StoreRequest.expiration_time: packed doubles end inside a value"),
    (pm.PingRequest, b"\x12\x00\x12\x00", r"PingRequest.peer at offset 2: a second copy of a singular sub-message"),
    (pm.CallUnaryRequest, b"\x0a\x00\x1a\x00", r"CallUnaryRequest.proto: a required field is missing"),
    (pm.CallUnaryRequest, b"\x0a\x00\x12\x01\xff\x1a\x00", r"CallUnaryRequest.proto at offset 2: string is not valid"),
    (pm.PersistentConnectionRequest, b"\x0a\x00\x1a\x04\x0a\x00\x1a\x05",
     r"PersistentConnectionRequest.call_unary.data at offset 6: length 5 runs past the end"),
    (pm.FindResponse, b"\x12\x02\x08\x01\x12\x02\x08\x80",
     r"FindResponse.results\[1\].type: varint at offset 7 runs past the end"),
])
def test_malformed_protobuf_is_refused_naming_the_field_and_offset(cls, blob, message):
    with pytest.raises(MalformedMessage, match=message):
        decode(cls, blob)


def test_oversized_protobuf_is_refused_before_parsing():
    with pytest.raises(OversizedMessage, match="PingRequest of 11 bytes is above the limit of 10"):
        decode(pm.PingRequest, b"\0" * 11, max_size=10)
    with pytest.raises(OversizedMessage, match=f"above the limit of {MAX_MESSAGE_SIZE}"):
        decode(pm.StoreRequest, bytes(MAX_MESSAGE_SIZE + 1))
    with pytest.raises(MalformedMessage, match="must be bytes"):
        decode(pm.NodeInfo, "text")


@pytest.mark.parametrize("cls", [pm.FindResponse, pm.CallUnaryRequest, pm.StoreRequest], ids=lambda c: c.__name__)
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_a_truncated_message_fails_here_exactly_where_it_fails_in_hivemind(cls, data):
    blob = encode(data.draw(messages(cls)))
    for cut in range(len(blob)):
        try:  # Python's protobuf parses a proto2 message without its required fields; p2pd's Go reader does not
            theirs_ok = PB2[cls].FromString(blob[:cut]).IsInitialized()
        except Exception:
            theirs_ok = False
        try:
            decode(cls, blob[:cut])
            ours_ok = True
        except MalformedMessage:
            ours_ok = False
        assert ours_ok == theirs_ok, cut


@pytest.mark.parametrize("cls", [pm.FindResponse, pm.StoreRequest, pm.PingResponse], ids=lambda c: c.__name__)
@settings(max_examples=50, deadline=None)
@given(blob=st.binary(max_size=64))
def test_garbage_is_a_protocol_error_or_what_hivemind_reads_too(cls, blob):
    try:
        ours = decode(cls, blob)
    except ProtocolError:
        return
    assert from_pb2(PB2[cls].FromString(blob), cls) == ours


def test_delimited_frames_come_whole_one_byte_at_a_time_and_bounded():
    frames = write_delimited(b"a" * 300) + write_delimited(b"")
    assert frames[:2] == b"\xac\x02"  # 300 as a uvarint
    for n in range(302):
        assert read_delimited(frames[:n]) is None
    assert read_delimited(frames) == (b"a" * 300, 302)
    assert read_delimited(frames[302:]) == (b"", 1)
    with pytest.raises(OversizedMessage, match="announces 300 bytes, above the limit of 299"):
        read_delimited(frames[:2], max_size=299)  # refused from the prefix, before any of the body
    with pytest.raises(OversizedMessage, match="announces over"):
        read_delimited(b"\xff\xff\xff\xff\xff", max_size=MAX_MESSAGE_SIZE)
    with pytest.raises(MalformedMessage, match="longer than 10 bytes"):
        read_delimited(b"\x80" * 10, max_size=2**70)
    with pytest.raises(OversizedMessage):
        write_delimited(b"x" * 11, max_size=10)


# ---------------------------------------------------------------- msgpack values and DHT ids

_KEYS = st.text(max_size=6) | st.binary(max_size=6)
_LEAVES = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False)
           | st.text(max_size=10) | st.binary(max_size=10))
VALUES = st.recursive(_LEAVES, lambda inner: st.lists(inner, max_size=4) | st.lists(inner, max_size=4).map(tuple)
                      | st.dictionaries(_KEYS, inner, max_size=4), max_leaves=12)


@settings(max_examples=50, deadline=None)
@given(value=VALUES)
def test_values_dump_as_hiveminds_msgpack_byte_for_byte_and_load_back(value):
    blob = rec.dumps(value)
    assert blob == MSGPackSerializer.dumps(value)
    assert rec.loads(blob) == MSGPackSerializer.loads(blob) == value


_SUBKEYS = st.binary(max_size=8) | st.text(max_size=8) | st.integers(0, 2**32)
_ENTRIES = st.lists(st.tuples(_SUBKEYS, st.binary(max_size=16), st.floats(0, 4e9)), max_size=5,
                   # distinct expirations too: hivemind's expiry heap compares subkeys of equal expirations
                   unique_by=(lambda e: (type(e[0]), e[0]), lambda e: e[2]))


@settings(max_examples=50, deadline=None)
@given(entries=_ENTRIES, maxsize=st.none() | st.integers(1, 1000))
def test_dictionary_values_travel_as_hiveminds_ext_0x50(entries, maxsize):
    theirs = DictionaryDHTValue(maxsize)
    with theirs.freeze():  # keep entries that have expired or overflow maxsize: the codec is what is compared
        for subkey, value, expiration in entries:
            theirs.store(subkey, value, expiration)
        blob = MSGPackSerializer.dumps(theirs)
    ours = rec.DictionaryValue(maxsize=maxsize or math.inf, latest_expiration=max((e[2] for e in entries),
                                                                                 default=-math.inf),
                               entries=tuple(rec.DictionaryEntry(*e) for e in entries))
    assert rec.dumps(ours) == blob
    assert rec.loads(blob) == ours
    assert rec.loads(rec.dumps([ours, (ours,)])) == [ours, (ours,)]


class _Kind(enum.IntEnum):
    ONE = 1


@pytest.mark.parametrize("value", [_Kind.ONE, {1, 2}, object()], ids=["IntEnum", "set", "object"])
def test_types_hiveminds_strict_msgpack_refuses_are_refused_here(value):
    with pytest.raises(TypeError):
        MSGPackSerializer.dumps(value)
    with pytest.raises(TypeError):
        rec.dumps(value)


@pytest.mark.parametrize(("blob", "error", "message"), [
    (msgpack.packb(msgpack.ExtType(0x51, b"\x90")), MalformedMessage, "unknown ExtType 0x51"),
    (msgpack.packb(msgpack.ExtType(0x50, msgpack.packb([1, 2]))), MalformedMessage, "not \\[maxsize"),
    (msgpack.packb(msgpack.ExtType(0x50, msgpack.packb([None, 2.0, [[b"k", "v", 1.0]]]))), MalformedMessage,
     "not \\[maxsize"),
    (msgpack.packb(msgpack.ExtType(0x50, msgpack.packb([5, 2.0, [[b"k", "not bytes", 1.0]]]))), MalformedMessage,
     "entry 0 is not"),
    (b"\x92\x01", MalformedMessage, "not valid"),
    (b"\x01\x02", MalformedMessage, "not valid"),
    (b"\x80" * 11, OversizedMessage, "above the limit of 10"),
])
def test_malformed_msgpack_is_refused_naming_what_is_wrong(blob, error, message):
    with pytest.raises(error, match=message):
        rec.loads(blob, max_size=10 if error is OversizedMessage else MAX_MESSAGE_SIZE)


@settings(max_examples=50, deadline=None)
@given(key=st.text(max_size=40) | st.binary(max_size=40) | st.integers(-2**63, 2**63)
       | st.tuples(st.text(), st.integers(0, 9)))
def test_dht_ids_equal_hiveminds(key):
    assert rec.dht_id(key) == DHTID.generate(source=key).to_bytes()
    assert len(rec.dht_id(key)) == rec.DHT_ID_BYTES


def test_a_str_key_and_its_utf8_bytes_are_different_keys():
    # hivemind hashes bytes as they are and a str through msgpack: "k" and b"k" never collide
    assert rec.dht_id("spike:plain").hex().startswith("410482a6")  # the id the interop spike saw live
    assert rec.dht_id("k") != rec.dht_id(b"k")


# ---------------------------------------------------------------- signed records

@pytest.fixture(scope="module")
def keys():
    """hivemind's key and validator, and a second RSA key as a `cryptography` key."""
    theirs = RSAPrivateKey()
    return theirs, RSASignatureValidator(theirs), rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _signed_by_us(private_key, expiration):
    key_id = rec.dht_id("run:bucket")
    subkey = rec.dumps(b"QmPeer" + rec.owner_marker(private_key.public_key()))
    return key_id, subkey, rec.sign_record(key_id, subkey, rec.dumps({"round": 3}), expiration, private_key)


def test_a_record_signed_here_passes_hiveminds_validator_and_one_it_signs_passes_here(keys):
    theirs, validator, ours = keys
    expiration = get_dht_time() + 60
    key_id, subkey, value = _signed_by_us(ours, expiration)
    assert validator.validate(DHTRecord(key_id, subkey, value, expiration))
    assert rec.check_record(key_id, subkey, value, expiration)
    assert rec.strip_signature(value) == rec.dumps({"round": 3})
    their_subkey = MSGPackSerializer.dumps(b"QmOther" + validator.local_public_key)
    signed = validator.sign_value(DHTRecord(key_id, their_subkey, MSGPackSerializer.dumps([1, 2.5]), expiration))
    assert rec.check_record(key_id, their_subkey, signed, expiration)
    assert rec.check_record(key_id, rec.REGULAR_TAG, b"anything", expiration)  # no owner: not protected


def _tamper(case, key_id, subkey, value, expiration, other_marker):
    if case == "value":
        return key_id, subkey, value.replace(b"\x03", b"\x04", 1), expiration
    if case == "expiration":
        return key_id, subkey, value, expiration + 1
    if case == "second marker":
        return key_id, subkey, value + b"[signature:AAAA]", expiration
    if case == "no marker":
        return key_id, subkey, rec.strip_signature(value), expiration
    if case == "wrong key":  # the subkey names another owner; the signature is ours
        return key_id, rec.dumps(b"QmPeer" + other_marker), value, expiration
    if case == "two owners":
        return key_id + other_marker, subkey, value, expiration
    if case == "marker moved":  # hivemind finds the marker anywhere and strips it: still valid
        start = value.index(b"[signature:")
        return key_id, subkey, value[start:] + value[:start], expiration
    if case == "bad base64":
        start = value.index(b"[signature:") + len(b"[signature:")
        return key_id, subkey, value[:start] + b"!" + value[start + 1:], expiration
    raise AssertionError(case)


@pytest.mark.parametrize(("case", "valid"), [("value", False), ("expiration", False), ("second marker", False),
                                             ("no marker", False), ("wrong key", False), ("two owners", False),
                                             ("marker moved", True), ("bad base64", False)])
def test_a_tampered_record_gets_the_same_verdict_here_and_in_hivemind(keys, case, valid):
    theirs, validator, ours = keys
    expiration = get_dht_time() + 60
    record = _tamper(case, *_signed_by_us(ours, expiration), expiration, validator.local_public_key)
    assert rec.check_record(*record) is valid
    assert validator.validate(DHTRecord(*record)) is valid


def test_an_unreadable_owner_key_is_refused_here_where_hivemind_raises(keys):
    _, validator, _ = keys
    subkey = rec.dumps(b"QmPeer[owner:ssh-rsa notakey]")
    assert rec.check_record(b"k" * 20, subkey, b"v[signature:AAAA]", 1.0) is False
    with pytest.raises(ValueError):
        validator.validate(DHTRecord(b"k" * 20, subkey, b"v[signature:AAAA]", 1.0))


def test_signing_refuses_what_no_validator_would_accept(keys):
    theirs, validator, ours = keys
    marker = rec.owner_marker(ours.public_key())
    with pytest.raises(ValueError, match="owner marker"):
        rec.sign_record(b"k" * 20, rec.dumps(b"QmPeer"), b"v", 1.0, ours)
    with pytest.raises(ValueError, match="another owner"):
        rec.sign_record(b"k" * 20, rec.dumps(b"QmPeer" + marker + validator.local_public_key), b"v", 1.0, ours)
    with pytest.raises(ValueError, match="already holds a signature"):
        rec.sign_record(b"k" * 20, rec.dumps(marker), b"v[signature:x]", 1.0, ours)


# ---------------------------------------------------------------- identities

def test_an_identity_file_gives_hiveminds_and_locoswarms_peer_id(tmp_path):
    path = str(tmp_path / "hivemind.key")
    P2P.generate_identity(path)
    data = open(path, "rb").read()
    identity = rec.load_identity(data)
    expected = PeerID.from_identity(data)
    assert identity.peer_id == expected.to_base58()
    assert rec.peer_id_bytes(identity.private_key.public_key()) == expected.to_bytes()
    assert peer_id_of_owner(identity.owner_marker[len(b"[owner:"):-1]) == identity.peer_id
    # The daemons' subkey reader, without hivemind, agrees with hivemind's own derivation.
    assert rec.subkey_author(b"Qmnamed" + identity.owner_marker) == ("Qmnamed", True, identity.peer_id)
    assert rec.signed_by_named(identity.peer_id.encode() + identity.owner_marker) == (identity.peer_id, True)
    assert rec.signed_by_named(b"Qmnamed" + identity.owner_marker) == ("Qmnamed", False)
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    made_by_the_daemon = ensure_identity(str(state_dir))  # node/statedir.py's own identity creation
    assert rec.load_identity((state_dir / IDENTITY_FILE).read_bytes()).peer_id == made_by_the_daemon


def test_a_subkey_without_a_readable_owner_key_is_nobodys():
    assert rec.subkey_author(b"Qmnamed") == ("Qmnamed", False, None)  # an unsigned entry
    assert rec.subkey_author(b"Qmnamed[owner:ssh-rsa AAAAnot-a-key]") == ("Qmnamed", True, None)
    assert rec.subkey_author(b"Qmnamed[owner:ssh-rsa AAAA") == ("Qmnamed", True, None)  # the marker never closes
    assert rec.subkey_author(7) == ("7", False, None)
    assert rec.signed_by_named(b"None[owner:junk]") == ("None", False)


def test_an_identity_that_is_not_an_rsa_key_is_refused_naming_why():
    raw = ed25519.Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.Raw,
                                                            serialization.PrivateFormat.Raw,
                                                            serialization.NoEncryption())
    ed = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.Ed25519, data=raw).SerializeToString()
    with pytest.raises(MalformedMessage, match="Ed25519 key, not RSA"):
        rec.load_identity(ed)
    with pytest.raises(MalformedMessage, match="not readable DER"):
        rec.load_identity(crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=b"junk").SerializeToString())
    with pytest.raises(MalformedMessage, match="PrivateKey.key_type: a required field is missing"):
        rec.load_identity(b"")


# ---------------------------------------------------------------- no hivemind in the modules

def test_the_modules_import_without_hivemind_protobuf_or_libp2p(tmp_path):
    code = ("import sys; import locoswarm.protocol.pbwire, locoswarm.protocol.pbmessages, "
            "locoswarm.protocol.dhtrecords; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'hivemind', 'google', 'libp2p', 'multihash'}))")
    package_parent = os.path.dirname(os.path.dirname(locoswarm.__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([package_parent, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
