"""Serving the outer state to joining peers, over libp2p binary streams (see
protocol/state.py); node/statedownload.py is the joiner's side.

A donor serves the manifest and chunks of its last few outer states, encoding each round's
state at most once (on the first request for it), and beside each its own residual of that
round (protocol/state.py), which a joiner takes to start where the donor's replica did.

Beside them it serves the delta messages its last few outer steps screened (node/replay.py
RoundLog), for a peer that catches up by the rounds' deltas instead of a state.

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
import time
from typing import Callable

from hivemind.p2p import P2P
from torch import Tensor

from locoswarm.node.streams import ByteBudget, PeerLimits, serve_framed
from locoswarm.protocol.state import (CHUNK, LATEST, MANIFEST, PROTOCOL, REQUEST_LEN, RESIDUAL_CHUNK, RESIDUAL_MANIFEST,
                                      ROUND_DELTAS, Ledger, StateSpec, encode_state, state_digest)

__all__ = ["CHUNK", "LATEST", "MANIFEST", "PROTOCOL", "REQUEST_LEN", "RESIDUAL_CHUNK", "RESIDUAL_MANIFEST",
           "ROUND_DELTAS", "RoundLog", "StateServer", "budget_chunk"]
_ROUNDS_KEPT = 2
_PIN_S = 60.0
"""An older round stays served while a joiner asked for it in the last this many seconds."""
_MAX_PINNED = 2
log = logging.getLogger(__name__)


REPLAY_ROUNDS = 128
"""Outer steps a peer keeps the deltas of, and the most a peer catches up by deltas (further
behind, it downloads the state)."""
LOG_BYTES = 64 << 20
"""The most the kept deltas may hold; the oldest steps go first."""
MAX_DELTAS = 1 << 16
"""The most deltas one step may name (the answer's two-byte count)."""


MAX_CHUNKS = 16384
"""Chunks a state is cut into at most: their hashes keep its manifest under 1 MiB."""


def budget_chunk(chunk_bytes: int, total_bytes: int, bytes_per_s: float, max_wait_s: float) -> int:
    """The chunk size a donor serves a state of `total_bytes` in under an upload budget of
    `bytes_per_s` (0: none) whose answers wait at most `max_wait_s`: `chunk_bytes`, halved
    until one chunk takes at most half that wait at the budget's rate, so that a joiner's next
    chunk, and a manifest behind it, wait for at most two; not below 64 KiB nor below
    total_bytes / MAX_CHUNKS. With whole 4 MiB chunks, a donor at 4 Mbit/s (8 s a chunk, 5 s
    of wait allowed) refused every request once its burst was spent, manifests included, and
    its joiners gave up (2026-12-05)."""
    if bytes_per_s <= 0:
        return chunk_bytes
    least = max(64 << 10, -(-total_bytes // MAX_CHUNKS))
    size = chunk_bytes
    while size // 2 >= least and size > bytes_per_s * max_wait_s / 2:
        size //= 2
    return size


class RoundLog:
    """The delta messages each of this peer's last REPLAY_ROUNDS outer steps screened, by the
    outer step they were taken from (its own among them, unless it held it)."""

    def __init__(self, rounds: int = REPLAY_ROUNDS, max_bytes: int = LOG_BYTES) -> None:
        self.rounds, self.max_bytes = rounds, max_bytes
        self._steps: dict[int, tuple[bytes, ...]] = {}

    def keep(self, step: int, wires: list[bytes]) -> None:
        """The messages screened in the round that took outer step `step` to `step + 1`."""
        if not wires or len(wires) >= MAX_DELTAS or not all(wires):
            return
        self._steps[step] = tuple(wires)
        for old in sorted(self._steps):
            if old > step - self.rounds and self.nbytes <= self.max_bytes:
                break
            del self._steps[old]

    def clear(self) -> None:
        """This peer took another state: its kept steps are not of that state's lineage."""
        self._steps.clear()

    @property
    def nbytes(self) -> int:
        return sum(len(w) for wires in self._steps.values() for w in wires)

    def answer(self, step: int, index: int) -> bytes:
        """Message `index` of step `step`, after the step's count of messages (2 bytes);
        b"" (not available) when the step is not kept or `index` is past its count."""
        wires = self._steps.get(step)
        if wires is None or index >= len(wires):
            return b""
        return len(wires).to_bytes(2, "big") + wires[index]


class StateServer:
    """Serves the manifest and chunks of the last few states given to `publish`.

    `publish` only keeps a snapshot; it is encoded (hashing a model-sized body) in a worker
    thread on the first request for it, so publishing after every outer step costs nothing
    when nobody joins. The last `_ROUNDS_KEPT` rounds stay available, and an older one (at
    most `_MAX_PINNED`) while a joiner asked for it in the last `_PIN_S` seconds: a joiner on
    a slow link takes longer than a few rounds to download a state, and when the round it
    read the manifest of was dropped under it, every retry of the download started on a
    newer round and was dropped again (three attempts in a row on the fault suite's lossy
    links).
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
        self._residuals: dict[int, dict[str, Tensor]] = {}
        self._encoded_residuals: dict[int, tuple[bytes, bytes]] = {}
        self.request_timeout_s = request_timeout_s
        self.chunk_bytes = budget_chunk(chunk_bytes, spec.total_bytes, upload_bytes_per_s, request_timeout_s / 2)
        """`chunk_bytes`, or smaller under an upload budget (`budget_chunk`)."""
        self._snapshots: dict[int, dict[str, Tensor]] = {}
        self._meta: dict[int, tuple[str, Ledger]] = {}
        """round → the round chain ("" unknown) and the ledger of the state served for it."""
        self._encoded: dict[int, tuple[bytes, bytes]] = {}
        self._lock = asyncio.Lock()
        self._asked: dict[int, float] = {}
        """round → when a joiner last asked for it (time.monotonic)."""
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
        self.rounds = RoundLog()
        """The deltas of the last few outer steps, for peers catching up (node/replay.py)."""

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(PROTOCOL, self.rpc_get_state)

    def publish(self, state: dict[str, Tensor], round_: int, chain: str = "", ledger: Ledger = (),
                residual: dict[str, Tensor] | None = None) -> None:
        """Serve `state` (tensors this server may keep: pass copies) as the state of `round_`,
        whose round chain is `chain` ("" unknown) and earned weight `ledger`; with it this
        peer's `residual` at that round (following `residual_spec`), None for none."""
        self._snapshots[round_] = state
        self._meta[round_] = (chain, ledger)
        self._encoded_residuals.pop(round_, None)
        if residual is not None and self.residual_spec is not None:
            self._residuals[round_] = residual
        else:
            self._residuals.pop(round_, None)
        now = time.monotonic()
        pinned = sorted((r for r, at in self._asked.items() if now - at < _PIN_S), reverse=True)[:_MAX_PINNED]
        for old in [r for r in self._snapshots if r <= round_ - _ROUNDS_KEPT and r not in pinned]:
            del self._snapshots[old]
            self._meta.pop(old, None)
            self._encoded.pop(old, None)
            self._residuals.pop(old, None)
            self._encoded_residuals.pop(old, None)
        self._asked = {r: at for r, at in self._asked.items() if r in self._snapshots}

    def newest(self) -> tuple[int, str, Ledger] | None:
        """(round, chain, ledger) of the newest state served, None before the first."""
        if not self._meta:
            return None
        round_ = max(self._meta)
        return (round_, *self._meta[round_])

    async def encoded(self, round_: int) -> tuple[bytes, bytes] | None:
        """(manifest, body) of `round_`, encoding it on first use; None when not kept."""
        async with self._lock:
            if round_ not in self._encoded:
                state = self._snapshots.get(round_)
                if state is None:
                    return None
                chain, ledger = self._meta.get(round_, ("", ()))
                self._encoded[round_] = await asyncio.to_thread(encode_state, self.spec, state, round_,
                                                                self.chunk_bytes, chain, ledger)
                if self.on_encoded is not None:
                    self.on_encoded(round_, state_digest(self._encoded[round_][1], ledger))
            return self._encoded[round_]

    async def encoded_residual(self, round_: int) -> tuple[bytes, bytes] | None:
        """(manifest, body) of this peer's residual at `round_`, encoding it on first use;
        None when it serves none for that round."""
        async with self._lock:
            if round_ not in self._encoded_residuals:
                residual = self._residuals.get(round_)
                if residual is None:
                    return None
                self._encoded_residuals[round_] = await asyncio.to_thread(encode_state, self.residual_spec, residual,
                                                                          round_, self.chunk_bytes)
            return self._encoded_residuals[round_]

    async def rpc_get_state(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sent = await serve_framed(info, reader, writer, request_len=REQUEST_LEN, answer=self._answer,
                                  timeout_s=self.request_timeout_s, what="state", limits=self.limits,
                                  admit=self.admit)
        self.bytes_sent += sent  # after the await: chunks are served concurrently (see exchange.py)

    async def _answer(self, request: bytes) -> bytes:
        kind, round_ = request[0], int.from_bytes(request[1:9], "big")
        index, offset = int.from_bytes(request[9:17], "big"), int.from_bytes(request[17:], "big")
        if kind == ROUND_DELTAS:
            return await self._paid(self.rounds.answer(round_, index))
        if round_ == LATEST:
            if not self._snapshots:
                return b""
            round_ = max(self._snapshots)
        if round_ in self._snapshots:
            self._asked[round_] = time.monotonic()
        if kind in (MANIFEST, CHUNK):
            found = await self.encoded(round_)
        elif kind in (RESIDUAL_MANIFEST, RESIDUAL_CHUNK):
            found = await self.encoded_residual(round_)
        else:
            return b""
        if found is None:
            return b""
        manifest, body = found
        if kind in (MANIFEST, RESIDUAL_MANIFEST):
            answer = manifest
        elif offset < self.chunk_bytes:
            answer = body[index * self.chunk_bytes + offset : (index + 1) * self.chunk_bytes]
        else:
            return b""
        return await self._paid(answer)

    async def _paid(self, answer: bytes) -> bytes:
        """`answer`, once the upload budget has room for it."""
        if self.budget is not None and answer:
            await self.budget.take(len(answer))
        return answer
