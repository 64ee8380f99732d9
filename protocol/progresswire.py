"""The messages of a progress stream (`locoswarm/progress/1`), whatever carries it: hivemind's
p2pd or py-libp2p (node/progress.py on both; net/bridge.py carries it on py-libp2p).

A message is a kind byte (KIND_PROGRESS, KIND_RECORD, KIND_UPDATE), a two-byte big-endian
length and the body: a progress (`encode_progress`, which names its round,
1..MAX_PROGRESS_BYTES), a record (`encode_record`, 1..MAX_RECORD_BYTES, of the run's spec and
naming the sender) or, on a stream that already carried a record, an update of it
(`encode_update`, 1..MAX_UPDATE_BYTES; applied to the last record of the stream and checked
as a record). The connection authenticates the sender, so a message needs no signature, and
a record naming anyone but the sender is malformed.
"""

from __future__ import annotations

from dataclasses import dataclass

from locoswarm.protocol.errors import MalformedMessage
from locoswarm.protocol.records import (MAX_PROGRESS_BYTES, MAX_RECORD_BYTES, MAX_UPDATE_BYTES, PeerRecord, Progress,
                                        apply_update, decode_progress, decode_record, encode_progress, encode_record,
                                        encode_update, record_base)

PROTOCOL = "locoswarm/progress/1"
KIND_PROGRESS, KIND_RECORD, KIND_UPDATE = 1, 2, 3
LIMITS = {KIND_PROGRESS: MAX_PROGRESS_BYTES, KIND_RECORD: MAX_RECORD_BYTES, KIND_UPDATE: MAX_UPDATE_BYTES}
MAX_PEERS_PER_ROUND = 4096
"""Peers whose progress a reader keeps per round: memory bounded under a flood of identities."""
MAX_STREAMS = 1024
"""Progress streams a peer holds at once, each way."""
MESSAGE_RATE, MESSAGE_BURST = 50.0, 100
"""Messages a second a reader takes from one peer (honest peers send a few a second per round)."""


def frame(kind: int, body: bytes) -> bytes:
    """One message on a progress stream: its kind, a two-byte length and the body."""
    return bytes([kind]) + len(body).to_bytes(2, "big") + body


def progress_frame(progress: Progress) -> bytes:
    return frame(KIND_PROGRESS, encode_progress(progress))


def record_frame(record: PeerRecord) -> bytes:
    return frame(KIND_RECORD, encode_record(record))


@dataclass(frozen=True, slots=True)
class RecordFrames:
    """Our record as a stream carries it: whole (`full`, the first on a stream, or when its
    `base` changed), else as an update of the last one the stream carried."""
    full: bytes
    base: tuple
    update: bytes


def record_frames(record: PeerRecord) -> RecordFrames:
    return RecordFrames(record_frame(record), record_base(record), frame(KIND_UPDATE, encode_update(record)))


def check_kind(kind: int) -> int:
    """`kind` if it is a message kind; MalformedMessage otherwise. The body's limit."""
    if kind not in LIMITS:
        raise MalformedMessage(f"progress stream: message kind {kind} unknown")
    return LIMITS[kind]


def check_length(kind: int, length: int) -> None:
    if not 0 < length <= LIMITS[kind]:
        raise MalformedMessage(f"progress stream: message of {length} bytes (1..{LIMITS[kind]})")


class StreamDecoder:
    """What one sender's progress stream tells, message by message: a Progress, or its
    PeerRecord (whole, or its last one updated). Anything malformed raises a ProtocolError,
    after which the stream is to be dropped."""

    def __init__(self, sender: str, spec_hash: bytes) -> None:
        self.sender, self.spec_hash = sender, spec_hash
        self.base: PeerRecord | None = None
        """The last record this stream carried: what an update applies to."""

    def decode(self, kind: int, body: bytes) -> Progress | PeerRecord:
        if kind == KIND_PROGRESS:
            return decode_progress(body)
        if kind == KIND_RECORD:
            record = decode_record(body, self.spec_hash)
        elif self.base is None:
            raise MalformedMessage("progress stream: a record update before any record")
        else:
            record = apply_update(self.base, body, self.spec_hash)
        if record.peer_id != self.sender:
            raise MalformedMessage(f"progress stream: a record of {record.peer_id}, not of its sender")
        self.base = record
        return record
