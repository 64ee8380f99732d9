"""An anchor's roll: the established peers of an outer state, as one of a run's trust anchors
(the spec's trust.anchors) last signed them. A joiner whose ledger knows nobody takes only a
state an anchor vouches for; while none of the anchors is live it takes the state that the
peers of the newest roll it can read attest by a majority (node/roll.py, docs/trust.md), in
place of waiting for an anchor that may be gone for the night.

A roll is a msgpack map, version 1:

    {"v": 1, "spec": bytes, "round": int, "chain": str, "peers": [peer id, …]}

`spec` the run spec's hash, `round` the outer steps of the state it describes, `chain` that
state's round chain (32 hex digits), `peers` the peers established in its ledger, at most
MAX_ROLL_PEERS (the largest credits), in ascending order. It is stored in the DHT under
the run's roll key with the anchor's owner subkey, so hivemind's RSASignatureValidator signs
it with the anchor's identity and every reader checks that signature; node/roll.py takes
only entries whose signer is the peer the subkey names and one of the spec's anchors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import msgpack

from locoswarm.protocol.delta import MAX_ROUND
from locoswarm.protocol.dhtrecords import signed_by_named
from locoswarm.protocol.envelope import unpack_envelope
from locoswarm.protocol.errors import MalformedMessage, ProtocolError, SpecMismatch
from locoswarm.protocol.records import CHAIN_HEX_LEN, is_chain
from locoswarm.protocol.state import MAX_PEER_ID_LEN

ROLL_VERSION = 1
MAX_ROLL_PEERS = 64
"""Established peers a roll names: a majority of them live is what a joiner needs."""
MAX_ROLL_BYTES = 256 + MAX_ROLL_PEERS * (MAX_PEER_ID_LEN + 2)
_KEYS = frozenset({"v", "spec", "round", "chain", "peers"})


def roll_key(run_id: str) -> str:
    """The DHT key under which the run's anchors keep their rolls, one subkey each."""
    return f"locoswarm:{run_id}:roll"


@dataclass(frozen=True, slots=True)
class Roll:
    anchor: str
    """The trust anchor that signed it (the DHT subkey's owner)."""
    round: int
    chain: str
    peers: frozenset[str]
    """The peers established in that state's ledger."""


def roll_peers(ledger: tuple[tuple[str, int], ...], threshold: int) -> list[str]:
    """The peers a roll of `ledger` (peer id, credit pairs) names: those of credit >=
    `threshold`, the MAX_ROLL_PEERS largest, in ascending order."""
    established = sorted((p for p in ledger if p[1] >= threshold), key=lambda p: (-p[1], p[0]))[:MAX_ROLL_PEERS]
    return sorted(p for p, _ in established)


def encode_roll(spec_hash: bytes, round_: int, chain: str, peers: list[str]) -> bytes:
    """The roll of an outer state of `round_` and `chain` naming `peers` (`roll_peers`)."""
    if not is_chain(chain):
        raise ValueError(f"a roll needs the state's round chain, got {chain!r}")
    return msgpack.packb({"v": ROLL_VERSION, "spec": spec_hash, "round": round_, "chain": chain, "peers": peers},
                         use_bin_type=True)


def decode_roll(blob: object, anchor: str, spec_hash: bytes) -> Roll:
    """A roll `anchor` signed, checked field by field: MalformedMessage naming what is wrong,
    SpecMismatch when it is another run's."""
    m = unpack_envelope(blob, f"roll of {anchor}", max_bytes=MAX_ROLL_BYTES, version=ROLL_VERSION, keys=_KEYS,
                        max_array_len=MAX_ROLL_PEERS, max_str_len=MAX_PEER_ID_LEN, max_bin_len=64)
    if m["spec"] != spec_hash:
        raise SpecMismatch(f"roll of {anchor} is of another run spec")
    round_, chain, peers = m["round"], m["chain"], m["peers"]
    if type(round_) is not int or not 0 <= round_ <= MAX_ROUND:
        raise MalformedMessage(f"roll of {anchor}: round must be an integer in [0, 2**62], got {round_!r}")
    if not is_chain(chain):
        raise MalformedMessage(f"roll of {anchor}: chain must be {CHAIN_HEX_LEN} lowercase hex digits")
    if (not isinstance(peers, list) or not all(isinstance(p, str) and 0 < len(p) <= MAX_PEER_ID_LEN for p in peers)
            or any(a >= b for a, b in zip(peers, peers[1:]))):
        raise MalformedMessage(f"roll of {anchor}: peers must be distinct peer ids in ascending order")
    return Roll(anchor=anchor, round=round_, chain=chain, peers=frozenset(peers))


def take_roll(subkey: object, value: object, anchors: Iterable[str], spec_hash: bytes) -> Roll | str:
    """The roll in a DHT entry of the roll key (`subkey` and `value` as the DHT gives them), or
    why it is not one to take: not signed by the peer its subkey names, signed by a peer that is
    no anchor, or malformed."""
    named, by_named = signed_by_named(subkey)
    if not by_named:
        return f"a roll under {named} is not signed by the peer it names"
    if named not in anchors:
        return f"a roll signed by {named}, which is not one of the run's trust anchors"
    try:
        return decode_roll(value, named, spec_hash)
    except ProtocolError as e:
        return f"the roll of anchor {named} is refused: {e}"


def newest_roll(entries: Mapping[object, object], anchors: Iterable[str],
                spec_hash: bytes) -> tuple[Roll | None, list[str]]:
    """The newest roll (by round, then anchor) among the roll key's `entries` (subkey → value as
    the DHT gives it), each taken by `take_roll`; and why each other entry was skipped."""
    anchors = frozenset(anchors)
    rolls, skipped = [], []
    for subkey, value in entries.items():
        roll = take_roll(subkey, value, anchors, spec_hash)
        if isinstance(roll, Roll):
            rolls.append(roll)
        else:
            skipped.append(roll)
    return max(rolls, key=lambda r: (r.round, r.anchor), default=None), skipped
