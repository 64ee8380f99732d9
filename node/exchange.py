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
import logging

from hivemind.p2p import P2P, PeerID

from locoswarm.protocol import DecodedDelta, DeltaSpec, MalformedMessage, OversizedMessage, decode_delta

PROTOCOL = "locoswarm/delta/1"
_HEADER = 8
_ROUNDS_KEPT = 2
log = logging.getLogger(__name__)


class DeltaUnavailable(Exception):
    """The peer has no delta for that round (yet, or any more)."""


class DeltaServer:
    """Serves this peer's encoded deltas of the last few rounds."""

    def __init__(self, p2p: P2P, *, request_timeout_s: float = 10.0) -> None:
        self.p2p = p2p
        self.request_timeout_s = request_timeout_s
        self._deltas: dict[int, bytes] = {}
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
        try:
            request = await asyncio.wait_for(reader.readexactly(_HEADER), self.request_timeout_s)
            blob = self._deltas.get(int.from_bytes(request, "big"), b"")
            writer.write(len(blob).to_bytes(_HEADER, "big"))
            writer.write(blob)
            await asyncio.wait_for(writer.drain(), self.request_timeout_s)
            self.bytes_sent += _HEADER + len(blob)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError) as e:
            # A slow or vanished client: drop this request only.
            log.info("delta request from %s abandoned: %s", getattr(info, "peer_id", "?"), type(e).__name__)
        finally:
            writer.close()


async def call_get_delta(p2p: P2P, peer_id: PeerID, round_: int, spec: DeltaSpec, *, timeout_s: float) -> DecodedDelta:
    """Pull `peer_id`'s delta of `round_` and validate it against `spec`.

    Raises DeltaUnavailable when the peer has none, asyncio.TimeoutError when any step takes
    longer than `timeout_s`, a ProtocolError when the bytes are bad (including a delta of
    another round)."""

    async def pull() -> bytes:
        _, reader, writer = await p2p.call_binary_stream_handler(peer_id, PROTOCOL)
        try:
            writer.write(round_.to_bytes(_HEADER, "big"))
            await writer.drain()
            try:
                length = int.from_bytes(await reader.readexactly(_HEADER), "big")
            except asyncio.IncompleteReadError:
                raise MalformedMessage(f"peer {peer_id} closed the stream before the length header") from None
            if length == 0:
                raise DeltaUnavailable(f"peer {peer_id} has no delta for round {round_}")
            if length > spec.max_message_bytes:
                raise OversizedMessage(
                    f"peer {peer_id} announced {length} bytes, above the spec's limit of {spec.max_message_bytes}"
                )
            try:
                return await reader.readexactly(length)
            except asyncio.IncompleteReadError as e:
                raise MalformedMessage(f"peer {peer_id} sent {len(e.partial)} of {length} announced bytes") from None
        finally:
            writer.close()

    blob = await asyncio.wait_for(pull(), timeout_s)
    delta = decode_delta(blob, spec)
    if delta.round != round_:
        raise MalformedMessage(f"peer {peer_id} answered round {round_} with a delta of round {delta.round}")
    return delta
