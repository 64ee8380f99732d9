"""The wire format of a row's aggregate in a tree round (node/tree.py), format version 1.

A msgpack map:

    {"v": 1, "run": str, "spec": bytes (spec hash), "round": int, "row": int, "rows": int,
     "members": [[peer id, tokens, earned, content], …], "shares": int,
     "banned": [peer id, …], "delta": bytes}

`members` are the senders whose deltas the row aggregated, in ascending peer id order: the
tokens each was weighted by, the credit it earned (optim/screen.py Screened.earned, at most
its tokens) and the 16-byte digest of its screened delta (node/chains.py delta_content).
`shares` is the peers' worth of planned work they stand for (Screened.shares), `banned` the
peers the row's screening excluded. `delta` is the row's aggregate recompressed as a delta
message of the run's layout (protocol/delta.py), taken from the same outer state as its
members' deltas, its sender the first member, its tokens the members' sum: the round's outer
step aggregates the rows' deltas as a full round aggregates the peers'.

`decode_row` trusts nothing: the message is bounded by the spec before parsing, every field
is checked, and the inner delta goes through `decode_delta`. What it cannot check alone (that
every member belongs to the row, that the row count is the receiver's) node/tree.py checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import msgpack

from locoswarm.protocol.delta import (MAX_CHECKS, MAX_ROUND, MAX_SENDER_LEN, DecodedDelta, DeltaSpec, decode_delta,
                                      int_field)
from locoswarm.protocol.envelope import unpack_envelope
from locoswarm.protocol.errors import MalformedMessage, SpecMismatch

ROW_FORMAT_VERSION = 1
MAX_ROW_MEMBERS = 256
"""Members one row may name (rows are drawn to hold about rounds.row_size peers)."""
MAX_ROWS = 2**20
CONTENT_LEN = 16
_KEYS = frozenset({"v", "run", "spec", "round", "row", "rows", "members", "shares", "banned", "delta"})


@dataclass(frozen=True, slots=True)
class RowMember:
    sender: str
    tokens: int
    earned: int
    content: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class RowHeader:
    """What a row aggregate says of itself."""

    round: int
    row: int
    rows: int
    members: tuple[RowMember, ...]
    shares: int
    banned: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class RowMessage(RowHeader):
    run_id: str
    spec_hash: bytes
    delta: bytes
    """The row's aggregate as an encoded delta message."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RowAggregate(RowHeader):
    """A received row aggregate that passed every check."""

    delta: DecodedDelta
    nbytes: int
    wire: bytes = field(default=b"", repr=False, compare=False)

    @property
    def tokens(self) -> int:
        return self.delta.num_tokens


def encode_row(msg: RowMessage) -> bytes:
    body = {
        "v": ROW_FORMAT_VERSION,
        "run": msg.run_id,
        "spec": msg.spec_hash,
        "round": msg.round,
        "row": msg.row,
        "rows": msg.rows,
        "members": [[m.sender, m.tokens, m.earned, m.content] for m in msg.members],
        "shares": msg.shares,
        "banned": list(msg.banned),
        "delta": msg.delta,
    }
    return msgpack.packb(body, use_bin_type=True)


def row_spec(spec: DeltaSpec) -> DeltaSpec:
    """The layout a row aggregate's delta is checked against: the run's, with room for the
    tokens of MAX_ROW_MEMBERS peers."""
    return replace(spec, max_tokens=spec.max_tokens * MAX_ROW_MEMBERS)


def row_message_limit(spec: DeltaSpec) -> int:
    """The largest row message of `spec` (whose max_tokens is a whole row's)."""
    member = 4 * MAX_SENDER_LEN + 2 * 9 + CONTENT_LEN + 8
    return spec.max_message_bytes + MAX_ROW_MEMBERS * member + MAX_CHECKS * (4 * MAX_SENDER_LEN + 4) + 256


def decode_row(data: bytes, spec: DeltaSpec) -> RowAggregate:
    """Parse and validate one row aggregate against `spec` (the run's delta layout with
    max_tokens a peer's bound times MAX_ROW_MEMBERS: `row_spec`); raises a ProtocolError
    subclass naming what was wrong."""
    limit = row_message_limit(spec)
    body = unpack_envelope(data, "row aggregate", max_bytes=limit, version=ROW_FORMAT_VERSION, keys=_KEYS,
                           max_bin_len=spec.max_message_bytes,
                           max_str_len=max(spec.max_string_bytes, 4 * MAX_SENDER_LEN),
                           max_array_len=max(MAX_ROW_MEMBERS, MAX_CHECKS))
    if body["run"] != spec.run_id:
        raise SpecMismatch(f"row aggregate is for run {body['run']!r}, this peer is in run {spec.run_id!r}")
    if body["spec"] != spec.spec_hash:
        raise SpecMismatch("row aggregate was made under another run spec (spec hash differs)")
    round_ = int_field(body, "round", 0, MAX_ROUND)
    rows = int_field(body, "rows", 1, MAX_ROWS)
    row = int_field(body, "row", 0, rows - 1)
    members = _members(body["members"], spec.max_tokens // MAX_ROW_MEMBERS)
    shares = int_field(body, "shares", 1, len(members))
    banned = _peers(body["banned"], "banned")
    inner = body["delta"]
    if not isinstance(inner, bytes):
        raise MalformedMessage(f"row aggregate: delta must be bytes, got {type(inner).__name__}")
    delta = decode_delta(inner, spec)
    if delta.round != round_:
        raise MalformedMessage(f"row aggregate of round {round_} holds a delta of round {delta.round}")
    if delta.sender != members[0].sender:
        raise MalformedMessage(f"row aggregate's delta names sender {delta.sender}, its first member is "
                               f"{members[0].sender}")
    total = sum(m.tokens for m in members)
    if delta.num_tokens != total:
        raise MalformedMessage(f"row aggregate's delta claims {delta.num_tokens} tokens, its members {total}")
    return RowAggregate(round=round_, row=row, rows=rows, members=members, shares=shares, banned=banned, delta=delta,
                        nbytes=len(data), wire=bytes(data))


def _members(items: Any, max_tokens: int) -> tuple[RowMember, ...]:
    if not isinstance(items, list) or not 0 < len(items) <= MAX_ROW_MEMBERS:
        count = len(items) if isinstance(items, list) else type(items).__name__
        raise MalformedMessage(f"row aggregate: members must be a list of 1..{MAX_ROW_MEMBERS}, got {count}")
    out, last = [], ""
    for i, item in enumerate(items):
        if not isinstance(item, list) or len(item) != 4:
            raise MalformedMessage(f"row aggregate: member {i} is not a [peer id, tokens, earned, content] list")
        sender, tokens, earned, content = item
        if not isinstance(sender, str) or not 0 < len(sender) <= MAX_SENDER_LEN:
            raise MalformedMessage(f"row aggregate: member {i}'s peer id must be a string of 1..{MAX_SENDER_LEN} "
                                   "characters")
        if sender <= last:
            raise MalformedMessage(f"row aggregate: member {i} ({sender}): peer ids must be unique and ascending")
        if type(tokens) is not int or not 0 < tokens <= max_tokens:
            raise MalformedMessage(f"row aggregate: member {sender}'s tokens {tokens!r} outside [1, {max_tokens}]")
        if type(earned) is not int or not 0 <= earned <= tokens:
            raise MalformedMessage(f"row aggregate: member {sender}'s credit {earned!r} outside [0, its {tokens} "
                                   "tokens]")
        if not isinstance(content, bytes) or len(content) != CONTENT_LEN:
            raise MalformedMessage(f"row aggregate: member {sender}'s content must be {CONTENT_LEN} bytes")
        out.append(RowMember(sender, tokens, earned, content))
        last = sender
    return tuple(out)


def _peers(items: Any, what: str) -> tuple[str, ...]:
    if not isinstance(items, list) or len(items) > MAX_CHECKS:
        raise MalformedMessage(f"row aggregate: {what} must be a list of at most {MAX_CHECKS} peer ids")
    last = ""
    for i, peer in enumerate(items):
        if not isinstance(peer, str) or not 0 < len(peer) <= MAX_SENDER_LEN or peer <= last:
            raise MalformedMessage(f"row aggregate: {what} entry {i} must be a peer id, unique and ascending")
        last = peer
    return tuple(items)
