"""The outer state on py-libp2p: `StateServer` serves this peer's states as a donor on
`locoswarm/state/3` (protocol/statebook.py says what it keeps and answers, as
node/statesync.py's donor on p2pd does), and `download_state` is a joiner's download from
donors of either kind: the manifests of up to MANIFEST_DONORS
donors, the newest state at least AGREEING of them show (else the newest one), then its
chunks from every donor that shows it, each checked against the manifest's SHA-256
(protocol/state.py). A chunk cut mid-body is asked again for its rest only; a donor that
fails DONOR_FAILURES times (or cuts DONOR_CUTS chunks in a row) is dropped, and its chunks go
to the others. What node/statedownload.py adds on p2pd (attested states, a target round, the
donor's residual, a retry that keeps verified chunks) is not here yet (docs/windows.md).
"""

from __future__ import annotations

import collections
import logging
from typing import NamedTuple

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from torch import Tensor

from locoswarm.net.framed import KeptStreams, serve_framed
from locoswarm.protocol.admission import PeerLimits
from locoswarm.protocol.errors import MalformedMessage
from locoswarm.protocol.framing import TruncatedBody
from locoswarm.protocol.state import (CHUNK, DONOR_CUTS, DONOR_FAILURES, LATEST, MANIFEST, MANIFEST_DONORS, PROTOCOL,
                                      REQUEST_LEN, ROUND_DELTAS, Ledger, Manifest, StateAssembler, StateSpec,
                                      choose_state, decode_manifest, encode_state_request, serving)
from locoswarm.protocol.statebook import StateBook, parse_state_request

log = logging.getLogger(__name__)
MANIFEST_LIMIT = 1 << 20


class StateServer:
    """Serves this peer's last few states (and residuals, and the deltas of its last outer
    steps) on `host`; `publish` keeps a snapshot, encoded in a worker thread on the first
    request for its round. No upload budget yet (docs/windows.md)."""

    def __init__(self, host: IHost, spec: StateSpec, *, chunk_bytes: int = 4 << 20,
                 residual_spec: StateSpec | None = None, request_timeout_s: float = 10.0) -> None:
        self.host, self.request_timeout_s = host, request_timeout_s
        self.book = StateBook(spec, chunk_bytes, residual_spec=residual_spec)
        self.limits = PeerLimits(max_concurrent=2, rate=50.0, burst=100)
        """As the p2pd donor's: a joiner asks one chunk at a time."""
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
        return self.book.answer(kind, round_, index, offset)


class StateUnavailable(Exception):
    """No donor served a state that could be downloaded whole; says why."""


class Downloaded(NamedTuple):
    round: int
    tensors: dict[str, Tensor]
    digest: str
    """state_digest of the body and ledger: what the donors report serving."""
    chain: str
    ledger: Ledger
    donors: tuple[str, ...]
    """The donors whose chunks made it (every one that showed the chosen state)."""


async def fetch_manifest(streams: KeptStreams, peer: ID, spec: StateSpec, timeout_s: float) -> Manifest | None:
    """`peer`'s manifest of its newest state; None (logged) when it serves none or a bad one."""
    try:
        body = await streams.call(peer, encode_state_request(MANIFEST, LATEST, 0), limit=MANIFEST_LIMIT,
                                  limit_name="the manifest limit", timeout_s=timeout_s)
        if body is None:
            raise MalformedMessage("it has no state to serve")
        return decode_manifest(body, spec)
    except Exception as e:  # whatever a donor does wrong, it is skipped, never fatal
        log.warning("donor %s skipped: %s: %s", peer, type(e).__name__, e)
        return None


async def download_state(host: IHost, donors: list[ID], spec: StateSpec, *, timeout_s: float = 30.0) -> Downloaded:
    """The state the first MANIFEST_DONORS of `donors` agree on, checked chunk by chunk;
    StateUnavailable when no donor serves one or its chunks cannot all be had."""
    streams = KeptStreams(host, PROTOCOL)
    try:
        asked = donors[:MANIFEST_DONORS]
        found: dict[ID, Manifest] = {}

        async def ask(peer: ID) -> None:
            manifest = await fetch_manifest(streams, peer, spec, timeout_s)
            if manifest is not None:
                found[peer] = manifest

        async with trio.open_nursery() as nursery:
            for peer in asked:
                nursery.start_soon(ask, peer)
        if not found:
            raise StateUnavailable(f"none of the {len(asked)} donors asked served a valid state manifest")
        chosen = choose_state(list(found.values()))
        pool = serving(found, chosen)
        asm = StateAssembler(spec, chosen)
        await _pull(streams, pool, asm, timeout_s)
        if asm.missing():
            raise StateUnavailable(f"no donor delivered chunk {asm.missing()[0]} of {len(chosen.chunks)}")
        return Downloaded(chosen.round, asm.finish(), asm.digest(), chosen.chain, chosen.ledger,
                          tuple(str(p) for p in pool))
    finally:
        await streams.close()


async def _pull(streams: KeptStreams, pool: list[ID], asm: StateAssembler, timeout_s: float) -> None:
    """Fill `asm` with its manifest's chunks from the donors of `pool`, one request in
    flight per donor, from one shared queue."""
    round_, chunk_bytes = asm.manifest.round, asm.manifest.chunk_bytes
    queue = collections.deque(asm.missing())
    partial: dict[int, bytes] = {}
    in_flight = 0

    async def worker(peer: ID) -> None:
        nonlocal in_flight
        failures = cuts = 0
        while failures < DONOR_FAILURES and cuts < DONOR_CUTS:
            if not queue:
                if not in_flight:
                    return
                await trio.sleep(0.05)  # another donor's chunk may fail and come back to the queue
                continue
            index = queue.popleft()
            have = partial.pop(index, b"")
            in_flight += 1
            try:
                rest = await streams.call(peer, encode_state_request(CHUNK, round_, index, len(have)),
                                          limit=chunk_bytes - len(have), limit_name="the chunk size",
                                          timeout_s=timeout_s)
                if rest is None:
                    raise MalformedMessage(f"it has nothing for chunk {index} of round {round_}")
                asm.add(index, have + rest)
                cuts = 0
            except TruncatedBody as e:  # cut inside the body: the next request asks for the rest only
                partial[index] = have + e.partial
                queue.appendleft(index)
                cuts += 1
            except Exception as e:  # any failure: the chunk goes to another donor
                log.warning("chunk %d from %s failed: %s: %s", index, peer, type(e).__name__, e)
                queue.append(index)
                failures += 1
            finally:
                in_flight -= 1

    async with trio.open_nursery() as nursery:
        for peer in pool:
            nursery.start_soon(worker, peer)
