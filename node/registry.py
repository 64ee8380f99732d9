"""Peer discovery through the DHT: each peer keeps its record (protocol/records) under the
run's key, one subkey per peer id, with an expiry it refreshes; a peer that vanishes
(SIGKILL, cut network) is forgotten when its record expires, and one that leaves cleanly
withdraws it with an empty tombstone that outlives the record. Runs on the caller's event
loop through hivemind's DHTNode (no forked DHT process).

Records are signed: with an RSASignatureValidator (hivemind's; the DHT node must be created
with it) the subkey is the peer id followed by the owner's public key, and every DHT node
refuses a write to it that the owner did not sign, so no peer can overwrite or withdraw
another's record. A record whose subkey does not start with the peer id it names is
refused, as is an unsigned one when this registry signs its own. And the signing key must
be the peer's libp2p identity (its peer id is the hash of that public key, which the DHT
node checks when it authenticates a connection): a record signed by any other key — a
stranger's advertising another peer's id under a subkey of its own — is refused, so a
record names the peer that signed it.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import logging
from typing import Callable

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time

from locoswarm.protocol import ProtocolError
from locoswarm.protocol.records import PeerRecord, decode_record, encode_record

log = logging.getLogger(__name__)


def peer_id_of_owner(owner_key: bytes) -> str:
    """The libp2p peer id (base58) of an RSA public key in the OpenSSH form hivemind's
    validator puts in subkeys: sha2-256 multihash of the key's libp2p protobuf."""
    import multihash
    from cryptography.hazmat.primitives import serialization
    from hivemind.p2p import PeerID
    from hivemind.proto import crypto_pb2

    public = serialization.load_ssh_public_key(owner_key)
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.KeyType.RSA, data=der).SerializeToString()
    return PeerID(multihash.encode(hashlib.sha256(encoded).digest(), "sha2-256")).to_base58()


@functools.lru_cache(maxsize=4096)
def _signer(owner_key: bytes) -> str | None:
    """peer_id_of_owner, None for a key that cannot be read (cached: the same keys come back
    at every refresh of records and round progress)."""
    try:
        return peer_id_of_owner(owner_key)
    except (ValueError, TypeError):
        return None


def subkey_author(subkey: object) -> tuple[str, bool, str | None]:
    """Who a DHT subkey says wrote its entry, and who signed it: (the peer id it names,
    whether it carries an owner key, the peer id of that key or None when unreadable). The
    entry is its named peer's only when the two ids agree."""
    if not isinstance(subkey, bytes):
        return str(subkey), False, None
    named, marker, rest = subkey.partition(b"[owner:")
    return named.decode(errors="replace"), bool(marker), _signer(rest[:-1]) if marker else None


class CachedSignatureValidator(RSASignatureValidator):
    """hivemind's RSASignatureValidator, remembering each verdict by the record's content.

    The DHT validates every entry of every copy it receives: a get asks up to ~20 nodes for
    the same dictionary, and each answer repeats the same signed entries, each an RSA-2048
    verification (≈70 µs). An entry's content (key, subkey, value with its signature,
    expiration) fixes the verdict, so each is verified once: later copies cost a hash. The
    memory is bounded (MAX_VERDICTS, least recently used forgotten)."""

    MAX_VERDICTS = 65536

    def __init__(self, private_key=None) -> None:
        super().__init__(private_key)
        self._verdicts: collections.OrderedDict[bytes, bool] = collections.OrderedDict()
        self.verified = 0
        """RSA verifications actually run (the rest came from the memory)."""

    def validate(self, record) -> bool:
        digest = hashlib.blake2b(self._serialize_record(record), digest_size=16).digest()
        verdict = self._verdicts.get(digest)
        if verdict is not None:
            self._verdicts.move_to_end(digest)
            return verdict
        verdict = super().validate(record)
        self.verified += 1
        self._verdicts[digest] = verdict
        if len(self._verdicts) > self.MAX_VERDICTS:
            self._verdicts.popitem(last=False)
        return verdict


def run_key(run_id: str) -> str:
    return f"locoswarm:{run_id}:peers"


class PeerRegistry:
    def __init__(self, dht: DHTNode, run_id: str, spec_hash: bytes, *, ttl_s: float = 30.0,
                 validator: RSASignatureValidator | None = None,
                 refuse: Callable[[PeerRecord], str | None] | None = None) -> None:
        """`refuse(record)`: why a valid record's peer is not admitted (a private run's
        access policy), None to take it."""
        self.dht = dht
        self.refuse = refuse
        self.validator = validator
        self.key = run_key(run_id)
        self.spec_hash = spec_hash
        self.ttl_s = ttl_s
        self.rejected: list[tuple[str, str]] = []
        """(subkey, reason) of the records refused by the last `peers()` call."""
        self.withdrawn: set[str] = set()
        """Peer ids whose record the last `peers()` call found withdrawn (left on purpose)."""

    async def announce(self, record: PeerRecord) -> bool:
        """Store or refresh this peer's record, valid for `ttl_s` from now."""
        return await self.dht.store(self.key, encode_record(record), get_dht_time() + self.ttl_s,
                                    subkey=self._subkey(record.peer_id))

    async def withdraw(self, peer_id: str) -> bool:
        """Replace this peer's record by a tombstone that outlives it."""
        return await self.dht.store(self.key, b"", get_dht_time() + 2 * self.ttl_s, subkey=self._subkey(peer_id))

    def _subkey(self, peer_id: str) -> str | bytes:
        if self.validator is None:
            return peer_id
        return peer_id.encode() + self.validator.local_public_key

    async def peers(self) -> list[PeerRecord]:
        """The valid, live records of this run, by peer id; refused ones go to `rejected`."""
        found = await self.dht.get(self.key, latest=True)
        self.rejected = []
        self.withdrawn = set()
        if found is None or not isinstance(found.value, dict):
            return []
        latest: dict[str, PeerRecord] = {}
        for subkey, item in sorted(found.value.items(), key=lambda kv: str(kv[0])):
            value = item.value
            if value == b"":
                owner, _, signer = subkey_author(subkey)
                if self.validator is None or signer == owner:
                    self.withdrawn.add(owner)
                continue
            try:
                record = decode_record(value, self.spec_hash)
            except ProtocolError as e:
                self._reject(subkey, str(e))
                continue
            owner, signed, signer = subkey_author(subkey)
            if self.validator is not None and not signed:
                self._reject(subkey, f"record of {record.peer_id} is not signed")
                continue
            if record.peer_id != owner:
                self._reject(owner, f"record names peer {record.peer_id}, stored under {owner}")
                continue
            if self.validator is not None and signer != record.peer_id:
                self._reject(owner, f"record of {record.peer_id} is signed by a key that is not its identity "
                                    f"(that key's peer id: {signer or 'unreadable'})")
                continue
            why = self.refuse(record) if self.refuse is not None else None
            if why is not None:
                self._reject(owner, why)
                continue
            best = latest.get(record.peer_id)
            if best is None or record.round > best.round:
                latest[record.peer_id] = record  # after a restart with a new key, two records for a while
        return [latest[p] for p in sorted(latest)]

    def _reject(self, subkey: object, reason: str) -> None:
        log.warning("peer record under %s refused: %s", subkey, reason)
        self.rejected.append((str(subkey), reason))
