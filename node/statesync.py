"""Serving the outer state to joining peers, over libp2p binary streams (see
protocol/state.py); node/statedownload.py is the joiner's side.

A donor serves the manifest and chunks of its last few outer states, encoding each round's
state at most once (on the first request for it), and beside each its own residual of that
round (protocol/state.py), which a joiner takes to start where the donor's replica did.
Beside them it serves the delta messages its last few outer steps screened (RoundLog), for a
peer that catches up by the rounds' deltas instead of a state. What is kept and answered is
protocol/statebook.py's. A py-libp2p peer runs this module too, over net/bridge.py.

Frames, integers big-endian: the request is a kind byte (0 manifest, 1 chunk, 2 residual
manifest, 3 residual chunk, 4 a round's delta), an 8-byte round (all ones: the newest; for
kind 4 the outer step the round was taken from), an 8-byte chunk index (kind 4: the
delta's index) and an 8-byte offset into the chunk; the response an 8-byte length and that
many bytes, length 0 meaning "not available" (a donor of an older release answers so for
kinds 2 to 4). Kind 4's answer is the step's count of deltas (2 bytes), then the message.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Callable

from locoswarm.node.streams import ByteBudget, PeerLimits, serve_framed
from locoswarm.protocol.state import (CHUNK, LATEST, MANIFEST, PROTOCOL, REQUEST_LEN, RESIDUAL_CHUNK, RESIDUAL_MANIFEST,
                                      ROUND_DELTAS, StateSpec, state_digest)
from locoswarm.protocol.statebook import (LOG_BYTES, MAX_CHUNKS, MAX_DELTAS, REPLAY_ROUNDS, RoundLog, StateBook,
                                          budget_chunk, parse_state_request)

if TYPE_CHECKING:
    from hivemind.p2p import P2P

__all__ = ["CHUNK", "LATEST", "LOG_BYTES", "MANIFEST", "MAX_CHUNKS", "MAX_DELTAS", "PROTOCOL", "REPLAY_ROUNDS",
           "REQUEST_LEN", "RESIDUAL_CHUNK", "RESIDUAL_MANIFEST", "ROUND_DELTAS", "RoundLog", "StateServer",
           "budget_chunk"]
log = logging.getLogger(__name__)


class StateServer:
    """Serves the manifest and chunks of the last few states given to `publish` on p2pd.

    `publish` only keeps a snapshot; it is encoded (hashing a model-sized body) in a worker
    thread on the first request for it, so publishing after every outer step costs nothing
    when nobody joins (protocol/statebook.py says what stays served).
    """

    def __init__(self, p2p: P2P, spec: StateSpec, *, request_timeout_s: float = 10.0,
                 chunk_bytes: int = 4 << 20, admit: Callable[[str], bool] | None = None,
                 upload_bytes_per_s: float = 0.0, residual_spec: StateSpec | None = None) -> None:
        """`upload_bytes_per_s`: what serving states may send a second, all joiners
        together (0: no budget); a chunk waits for it up to half `request_timeout_s`, then
        is refused (the joiner asks again, or another donor). `residual_spec`: the layout
        of the residuals given to `publish` (None: none is served)."""
        self.p2p = p2p
        self.admit = admit
        """Whether to serve a peer id at all (a private run's policy); None: everyone."""
        self.spec = spec
        self.residual_spec = residual_spec
        self.request_timeout_s = request_timeout_s
        self.chunk_bytes = budget_chunk(chunk_bytes, spec.total_bytes, upload_bytes_per_s, request_timeout_s / 2)
        """`chunk_bytes`, or smaller under an upload budget (`budget_chunk`)."""
        self.book = StateBook(spec, self.chunk_bytes, residual_spec=residual_spec)
        self.rounds = self.book.rounds
        """The deltas of the last few outer steps, for peers catching up (node/replay.py)."""
        self._lock = asyncio.Lock()
        self.limits = PeerLimits(max_concurrent=2, rate=50.0, burst=100)
        """A joiner asks one chunk at a time: 50 chunks of 4 MiB a second is 200 MiB/s."""
        self.budget = (ByteBudget(upload_bytes_per_s, burst_bytes=2 * self.chunk_bytes,
                                  max_wait_s=request_timeout_s / 2)
                       if upload_bytes_per_s > 0 else None)
        """Bytes a second for all joiners together: three identities flooding chunks took 5.4 GB
        in 30 s off one peer before there was one (issue 19), however many identities ask."""
        self.bytes_sent = 0
        """Bytes written to state streams (headers included)."""
        self.on_encoded: Callable[[int, str], None] | None = None
        """Called with (round, its state_digest) when a round's state is first encoded."""
        self.publish = self.book.publish
        self.newest = self.book.newest

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(PROTOCOL, self.rpc_get_state)

    async def _encode(self, kind: int, round_: int) -> None:
        """Encode what a request of `kind` for `round_` needs, once, in a worker thread."""
        async with self._lock:
            work = self.book.encoding(kind, round_)
            if work is None:
                return
            value = await asyncio.to_thread(work)
            self.book.encoded(kind, round_, value)
            if kind in (MANIFEST, CHUNK) and self.on_encoded is not None:
                self.on_encoded(round_, state_digest(value[1], self.book.meta(round_)[1]))

    async def encoded(self, round_: int) -> tuple[bytes, bytes] | None:
        """(manifest, body) of `round_`, encoding it on first use; None when not kept."""
        await self._encode(MANIFEST, round_)
        return self.book.states.get(round_)

    async def rpc_get_state(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sent = await serve_framed(info, reader, writer, request_len=REQUEST_LEN, answer=self._answer,
                                  timeout_s=self.request_timeout_s, what="state", limits=self.limits,
                                  admit=self.admit)
        self.bytes_sent += sent  # after the await: chunks are served concurrently (see exchange.py)

    async def _answer(self, request: bytes) -> bytes:
        kind, round_, index, offset = parse_state_request(request)
        if kind != ROUND_DELTAS:
            round_ = self.book.resolve(round_)
            if round_ is None:
                return b""
            await self._encode(kind, round_)
        return await self._paid(self.book.answer(kind, round_, index, offset))

    async def _paid(self, answer: bytes) -> bytes:
        """`answer`, once the upload budget has room for it."""
        if self.budget is not None and answer:
            await self.budget.take(len(answer))
        return answer
