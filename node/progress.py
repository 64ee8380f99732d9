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

A message is a one-byte length (1..MAX_PROGRESS_BYTES) and the progress (protocol/records.py
`encode_progress`, which names its round). Delivery is best effort with memory: a sender
keeps the latest message of each open round per peer and sends it again on a new stream
when the last one broke, so a report is lost only with its peer. The receiver keeps the
latest message per peer and round for the rounds open here (ROUNDS_KEPT before the newest,
ROUNDS_AHEAD after), reads one stream per peer (a newer one replaces the older), takes at
most MESSAGE_RATE messages a second from a peer and drops a stream that sends anything
malformed; with an access policy, what a peer not admitted told is not heard (`seen`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from locoswarm.node.streams import PeerLimits
from locoswarm.protocol import ProtocolError
from locoswarm.protocol.errors import MalformedMessage
from locoswarm.protocol.records import MAX_PROGRESS_BYTES, Progress, decode_progress, encode_progress

log = logging.getLogger(__name__)
PROTOCOL = "locoswarm/progress/1"
ROUNDS_KEPT = 3
"""Rounds before the newest one opened here whose progress is still kept (with overlap a
round's exchange runs beside the next round's training)."""
ROUNDS_AHEAD = 2
"""Rounds after the newest one opened here whose progress is kept already: a peer a round
ahead reports before we get there, and its "done" is sent once."""
MAX_PEERS_PER_ROUND = 4096
"""Peers whose progress is kept per round: memory bounded under a flood of identities."""
MAX_STREAMS = 1024
"""Inbound progress streams held at once."""
MESSAGE_RATE, MESSAGE_BURST = 50.0, 100
"""Messages a second taken from one peer (honest peers send a few a second per round)."""
IDLE_S = 30.0
"""A stream with nothing to say for this long is closed (by the sender; the receiver waits twice as long)."""
OPEN_TIMEOUT_S = 5.0
WRITE_TIMEOUT_S = 5.0
RETRY_S = (0.25, 2.0, 4.0)
"""After a failed open or write: wait 250 ms, doubling to at most 4 s, then try again."""
MAX_TARGETS = 256
"""Peers told per report at most (a round's peers are bounded by the view, ≤ 200)."""


def progress_frame(progress: Progress) -> bytes:
    """One message on a progress stream: a one-byte length and the encoded progress."""
    body = encode_progress(progress)
    return bytes([len(body)]) + body


@dataclass(frozen=True, slots=True)
class Seen:
    progress: Progress
    at: float
    """time.monotonic() when its count last changed here (the reader extrapolates from it)."""


class ProgressBus:
    """This peer's side of the progress streams: what the others told us, per round, and
    one outbox per peer we tell."""

    def __init__(self, p2p, me: str, *, admit: Callable[[str], bool] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`admit(peer_id)`: whether a peer may take part (a private run's policy)."""
        self.p2p, self.me, self.admit, self.clock = p2p, me, admit, clock
        self.newest = -1
        """The newest round opened here (-1: none yet)."""
        self._rounds: dict[int, dict[str, Seen]] = {}
        self._inbound: dict[str, asyncio.StreamWriter] = {}
        self._outboxes: dict[str, _Outbox] = {}
        self.limits = PeerLimits(max_concurrent=1, rate=MESSAGE_RATE, burst=MESSAGE_BURST)
        self.rejected = 0
        """Streams dropped for a malformed message or a flood."""
        self.messages_sent = 0
        self.messages_received = 0

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
        try:
            while True:
                length = (await asyncio.wait_for(reader.readexactly(1), 2 * IDLE_S))[0]
                if not 0 < length <= MAX_PROGRESS_BYTES:
                    raise MalformedMessage(f"progress message of {length} bytes (1..{MAX_PROGRESS_BYTES})")
                body = await asyncio.wait_for(reader.readexactly(length), WRITE_TIMEOUT_S)
                why = self.limits.admit(peer)
                if why is not None:
                    raise MalformedMessage(f"flood: {why}")
                self.limits.release(peer)
                self.messages_received += 1
                self.take(peer, decode_progress(body))
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            pass  # the sender left, went idle or broke the stream: it opens a new one when it has news
        except ProtocolError as e:
            self.rejected += 1
            log.warning("progress stream of %s dropped: %s", peer, e)
        finally:
            if self._inbound.get(peer) is writer:
                del self._inbound[peer]
            writer.close()

    # ------------------------------------------------------------------ what we tell

    def publish(self, progress: Progress, peers: Iterable[str]) -> None:
        """Tell `peers` our `progress` (each at most once: a peer already told this exact
        message is not told again; a new peer of the round is told at once)."""
        frame = progress_frame(progress)
        told = 0
        for peer in peers:
            if peer == self.me:
                continue
            if told >= MAX_TARGETS:
                break
            told += 1
            outbox = self._outboxes.get(peer)
            if outbox is None:
                outbox = self._outboxes[peer] = _Outbox(self, peer)
            outbox.put(progress.round, frame)

    def reachable(self, peer: str) -> bool:
        """Whether our progress stream to `peer` is open: a daemon of the protocol answers
        there (a bare record, or a p2pd with no daemon behind it, never does)."""
        outbox = self._outboxes.get(peer)
        return outbox is not None and outbox.open

    def _closed(self, outbox: "_Outbox") -> None:
        if self._outboxes.get(outbox.peer) is outbox:
            del self._outboxes[outbox.peer]


class _Outbox:
    """One peer we tell: the latest message of each open round, sent on one stream that is
    opened again when it breaks (the messages of the open rounds then go again)."""

    def __init__(self, bus: ProgressBus, peer: str) -> None:
        self.bus, self.peer = bus, peer
        self.pending: dict[int, bytes] = {}
        self.sent: dict[int, bytes] = {}
        self.wake = asyncio.Event()
        self.open = False
        """A stream to the peer is open now."""
        self.task = asyncio.ensure_future(self.run())
        self.task.add_done_callback(lambda _: bus._closed(self))

    def put(self, round_: int, frame: bytes) -> None:
        if self.pending.get(round_, self.sent.get(round_)) == frame:
            return
        self.pending[round_] = frame
        self.wake.set()

    def forget(self, old: Callable[[int], bool]) -> None:
        for box in (self.pending, self.sent):
            for r in [r for r in box if old(r)]:
                del box[r]

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
                    reader = writer = closed = None
                    self.open = False
                    wait = RETRY_S[0] if time.monotonic() - opened_at > IDLE_S else min(RETRY_S[2], wait * RETRY_S[1])
                    self.pending = {**self.sent, **self.pending}
                    await asyncio.sleep(wait)
                self.wake.clear()
                if not self.pending:
                    continue
                try:
                    if writer is None:
                        _, reader, writer = await asyncio.wait_for(
                            self.bus.p2p.call_binary_stream_handler(PeerID.from_base58(self.peer), PROTOCOL),
                            OPEN_TIMEOUT_S)
                        opened_at = time.monotonic()
                        self.open = True
                        closed = asyncio.ensure_future(reader.read(1))
                        self.pending = {**self.sent, **self.pending}  # a new stream: tell it all again
                    batch = sorted(self.pending.items())
                    writer.write(b"".join(frame for _, frame in batch))
                    await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
                except Exception as e:  # unreachable for now, or the stream broke: keep the news, try again
                    log.debug("progress to %s: %s: %s", self.peer, type(e).__name__, e)
                    if writer is not None:
                        writer.close()
                    if closed is not None:
                        closed.cancel()
                    reader = writer = closed = None
                    self.open = False
                    await asyncio.sleep(wait)
                    wait = min(RETRY_S[2], wait * RETRY_S[1])
                    self.wake.set()
                    continue
                self.bus.messages_sent += len(batch)
                for r, frame in batch:
                    self.sent[r] = frame
                    if self.pending.get(r) is frame:
                        del self.pending[r]
        finally:
            if closed is not None:
                closed.cancel()
            if writer is not None:
                writer.close()
