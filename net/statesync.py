"""The outer state on py-libp2p: `StateServer` serves this peer's states as a donor on
`locoswarm/state/3` (protocol/statebook.py says what it keeps and answers, as
node/statesync.py's donor on p2pd does), and `download_state` is a joiner's download from
donors of either kind, by node/statedownload.py's rules (protocol/statepull.py `pick_manifest`,
`ChunkPull`): a target round and chain, an attester's state, or the newest state at least
AGREEING of MANIFEST_DONORS donors show; its chunks from every donor that shows it, each
checked against the manifest's SHA-256; a chunk cut mid-body asked again for its rest only; a
donor that fails DONOR_FAILURES times (or cuts DONOR_CUTS chunks in a row) dropped, its chunks
going to the others; a donor's residual alongside; a retry that keeps the verified chunks.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from torch import Tensor

from locoswarm.net.framed import KeptStreams, Refused, serve_framed
from locoswarm.protocol.admission import Busy, ByteBudget, PeerLimits
from locoswarm.protocol.errors import MalformedMessage
from locoswarm.protocol.state import (CHUNK, LATEST, MANIFEST, PROTOCOL, REQUEST_LEN, RESIDUAL_CHUNK,
                                      RESIDUAL_MANIFEST, ROUND_DELTAS, Ledger, Manifest, StateAssembler, StateSpec,
                                      decode_manifest, encode_state_request)
from locoswarm.protocol.statepull import (MANIFEST_DONORS, ChunkPull, StateUnavailable, pick_manifest, pull_chunks,
                                          serving, take_residual)
from locoswarm.protocol.statebook import StateBook, budget_chunk, parse_state_request

__all__ = ["Downloaded", "StateServer", "StateUnavailable", "download_state", "fetch_manifest", "fetch_residual"]
log = logging.getLogger(__name__)
MANIFEST_LIMIT = 1 << 20


class StateServer:
    """Serves this peer's last few states (and residuals, and the deltas of its last outer
    steps) on `host`; `publish` keeps a snapshot, encoded in a worker thread on the first
    request for its round."""

    def __init__(self, host: IHost, spec: StateSpec, *, chunk_bytes: int = 4 << 20,
                 residual_spec: StateSpec | None = None, request_timeout_s: float = 10.0,
                 upload_bytes_per_s: float = 0.0) -> None:
        """`upload_bytes_per_s`: what serving states may send a second, all joiners together
        (0: no budget), as on p2pd (node/statesync.py): a chunk waits for it up to half
        `request_timeout_s`, then is refused (the joiner asks again, or another donor), and the
        state is cut into chunks small enough for that wait (protocol/statebook.py `budget_chunk`)."""
        self.host, self.request_timeout_s = host, request_timeout_s
        self.chunk_bytes = budget_chunk(chunk_bytes, spec.total_bytes, upload_bytes_per_s, request_timeout_s / 2)
        self.book = StateBook(spec, self.chunk_bytes, residual_spec=residual_spec)
        self.limits = PeerLimits(max_concurrent=2, rate=50.0, burst=100)
        """As the p2pd donor's: a joiner asks one chunk at a time."""
        self.budget = (ByteBudget(upload_bytes_per_s, burst_bytes=2 * self.chunk_bytes,
                                  max_wait_s=request_timeout_s / 2) if upload_bytes_per_s > 0 else None)
        """Bytes a second for all joiners together, however many identities ask."""
        self.bytes_sent = 0
        self.publish = self.book.publish
        self._lock = trio.Lock()

    def start(self) -> None:
        def count(sent: int) -> None:
            self.bytes_sent += sent

        serve_framed(self.host, PROTOCOL, self._answer, request_len=REQUEST_LEN, what="state", limits=self.limits,
                     timeout_s=self.request_timeout_s, sent=count)

    async def _answer(self, peer: str, request: bytes) -> bytes:
        kind, round_, index, offset = parse_state_request(request)
        if kind != ROUND_DELTAS:
            round_ = self.book.resolve(round_)
            if round_ is None:
                return b""
            async with self._lock:
                work = self.book.encoding(kind, round_)
                if work is not None:
                    self.book.encoded(kind, round_, await trio.to_thread.run_sync(work))
        answer = self.book.answer(kind, round_, index, offset)
        if self.budget is not None and answer:
            try:
                wait = self.budget.reserve(len(answer))
            except Busy as e:
                raise Refused(str(e)) from None
            await trio.sleep(wait)
        return answer


class Downloaded(NamedTuple):
    round: int
    tensors: dict[str, Tensor]
    digest: str
    """state_digest of the body and ledger: what the donors report serving."""
    chain: str
    ledger: Ledger
    donors: tuple[str, ...]
    """The donors whose chunks made it (every one that showed the chosen state)."""
    residual: dict[str, Tensor] | None = None
    """One donor's residual at that round (float32 tensors), None when none was asked or none came."""


async def fetch_manifest(streams: KeptStreams, peer: ID, spec: StateSpec, timeout_s: float, round_: int = LATEST,
                         kind: int = MANIFEST) -> Manifest | None:
    """`peer`'s manifest (`kind`: of its state, or of its residual) of `round_` (LATEST: its newest);
    None (logged) when it serves none or a bad one."""
    try:
        body = await streams.call(peer, encode_state_request(kind, round_, 0), limit=MANIFEST_LIMIT,
                                  limit_name="the manifest limit", timeout_s=timeout_s)
        if body is None:
            raise MalformedMessage("it has no state to serve")
        return decode_manifest(body, spec)
    except Exception as e:  # whatever a donor does wrong, it is skipped, never fatal
        log.warning("donor %s skipped: %s: %s", peer, type(e).__name__, e)
        return None


async def _manifests(streams: KeptStreams, peers: list[ID], spec: StateSpec, timeout_s: float,
                     round_: int = LATEST) -> dict[ID, Manifest]:
    """The manifests of `peers` that came, asked at once."""
    found: dict[ID, Manifest] = {}

    async def ask(peer: ID) -> None:
        manifest = await fetch_manifest(streams, peer, spec, timeout_s, round_)
        if manifest is not None:
            found[peer] = manifest

    async with trio.open_nursery() as nursery:
        for peer in peers:
            nursery.start_soon(ask, peer)
    return found


async def download_state(host: IHost, donors: list[ID], spec: StateSpec, *, timeout_s: float = 30.0,
                         attesters: frozenset[str] = frozenset(), target: tuple[int, str] | None = None,
                         residual_spec: StateSpec | None = None, kept: dict | None = None) -> Downloaded:
    """The state of `donors` a joiner takes, as node/statedownload.py takes it on p2pd (the
    rules are protocol/statepull.py's `pick_manifest`): with a `target` (round, chain: what a
    majority of earned weight attests) only that round and chain; else with `attesters` (peer
    ids) the newest state an attester among `donors` shows, the others asked for its round to
    serve chunks too; else the newest state at least AGREEING of the first MANIFEST_DONORS show.
    Its chunks come from every donor that shows it, each checked against the manifest. With
    `residual_spec`, one donor's residual of that round too, alongside. `kept`: a dict passed to
    every attempt of one download: the chunks an attempt verified stay there, and an attempt
    that chooses the same manifest asks only for the rest. StateUnavailable says why none came."""
    streams = KeptStreams(host, PROTOCOL)
    try:
        trusted = [p for p in donors if str(p) in attesters]
        asked = trusted + [p for p in donors if p not in trusted][:MANIFEST_DONORS]
        found = await _manifests(streams, asked, spec, timeout_s, LATEST if target is None else target[0])
        chosen = pick_manifest(found, asked=len(asked), trusted=trusted if attesters else None, target=target)
        if target is None and attesters:  # the others may show a newer round: asked for the chosen one's
            behind = [p for p, m in found.items() if m.round != chosen.round]
            found.update(await _manifests(streams, behind, spec, timeout_s, chosen.round))
        pool = serving(found, chosen)
        if kept is not None and kept.get("manifest") == chosen:
            asm = kept["assembler"]
        else:
            asm = StateAssembler(spec, chosen)
            if kept is not None:
                kept.update(manifest=chosen, assembler=asm)
        residual: list = []
        async with trio.open_nursery() as nursery:
            # The residual comes from one donor while the chunks come from all: the join waits
            # for the slower of the two, not for both one after the other.
            if residual_spec is not None:
                async def take_residual() -> None:
                    residual.append(await fetch_residual(streams, pool, residual_spec, chosen.round, timeout_s))
                nursery.start_soon(take_residual)
            await _pull(streams, pool, asm, CHUNK, timeout_s)
            if asm.missing():
                nursery.cancel_scope.cancel()  # no state: its residual is not wanted either
        if asm.missing():
            raise StateUnavailable(f"no donor delivered chunk {asm.missing()[0]} of {len(chosen.chunks)}")
        tensors = asm.finish()
        return Downloaded(chosen.round, tensors, asm.digest(), chosen.chain, chosen.ledger,
                          tuple(str(p) for p in pool), residual[0] if residual else None)
    finally:
        await streams.close()


async def fetch_residual(streams: KeptStreams, pool: list[ID], spec: StateSpec, round_: int,
                         timeout_s: float) -> dict[str, Tensor] | None:
    """One donor's residual at `round_` (protocol/statepull.py `take_residual`), None when none came."""
    async def manifest_of(peer: ID) -> Manifest | None:
        return await fetch_manifest(streams, peer, spec, timeout_s, round_, kind=RESIDUAL_MANIFEST)

    async def pull(peer: ID, asm: StateAssembler) -> None:
        await _pull(streams, [peer], asm, RESIDUAL_CHUNK, timeout_s)

    return await take_residual(pool, spec, round_, manifest_of, pull)


async def _pull(streams: KeptStreams, pool: list[ID], asm: StateAssembler, kind: int, timeout_s: float) -> None:
    """Fill `asm` with chunks (request `kind`) of its manifest's round from the donors of `pool`,
    one request in flight per donor, from one shared queue (protocol/statepull.py `ChunkPull`,
    `pull_chunks`); what is missing when every donor gave up stays missing."""
    round_, chunk_bytes = asm.manifest.round, asm.manifest.chunk_bytes
    pull = ChunkPull(asm)

    def asker(peer: ID):
        async def ask_chunk(index: int, offset: int) -> bytes:
            rest = await streams.call(peer, encode_state_request(kind, round_, index, offset),
                                      limit=chunk_bytes - offset, limit_name="the chunk size", timeout_s=timeout_s)
            if rest is None:
                raise MalformedMessage(f"it has nothing for chunk {index} of round {round_}")
            return rest
        return ask_chunk

    async with trio.open_nursery() as nursery:
        for peer in pool:
            nursery.start_soon(pull_chunks, pull, peer, asker(peer), trio.sleep)
