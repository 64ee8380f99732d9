"""The sending side of the progress streams (node/progress.py) on p2pd: one outbox per peer
we tell, its book (protocol/outbox.py: our latest record and the latest message of each open
round) written on one long-lived stream that is opened again when it breaks; a peer to which
no stream opens for GONE_S is reported gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Callable

from locoswarm.node.streams import peer_id_of
from locoswarm.protocol.outbox import GONE_S, IDLE_S, OPEN_TIMEOUT_S, RECORD_SLOT, RETRY_S, WRITE_TIMEOUT_S, OutboxBook

if TYPE_CHECKING:
    from locoswarm.node.progress import ProgressBus, RecordFrames

__all__ = ["GONE_S", "IDLE_S", "OPEN_TIMEOUT_S", "RECORD_SLOT", "RETRY_S", "WRITE_TIMEOUT_S", "Outbox"]
log = logging.getLogger(__name__)


class Outbox:
    """One peer we tell: its book (protocol/outbox.py) sent on one stream that is opened
    again when it breaks (everything then goes again)."""

    def __init__(self, bus: ProgressBus, peer: str, protocol: str) -> None:
        self.bus, self.peer, self.protocol = bus, peer, protocol
        self.book = OutboxBook()
        self.wake = asyncio.Event()
        self.back = asyncio.Event()
        """Set when the peer opened a progress stream to us: it is up, with its handler."""
        self.open = False
        """A stream to the peer is open now."""
        self.served = False
        """A stream to the peer opened at least once (it runs a daemon of ours)."""
        self.task = asyncio.ensure_future(self.run())
        self.task.add_done_callback(lambda _: bus._closed(self))

    @property
    def sent(self) -> dict[int, bytes]:
        return self.book.sent

    def put(self, slot: int, message: bytes) -> None:
        """`message` for `slot` (a round, or RECORD_SLOT), replacing what the slot held."""
        if self.book.put(slot, message):
            self.wake.set()

    def put_record(self, record: RecordFrames) -> None:
        if self.book.put_record(record):
            self.wake.set()

    def forget(self, old: Callable[[int], bool]) -> None:
        self.book.forget(old)

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
        book = self.book
        reader = writer = closed = None
        """`closed` ends when the receiver closes the stream (it never writes to it)."""
        try:
            while True:
                woken = asyncio.ensure_future(self.wake.wait())
                done, _ = await asyncio.wait([woken] + ([closed] if closed else []), timeout=IDLE_S,
                                             return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
                if not done:
                    return  # nothing to say: close; the next report opens a new stream
                if closed is not None and closed.done():
                    writer.close()
                    _drop(closed)
                    reader = writer = closed = None
                    self.open = False
                    await self._retry_after(book.closed_by_receiver(time.monotonic()))
                self.wake.clear()
                if not book.pending:
                    continue
                try:
                    if writer is None:
                        _, reader, writer = await asyncio.wait_for(
                            self.bus.p2p.call_binary_stream_handler(peer_id_of(self.bus.p2p, self.peer), self.protocol),
                            OPEN_TIMEOUT_S)
                        book.stream_opened(time.monotonic())
                        self.open = self.served = True
                        closed = asyncio.ensure_future(reader.read(1))
                    batch, data = book.batch()
                    writer.write(data)
                    await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
                except Exception as e:  # unreachable for now, or the stream broke: keep the news, try again
                    log.debug("progress to %s: %s: %s", self.peer, type(e).__name__, e)
                    if writer is None:  # the open failed
                        if book.open_failed(time.monotonic()):
                            self.bus._gone(self)
                    else:
                        writer.close()
                    _drop(closed)
                    reader = writer = closed = None
                    self.open = False
                    book.retried(await self._retry_after(book.wait))
                    self.wake.set()
                    continue
                self.bus.messages_sent += len(batch)
                self.bus.records_sent += sum(slot == RECORD_SLOT for slot, _ in batch)
                self.bus.writes_sent += 1
                self.bus.bytes_sent += len(data)
                book.written(batch)
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
