"""The sending side of the progress streams (node/progress.py): one outbox per peer we
tell, holding our latest record and the latest message of each open round, written on one
long-lived stream that is opened again when it breaks; a peer to which no stream opens for
GONE_S is reported gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from locoswarm.node.progress import ProgressBus, RecordFrames

log = logging.getLogger(__name__)
IDLE_S = 30.0
"""A stream with nothing to say for this long is closed (by the sender; the receiver waits twice as long)."""
OPEN_TIMEOUT_S = 5.0
WRITE_TIMEOUT_S = 5.0
RETRY_S = (0.25, 2.0, 4.0)
"""After a failed open or write: wait 250 ms, doubling to at most 4 s, then try again."""
GONE_S = 1.5
"""A peer none of whose stream opens succeeded for this long (two failures at least: at
0, 0.25, 0.75 and 1.75 s when refused at once) is reported gone (`on_gone`): its process
died, its link is cut, or it serves no daemon of ours. Where opens time out instead (a cut
link), two of OPEN_TIMEOUT_S each come first."""
RECORD_SLOT = -1
"""An outbox's slot for our record (the others are rounds, ≥ 0): sent before any progress."""


class Outbox:
    """One peer we tell: our latest record and the latest message of each open round, sent
    on one stream that is opened again when it breaks (they then all go again)."""

    def __init__(self, bus: ProgressBus, peer: str, protocol: str) -> None:
        self.bus, self.peer, self.protocol = bus, peer, protocol
        self.pending: dict[int, bytes] = {}
        self.sent: dict[int, bytes] = {}
        self.wake = asyncio.Event()
        self.back = asyncio.Event()
        """Set when the peer opened a progress stream to us: it is up, with its handler."""
        self.open = False
        """A stream to the peer is open now."""
        self.served = False
        """A stream to the peer opened at least once (it runs a daemon of ours)."""
        self.failing: tuple[float, int] | None = None
        """Since when (time.monotonic()) opens have failed without one succeeding, and how many."""
        self.record: RecordFrames | None = None
        """Our latest record's frames (the RECORD_SLOT holds its whole frame)."""
        self.stream_base: tuple | None = None
        """The base (protocol/records.py record_base) of the last whole record the open stream
        carried: a record of the same base goes on it as an update."""
        self.task = asyncio.ensure_future(self.run())
        self.task.add_done_callback(lambda _: bus._closed(self))

    def put(self, slot: int, message: bytes) -> None:
        """`message` for `slot` (a round, or RECORD_SLOT), replacing what the slot held."""
        if self.pending.get(slot, self.sent.get(slot)) == message:
            return
        self.pending[slot] = message
        self.wake.set()

    def put_record(self, record: RecordFrames) -> None:
        """Our latest record for RECORD_SLOT: written whole on a stream that carried none of
        its base yet, else as an update."""
        self.record = record
        self.put(RECORD_SLOT, record.full)

    def _wire(self, slot: int, message: bytes) -> bytes:
        """What goes on the stream for `message` in `slot`."""
        record = self.record
        if slot != RECORD_SLOT or record is None or message != record.full:
            return message
        if self.stream_base == record.base:
            return record.update
        self.stream_base = record.base
        return message

    def forget(self, old: Callable[[int], bool]) -> None:
        for box in (self.pending, self.sent):
            for r in [r for r in box if r != RECORD_SLOT and old(r)]:
                del box[r]

    async def _retry_after(self, wait: float) -> bool:
        """Sleep `wait` before trying again, less when the peer shows it is back (a peer
        that restarted opens its stream to us within a second; a backoff of seconds would
        miss a short life entirely); True when it did."""
        try:
            await asyncio.wait_for(self.back.wait(), wait)
        except asyncio.TimeoutError:
            return False
        self.back.clear()
        return True

    async def run(self) -> None:
        from hivemind.p2p import PeerID

        reader = writer = closed = None
        """`closed` ends when the receiver closes the stream (it never writes to it)."""
        opened_at = 0.0
        wait = RETRY_S[0]
        try:
            while True:
                woken = asyncio.ensure_future(self.wake.wait())
                done, _ = await asyncio.wait([woken] + ([closed] if closed else []), timeout=IDLE_S,
                                             return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
                if not done:
                    return  # nothing to say: close; the next report opens a new stream
                if closed is not None and closed.done():
                    # The receiver closed it: it restarted its handler, or does not admit us
                    # (yet: a private run's peer before it has read our record). What it was
                    # told last may be lost: tell the open rounds again on a new stream, after
                    # a wait that grows while streams keep being closed at once.
                    writer.close()
                    _drop(closed)
                    reader = writer = closed = None
                    self.open = False
                    wait = RETRY_S[0] if time.monotonic() - opened_at > IDLE_S else min(RETRY_S[2], wait * RETRY_S[1])
                    self.pending = {**self.sent, **self.pending}
                    await self._retry_after(wait)
                self.wake.clear()
                if not self.pending:
                    continue
                try:
                    if writer is None:
                        _, reader, writer = await asyncio.wait_for(
                            self.bus.p2p.call_binary_stream_handler(PeerID.from_base58(self.peer), self.protocol),
                            OPEN_TIMEOUT_S)
                        opened_at = time.monotonic()
                        self.open = self.served = True
                        self.failing = None
                        self.stream_base = None
                        closed = asyncio.ensure_future(reader.read(1))
                        self.pending = {**self.sent, **self.pending}  # a new stream: tell it all again
                    batch = sorted(self.pending.items())  # the record (slot −1) first
                    data = b"".join(self._wire(slot, message) for slot, message in batch)
                    writer.write(data)
                    await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
                except Exception as e:  # unreachable for now, or the stream broke: keep the news, try again
                    log.debug("progress to %s: %s: %s", self.peer, type(e).__name__, e)
                    if writer is None:  # the open failed
                        now = time.monotonic()
                        since, failures = self.failing or (now, 0)
                        self.failing = (since, failures + 1)
                        if failures >= 1 and now - since >= GONE_S:
                            self.bus._gone(self)
                    else:
                        writer.close()
                    _drop(closed)
                    reader = writer = closed = None
                    self.open = False
                    if await self._retry_after(wait):
                        wait = RETRY_S[0]
                    else:
                        wait = min(RETRY_S[2], wait * RETRY_S[1])
                    self.wake.set()
                    continue
                self.bus.messages_sent += len(batch)
                self.bus.records_sent += sum(slot == RECORD_SLOT for slot, _ in batch)
                self.bus.writes_sent += 1
                self.bus.bytes_sent += len(data)
                for slot, message in batch:
                    self.sent[slot] = message
                    if self.pending.get(slot) is message:
                        del self.pending[slot]
        finally:
            _drop(closed)
            if writer is not None:
                writer.close()


def _drop(future: asyncio.Future | None) -> None:
    """Let go of a read that watches a stream: cancelled if still running, its error (a
    reset connection) taken if it ended with one, so that asyncio does not log it."""
    if future is None:
        return
    if not future.done():
        future.cancel()
    elif not future.cancelled():
        future.exception()
