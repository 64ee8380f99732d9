"""The delta exchange on py-libp2p: serve this peer's deltas and pull others', on the very
protocol hivemind peers speak (protocol/deltabook.py says what is asked and answered,
node/exchange.py is the p2pd side). A request for a round this peer still trains is held
until its delta is published, as there.
"""

from __future__ import annotations

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID

from locoswarm.net.framed import KeptStreams, Refused, serve_framed
from locoswarm.protocol import DecodedDelta, DeltaSpec
from locoswarm.protocol.admission import PeerLimits
from locoswarm.protocol.deltabook import (LONG_POLL_S, PROTOCOL, REQUEST_LEN, DeltaBook, DeltaGone, DeltaUnavailable,
                                          TooManySends, delta_of, encode_request, parse_request)

__all__ = ["DeltaGone", "DeltaServer", "DeltaUnavailable", "call_get_delta", "delta_streams"]


class DeltaServer:
    """Serves this peer's encoded deltas of the last few rounds on `host`."""

    def __init__(self, host: IHost, *, incarnation: int = 0, protocol: str = PROTOCOL,
                 request_timeout_s: float = 10.0, hold_s: float = LONG_POLL_S) -> None:
        self.host, self.protocol = host, protocol
        self.book = DeltaBook(trio.Event, incarnation=incarnation)
        self.request_timeout_s, self.hold_s = request_timeout_s, hold_s
        self.limits = PeerLimits(max_concurrent=2, rate=10.0, burst=30)
        """As the p2pd side's: a peer pulls one delta a round, asking again a few times a second at most."""
        self.bytes_sent = 0
        self.training = self.book.training
        self.give_up = self.book.give_up
        self.publish = self.book.publish
        self.stop = self.book.stop

    def start(self) -> None:
        def count(sent: int) -> None:
            self.bytes_sent += sent

        serve_framed(self.host, self.protocol, self.respond_to, request_len=REQUEST_LEN, what="delta",
                     limits=self.limits, timeout_s=self.request_timeout_s, sent=count)

    async def respond_to(self, peer: str, request: bytes) -> bytes:
        """The answer to `peer`'s request; a "not yet" held until the round's delta is
        published or given up, or `hold_s` passed. Refused once that round's delta went to
        the peer MAX_SENDS_PER_ROUND times."""
        round_, incarnation = parse_request(request)
        body = self.book.answer(round_, incarnation)
        waiter = self.book.waiter(round_, body)
        if waiter is not None:
            with trio.move_on_after(self.hold_s):
                await waiter.wait()
            body = self.book.answer(round_, incarnation)
        try:
            self.book.sent(peer, round_, body)
        except TooManySends as e:
            raise Refused(str(e)) from None
        return body


def delta_streams(host: IHost, protocol: str = PROTOCOL) -> KeptStreams:
    return KeptStreams(host, protocol)


async def call_get_delta(streams: KeptStreams, peer: ID, round_: int, spec: DeltaSpec, *, timeout_s: float,
                         incarnation: int = 0) -> DecodedDelta:
    """`peer`'s delta of `round_` from its process of `incarnation` (0: whichever runs),
    validated against `spec`. Raises DeltaUnavailable ("not yet"), DeltaGone ("never"),
    TimeoutError after `timeout_s`, a ProtocolError for bad bytes (a delta of another
    round included), ConnectionResetError or py-libp2p's errors when the stream fails."""
    blob = await streams.call(peer, encode_request(round_, incarnation), limit=spec.max_message_bytes,
                              limit_name="the spec's limit", timeout_s=timeout_s)
    return delta_of(blob, peer, round_, spec)
