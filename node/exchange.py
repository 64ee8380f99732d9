"""Delta exchange over libp2p binary streams (hivemind's p2pd, the one sidecar we accept).

A peer serves its encoded delta of a round; others pull it by round number. Deltas travel
over streams, not protobuf RPCs, which fail above 4 MiB. What a request and its answer are
("not yet", GONE, or the delta; a request for a pending round held until the delta is
published) is protocol/deltabook.py's, shared with the py-libp2p peer. A stream carries
one request after another (node/streams.py KeptStreams): a peer pulls from the same peers
round after round, and a stream opened per request cost more than the request. The client
never trusts the length: it refuses one above the spec's limit before reading, bounds every
wait with a timeout, and hands the bytes to `decode_delta`, so a bad peer costs a round's
contribution, never the node.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Callable

from locoswarm.node.streams import Busy, KeptStreams, PeerLimits, serve_framed
from locoswarm.protocol import DecodedDelta, DeltaSpec
from locoswarm.protocol.deltabook import (GONE, LONG_POLL_S, MAX_SENDS_PER_ROUND, PROTOCOL, REQUEST_LEN, DeltaBook,
                                          DeltaGone, DeltaUnavailable, TooManySends, delta_of, encode_request,
                                          parse_request)

if TYPE_CHECKING:
    from hivemind.p2p import P2P, PeerID

__all__ = ["GONE", "LONG_POLL_S", "MAX_SENDS_PER_ROUND", "PROTOCOL", "REQUEST_LEN", "DeltaGone", "DeltaServer",
           "DeltaUnavailable", "call_get_delta", "delta_streams"]
KEPT_IDLE_S = 30.0
"""A puller closes a stream it has not asked on for this long (a peer pulled from every
round asks again within a round; the server gives up on it after twice this)."""


class DeltaServer:
    """Serves this peer's encoded deltas of the last few rounds on p2pd: what it answers is
    protocol/deltabook.py's; on py-libp2p the same server runs over net/bridge.py."""

    def __init__(self, p2p: P2P, *, incarnation: int = 0, request_timeout_s: float = 10.0,
                 admit: Callable[[str], bool] | None = None, protocol: str = PROTOCOL) -> None:
        """`incarnation`: this process's (PeerRecord.incarnation); `admit(peer_id)`: whether
        to serve that peer at all (a private run's policy); `protocol`: the stream protocol
        served (node/tree.py serves its rows' aggregates with a second server)."""
        self.p2p = p2p
        self.protocol = protocol
        self.book = DeltaBook(asyncio.Event, incarnation=incarnation)
        self.admit = admit
        self.request_timeout_s = request_timeout_s
        self.limits = PeerLimits(max_concurrent=2, rate=10.0, burst=30)
        """A peer pulls one delta a round, asking again at most 4 times a second while it is not ready."""
        self.bytes_sent = 0
        """Bytes of deltas written to streams (headers included)."""
        self.training = self.book.training
        self.give_up = self.book.give_up
        self.publish = self.book.publish
        self.answer = self.book.answer

    @property
    def incarnation(self) -> int:
        return self.book.incarnation

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(self.protocol, self.rpc_get_delta)

    async def respond(self, round_: int, incarnation: int = 0, hold_s: float = LONG_POLL_S) -> bytes:
        """`answer`, holding a "not yet" for a round this peer trains until its delta is
        published or given up, or `hold_s` passed."""
        body = self.book.answer(round_, incarnation)
        waiter = self.book.waiter(round_, body)
        if waiter is not None:
            try:
                await asyncio.wait_for(waiter.wait(), hold_s)
            except asyncio.TimeoutError:
                pass
            body = self.book.answer(round_, incarnation)
        return body

    async def respond_to(self, peer: str, request: bytes) -> bytes:
        """The answer to `peer`'s `request`; Busy once it was sent that round's delta
        MAX_SENDS_PER_ROUND times."""
        round_, incarnation = parse_request(request)
        body = await self.respond(round_, incarnation)
        try:
            self.book.sent(peer, round_, body)
        except TooManySends as e:
            raise Busy(str(e)) from None
        return body

    def stop(self) -> None:
        """Leaving: answer every held request now ("not yet" for what was not published), so
        that none is still waiting when p2pd shuts down and cancels its handler."""
        self.book.stop()

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

    blob = await streams.call(peer_id, encode_request(round_, incarnation), limit=spec.max_message_bytes,
                              limit_name="the spec's limit", timeout_s=timeout_s)
    return delta_of(blob, peer_id, round_, spec)
