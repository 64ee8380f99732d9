"""How a joiner takes a state from donors, on either transport (node/statedownload.py, on p2pd
or on py-libp2p through net/bridge.py), without I/O of its own: which donors' manifests it trusts
(`pick_manifest`: a target a majority of earned weight attests, an attester's state, or the
newest state AGREEING donors show), which chunk each donor is asked next (`ChunkPull`,
`Donor`, `pull_chunks`) and how one donor's residual is taken (`take_residual`). The
coroutines await only the callables they are given, so asyncio and trio run them alike.
protocol/state.py holds what goes on the wire (manifests, requests, chunks and their checks).
"""

from __future__ import annotations

import collections
import logging
from typing import Awaitable, Callable

from torch import Tensor

from locoswarm.protocol.framing import TruncatedBody
from locoswarm.protocol.state import Manifest, StateAssembler, StateSpec

log = logging.getLogger(__name__)

MANIFEST_DONORS = 4
"""Donors a joiner asks for their manifest at once (the caller passes them shuffled)."""
AGREEING = 2
"""Donors that must show the same digest for a state to be taken over a newer single one."""
DONOR_FAILURES = 2
"""Failed chunk requests after which a donor is dropped from a download."""
DONOR_CUTS = 8
"""Chunk streams cut inside the body, one after another, after which a donor is dropped
(each cut keeps what came; a delivered chunk starts the count again)."""
RESIDUAL_DONORS = 2
"""Donors of the state asked for their residual, one after another, before going without."""


def same_state(m: Manifest) -> tuple:
    """What two donors' manifests must both show to serve one state."""
    return m.round, m.digest, m.chain, m.ledger


def choose_state(manifests: list[Manifest]) -> Manifest:
    """The newest state (round, digest, chain and ledger) at least AGREEING manifests show,
    else the newest one (a joiner's choice, on either transport)."""
    counts = collections.Counter(same_state(m) for m in manifests)
    agreed = [m for m in manifests if counts[same_state(m)] >= AGREEING]
    return max(agreed or manifests, key=lambda m: m.round)


def serving(manifests: dict, chosen: Manifest) -> list:
    """The donors (keys of `manifests`) whose manifest shows `chosen`'s state cut alike: donors
    cut a state alike only at the same chunk size (an upload budget makes it smaller)."""
    return [p for p, m in manifests.items()
            if same_state(m) == same_state(chosen) and m.chunk_bytes == chosen.chunk_bytes]


class StateUnavailable(Exception):
    """No donor served a state that could be downloaded whole; says why."""


def pick_manifest(manifests: dict, *, asked: int, trusted: list | None = None,
                  target: tuple[int, str] | None = None) -> Manifest:
    """The manifest a download takes among `manifests` (donor → its manifest, `asked` donors
    asked), on either transport: with a `target` (round, chain), the state a majority of
    earned weight attests, only manifests of that round and chain count, and of those the
    state most of them show; else where attesters are asked for (`trusted`: those among the
    donors, maybe none), the newest state one of them showed, whatever the others show; else
    `choose_state`. StateUnavailable naming why when none fits."""
    if target is not None:
        fitting = [m for m in manifests.values() if (m.round, m.chain) == target]
        if not fitting:
            raise StateUnavailable(f"none of the {asked} donors asked served the attested state of round "
                                   f"{target[0]} (chain {target[1][:12]}…)")
        counts = collections.Counter(same_state(m) for m in fitting)
        return max(fitting, key=lambda m: counts[same_state(m)])
    if trusted is not None:
        vouched = [m for p, m in manifests.items() if p in trusted]
        if not vouched:
            raise StateUnavailable(f"none of the {len(trusted)} trusted donors served a state manifest")
        return max(vouched, key=lambda m: m.round)
    if not manifests:
        raise StateUnavailable(f"none of the {asked} donors asked served a valid state manifest")
    return choose_state(list(manifests.values()))


class ChunkPull:
    """Which chunk of one state each donor asks for next, without I/O (node/statedownload.py
    drives it, on either transport): one shared queue, one request in flight
    per donor. A chunk whose stream was cut inside the body is asked again for its rest only,
    first, from any donor; one that failed (or did not match its hash) goes to the queue's end
    for another donor. `Donor` counts one donor's failures."""

    def __init__(self, asm: StateAssembler) -> None:
        self.asm = asm
        self.queue = collections.deque(asm.missing())
        self.partial: dict[int, bytes] = {}
        """chunk index → the bytes of it that came before its stream was cut."""
        self.in_flight: dict[int, bytes] = {}
        """chunk index → what of it was had when it was asked for."""

    def idle(self) -> bool:
        """Nothing left to ask for and nothing in flight that could come back to the queue."""
        return not self.queue and not self.in_flight

    def take(self) -> tuple[int, int] | None:
        """The next chunk to ask for and the offset to ask from; None while the queue is empty."""
        if not self.queue:
            return None
        index = self.queue.popleft()
        have = self.partial.pop(index, b"")
        self.in_flight[index] = have
        return index, len(have)

    def delivered(self, index: int, rest: bytes) -> None:
        """The rest of chunk `index` came: kept when it matches its hash, else back to the queue
        and the assembler's error raised."""
        have = self.in_flight.pop(index)
        try:
            self.asm.add(index, have + rest)
        except Exception:
            self.queue.append(index)
            raise

    def cut(self, index: int, partial: bytes) -> None:
        """Its stream was cut inside the body after `partial`: the rest is asked for next."""
        self.partial[index] = self.in_flight.pop(index) + partial
        self.queue.appendleft(index)

    def failed(self, index: int) -> None:
        """The request failed: the chunk goes to another donor (whatever of it was had is dropped)."""
        if index in self.in_flight:
            del self.in_flight[index]
            self.queue.append(index)


class Donor:
    """One donor's standing in a pull: dropped after DONOR_FAILURES failures, or DONOR_CUTS cuts
    in a row (a delivered chunk starts that count again)."""

    def __init__(self) -> None:
        self.failures = self.cuts = 0

    @property
    def alive(self) -> bool:
        return self.failures < DONOR_FAILURES and self.cuts < DONOR_CUTS

    def delivered(self) -> None:
        self.cuts = 0

    def cut(self) -> None:
        self.cuts += 1

    def failed(self) -> None:
        self.failures += 1


async def pull_chunks(pull: ChunkPull, peer: object, ask: Callable[[int, int], Awaitable[bytes]],
                      sleep: Callable[[float], Awaitable[object]],
                      on_chunk: Callable[[], None] | None = None) -> None:
    """One donor's part of `pull` until the queue is done or the donor is dropped (`Donor`):
    `ask(index, offset)` returns the rest of a chunk from `offset` (raising what the request
    raised: TruncatedBody when cut inside the body). It awaits nothing but `ask` and `sleep`,
    so it runs on any event loop (asyncio: node/statedownload.py; trio would do)."""
    donor = Donor()
    while donor.alive:
        job = pull.take()
        if job is None:
            if pull.idle():
                return
            await sleep(0.05)  # another donor's chunk may fail and come back to the queue
            continue
        index, offset = job
        try:
            pull.delivered(index, await ask(index, offset))
            donor.delivered()
        except TruncatedBody as e:  # cut inside the body: the next request asks for the rest only
            log.info("chunk %d from %s cut after %d bytes: resuming it", index, peer, offset + len(e.partial))
            pull.cut(index, e.partial)
            donor.cut()
            continue
        except Exception as e:  # any failure: the chunk goes to another donor
            log.warning("chunk %d from %s failed: %s: %s", index, peer, type(e).__name__, e)
            pull.failed(index)
            donor.failed()
            continue
        if on_chunk is not None:
            on_chunk()


async def take_residual(pool: list, spec: StateSpec, round_: int,
                        manifest_of: Callable[[object], Awaitable[Manifest | None]],
                        pull: Callable[[object, StateAssembler], Awaitable[None]]) -> dict[str, Tensor] | None:
    """One donor's residual at `round_`, whole, from the first of `pool` (RESIDUAL_DONORS
    tried) that serves a valid one, None when none does: `manifest_of(peer)` asks a donor for
    its residual's manifest of the round, `pull(peer, assembler)` fills the assembler from it.
    Runtime-agnostic, as `pull_chunks`."""
    for peer in pool[:RESIDUAL_DONORS]:
        manifest = await manifest_of(peer)
        if manifest is None or manifest.round != round_:
            continue
        asm = StateAssembler(spec, manifest)
        await pull(peer, asm)
        try:
            return asm.finish()
        except Exception as e:  # incomplete, or values no replica can start from
            log.warning("residual of %s skipped: %s: %s", peer, type(e).__name__, e)
    log.info("no donor of round %d served its residual: the replica starts at the outer state", round_)
    return None
