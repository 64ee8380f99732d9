"""What a progress-stream sender keeps for one peer it tells, without any I/O: our latest
record and the latest message of each open round, which of them the peer's stream carried,
when to try again after a failure and when to call the peer gone. node/outbox.py drives it,
on p2pd and on py-libp2p (through net/bridge.py).

Delivery is best effort with memory: a slot holds only its latest message; a new stream
(the first, or one opened after a break) carries every slot again, our record whole first.
"""

from __future__ import annotations

from locoswarm.protocol.progresswire import RecordFrames

IDLE_S = 30.0
"""A stream with nothing to say for this long is closed (by the sender; the receiver waits twice as long)."""
OPEN_TIMEOUT_S = 5.0
WRITE_TIMEOUT_S = 5.0
RETRY_S = (0.25, 2.0, 4.0)
"""After a failed open or write: wait 250 ms, doubling to at most 4 s, then try again."""
GONE_S = 1.5
"""A peer none of whose stream opens succeeded for this long (two failures at least: at
0, 0.25, 0.75 and 1.75 s when refused at once) is reported gone: its process died, its link
is cut, or it serves no daemon of ours. Where opens time out instead (a cut link), two of
OPEN_TIMEOUT_S each come first."""
RECORD_SLOT = -1
"""The slot of our record (the others are rounds, ≥ 0): sent before any progress."""


class OutboxBook:
    """One peer's outbox: what is to be told, what its stream carried, and the retry state."""

    def __init__(self) -> None:
        self.pending: dict[int, bytes] = {}
        self.sent: dict[int, bytes] = {}
        self.record: RecordFrames | None = None
        """Our latest record's frames (the RECORD_SLOT holds its whole frame)."""
        self.stream_base: tuple | None = None
        """The base (protocol/records.py record_base) of the last whole record the open stream
        carried: a record of the same base goes on it as an update."""
        self.failing: tuple[float, int] | None = None
        """Since when (a monotonic clock) opens have failed without one succeeding, and how many."""
        self.wait = RETRY_S[0]
        """The pause before the next attempt after a failure."""
        self.opened_at = 0.0

    def put(self, slot: int, message: bytes) -> bool:
        """`message` for `slot` (a round, or RECORD_SLOT), replacing what the slot held; False
        when the slot holds it already (nothing new to send)."""
        if self.pending.get(slot, self.sent.get(slot)) == message:
            return False
        self.pending[slot] = message
        return True

    def put_record(self, record: RecordFrames) -> bool:
        """Our latest record for RECORD_SLOT: written whole on a stream that carried none of
        its base yet, else as an update."""
        self.record = record
        return self.put(RECORD_SLOT, record.full)

    def forget(self, old) -> None:
        """Drop the rounds `old(round)` says are over (the record stays)."""
        for box in (self.pending, self.sent):
            for r in [r for r in box if r != RECORD_SLOT and old(r)]:
                del box[r]

    def stream_opened(self, now: float) -> None:
        """A new stream to the peer: it is told everything again, the record whole."""
        self.opened_at = now
        self.failing = None
        self.stream_base = None
        self.pending = {**self.sent, **self.pending}

    def batch(self) -> tuple[list[tuple[int, bytes]], bytes]:
        """The pending slots, the record first, and the bytes that carry them on the open stream."""
        batch = sorted(self.pending.items())
        return batch, b"".join(self._wire(slot, message) for slot, message in batch)

    def _wire(self, slot: int, message: bytes) -> bytes:
        record = self.record
        if slot != RECORD_SLOT or record is None or message != record.full:
            return message
        if self.stream_base == record.base:
            return record.update
        self.stream_base = record.base
        return message

    def written(self, batch: list[tuple[int, bytes]]) -> None:
        """`batch` went out whole: its slots are sent unless a newer message came meanwhile."""
        for slot, message in batch:
            self.sent[slot] = message
            if self.pending.get(slot) is message:
                del self.pending[slot]

    def open_failed(self, now: float) -> bool:
        """No stream opened; True when the peer is now to be reported gone (it failed for
        GONE_S, twice at least)."""
        since, failures = self.failing or (now, 0)
        self.failing = (since, failures + 1)
        return failures >= 1 and now - since >= GONE_S

    def closed_by_receiver(self, now: float) -> float:
        """The peer closed our stream (it restarted its handler, or does not admit us yet:
        a private run's peer before it read our record). What it was told last may be lost:
        everything goes again on a new stream, after the pause returned, which grows while
        streams keep being closed as soon as they open."""
        self.pending = {**self.sent, **self.pending}
        young = now - self.opened_at <= IDLE_S
        self.wait = min(RETRY_S[2], self.wait * RETRY_S[1]) if young else RETRY_S[0]
        return self.wait

    def retried(self, peer_back: bool) -> None:
        """After the pause that followed a failed open or write: back to the shortest pause
        if the peer showed it is up (it opened its own stream to us), else a longer one."""
        self.wait = RETRY_S[0] if peer_back else min(RETRY_S[2], self.wait * RETRY_S[1])
