"""Length-prefixed response frames of the request/response byte streams that carry deltas
and state chunks (node/exchange.py, node/statesync.py).

A response is an 8-byte big-endian length and that many bytes, length 0 meaning "nothing
here". The reader refuses a declared length above its limit before reading a byte of the
body, so a peer cannot make it allocate or wait for more than the run allows. Only the
frame lives here; opening streams, timeouts and admission are the node's (node/streams.py).
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from locoswarm.protocol.errors import MalformedMessage, OversizedMessage

HEADER = 8
"""Bytes of the big-endian length that opens a response."""


class TruncatedBody(MalformedMessage):
    """The stream ended inside the announced body. A bad peer can do it on purpose, but a
    lossy link resets streams too (at 1 % packet loss a delta was cut after its header), so
    a caller may ask again before it holds it against the peer, or ask for the rest only
    (`partial` holds the bytes that came)."""

    def __init__(self, message: str, partial: bytes = b"") -> None:
        super().__init__(message)
        self.partial = partial


def frame_header(length: int) -> bytes:
    """The header announcing a body of `length` bytes (0: nothing here)."""
    return length.to_bytes(HEADER, "big")


async def read_frame(reader: asyncio.StreamReader, *, peer: object, limit: int, limit_name: str) -> bytes | None:
    """Read one response from `reader`: its body, None when `peer` announced nothing.

    Raises ConnectionResetError when the stream ends before the header (the peer is leaving
    or its handler is gone: not a protocol fault), OversizedMessage when the announced length
    is above `limit`, TruncatedBody when the stream ends inside the body."""

    async def read_exactly(n: int) -> bytes:
        try:
            return await reader.readexactly(n)
        except asyncio.IncompleteReadError as e:
            return e.partial

    return await read_frame_with(read_exactly, peer=peer, limit=limit, limit_name=limit_name)


async def read_frame_with(read_exactly: Callable[[int], Awaitable[bytes]], *, peer: object, limit: int,
                          limit_name: str) -> bytes | None:
    """`read_frame` on any stream: `read_exactly(n)` returns n bytes, or fewer where the
    stream ended (a stream read in pieces)."""
    header = await read_exactly(HEADER)
    if len(header) < HEADER:
        raise ConnectionResetError(f"peer {peer} closed the stream before the length header")
    length = int.from_bytes(header, "big")
    if length == 0:
        return None
    if length > limit:
        raise OversizedMessage(f"peer {peer} announced {length} bytes, above {limit_name} of {limit}")
    body = await read_exactly(length)
    if len(body) < length:
        raise TruncatedBody(f"peer {peer} sent {len(body)} of {length} announced bytes", body)
    return body
