"""The joiner's side of the state download (node/statesync.py serves it).

A joiner asks up to MANIFEST_DONORS donors for their manifests at once, keeps those valid
for its run spec, and takes the newest state that at least two of them agree on (by digest;
the newest single one when no two agree, as with one donor): one donor lying about a newer
round cannot pick the state alone. It then pulls chunks from every donor of that digest in
parallel, one request in flight per donor, from one shared queue. A chunk whose stream is
cut inside the body is resumed where it stopped (from any donor of the digest); with
attesters (a joiner that knows no earned weight yet: node/catchup.py), the state is the one
an attester's manifest shows, whatever the others agree on, and the others only serve its
chunks; with a target (a peer with a ledger: the round and chain a majority of earned weight
attests), only manifests of that round and chain are taken. A chunk that fails, times out
or does not match its hash goes back to the queue for another donor; a donor that fails
DONOR_FAILURES times (or cuts DONOR_CUTS streams in a row) is dropped from the download.

With it the joiner takes one donor's residual of that round (protocol/state.py), whole, from
the first donor of the state that serves one (RESIDUAL_DONORS tried): a peer that took a state
with an empty residual restarts at the outer state, where every other replica restarts ahead
by its unsent progress, and its first deltas failed the swarm's checks (docs/trust.md).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import TYPE_CHECKING, Callable, NamedTuple

from torch import Tensor

from locoswarm.node.statesync import CHUNK, LATEST, MANIFEST, PROTOCOL, RESIDUAL_CHUNK, RESIDUAL_MANIFEST
from locoswarm.node.streams import call_framed
from locoswarm.protocol import MalformedMessage
from locoswarm.protocol.state import Ledger, Manifest, StateAssembler, StateSpec, decode_manifest, encode_state_request
from locoswarm.protocol.statepull import (AGREEING, DONOR_CUTS, DONOR_FAILURES, MANIFEST_DONORS, ChunkPull,
                                          StateUnavailable, choose_state, pick_manifest, pull_chunks, serving,
                                          take_residual)

if TYPE_CHECKING:
    from hivemind.p2p import P2P, PeerID

__all__ = ["AGREEING", "DONOR_CUTS", "DONOR_FAILURES", "MANIFEST_DONORS", "Downloaded", "StateUnavailable",
           "choose_state", "download_state", "fetch_manifest", "fetch_residual"]

_CUTS_TOLERATED = 4
"""Times one request is asked of a donor whose stream is cut or refused before any answer
(a donor over its stream limits closes streams unanswered, as one under load may), a short
wait between, before the donor counts as failed."""
_CUT_WAIT_S = 0.05
"""The first wait after a cut stream; it doubles each time."""
log = logging.getLogger(__name__)


class DownloadProgress:
    """A rich progress bar for the state download on a terminal; plain log lines at each
    quarter otherwise (a service's journal, a test's pipe)."""

    def __init__(self, total_bytes: int) -> None:
        self.total_bytes = total_bytes
        self._bar = None

    def __enter__(self) -> DownloadProgress:
        if sys.stderr.isatty():
            from rich.progress import Progress

            self._bar = Progress(transient=True)
            self._bar.start()
            self._task = self._bar.add_task(f"downloading the swarm's state ({self.total_bytes / 1e6:.1f} MB)",
                                            total=None)
        return self

    def update(self, done: int, total: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total)
        elif done == total or done % max(1, total // 4) == 0:
            log.info("state download: %d/%d chunks", done, total)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()


async def _request(p2p: P2P, peer: PeerID, kind: int, round_: int, index: int, limit: int,
                   timeout_s: float, offset: int = 0) -> bytes:
    body = await call_framed(p2p, peer, PROTOCOL, encode_state_request(kind, round_, index, offset), limit=limit,
                             limit_name="the limit", timeout_s=timeout_s)
    if body is None:
        raise MalformedMessage(f"donor {peer} has nothing for request {kind}/{round_}/{index}")
    return body


async def ask(p2p: P2P, peer: PeerID, kind: int, round_: int, index: int, limit: int, timeout_s: float,
               offset: int = 0) -> bytes:
    """_request, asked again after a short wait while the donor cuts the stream before any
    answer (up to _CUTS_TOLERATED times); other failures, and the last cut, are raised."""
    for attempt in range(_CUTS_TOLERATED - 1):
        try:
            return await _request(p2p, peer, kind, round_, index, limit, timeout_s, offset)
        except ConnectionError as e:
            log.info("request %d/%d from %s cut, asking again: %s", kind, index, peer, e)
            await asyncio.sleep(_CUT_WAIT_S * 2**attempt)
    return await _request(p2p, peer, kind, round_, index, limit, timeout_s, offset)


async def fetch_manifest(p2p: P2P, peer: PeerID, spec: StateSpec, timeout_s: float,
                    round_: int = LATEST, kind: int = MANIFEST) -> Manifest | None:
    try:
        return decode_manifest(await ask(p2p, peer, kind, round_, 0, 1 << 20, timeout_s), spec)
    except Exception as e:  # whatever a donor does wrong, it is skipped, never fatal
        log.warning("donor %s skipped: %s: %s", peer, type(e).__name__, e)
        return None


class Downloaded(NamedTuple):
    round: int
    tensors: dict[str, Tensor]
    chain: str
    """The donors' round chain at that round ("" unknown)."""
    ledger: Ledger
    """The state's earned weight (protocol/state.py)."""
    residual: dict[str, Tensor] | None = None
    """One donor's residual at that round (float32 tensors), None when none was asked or
    none came."""


async def download_state(
    p2p: P2P,
    donors: list[PeerID],
    spec: StateSpec,
    *,
    timeout_s: float = 30.0,
    on_progress: Callable[[int, int], None] | None = None,
    attesters: frozenset[str] = frozenset(),
    target: tuple[int, str] | None = None,
    residual_spec: StateSpec | None = None,
    kept: dict | None = None,
) -> Downloaded:
    """Download the state the first MANIFEST_DONORS of `donors` agree on (see the module
    docstring). With `attesters` (peer ids) the state is the newest one an attester among
    `donors` served the manifest of, whatever the others show, and StateUnavailable when none
    did; the others that serve that state (asked for its round) serve chunks too, each
    checked against the attester's manifest. With a `target` (round, chain), the state a
    majority of earned weight attests (node/lineage.py attested_state), only manifests of that
    round and chain are taken, whatever newer one donors agree on: of those, the one most of
    them show (body and ledger). With `residual_spec`, a donor's residual of that round too
    (`_residual`). `kept`: a dict the caller passes to every attempt of one download: the
    chunks an attempt verified stay there, and the next attempt that chooses the same state
    (manifest) asks only for the rest, so a retry on a slow link does not start again."""
    trusted = [p for p in donors if p.to_base58() in attesters]
    asked = trusted + [p for p in donors if p not in trusted][:MANIFEST_DONORS]
    round_ = LATEST if target is None else target[0]
    found = await asyncio.gather(*(fetch_manifest(p2p, peer, spec, timeout_s, round_) for peer in asked))
    manifests = {peer: m for peer, m in zip(asked, found) if m is not None}
    chosen = pick_manifest(manifests, asked=len(asked), trusted=trusted if attesters else None, target=target)
    if target is None and attesters:  # the others may show a newer round: asked for the chosen one's
        behind = [p for p, m in manifests.items() if m.round != chosen.round]
        again = await asyncio.gather(*(fetch_manifest(p2p, p, spec, timeout_s, chosen.round) for p in behind))
        manifests.update({p: m for p, m in zip(behind, again) if m is not None})
    pool = serving(manifests, chosen)
    if kept is not None and kept.get("manifest") == chosen:
        asm = kept["assembler"]
    else:
        asm = StateAssembler(spec, chosen)
        if kept is not None:
            kept.update(manifest=chosen, assembler=asm)
    # The residual comes from one donor while the state's chunks come from all of them, at
    # once: a join then waits for the slower of the two, not for both one after the other.
    wanted = (asyncio.ensure_future(fetch_residual(p2p, pool, residual_spec, chosen.round, timeout_s))
              if residual_spec is not None else None)
    try:
        await _pull(p2p, pool, asm, CHUNK, timeout_s, on_progress)
        if asm.missing():
            raise StateUnavailable(f"no donor delivered chunk {asm.missing()[0]} of {len(chosen.chunks)}")
        tensors = asm.finish()
        residual = None if wanted is None else await wanted
    finally:
        if wanted is not None and not wanted.done():
            wanted.cancel()
    return Downloaded(chosen.round, tensors, chosen.chain, chosen.ledger, residual)


async def _pull(p2p: P2P, pool: list[PeerID], asm: StateAssembler, kind: int, timeout_s: float,
                on_progress: Callable[[int, int], None] | None = None) -> None:
    """Fill `asm` with chunks (request `kind`) of its manifest's round from the donors of
    `pool`, one request in flight per donor, from one shared queue (protocol/statepull.py
    `ChunkPull`, `pull_chunks`); what is missing when every donor gave up stays missing."""
    round_, chunk_bytes = asm.manifest.round, asm.manifest.chunk_bytes
    total = len(asm.manifest.chunks)
    pull = ChunkPull(asm)

    def progressed() -> None:
        if on_progress is not None:
            on_progress(total - len(asm.missing()), total)

    def asker(peer: PeerID):
        async def ask_chunk(index: int, offset: int) -> bytes:
            return await ask(p2p, peer, kind, round_, index, chunk_bytes - offset, timeout_s, offset=offset)
        return ask_chunk

    await asyncio.gather(*(pull_chunks(pull, peer, asker(peer), asyncio.sleep, progressed) for peer in pool))


async def fetch_residual(p2p: P2P, pool: list[PeerID], spec: StateSpec, round_: int,
                         timeout_s: float) -> dict[str, Tensor] | None:
    """One donor's residual at `round_` (protocol/statepull.py `take_residual`), None when none came."""
    async def manifest_of(peer: PeerID) -> Manifest | None:
        return await fetch_manifest(p2p, peer, spec, timeout_s, round_, kind=RESIDUAL_MANIFEST)

    async def pull(peer: PeerID, asm: StateAssembler) -> None:
        await _pull(p2p, [peer], asm, RESIDUAL_CHUNK, timeout_s)

    return await take_residual(pool, spec, round_, manifest_of, pull)
