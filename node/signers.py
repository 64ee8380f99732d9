"""Who signed a DHT entry. Records and progress are signed with hivemind's
RSASignatureValidator, whose subkeys carry the owner's public key; an entry is its named
peer's only when that key is the peer's libp2p identity (the peer id is the key's hash).
`peer_id_of_owner` is hivemind's own derivation of whose an entry is (the daemons read
subkeys with protocol/dhtrecords.py's `subkey_author`, which agrees with it and needs no
hivemind); CachedSignatureValidator verifies each entry once, remembering the verdict by content.
"""

from __future__ import annotations

import collections
import hashlib

from hivemind.dht.crypto import RSASignatureValidator


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
