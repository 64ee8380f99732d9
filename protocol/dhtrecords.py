"""DHT values, keys and signed records as hivemind 1.1.12 makes them, without hivemind: what a
peer that cannot import it needs to read and write the swarm's DHT entries (issue 22;
docs/protocol.md, "Speaking the swarm without hivemind").

- `dumps`/`loads`: hivemind's MSGPackSerializer (msgpack with bin type and strict types; a
  tuple is ExtType 0x40 around the msgpack of its items as a list; a dictionary value is
  ExtType 0x50 around `[maxsize, latest_expiration, [[subkey, value, expiration], …]]`).
- `dht_id`: the 20-byte key id (SHA-1 of a bytes key as it is, of any other key's msgpack).
- `sign_record`/`check_record`: hivemind's RSASignatureValidator. A record whose key or
  subkey holds `[owner:<OpenSSH RSA public key>]` is that key's; its value must hold exactly
  one `[signature:<base64>]` (appended when signing), an RSA-PSS (SHA-256, MGF1-SHA-256, maximal
  salt) signature of the msgpack of the tuple (key id, subkey, value without the marker,
  expiration as a float64).
- `subkey_author`, `signed_by_named`: whose a signed entry is (the peer its subkey names, the
  peer whose key is in its owner marker), for the daemons on either network and for the rolls.
- `load_identity`: a libp2p identity file (hivemind's and locoswarm's: an RSA PrivateKey
  protobuf) as a `cryptography` key with its base58 peer id, the id node/signers.py
  derives from the owner key in a subkey.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from locoswarm.protocol.errors import MalformedMessage, OversizedMessage
from locoswarm.protocol.pbmessages import KeyType, PrivateKey, PublicKey
from locoswarm.protocol.pbwire import MAX_MESSAGE_SIZE, decode, encode

TUPLE_EXT, DICTIONARY_EXT = 0x40, 0x50
DHT_ID_BYTES = 20
OWNER = b"[owner:"
"""What opens an owner marker in a subkey (`owner_marker`)."""
REGULAR_TAG, DICTIONARY_TAG = b"\xc0", b""
"""StoreRequest subkey tags: msgpack nil for a regular value, empty for a whole dictionary."""


# ---------------------------------------------------------------- msgpack as hivemind writes it

class DictionaryEntry(NamedTuple):
    subkey: Any
    """The subkey as a value (locoswarm's: bytes, the peer id and its owner marker)."""
    value: bytes
    """The stored bytes (the application value's msgpack, and its signature marker)."""
    expiration: float


@dataclass(frozen=True, slots=True)
class DictionaryValue:
    """hivemind's DictionaryDHTValue as it travels: what a FOUND_DICTIONARY result and a
    whole-dictionary store carry."""

    maxsize: float = math.inf
    """hivemind writes inf for an unbounded dictionary (an int otherwise)."""
    latest_expiration: float = -math.inf
    """The latest expiration among the entries (hivemind's -inf for none)."""
    entries: tuple[DictionaryEntry, ...] = ()


def _ext(obj: Any) -> msgpack.ExtType:
    if type(obj) is DictionaryValue:
        items = [[e.subkey, e.value, e.expiration] for e in obj.entries]
        return msgpack.ExtType(DICTIONARY_EXT, dumps([obj.maxsize, obj.latest_expiration, items]))
    if isinstance(obj, tuple):
        return msgpack.ExtType(TUPLE_EXT, dumps(list(obj)))
    raise TypeError(f"hivemind's msgpack cannot encode {type(obj).__name__}")


def dumps(obj: Any) -> bytes:
    """`obj` as hivemind's MSGPackSerializer.dumps writes it, byte for byte. Types are strict:
    a subclass of int, str, list or dict (an IntEnum) is a TypeError, as in hivemind."""
    return msgpack.packb(obj, use_bin_type=True, strict_types=True, default=_ext)


def _ext_hook(code: int, data: bytes) -> Any:
    if code == TUPLE_EXT:
        return tuple(_unpack(data))
    if code == DICTIONARY_EXT:
        return _dictionary(_unpack(data))
    # hivemind logs unknown codes and hands back the raw bytes; here they are refused
    raise MalformedMessage(f"hivemind msgpack: unknown ExtType {code:#x}")


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, ext_hook=_ext_hook)


def _is_number(x: Any) -> bool:
    return type(x) in (int, float)


def _dictionary(m: Any) -> DictionaryValue:
    if not (isinstance(m, list) and len(m) == 3 and _is_number(m[0]) and _is_number(m[1]) and isinstance(m[2], list)):
        raise MalformedMessage("dictionary value: not [maxsize, latest_expiration, entries]")
    entries = []
    for i, e in enumerate(m[2]):
        if not (isinstance(e, list) and len(e) == 3 and isinstance(e[1], bytes) and _is_number(e[2])):
            raise MalformedMessage(f"dictionary value: entry {i} is not [subkey, value bytes, expiration]")
        entries.append(DictionaryEntry(*e))
    return DictionaryValue(maxsize=m[0], latest_expiration=m[1], entries=tuple(entries))


def loads(data: bytes | bytearray | memoryview, *, max_size: int = MAX_MESSAGE_SIZE) -> Any:
    """A value read as hivemind's MSGPackSerializer.loads reads it (arrays as lists, tuples
    and dictionary values from their ExtTypes); OversizedMessage above `max_size` bytes,
    MalformedMessage for anything not a single well-formed value of the kinds above."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedMessage(f"hivemind msgpack must be bytes, got {type(data).__name__}")
    if len(data) > max_size:
        raise OversizedMessage(f"hivemind msgpack of {len(data)} bytes is above the limit of {max_size}")
    try:
        return _unpack(bytes(data))
    except MalformedMessage:
        raise
    except Exception as e:  # msgpack raises many types for bad input (and RecursionError for deep nesting)
        raise MalformedMessage(f"hivemind msgpack is not valid: {type(e).__name__}: {e}") from None


def dht_id(key: Any) -> bytes:
    """The 20-byte DHT id of `key` (DHTID.generate(source=key).to_bytes()): SHA-1 of a bytes
    key itself and of the msgpack of any other key (a str key hashes its msgpack str)."""
    return hashlib.sha1(key if isinstance(key, bytes) else dumps(key)).digest()


# ---------------------------------------------------------------- signed records

_OWNER_RE = re.compile(rb"\[owner:(.+?)\]")
_SIGNATURE_RE = re.compile(rb"\[signature:(.+?)\]")
"""hivemind's patterns: the shortest run of bytes other than a newline up to a "]"."""
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)


def owner_marker(public_key: rsa.RSAPublicKey) -> bytes:
    """`[owner:ssh-rsa AAAA…]`: put in a subkey, it makes the entry this key's alone."""
    ssh = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return OWNER + ssh + b"]"


def record_blob(key_id: bytes, subkey: bytes, value: bytes, expiration: float) -> bytes:
    """What a signature covers: the msgpack of the record tuple, expiration as a float64."""
    return dumps((key_id, subkey, value, float(expiration)))


def sign_record(key_id: bytes, subkey: bytes, value: bytes, expiration: float,
                private_key: rsa.RSAPrivateKey) -> bytes:
    """`value` with its `[signature:…]` marker, for storing under `key_id` (dht_id of the key)
    and `subkey` (the msgpack of the subkey, the StoreRequest tag) until `expiration`.

    ValueError where hivemind would leave the value unsigned (neither key nor subkey holds
    this key's owner marker) or sign what no one can check (the value already holds a
    signature marker, or key and subkey name another owner too)."""
    marker = owner_marker(private_key.public_key())
    owners = set(_OWNER_RE.findall(key_id) + _OWNER_RE.findall(subkey))
    if marker not in key_id and marker not in subkey:
        raise ValueError("neither key nor subkey holds this key's owner marker: the record would not be its")
    if owners != {marker[len(b"[owner:"):-1]}:
        raise ValueError("key and subkey name another owner besides this key: no signature would pass")
    if _SIGNATURE_RE.search(value):
        raise ValueError("the value already holds a signature marker: a second one would not pass")
    signature = private_key.sign(record_blob(key_id, subkey, value, expiration), _PSS, hashes.SHA256())
    return value + b"[signature:" + base64.b64encode(signature) + b"]"


def check_record(key_id: bytes, subkey: bytes, value: bytes, expiration: float) -> bool:
    """RSASignatureValidator.validate's verdict: True for a record no owner marker protects;
    for a protected one, True when key and subkey name one owner key, the value holds
    exactly one signature marker, and the signature over the record without it verifies.
    An owner key that cannot be read (hivemind raises there, failing the call) is False."""
    owners = _OWNER_RE.findall(key_id) + _OWNER_RE.findall(subkey)
    if not owners:
        return True
    if len(set(owners)) > 1:
        return False
    try:
        public_key = serialization.load_ssh_public_key(owners[0])
    except (ValueError, UnsupportedAlgorithm):
        return False
    if not isinstance(public_key, rsa.RSAPublicKey):
        return False
    signatures = _SIGNATURE_RE.findall(value)
    if len(signatures) != 1:
        return False
    try:
        # b64decode as hivemind calls it: characters outside the alphabet are dropped, not refused
        public_key.verify(base64.b64decode(signatures[0]), record_blob(key_id, subkey, _SIGNATURE_RE.sub(b"", value),
                                                                       expiration), _PSS, hashes.SHA256())
    except (ValueError, InvalidSignature):
        return False
    return True


def verify_signed(owner_key: bytes, data: bytes, signature: bytes) -> tuple[str, bool]:
    """(the peer id of the OpenSSH RSA key `owner_key`, whether `signature` is its RSA-PSS
    SHA-256 signature of `data`), as hivemind's RSAPrivateKey signs (invites: node/invite.py);
    ValueError when the key is no RSA key."""
    try:
        public_key = serialization.load_ssh_public_key(owner_key)
    except UnsupportedAlgorithm as e:
        raise ValueError(str(e)) from None
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise ValueError(f"expected an RSA public key, got {type(public_key).__name__}")
    try:
        public_key.verify(signature, data, _PSS, hashes.SHA256())
    except (ValueError, InvalidSignature):
        return peer_id(public_key), False
    return peer_id(public_key), True


def strip_signature(value: bytes) -> bytes:
    """`value` without its signature marker: the application's bytes (after check_record)."""
    return _SIGNATURE_RE.sub(b"", value)


# ---------------------------------------------------------------- identities and peer ids

_B58 = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def _base58(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = bytearray()
    while n:
        n, digit = divmod(n, 58)
        out.append(_B58[digit])
    zeros = len(data) - len(data.lstrip(b"\0"))
    return (b"1" * zeros + bytes(reversed(out))).decode()


def peer_id_bytes(public_key: rsa.RSAPublicKey) -> bytes:
    """The libp2p peer id of an RSA key as bytes: the sha2-256 multihash (0x12, 32, digest) of
    the key's PublicKey protobuf (RSA, SubjectPublicKeyInfo DER). What a CallUnaryRequest's
    peer and a FindResult's nearest_peer_ids hold."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return b"\x12\x20" + hashlib.sha256(encode(PublicKey(key_type=KeyType.RSA, data=der))).digest()


def peer_id(public_key: rsa.RSAPublicKey) -> str:
    """The base58 peer id (Qm…) of an RSA key: node/signers.py's peer_id_of_owner of its
    OpenSSH form, and hivemind's PeerID.from_identity of the identity file holding it."""
    return _base58(peer_id_bytes(public_key))


@functools.lru_cache(maxsize=65536)
def owner_peer_id(owner_key: bytes) -> str | None:
    """The peer id of the OpenSSH RSA key in an owner marker, None for a key that cannot be read
    (cached: the same keys come back at every read of records, progress and rolls; 65,536 of
    them, so a swarm of thousands does not miss)."""
    try:
        key = serialization.load_ssh_public_key(owner_key)
    except (ValueError, UnsupportedAlgorithm):
        return None
    return peer_id(key) if isinstance(key, rsa.RSAPublicKey) else None


def subkey_author(subkey: object) -> tuple[str, bool, str | None]:
    """Who a DHT subkey says wrote its entry, and who signed it: (the peer id it names, whether
    it carries an owner marker, the peer id of the marker's key, None when unreadable). The
    entry is its named peer's only when the two ids agree: `signed_by_named`."""
    if not isinstance(subkey, bytes):
        return str(subkey), False, None
    named, marker, rest = subkey.partition(OWNER)
    signer = owner_peer_id(rest[:-1]) if marker and rest.endswith(b"]") else None
    return named.decode(errors="replace"), bool(marker), signer


def signed_by_named(subkey: object) -> tuple[str, bool]:
    """The peer a subkey names, and whether that peer's own key signed its entry."""
    named, _, signer = subkey_author(subkey)
    return named, signer == named


@dataclass(frozen=True, slots=True)
class Identity:
    private_key: rsa.RSAPrivateKey
    peer_id: str
    """base58, as peers name each other."""

    @property
    def owner_marker(self) -> bytes:
        """What this peer puts after its peer id in a subkey it signs entries under."""
        return owner_marker(self.private_key.public_key())


def new_identity_file() -> bytes:
    """The contents of a new identity file: a 2048-bit RSA key (exponent 65537) as PKCS#1 DER
    in a libp2p PrivateKey protobuf, as hivemind's P2P writes one (`load_identity` reads it)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.private_bytes(encoding=serialization.Encoding.DER, format=serialization.PrivateFormat.TraditionalOpenSSL,
                            encryption_algorithm=serialization.NoEncryption())
    return encode(PrivateKey(key_type=KeyType.RSA, data=der))


def load_identity(data: bytes) -> Identity:
    """The RSA key in identity file contents `data` (a libp2p PrivateKey protobuf holding
    PKCS#1 DER, as hivemind's P2P.generate_identity and node/statedir.py write it) and its
    peer id; MalformedMessage naming what is wrong with a file that is not one."""
    stored = decode(PrivateKey, data, max_size=1 << 16)
    if stored.key_type != KeyType.RSA:
        name = stored.key_type.name if isinstance(stored.key_type, KeyType) else stored.key_type
        raise MalformedMessage(f"identity holds a {name} key, not RSA (DHT records are signed with RSA)")
    try:
        key = serialization.load_der_private_key(stored.data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise MalformedMessage(f"identity: its RSA key is not readable DER ({e})") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise MalformedMessage(f"identity: key_type RSA but the DER holds a {type(key).__name__}")
    return Identity(private_key=key, peer_id=peer_id(key.public_key()))
