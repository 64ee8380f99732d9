"""Progress streams (`locoswarm/progress/1`) on py-libp2p: what the swarm's peers tell this
peer (their records and their progress in each round) and what it tells them, in the
messages protocol/progresswire.py defines, which hivemind peers read and write over p2pd
(node/progress.py).

The reader keeps each peer's last record and its latest progress per round for the newest
ROUNDS_KEPT rounds told, at most MAX_PEERS_PER_ROUND peers a round and MAX_STREAMS streams,
takes at most MESSAGE_RATE messages a second from a peer, and drops a stream that sends
anything malformed (a record of another spec or naming another peer included), naming it in
`rejected`. The teller keeps one stream per peer and, when it broke, opens a new one and
tells the peer's last record again before the message. What node/outbox.py adds on p2pd
(resending a round's latest message on a new stream, backoff, finding a peer gone) is not
here yet (docs/windows.md).
"""

from __future__ import annotations

import logging

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from locoswarm.net.framed import read_exactly
from locoswarm.net.rpc import close_stream
from locoswarm.protocol.admission import PeerLimits
from locoswarm.protocol.errors import MalformedMessage, ProtocolError
from locoswarm.protocol.progresswire import (MAX_PEERS_PER_ROUND, MAX_STREAMS, MESSAGE_BURST, MESSAGE_RATE, PROTOCOL,
                                             StreamDecoder, check_kind, check_length, progress_frame, record_frame)
from locoswarm.protocol.records import PeerRecord, Progress

log = logging.getLogger(__name__)
ROUNDS_KEPT = 6
"""Rounds whose progress is kept: the newest told and the five before it."""
IDLE_S = 60.0
"""A stream that tells nothing for this long is dropped (a sender closes its own after 30 s)."""
WRITE_TIMEOUT_S = 5.0


class ProgressStreams:
    """This peer's side of the progress streams on `host`, for a run of `spec_hash`."""

    def __init__(self, host: IHost, spec_hash: bytes) -> None:
        self.host, self.spec_hash = host, spec_hash
        self.records: dict[str, PeerRecord] = {}
        """Peer id → the last record it told us."""
        self.progress: dict[int, dict[str, Progress]] = {}
        """Round → peer id → the latest progress it told us in that round."""
        self.rejected: list[tuple[str, str]] = []
        """(peer, why) of every stream dropped for what it sent (the last 100)."""
        self.limits = PeerLimits(max_concurrent=1, rate=MESSAGE_RATE, burst=MESSAGE_BURST)
        self.messages_received = 0
        self._inbound = 0
        self._outbound: dict[str, INetStream] = {}
        self._told_record: dict[str, bytes] = {}
        """Peer id → the record frame last told to it (told again on a new stream)."""

    def start(self) -> None:
        self.host.set_stream_handler(TProtocol(PROTOCOL), self._on_stream)

    # ------------------------------------------------------------------ what we are told

    async def _on_stream(self, stream: INetStream) -> None:
        peer = str(stream.muxed_conn.peer_id)
        if self._inbound >= MAX_STREAMS:
            log.info("progress stream from %s refused: %d streams open", peer, MAX_STREAMS)
            await close_stream(stream, reset=True)
            return
        self._inbound += 1
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

    async def tell(self, peer: ID, *, record: PeerRecord | None = None, progress: Progress | None = None) -> None:
        """Tell `peer` our `record` and/or `progress` on our stream to it, opened (again, with
        the last record told first) where it is not open. Raises what opening or writing
        raised, after one retry on a new stream."""
        key = str(peer)
        if record is not None:
            self._told_record[key] = record_frame(record)
        message = (record_frame(record) if record is not None else b"") + \
            (progress_frame(progress) if progress is not None else b"")
        for attempt in range(2):
            stream = self._outbound.get(key)
            fresh = stream is None
            try:
                if fresh:
                    with trio.fail_after(WRITE_TIMEOUT_S):
                        stream = await self.host.new_stream(peer, [TProtocol(PROTOCOL)])
                    self._outbound[key] = stream
                first = self._told_record.get(key, b"") if fresh and record is None else b""
                with trio.fail_after(WRITE_TIMEOUT_S):
                    await stream.write(first + message)
                return
            except Exception:
                self._outbound.pop(key, None)
                await close_stream(stream, reset=True)
                if attempt:
                    raise

    async def close(self) -> None:
        for stream in self._outbound.values():
            await close_stream(stream, reset=False)
        self._outbound.clear()
