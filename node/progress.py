"""Round progress told directly to a round's peers over long-lived libp2p streams.

Each peer training a round tells the peers it expects in that round (node/rounds.py: the
live records at or just before the round, and every peer that told us its progress in it)
how far it has got, on one stream per peer kept open while there is news. The connection
authenticates the sender (libp2p's noise handshake binds the stream to the peer id), so a
message needs no signature and nobody can report for another peer. Before, progress was a
signed entry in one DHT key per round, stored at the key's five replicas and read back, the
whole round's entries each time, ten times a second by every peer: at six peers that was
half of all control traffic and grew with the round's size (docs/scale.md has the figures).
Here a report costs one small message to each of the round's peers and a read costs
nothing; the group rounds of the bounded design (docs/scale.md) keep that set bounded.

The same streams carry the sender's peer record (protocol/records.py), whenever it changed:
its round, chains, paused flag and incarnation reach the round's peers at once, where the
registry shows them only at its next refresh and read, every few seconds (node/membership.py
takes the newer of the two by the record's sequence number).

The messages and their checks are protocol/progresswire.py's (the py-libp2p peer reads and
writes the same). Delivery is best effort with memory: a sender (node/outbox.py) keeps its
latest record and the latest message of each open round per peer and sends them again on a
new stream when the last one broke, so a report is lost only with its peer. The receiver
keeps the latest message per peer and round for the rounds open here (ROUNDS_KEPT before the newest,
ROUNDS_AHEAD after), reads one stream per peer (a newer one replaces the older), takes at
most MESSAGE_RATE messages a second from a peer and drops a stream that sends anything
malformed (a record of another spec or naming another peer included); with an access
policy, what a peer not admitted told is not heard (`seen`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from locoswarm.node.outbox import IDLE_S, RECORD_SLOT, WRITE_TIMEOUT_S, Outbox
from locoswarm.node.streams import PeerLimits
from locoswarm.protocol import ProtocolError
from locoswarm.protocol.errors import MalformedMessage
from locoswarm.protocol.progresswire import (KIND_PROGRESS, KIND_RECORD, KIND_UPDATE, LIMITS, MAX_PEERS_PER_ROUND,
                                             MAX_STREAMS, MESSAGE_BURST, MESSAGE_RATE, PROTOCOL, RecordFrames,
                                             StreamDecoder, check_kind, check_length, frame, progress_frame,
                                             record_frame, record_frames)
from locoswarm.protocol.records import PeerRecord, Progress

__all__ = ["KIND_PROGRESS", "KIND_RECORD", "KIND_UPDATE", "LIMITS", "MAX_PEERS_PER_ROUND", "MAX_STREAMS",
           "MESSAGE_BURST", "MESSAGE_RATE", "PROTOCOL", "ProgressBus", "RecordFrames", "Seen", "frame", "progress_frame",
           "record_frame", "record_frames"]

log = logging.getLogger(__name__)
ROUNDS_KEPT = 3
"""Rounds before the newest one opened here whose progress is still kept (with overlap a
round's exchange runs beside the next round's training)."""
ROUNDS_AHEAD = 2
"""Rounds after the newest one opened here whose progress is kept already: a peer a round
ahead reports before we get there, and its "done" is sent once."""
MAX_TARGETS = 256
"""Peers told per report at most (a round's peers are bounded by the view, ≤ 200)."""
@dataclass(frozen=True, slots=True)
class Seen:
    progress: Progress
    at: float
    """time.monotonic() when its count last changed here (the reader extrapolates from it)."""


class ProgressBus:
    """This peer's side of the progress streams: what the others told us, per round, and
    one outbox per peer we tell."""

    def __init__(self, p2p, me: str, *, admit: Callable[[str], bool] | None = None,
                 clock: Callable[[], float] = time.monotonic, spec_hash: bytes = b"",
                 record: Callable[[], PeerRecord] | None = None,
                 on_record: Callable[[PeerRecord], None] | None = None,
                 on_gone: Callable[[str, bool], None] | None = None) -> None:
        """`admit(peer_id)`: whether a peer may take part (a private run's policy);
        `record()`: our current peer record, told with our progress; `on_record(record)`:
        a record a peer told us (checked: of `spec_hash`, naming the peer that sent it);
        `on_gone(peer_id, served)`: no stream to a peer we tell could be opened for GONE_S (node/outbox.py)
        (`served`: one had opened before, so it ran a daemon of ours); we stop telling it."""
        self.p2p, self.me, self.admit, self.clock = p2p, me, admit, clock
        self.spec_hash, self.record, self.on_record, self.on_gone = spec_hash, record, on_record, on_gone
        self._last_record: tuple[PeerRecord, RecordFrames] | None = None
        """Our last record and its frames (encoded once per change)."""
        self.newest = -1
        """The newest round opened here (-1: none yet)."""
        self._rounds: dict[int, dict[str, Seen]] = {}
        self._inbound: dict[str, asyncio.StreamWriter] = {}
        self._outboxes: dict[str, Outbox] = {}
        self._mine: dict[int, bytes] = {}
        """Round → our latest message in it (told back to a peer that tells us its own)."""
        self.limits = PeerLimits(max_concurrent=1, rate=MESSAGE_RATE, burst=MESSAGE_BURST)
        self.rejected = 0
        """Streams dropped for a malformed message or a flood."""
        self.messages_sent = 0
        self.writes_sent = 0
        """Writes to our outboxes' streams (a batch of messages each)."""
        self.records_sent = 0
        """Of messages_sent: our record, whole or as an update."""
        self.messages_received = 0
        self.bytes_sent = 0
        """Bytes of frames written to progress streams (before libp2p's framing)."""

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(PROTOCOL, self.rpc_progress)

    def close(self) -> None:
        for outbox in list(self._outboxes.values()):
            outbox.task.cancel()
        for writer in list(self._inbound.values()):
            writer.close()

    # ------------------------------------------------------------------ what we were told

    def open_round(self, round_: int) -> None:
        """We train `round_` now: keep its progress and the rounds around it, forget older ones."""
        self.newest = max(self.newest, round_)
        for old in [r for r in self._rounds if not self._kept(r)]:
            del self._rounds[old]
        for outbox in self._outboxes.values():
            outbox.forget(lambda r: not self._kept(r))
        for old in [r for r in self._mine if not self._kept(r)]:
            del self._mine[old]

    def seen(self, round_: int) -> dict[str, Seen]:
        """Peer id → its latest progress in `round_`, of the peers the access policy admits
        now (a copy: safe to read from another thread). What a peer not admitted told is
        kept, within the same bounds, so that a private run's peer is heard from the moment
        its record has been read, not from its next report."""
        peers = self._rounds.get(round_, {})
        if self.admit is None:
            return dict(peers)
        return {peer: seen for peer, seen in peers.items() if self.admit(peer)}

    def _kept(self, round_: int) -> bool:
        return self.newest < 0 or self.newest - ROUNDS_KEPT <= round_ <= self.newest + ROUNDS_AHEAD

    def take(self, peer: str, progress: Progress) -> None:
        """`peer` told us `progress` (its stream authenticated it)."""
        if peer == self.me or not self._kept(progress.round):
            return
        peers = self._rounds.get(progress.round)
        if peers is None:
            if self.newest < 0 and len(self._rounds) >= ROUNDS_KEPT + ROUNDS_AHEAD + 1:
                return  # nothing opened yet: keep the first rounds told, not a flood of made-up ones
            peers = self._rounds[progress.round] = {}
        old = peers.get(peer)
        if old is None and len(peers) >= MAX_PEERS_PER_ROUND:
            return
        changed = old is None or old.progress != progress
        # Replaced, never mutated: the training thread reads a copy taken on the loop.
        peers[peer] = Seen(progress, self.clock() if changed else old.at)
        mine = self._mine.get(progress.round)
        if mine is not None and (self.admit is None or self.admit(peer)):
            # It trains a round we told: it hears ours too, even when it told us after our
            # last report of the round (a peer that joined or restarted into it late).
            self._tell(peer, progress.round, mine, self._record_frames())

    async def rpc_progress(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read one peer's progress stream until it ends."""
        peer = str(info.peer_id)
        if peer not in self._inbound and len(self._inbound) >= MAX_STREAMS:
            log.info("progress stream from %s refused: %d streams open", peer, MAX_STREAMS)
            writer.close()
            return
        older = self._inbound.pop(peer, None)
        if older is not None:
            older.close()  # the sender opened a new stream: its old one broke on its side
        self._inbound[peer] = writer
        outbox = self._outboxes.get(peer)
        if outbox is not None:
            outbox.back.set()  # it is up and serves the protocol (again): no backoff before we write
        decoder = StreamDecoder(peer, self.spec_hash)
        try:
            while True:
                kind = (await asyncio.wait_for(reader.readexactly(1), 2 * IDLE_S))[0]
                check_kind(kind)
                length = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), WRITE_TIMEOUT_S), "big")
                check_length(kind, length)
                body = await asyncio.wait_for(reader.readexactly(length), WRITE_TIMEOUT_S)
                why = self.limits.admit(peer)
                if why is not None:
                    raise MalformedMessage(f"flood: {why}")
                self.limits.release(peer)
                self.messages_received += 1
                told = decoder.decode(kind, body)
                if isinstance(told, Progress):
                    self.take(peer, told)
                else:
                    self._heard_record(peer, told)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            pass  # the sender left, went idle or broke the stream: it opens a new one when it has news
        except asyncio.CancelledError:
            pass  # we are stopping (node/streams.py serve_framed says why this ends quietly)
        except ProtocolError as e:
            self.rejected += 1
            log.warning("progress stream of %s dropped: %s", peer, e)
        finally:
            if self._inbound.get(peer) is writer:
                del self._inbound[peer]
            writer.close()

    def _heard_record(self, peer: str, record: PeerRecord) -> None:
        """A record `peer` told us (whole, or its last one updated, checked to name it)."""
        if self.on_record is not None:
            self.on_record(record)
        if self.admit is None or self.admit(peer):
            # Told back where it has not been told ours yet: a joiner, which has only the
            # registry's copies of our records (up to a refresh old), learns our round now.
            self.introduce([peer])

    # ------------------------------------------------------------------ what we tell

    def _record_frames(self) -> RecordFrames | None:
        """The frames of our current record (None: no record to tell), encoded again only
        when its sequence number moved: the throughput it also carries changes every step
        and is no news worth a message."""
        if self.record is None:
            return None
        record = self.record()
        if self._last_record is None or self._last_record[0].seq != record.seq:
            self._last_record = (record, record_frames(record))
        return self._last_record[1]

    def show(self) -> None:
        """Tell every peer we tell our progress our current record, where it changed since
        they were last told (the daemon calls it at each registry refresh: a pause, which
        no progress report follows, reaches them then)."""
        self.introduce(list(self._outboxes))

    def publish(self, progress: Progress, peers: Iterable[str]) -> None:
        """Tell `peers` our `progress` (each at most once: a peer already told this exact
        message is not told again; a new peer of the round is told at once)."""
        message = self._mine[progress.round] = progress_frame(progress)
        record = self._record_frames()
        told = 0
        for peer in peers:
            if peer == self.me:
                continue
            if told >= MAX_TARGETS:
                break
            told += 1
            self._tell(peer, progress.round, message, record)

    def _tell(self, peer: str, round_: int, message: bytes, record: RecordFrames | None) -> None:
        """Put our `record` (None: none to tell) and `message` of `round_` in `peer`'s outbox."""
        outbox = self._outbox(peer)
        if outbox is None:
            return
        if record is not None:
            outbox.put_record(record)
        outbox.put(round_, message)

    def _outbox(self, peer: str) -> "Outbox | None":
        """`peer`'s outbox, opened if need be; None when MAX_STREAMS are open already."""
        outbox = self._outboxes.get(peer)
        if outbox is None and len(self._outboxes) < MAX_STREAMS:
            outbox = self._outboxes[peer] = Outbox(self, peer, PROTOCOL)
        return outbox

    def introduce(self, peers: Iterable[str]) -> None:
        """Tell `peers` our record now, progress or not (a joiner, before it asks them for
        their state: a private run's donor serves only peers whose record it has)."""
        record = self._record_frames()
        if record is None:
            return
        for peer in peers:
            outbox = self._outbox(peer) if peer != self.me else None
            if outbox is not None:
                outbox.put_record(record)

    async def delivered(self, peers: Iterable[str], timeout_s: float) -> set[str]:
        """Wait until our current record went out on an open stream to each of `peers`
        (`introduce`) that is not found gone meanwhile, at most `timeout_s`; the peers it
        reached."""
        record, peers = self._record_frames(), [p for p in peers if p != self.me]
        deadline = time.monotonic() + timeout_s
        reached: set[str] = set()
        while record is not None:
            waiting = False
            for peer in peers:
                outbox = self._outboxes.get(peer)
                if outbox is not None and outbox.sent.get(RECORD_SLOT) == record.full:
                    reached.add(peer)
                elif outbox is not None:
                    waiting = True
            if not waiting or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.02)
        return reached

    def reachable(self, peer: str) -> bool:
        """Whether our progress stream to `peer` is open: a daemon of the protocol answers
        there (a bare record, or a p2pd with no daemon behind it, never does)."""
        outbox = self._outboxes.get(peer)
        return outbox is not None and outbox.open

    def _closed(self, outbox: "Outbox") -> None:
        if self._outboxes.get(outbox.peer) is outbox:
            del self._outboxes[outbox.peer]

    def _gone(self, outbox: "Outbox") -> None:
        """`outbox`'s peer could not be reached for GONE_S: forget what it was to be told
        (its outbox ends) and say so, unless it has a stream open to us (then it is there,
        and only our way to it failed)."""
        if outbox.peer in self._inbound:
            return
        self._closed(outbox)  # now, not when its task ends: a report meanwhile opens a new outbox
        outbox.task.cancel()
        if self.on_gone is not None:
            self.on_gone(outbox.peer, outbox.served)
