"""hivemind's unary RPCs (p2pd's "persistent connection" calls) over py-libp2p streams, both
ways: `call_unary` asks a peer, `serve_unary` answers. One call takes one stream whose
protocol id is the call's name (e.g. DHTProtocol.rpc_find). The caller writes a delimited
PersistentConnectionRequest{callId, callUnary{peer, proto, data}}, the callee answers with the
same callId and a CallUnaryResponse holding the answer or an error, and both close the stream
(docs/protocol.md, "A unary call"; the framing is protocol/pbmessages.py's).

The caller must not half-close before the answer arrives: p2pd reads one byte after the
request to learn whether the caller went away, and on EOF it cancels the handler and never
answers. Every failure is an RpcError naming the peer and the call, never a crash.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from locoswarm.protocol.errors import ProtocolError
from locoswarm.protocol.pbmessages import decode_frame, encode_answer, encode_call
from locoswarm.protocol.pbwire import MAX_MESSAGE_SIZE, read_delimited

DEFAULT_TIMEOUT_S = 3.0
"""hivemind's DHT wait_timeout: it gives up on an answer after 3 s."""
CALL_ID_BYTES = 16

UnaryHandler = Callable[[ID, bytes], Awaitable[bytes]]
"""A served call: (the caller's peer id, the request's bytes) -> the answer's bytes. An
exception it raises goes back to the caller as the call's error (its repr, as hivemind sends)."""


class RpcError(Exception):
    """A unary call failed; the message names the peer and the call."""

    def __init__(self, peer: ID | str, proto: str, what: str) -> None:
        super().__init__(f"{proto} to {peer}: {what}")
        self.peer, self.proto = str(peer), proto


class RpcTimeout(RpcError):
    """No answer within the call's timeout."""


class RemoteError(RpcError):
    """The callee answered with an error instead of an answer."""


class BadAnswer(RpcError):
    """The callee's bytes are not a well-formed answer to this call."""


class BadAnswerBytes(ProtocolError):
    """Bytes on a unary call's stream beyond its one message."""


async def read_message(stream: INetStream, *, max_size: int = MAX_MESSAGE_SIZE) -> bytes:
    """One uvarint-delimited message from `stream`; EOFError when the stream ends first,
    OversizedMessage as soon as a length above `max_size` is announced."""
    buffer = bytearray()
    while True:
        found = read_delimited(buffer, max_size=max_size)
        if found is not None:
            message, used = found
            if used != len(buffer):  # one message per direction: anything after it is a protocol breach
                raise BadAnswerBytes(f"{len(buffer) - used} bytes after the message")
            return message
        chunk = await stream.read(max(1, min(65536, max_size + 10 - len(buffer))))
        if not chunk:
            raise EOFError(f"stream ended after {len(buffer)} bytes, inside a message")
        buffer += chunk


async def close_stream(stream: INetStream | None, *, reset: bool) -> None:
    """Closes `stream` (resets it when the exchange failed), within a second, whatever happens."""
    if stream is None:
        return
    with trio.move_on_after(1.0):  # closing must never hang a caller
        try:
            await (stream.reset() if reset else stream.close())
        except Exception:  # the stream may already be gone; nothing to tell anyone
            pass


async def call_unary(host: IHost, peer_id: ID, proto: str, request: bytes, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                     max_size: int = MAX_MESSAGE_SIZE) -> bytes:
    """The answer of `peer_id` to unary call `proto` with `request` (serialized bytes). Opens
    a stream (dialing the peer when not connected, at addresses the host's peerstore holds),
    and raises RpcTimeout, RemoteError, BadAnswer or RpcError (stream or dial failures)."""
    call_id = os.urandom(CALL_ID_BYTES)
    frame = encode_call(call_id, proto, request, peer=peer_id.to_bytes())  # OversizedMessage above max_size
    stream = None
    ok = False
    try:
        with trio.fail_after(timeout_s):
            stream = await host.new_stream(peer_id, [TProtocol(proto)])
            await stream.write(frame)
            message = await read_message(stream, max_size=max_size)
        ok = True
    except trio.TooSlowError:
        raise RpcTimeout(peer_id, proto, f"no answer within {timeout_s} s") from None
    except ProtocolError as e:
        raise BadAnswer(peer_id, proto, f"{type(e).__name__}: {e}") from None
    except Exception as e:  # dial, negotiation and stream errors of py-libp2p (many types)
        raise RpcError(peer_id, proto, f"{type(e).__name__}: {e}") from None
    finally:
        await close_stream(stream, reset=not ok)
    try:
        answer = decode_frame(message, max_size=max_size)
    except ProtocolError as e:
        raise BadAnswer(peer_id, proto, f"{type(e).__name__}: {e}") from None
    if answer.call_id != call_id or answer.unary_response is None:
        raise BadAnswer(peer_id, proto, "the answer is not for this call")
    if answer.unary_response.error is not None:
        raise RemoteError(peer_id, proto, answer.unary_response.error.decode(errors="replace")[:500])
    if answer.unary_response.response is None:
        raise BadAnswer(peer_id, proto, "the answer carries neither response nor error")
    return answer.unary_response.response


def serve_unary(host: IHost, proto: str, handler: UnaryHandler, *, timeout_s: float = 30.0,
                max_size: int = MAX_MESSAGE_SIZE) -> None:
    """Answers unary call `proto` with `handler` on every stream a peer opens for it. A
    request that cannot be read is dropped (stream reset) and the handler's exceptions go back
    as the call's error; a caller that sends nothing within `timeout_s` is cut off."""

    async def on_stream(stream: INetStream) -> None:
        caller = stream.muxed_conn.peer_id
        ok = False
        try:
            with trio.fail_after(timeout_s):
                frame = decode_frame(await read_message(stream, max_size=max_size), max_size=max_size)
            if frame.call_unary is None:
                return
            try:
                answer = encode_answer(frame.call_id, response=await handler(caller, frame.call_unary.data))
            except Exception as e:  # the handler's failure is the caller's answer, as p2pd sends it
                answer = encode_answer(frame.call_id, error=repr(e)[:1000].encode())
            await stream.write(answer)
            ok = True
        except Exception:  # a bad or silent caller (timeout, malformed frame, stream error)
            pass  # its stream is reset below; the host carries on
        finally:
            await close_stream(stream, reset=not ok)

    host.set_stream_handler(TProtocol(proto), on_stream)
