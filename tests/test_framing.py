"""Unit tests of the response frame (locoswarm.protocol.framing): a body round-trips, length 0
means nothing, a length above the limit is refused before the body is read, and a stream
cut before the header or inside the body raises what the caller retries on."""

from __future__ import annotations

import asyncio

import pytest

from locoswarm.protocol import MalformedMessage, OversizedMessage
from locoswarm.protocol.framing import HEADER, TruncatedBody, frame_header, read_frame


def _read(data: bytes, *, limit: int = 1 << 10) -> bytes | None:
    async def go() -> bytes | None:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await read_frame(reader, peer="p", limit=limit, limit_name="the limit")

    return asyncio.run(go())


def test_a_framed_body_reads_back_unchanged():
    body = bytes(range(256)) * 3
    assert _read(frame_header(len(body)) + body) == body


def test_a_zero_length_frame_means_nothing_here():
    assert frame_header(0) == bytes(HEADER)
    assert _read(frame_header(0)) is None


def test_a_length_above_the_limit_is_refused_before_the_body_arrives():
    with pytest.raises(OversizedMessage, match="above the limit of 100"):
        _read(frame_header(101), limit=100)  # no body follows: refusing must not wait for it


def test_a_body_cut_short_is_a_truncated_malformed_message():
    with pytest.raises(TruncatedBody, match="3 of 10") as cut:
        _read(frame_header(10) + b"abc")
    assert cut.value.partial == b"abc", "what came is kept: the rest can be asked for alone"
    assert issubclass(TruncatedBody, MalformedMessage)


def test_a_stream_cut_inside_the_header_is_a_connection_reset_not_a_protocol_fault():
    with pytest.raises(ConnectionResetError):
        _read(frame_header(10)[:5])
