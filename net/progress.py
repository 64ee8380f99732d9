"""Progress streams (`locoswarm/progress/1`) on py-libp2p: what the swarm's peers tell this
peer (their records and their progress in each round) and what it tells them, in the
messages protocol/progresswire.py defines, which hivemind peers read and write over p2pd
(node/progress.py).

The reader keeps each peer's last record and its latest progress per round for the newest
ROUNDS_KEPT rounds told, at most MAX_PEERS_PER_ROUND peers a round and MAX_STREAMS streams,
takes at most MESSAGE_RATE messages a second from a peer, and drops a stream that sends
anything malformed (a record of another spec or naming another peer included), naming it in
`rejected`. The teller keeps one outbox per peer (protocol/outbox.py's book, as node/outbox.py
keeps on p2pd): our latest record and the latest message of each round told, written on one
long-lived stream; when the stream breaks or the peer closes it, everything goes again on a
new one after a pause (250 ms doubling to 4 s, cut short when the peer opens its own stream
to us); a peer to which no stream opens for GONE_S is reported gone.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from locoswarm.net.framed import read_exactly
from locoswarm.net.rpc import close_stream
from locoswarm.protocol.admission import PeerLimits
from locoswarm.protocol.errors import MalformedMessage, ProtocolError
from locoswarm.protocol.outbox import IDLE_S as SENDER_IDLE_S
from locoswarm.protocol.outbox import OPEN_TIMEOUT_S, WRITE_TIMEOUT_S, OutboxBook
from locoswarm.protocol.progresswire import (MAX_PEERS_PER_ROUND, MAX_STREAMS, MESSAGE_BURST, MESSAGE_RATE, PROTOCOL,
                                             RecordFrames, StreamDecoder, check_kind, check_length, progress_frame,
                                             record_frames)
from locoswarm.protocol.records import PeerRecord, Progress

log = logging.getLogger(__name__)
ROUNDS_KEPT = 6
"""Rounds whose progress is kept: the newest told and the five before it."""
IDLE_S = 2 * SENDER_IDLE_S
"""A stream that tells nothing for this long is dropped (a sender closes its own after 30 s)."""


class ProgressStreams:
    """This peer's side of the progress streams on `host`, for a run of `spec_hash`."""

    def __init__(self, host: IHost, spec_hash: bytes, *,
                 on_gone: Callable[[str, bool], None] | None = None) -> None:
        """`on_gone(peer_id, served)`: no stream to a peer we tell could be opened for GONE_S;
        `served` says whether one ever opened (it ran a peer of ours)."""
        self.host, self.spec_hash, self.on_gone = host, spec_hash, on_gone
        self.records: dict[str, PeerRecord] = {}
        """Peer id → the last record it told us."""
        self.progress: dict[int, dict[str, Progress]] = {}
        """Round → peer id → the latest progress it told us in that round."""
        self.rejected: list[tuple[str, str]] = []
        """(peer, why) of every stream dropped for what it sent (the last 100)."""
        self.gone: dict[str, float] = {}
        """Peer id → when (time.monotonic()) it was reported gone (until something is told it again)."""
        self.limits = PeerLimits(max_concurrent=1, rate=MESSAGE_RATE, burst=MESSAGE_BURST)
        self.messages_received = 0
        self.messages_sent = 0
        self.writes_sent = 0
        self.streams_opened = 0
        """Streams our tellers opened (the first to each peer and every one after a break)."""
        self._inbound = 0
        self._record: tuple[PeerRecord, RecordFrames] | None = None
        """Our latest record told, and its frames (encoded once per record): a peer told anything gets it first."""
        self._tellers: dict[str, _Teller] = {}
        self._newest_told = -1
        self._nursery: trio.Nursery | None = None

    def start(self, nursery: trio.Nursery) -> None:
        """Serve the protocol on the host; the tellers run in `nursery`."""
        self._nursery = nursery
        self.host.set_stream_handler(TProtocol(PROTOCOL), self._on_stream)

    # ------------------------------------------------------------------ what we are told

    async def _on_stream(self, stream: INetStream) -> None:
        peer = str(stream.muxed_conn.peer_id)
        if self._inbound >= MAX_STREAMS:
            log.info("progress stream from %s refused: %d streams open", peer, MAX_STREAMS)
            await close_stream(stream, reset=True)
            return
        self._inbound += 1
        teller = self._tellers.get(peer)
        if teller is not None:
            teller.back.set()  # it is up and serves the protocol (again): no pause before we write
        decoder = StreamDecoder(peer, self.spec_hash)
        try:
            while True:
                with trio.move_on_after(IDLE_S):
                    kind = await read_exactly(stream, 1)
                if not kind:
                    return  # the sender left or went idle: it opens a new stream when it has news
                check_kind(kind[0])
                with trio.fail_after(WRITE_TIMEOUT_S):
                    head = await read_exactly(stream, 2)
                    length = int.from_bytes(head, "big") if len(head) == 2 else 0
                    if len(head) < 2:
                        return
                    check_length(kind[0], length)
                    body = await read_exactly(stream, length)
                if len(body) < length:
                    return
                why = self.limits.admit(peer)
                if why is not None:
                    raise MalformedMessage(f"flood: {why}")
                self.limits.release(peer)
                self.messages_received += 1
                told = decoder.decode(kind[0], body)
                if isinstance(told, Progress):
                    self._take(peer, told)
                else:
                    self.records[peer] = told
        except ProtocolError as e:
            self.rejected = (self.rejected + [(peer, str(e))])[-100:]
            log.warning("progress stream of %s dropped: %s", peer, e)
        except trio.TooSlowError:
            pass  # a message begun and not finished in time: the sender broke it
        finally:
            self._inbound -= 1
            await close_stream(stream, reset=False)

    def _take(self, peer: str, progress: Progress) -> None:
        newest = max(self.progress, default=progress.round)
        if progress.round < newest - ROUNDS_KEPT + 1:
            return  # older than every round kept
        peers = self.progress.setdefault(progress.round, {})
        if peer in peers or len(peers) < MAX_PEERS_PER_ROUND:
            peers[peer] = progress
        for old in [r for r in self.progress if r < max(self.progress) - ROUNDS_KEPT + 1]:
            del self.progress[old]

    # ------------------------------------------------------------------ what we tell

    def tell(self, peer: ID, *, record: PeerRecord | None = None, progress: Progress | None = None) -> bool:
        """Put our `record` and/or `progress` in `peer`'s outbox; its teller writes them (our
        latest record first, a round's latest progress only) on its stream, opened where it is
        not open. False when MAX_STREAMS peers are told already and `peer` is not one of them."""
        if self._nursery is None:
            raise RuntimeError("ProgressStreams.tell before start(nursery)")
        key = str(peer)
        teller = self._tellers.get(key)
        if teller is None:
            if len(self._tellers) >= MAX_STREAMS:
                return False
            teller = self._tellers[key] = _Teller(self, peer)
            self._nursery.start_soon(teller.run)
        self.gone.pop(key, None)
        if record is not None:
            if self._record is None or self._record[0] != record:
                self._record = (record, record_frames(record))
        if self._record is not None:
            teller.put_record(self._record[1])
        if progress is not None:
            self._newest_told = max(self._newest_told, progress.round)
            oldest = self._newest_told - ROUNDS_KEPT + 1
            for t in self._tellers.values():
                t.book.forget(lambda r: r < oldest)
            teller.put(progress.round, progress_frame(progress))
        return True

    def telling(self, peer: ID) -> bool:
        """A stream to `peer` is open now."""
        teller = self._tellers.get(str(peer))
        return teller is not None and teller.open

    def _ended(self, teller: "_Teller") -> None:
        if self._tellers.get(teller.key) is teller:
            del self._tellers[teller.key]

    def _gone(self, teller: "_Teller") -> None:
        self.gone[teller.key] = time.monotonic()
        log.info("progress to %s: no stream opens: gone", teller.key)
        if self.on_gone is not None:
            self.on_gone(teller.key, teller.served)

    async def close(self) -> None:
        for teller in list(self._tellers.values()):
            teller.stop()
        self._tellers.clear()


class _Teller:
    """One peer we tell: its book (protocol/outbox.py) written on one stream that is opened
    again when it breaks, everything then told again."""

    def __init__(self, streams: ProgressStreams, peer: ID) -> None:
        self.streams, self.peer, self.key = streams, peer, str(peer)
        self.book = OutboxBook()
        self.news = trio.Event()
        self.back = trio.Event()
        """Set when the peer opened a progress stream to us: it is up, with its handler."""
        self.open = False
        self.served = False
        """A stream to the peer opened at least once."""
        self._stream: INetStream | None = None
        self._closed_by_peer = False
        self._scope = trio.CancelScope()

    def put(self, slot: int, message: bytes) -> None:
        if self.book.put(slot, message):
            self.news.set()

    def put_record(self, record: RecordFrames) -> None:
        if self.book.put_record(record):
            self.news.set()

    def stop(self) -> None:
        self._scope.cancel()

    async def run(self) -> None:
        try:
            with self._scope:
                async with trio.open_nursery() as watchers:
                    await self._loop(watchers)
                    watchers.cancel_scope.cancel()
        finally:
            self.open = False
            self.streams._ended(self)
            if self._stream is not None:
                with trio.CancelScope(shield=True):
                    await close_stream(self._stream, reset=False)

    async def _loop(self, watchers: trio.Nursery) -> None:
        book, streams = self.book, self.streams
        while True:
            with trio.move_on_after(SENDER_IDLE_S) as idle:
                await self.news.wait()
            if idle.cancelled_caught:
                return  # nothing to say: close; the next report opens a new stream
            self.news = trio.Event()
            if self._closed_by_peer:
                await self._drop(reset=False)
                await self._pause(book.closed_by_receiver(time.monotonic()))
            if not book.pending:
                continue
            try:
                if self._stream is None:
                    with trio.fail_after(OPEN_TIMEOUT_S):
                        stream = await streams.host.new_stream(self.peer, [TProtocol(PROTOCOL)])
                    self._stream, self._closed_by_peer = stream, False
                    book.stream_opened(time.monotonic())
                    self.open = self.served = True
                    streams.streams_opened += 1
                    watchers.start_soon(self._watch, stream)
                batch, data = book.batch()
                with trio.fail_after(WRITE_TIMEOUT_S):
                    await self._stream.write(data)
            except Exception as e:  # unreachable for now, or the stream broke: keep the news, try again
                log.debug("progress to %s: %s: %s", self.key, type(e).__name__, e)
                if self._stream is None and book.open_failed(time.monotonic()):
                    streams._gone(self)
                    return
                await self._drop(reset=True)
                book.retried(await self._pause(book.wait))
                self.news.set()
                continue
            streams.messages_sent += len(batch)
            streams.writes_sent += 1
            book.written(batch)

    async def _watch(self, stream: INetStream) -> None:
        """Ends when the peer closes or resets `stream` (it never writes on it)."""
        try:
            await stream.read(1)
        except Exception:
            pass
        if self._stream is stream:
            self._closed_by_peer = True
            self.news.set()

    async def _drop(self, *, reset: bool) -> None:
        stream, self._stream, self.open = self._stream, None, False
        if stream is not None:
            await close_stream(stream, reset=reset)

    async def _pause(self, wait: float) -> bool:
        """Sleep `wait`, less when the peer shows it is back; True when it did."""
        with trio.move_on_after(wait):
            await self.back.wait()
            self.back = trio.Event()
            return True
        return False
