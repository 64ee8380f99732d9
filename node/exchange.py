"""Delta exchange over libp2p binary streams (hivemind's p2pd, the one sidecar we accept).

A peer serves its encoded delta of a round; others pull it by round number. Deltas travel
over streams, not protobuf RPCs, which fail above 4 MiB. Frames, all integers 8-byte
big-endian: the request is the round number and the incarnation of the peer's process it
is asked of (0: whichever runs); the response is a length then that many bytes: length 0
means "not yet" (this peer may still train that round, or is encoding its delta), the one
byte GONE means "never" (another incarnation is asked: it restarted; or it is past that
round without a delta: it gave the round up or took another state), so that nobody waits
for a delta that cannot come. Any other body is an encoded delta. A request for a round the
peer is still training or encoding is held until its delta is published (at most
LONG_POLL_S, then "not yet"): the delta leaves the moment it exists, instead of at the next
poll of an asker, which on a fast machine cost a good part of a short round. A stream carries
one request after another (node/streams.py KeptStreams): a peer pulls from the same peers
round after round, and a stream opened per request cost more than the request. The client never trusts the
length: it refuses one above the spec's limit before reading, bounds every wait with a
timeout, and hands the bytes to `decode_delta`, so a bad peer costs a round's contribution,
never the node.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from hivemind.p2p import P2P, PeerID

from locoswarm.node.streams import Busy, KeptStreams, PeerLimits, serve_framed
from locoswarm.protocol import DecodedDelta, DeltaSpec, MalformedMessage, decode_delta
from locoswarm.protocol.framing import HEADER

PROTOCOL = "locoswarm/delta/4"
REQUEST_LEN = 16
"""Round and incarnation, 8 bytes each."""
_ROUNDS_KEPT = 2
GONE = b"\x00"
"""The answer for a round whose delta this peer will never serve (a delta is never one byte)."""
LONG_POLL_S = 1.0
"""Longest a request for a pending round is held before "not yet" (below node/rounds.py's
LIVENESS_S, so a probed peer's answer arrives within the probe's bound)."""
MAX_SENDS_PER_ROUND = 6
"""A peer is sent one round's delta at most this many times: an honest puller asks once, and
again after each stream cut inside the delta (node/pull.py STREAM_RETRY_S allows five). One
identity asking in a loop then costs a few deltas a round, not its request rate's worth."""
KEPT_IDLE_S = 30.0
"""A puller closes a stream it has not asked on for this long (a peer pulled from every
round asks again within a round; the server gives up on it after twice this)."""


class DeltaUnavailable(Exception):
    """The peer has no delta for that round yet: it is still training it."""


class DeltaGone(Exception):
    """The peer will never serve a delta for that round (not training it: restarted, gave it
    up, or past it)."""


class DeltaServer:
    """Serves this peer's encoded deltas of the last few rounds."""

    def __init__(self, p2p: P2P, *, incarnation: int = 0, request_timeout_s: float = 10.0,
                 admit: Callable[[str], bool] | None = None, protocol: str = PROTOCOL) -> None:
        """`incarnation`: this process's (PeerRecord.incarnation); `admit(peer_id)`: whether
        to serve that peer at all (a private run's policy); `protocol`: the stream protocol
        served (node/tree.py serves its rows' aggregates with a second server)."""
        self.p2p = p2p
        self.protocol = protocol
        self.incarnation = incarnation
        self.admit = admit
        self.request_timeout_s = request_timeout_s
        self._deltas: dict[int, bytes] = {}
        self._pending: set[int] = set()
        """Rounds this process trains, or ended and has not published or given up yet."""
        self._floor = 0
        """The lowest round this process may still train: below it, a round not pending is gone."""
        self._given_up: set[int] = set()
        self._stopping = False
        self._ready: dict[int, asyncio.Event] = {}
        """round → set when its delta is published or given up (wakes held requests)."""
        self.limits = PeerLimits(max_concurrent=2, rate=10.0, burst=30)
        """A peer pulls one delta a round, asking again at most 4 times a second while it is not ready."""
        self.bytes_sent = 0
        """Bytes of deltas written to streams (headers included)."""
        self._sends: dict[tuple[str, int], int] = {}
        """(peer, round) → times that round's delta was sent to that peer."""

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(self.protocol, self.rpc_get_delta)

    def training(self, round_: int) -> None:
        """This peer starts training `round_`: its delta is "not yet" until published or given up."""
        self._pending.add(round_)
        self._ready.setdefault(round_, asyncio.Event())
        self._floor = max(self._floor, round_)
        self._given_up = {r for r in self._given_up if r >= round_ - _ROUNDS_KEPT}
        for old in [r for r in self._ready if r < round_ - _ROUNDS_KEPT]:
            self._wake(old)  # never published nor given up (a state taken meanwhile): let held requests go

    def give_up(self, round_: int) -> None:
        """No delta of `round_` will come from this peer (discarded, withdrawn, or its state replaced)."""
        self._pending.discard(round_)
        self._given_up.add(round_)
        self._wake(round_)

    def _wake(self, round_: int) -> None:
        event = self._ready.pop(round_, None)
        if event is not None:
            event.set()

    def publish(self, round_: int, blob: bytes) -> None:
        """Serve `blob` as this peer's delta of `round_`; forget rounds older than the last few."""
        self._deltas[round_] = blob
        self._pending.discard(round_)
        self._wake(round_)
        for old in [r for r in self._deltas if r <= round_ - _ROUNDS_KEPT]:
            del self._deltas[old]
        self._sends = {key: n for key, n in self._sends.items() if key[1] > round_ - _ROUNDS_KEPT}

    def answer(self, round_: int, incarnation: int = 0) -> bytes:
        """The response body for a request of `round_`'s delta from `incarnation` (0: any)."""
        if incarnation not in (0, self.incarnation):
            return GONE  # asked of an earlier life of this peer: what it promised died with it
        if round_ in self._deltas:
            return self._deltas[round_]
        if round_ in self._pending or (round_ >= self._floor and round_ not in self._given_up):
            return b""
        return GONE

    async def respond(self, round_: int, incarnation: int = 0, hold_s: float = LONG_POLL_S) -> bytes:
        """`answer`, holding a "not yet" for a round this peer trains until its delta is
        published or given up, or `hold_s` passed."""
        body = self.answer(round_, incarnation)
        event = self._ready.get(round_)
        if body == b"" and event is not None and not self._stopping:
            try:
                await asyncio.wait_for(event.wait(), hold_s)
            except asyncio.TimeoutError:
                pass
            body = self.answer(round_, incarnation)
        return body

    async def respond_to(self, peer: str, request: bytes) -> bytes:
        """The answer to `peer`'s `request`; Busy once it was sent that round's delta
        MAX_SENDS_PER_ROUND times."""
        round_ = int.from_bytes(request[:8], "big")
        body = await self.respond(round_, int.from_bytes(request[8:], "big"))
        if len(body) > len(GONE):
            sent = self._sends.get((peer, round_), 0)
            if sent >= MAX_SENDS_PER_ROUND:
                raise Busy(f"round {round_}'s delta was sent to it {sent} times already")
            self._sends[(peer, round_)] = sent + 1
        return body

    def stop(self) -> None:
        """Leaving: answer every held request now ("not yet" for what was not published), so
        that none is still waiting when p2pd shuts down and cancels its handler."""
        self._stopping = True
        for round_ in list(self._ready):
            self._wake(round_)

    async def rpc_get_delta(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def count(sent: int) -> None:
            # Counted as each answer goes (not `self.bytes_sent += await …`, which reads the
            # counter before the await: requests held for one round end together).
            self.bytes_sent += sent

        peer = str(getattr(info, "peer_id", "?"))
        try:
            await serve_framed(
                info, reader, writer, request_len=REQUEST_LEN, timeout_s=self.request_timeout_s, what="delta",
                limits=self.limits, admit=self.admit, idle_s=2 * KEPT_IDLE_S, sent=count,
                answer=lambda request: self.respond_to(peer, request))
        except asyncio.CancelledError:
            # p2pd shut down under a held request: the asker sees its stream close and asks
            # again or drops us; nothing here is left to clean up.
            writer.close()


def delta_streams(p2p: P2P, protocol: str = PROTOCOL) -> KeptStreams:
    """The kept streams a puller asks for deltas (or, on node/tree.py's protocol, rows' aggregates) on."""
    return KeptStreams(p2p, protocol, idle_s=KEPT_IDLE_S)


async def call_get_delta(streams: KeptStreams, peer_id: PeerID, round_: int, spec: DeltaSpec, *, timeout_s: float,
                         incarnation: int = 0) -> DecodedDelta:
    """Pull `peer_id`'s delta of `round_` from its process of `incarnation` (0: whichever
    runs) and validate it against `spec`.

    Raises DeltaUnavailable when the peer has none yet, DeltaGone when it will have none,
    asyncio.TimeoutError when any step takes
    longer than `timeout_s`, a ProtocolError when the bytes are bad (including a delta of
    another round)."""

    request = round_.to_bytes(HEADER, "big") + incarnation.to_bytes(8, "big")
    blob = await streams.call(peer_id, request, limit=spec.max_message_bytes, limit_name="the spec's limit",
                              timeout_s=timeout_s)
    if blob is None:
        raise DeltaUnavailable(f"peer {peer_id} has no delta for round {round_} yet")
    if blob == GONE:
        raise DeltaGone(f"peer {peer_id} will serve no delta for round {round_}")
    delta = decode_delta(blob, spec)
    if delta.round != round_:
        raise MalformedMessage(f"peer {peer_id} answered round {round_} with a delta of round {delta.round}")
    return delta
