"""Delta exchange over libp2p binary streams (hivemind's p2pd, the one sidecar we accept).

A peer serves its encoded delta of a round; others pull it by round number. Deltas travel
over streams, not protobuf RPCs, which fail above 4 MiB. Frames, all integers 8-byte
big-endian: the request is the round number; the response is a length then that many
bytes, length 0 meaning "no delta for that round here". The client never trusts the
length: it refuses one above the spec's limit before reading, bounds every wait with a
timeout, and hands the bytes to `decode_delta`, so a bad peer costs a round's contribution,
never the node.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from hivemind.p2p import P2P, PeerID

from locoswarm.node.streams import PeerLimits, call_framed, serve_framed
from locoswarm.protocol import DecodedDelta, DeltaSpec, MalformedMessage, decode_delta
from locoswarm.protocol.framing import HEADER

PROTOCOL = "locoswarm/delta/1"
_ROUNDS_KEPT = 2


class DeltaUnavailable(Exception):
    """The peer has no delta for that round (yet, or any more)."""


class DeltaServer:
    """Serves this peer's encoded deltas of the last few rounds."""

    def __init__(self, p2p: P2P, *, request_timeout_s: float = 10.0,
                 admit: Callable[[str], bool] | None = None) -> None:
        """`admit(peer_id)`: whether to serve that peer at all (a private run's policy)."""
        self.p2p = p2p
        self.admit = admit
        self.request_timeout_s = request_timeout_s
        self._deltas: dict[int, bytes] = {}
        self.limits = PeerLimits(max_concurrent=2, rate=10.0, burst=30)
        """A peer pulls one delta a round, asking again at most 4 times a second while it is not ready."""
        self.bytes_sent = 0
        """Bytes of deltas written to streams (headers included)."""

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(PROTOCOL, self.rpc_get_delta)

    def publish(self, round_: int, blob: bytes) -> None:
        """Serve `blob` as this peer's delta of `round_`; forget rounds older than the last few."""
        self._deltas[round_] = blob
        for old in [r for r in self._deltas if r <= round_ - _ROUNDS_KEPT]:
            del self._deltas[old]

    async def rpc_get_delta(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.bytes_sent += await serve_framed(
            info, reader, writer, request_len=HEADER, timeout_s=self.request_timeout_s, what="delta", limits=self.limits,
            admit=self.admit,
            answer=lambda request: self._deltas.get(int.from_bytes(request, "big"), b""),
        )


async def call_get_delta(p2p: P2P, peer_id: PeerID, round_: int, spec: DeltaSpec, *, timeout_s: float) -> DecodedDelta:
    """Pull `peer_id`'s delta of `round_` and validate it against `spec`.

    Raises DeltaUnavailable when the peer has none, asyncio.TimeoutError when any step takes
    longer than `timeout_s`, a ProtocolError when the bytes are bad (including a delta of
    another round)."""

    blob = await call_framed(p2p, peer_id, PROTOCOL, round_.to_bytes(HEADER, "big"), limit=spec.max_message_bytes,
                             limit_name="the spec's limit", timeout_s=timeout_s)
    if blob is None:
        raise DeltaUnavailable(f"peer {peer_id} has no delta for round {round_}")
    delta = decode_delta(blob, spec)
    if delta.round != round_:
        raise MalformedMessage(f"peer {peer_id} answered round {round_} with a delta of round {delta.round}")
    return delta
