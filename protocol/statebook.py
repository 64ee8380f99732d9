"""What a donor serves on the state stream (`locoswarm/state/3`), whatever carries it: the
states of its last few outer steps (a snapshot each, encoded on the first request for it), its
residual beside each, and the deltas its last outer steps screened (RoundLog), for a peer that
catches up by them. node/statesync.py serves a book over p2pd and over py-libp2p
(net/bridge.py); a transport encodes what `encoding` hands it in a worker thread, stores it with
`encoded`, then answers with `answer`.

The last _ROUNDS_KEPT rounds stay available, and an older one (at most _MAX_PINNED) while a
joiner asked for it in the last _PIN_S seconds: a joiner on a slow link takes longer than a
few rounds to download a state, and when the round it read the manifest of was dropped under
it, every retry of the download started on a newer round and was dropped again (three
attempts in a row on the fault suite's lossy links).
"""

from __future__ import annotations

import time
from typing import Callable

from torch import Tensor

from locoswarm.protocol.state import (CHUNK, LATEST, MANIFEST, RESIDUAL_CHUNK, RESIDUAL_MANIFEST, ROUND_DELTAS, Ledger,
                                      StateSpec, encode_state)

_ROUNDS_KEPT = 2
_PIN_S = 60.0
"""An older round stays served while a joiner asked for it in the last this many seconds."""
_MAX_PINNED = 2
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




def parse_state_request(request: bytes) -> tuple[int, int, int, int]:
    """(kind, round, chunk index, offset) of a state request of REQUEST_LEN bytes."""
    return (request[0], int.from_bytes(request[1:9], "big"), int.from_bytes(request[9:17], "big"),
            int.from_bytes(request[17:25], "big"))


class StateBook:
    """The states a donor serves, by round: `publish` keeps a snapshot; a request's answer
    comes from its encoding, made once per round."""

    def __init__(self, spec: StateSpec, chunk_bytes: int, *, residual_spec: StateSpec | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.spec, self.chunk_bytes, self.residual_spec, self.clock = spec, chunk_bytes, residual_spec, clock
        self._snapshots: dict[int, dict[str, Tensor]] = {}
        self._meta: dict[int, tuple[str, Ledger]] = {}
        """round → the round chain ("" unknown) and the ledger of the state served for it."""
        self._residuals: dict[int, dict[str, Tensor]] = {}
        self.states: dict[int, tuple[bytes, bytes]] = {}
        """round → (manifest, body) of its state, once encoded."""
        self.residuals: dict[int, tuple[bytes, bytes]] = {}
        """round → (manifest, body) of this peer's residual at it, once encoded."""
        self._asked: dict[int, float] = {}
        """round → when a joiner last asked for it (the clock's time)."""
        self.rounds = RoundLog()
        """The deltas of the last few outer steps, for peers catching up (node/replay.py)."""

    def publish(self, state: dict[str, Tensor], round_: int, chain: str = "", ledger: Ledger = (),
                residual: dict[str, Tensor] | None = None) -> None:
        """Serve `state` (tensors this book may keep: pass copies) as the state of `round_`,
        whose round chain is `chain` ("" unknown) and earned weight `ledger`; with it this
        peer's `residual` at that round (following `residual_spec`), None for none."""
        self._snapshots[round_] = state
        self._meta[round_] = (chain, ledger)
        self.residuals.pop(round_, None)
        if residual is not None and self.residual_spec is not None:
            self._residuals[round_] = residual
        else:
            self._residuals.pop(round_, None)
        now = self.clock()
        pinned = sorted((r for r, at in self._asked.items() if now - at < _PIN_S), reverse=True)[:_MAX_PINNED]
        for old in [r for r in self._snapshots if r <= round_ - _ROUNDS_KEPT and r not in pinned]:
            del self._snapshots[old]
            self._meta.pop(old, None)
            self.states.pop(old, None)
            self._residuals.pop(old, None)
            self.residuals.pop(old, None)
        self._asked = {r: at for r, at in self._asked.items() if r in self._snapshots}

    def newest(self) -> tuple[int, str, Ledger] | None:
        """(round, chain, ledger) of the newest state served, None before the first."""
        if not self._meta:
            return None
        round_ = max(self._meta)
        return (round_, *self._meta[round_])

    def meta(self, round_: int) -> tuple[str, Ledger]:
        return self._meta.get(round_, ("", ()))

    def resolve(self, round_: int) -> int | None:
        """The round a request for `round_` (LATEST: the newest) is about, marked asked for
        (pinned while joiners ask); None when no state is served."""
        if round_ == LATEST:
            if not self._snapshots:
                return None
            round_ = max(self._snapshots)
        if round_ in self._snapshots:
            self._asked[round_] = self.clock()
        return round_

    def encoding(self, kind: int, round_: int) -> Callable[[], tuple[bytes, bytes]] | None:
        """The work that encodes what a request of `kind` for `round_` needs (to run in a
        worker thread), None when it is encoded already or nothing is kept for it."""
        if kind in (MANIFEST, CHUNK) and round_ not in self.states and round_ in self._snapshots:
            chain, ledger = self.meta(round_)
            state = self._snapshots[round_]
            return lambda: encode_state(self.spec, state, round_, self.chunk_bytes, chain, ledger)
        if kind in (RESIDUAL_MANIFEST, RESIDUAL_CHUNK) and round_ not in self.residuals and round_ in self._residuals:
            residual = self._residuals[round_]
            return lambda: encode_state(self.residual_spec, residual, round_, self.chunk_bytes)
        return None

    def encoded(self, kind: int, round_: int, value: tuple[bytes, bytes]) -> None:
        """Keep what `encoding(kind, round_)` made, while the round is still served."""
        if kind in (MANIFEST, CHUNK) and round_ in self._snapshots:
            self.states[round_] = value
        elif kind in (RESIDUAL_MANIFEST, RESIDUAL_CHUNK) and round_ in self._residuals:
            self.residuals[round_] = value

    def answer(self, kind: int, round_: int, index: int, offset: int) -> bytes:
        """The answer to a request from what is encoded; b"" ("not available") otherwise."""
        if kind == ROUND_DELTAS:
            return self.rounds.answer(round_, index)
        found = (self.states if kind in (MANIFEST, CHUNK) else
                 self.residuals if kind in (RESIDUAL_MANIFEST, RESIDUAL_CHUNK) else {}).get(round_)
        if found is None:
            return b""
        manifest, body = found
        if kind in (MANIFEST, RESIDUAL_MANIFEST):
            return manifest
        if offset < self.chunk_bytes:
            return body[index * self.chunk_bytes + offset : (index + 1) * self.chunk_bytes]
        return b""
