"""Request/response framing over libp2p binary streams (hivemind's p2pd), shared by the
delta exchange and the state download. The request is a fixed number of bytes; the
response an 8-byte big-endian length and that many bytes, length 0 meaning "nothing here".
The server bounds every wait and drops only the request that stalls; the client refuses a
declared length above its limit before reading a byte of the body, and bounds the whole
exchange with a timeout.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from hivemind.p2p import P2P, PeerID

from locoswarm.protocol import MalformedMessage, OversizedMessage

HEADER = 8
log = logging.getLogger(__name__)


async def serve_framed(
    info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
    request_len: int, answer: Callable[[bytes], bytes | Awaitable[bytes]], timeout_s: float, what: str,
) -> int:
    """Answer one request with `answer(request)` (a function or a coroutine function);
    returns the bytes written (0 if abandoned)."""
    try:
        request = await asyncio.wait_for(reader.readexactly(request_len), timeout_s)
        payload = answer(request)
        if asyncio.iscoroutine(payload):
            payload = await payload
        writer.write(len(payload).to_bytes(HEADER, "big"))
        writer.write(payload)
        await asyncio.wait_for(writer.drain(), timeout_s)
        return HEADER + len(payload)
    except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError) as e:
        # A slow or vanished client: drop this request only.
        log.info("%s request from %s abandoned: %s", what, getattr(info, "peer_id", "?"), type(e).__name__)
        return 0
    finally:
        writer.close()


async def call_framed(
    p2p: P2P, peer: PeerID, protocol: str, request: bytes, *, limit: int, limit_name: str, timeout_s: float,
) -> bytes | None:
    """Send `request` to `peer` and return the response body, None when the peer answered
    "nothing here". Raises OversizedMessage above `limit`, MalformedMessage on a cut
    stream, asyncio.TimeoutError after `timeout_s`."""

    async def go() -> bytes | None:
        _, reader, writer = await p2p.call_binary_stream_handler(peer, protocol)
        try:
            writer.write(request)
            await writer.drain()
            try:
                length = int.from_bytes(await reader.readexactly(HEADER), "big")
            except asyncio.IncompleteReadError:
                # Not a protocol fault: the peer is leaving, or its handler is gone.
                raise ConnectionResetError(f"peer {peer} closed the stream before the length header") from None
            if length == 0:
                return None
            if length > limit:
                raise OversizedMessage(f"peer {peer} announced {length} bytes, above {limit_name} of {limit}")
            try:
                return await reader.readexactly(length)
            except asyncio.IncompleteReadError as e:
                raise MalformedMessage(f"peer {peer} sent {len(e.partial)} of {length} announced bytes") from None
        finally:
            writer.close()

    return await asyncio.wait_for(go(), timeout_s)
