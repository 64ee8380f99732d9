"""Which run a peer trains: asked of the initial peers when none of them shows a record of ours.

A peer given the wrong run (the right address, but another spec or none: the embedded
default) finds no record of its run under its DHT key, which is the run's own, and would
train alone without a word. So each daemon answers one question on its own stream protocol,
"which run?", and a joiner that reaches its initial peers but finds no record of its run
asks them: when every one that answers trains another run (or another spec of ours), it
stops with an error naming what they train (exit 2), rather than start a swarm of one
beside them. A peer that does not answer (an older version, a plain DHT node, a slow
link) proves nothing, and the join goes on as before.

A private run (allow-list, secret or proof of work) answers only that it is private: its id
is for those it admits.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import msgpack
from hivemind.p2p import P2P, PeerID

from locoswarm.node.streams import PeerLimits, call_framed, serve_framed

log = logging.getLogger(__name__)
PROTOCOL = "locoswarm/run/1"
REQUEST = b"\x01"
"""The question (one byte: the version of the answer asked for)."""
MAX_ANSWER = 1024
ASK_TIMEOUT_S = 5.0
"""How long a joiner waits for an initial peer's answer: one request, a few hundred bytes."""


@dataclass(frozen=True, slots=True)
class RunAnswer:
    peer: str
    run_id: str | None
    """None: a private run."""
    spec_hash: str
    """Hex (the first 16 digits); empty for a private run."""

    def describe(self) -> str:
        if self.run_id is None:
            return f"{self.peer}: a private run"
        return f"{self.peer}: run {self.run_id!r} (spec {self.spec_hash})"


class RunInfoServer:
    """Answers "which run?" on PROTOCOL for this daemon's run."""

    def __init__(self, p2p: P2P, run_id: str, spec_hash: bytes, *, private: bool) -> None:
        self.p2p = p2p
        answer = {"run_id": None, "spec_hash": ""} if private else {"run_id": run_id, "spec_hash": spec_hash.hex()[:16]}
        self._answer = msgpack.packb(answer, use_bin_type=True)
        self.limits = PeerLimits(max_concurrent=1, rate=1.0, burst=4)

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(PROTOCOL, self.rpc_which_run)

    async def rpc_which_run(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_framed(info, reader, writer, request_len=len(REQUEST), answer=lambda _: self._answer,
                           timeout_s=ASK_TIMEOUT_S, what="run", limits=self.limits)


async def call_which_run(p2p: P2P, peer: str) -> RunAnswer | None:
    """`peer`'s answer, None when it gave none that could be read (logged)."""
    try:
        body = await call_framed(p2p, PeerID.from_base58(peer), PROTOCOL, REQUEST, limit=MAX_ANSWER,
                                 limit_name="the run answer's limit", timeout_s=ASK_TIMEOUT_S)
        fields = msgpack.unpackb(body or b"", raw=False, max_str_len=MAX_ANSWER, max_map_len=4)
    except Exception as e:  # anything: an answer we cannot use proves nothing either way
        log.info("peer %s did not say which run it trains: %s", peer, type(e).__name__)
        return None
    run_id, spec_hash = (fields.get("run_id"), fields.get("spec_hash")) if isinstance(fields, dict) else (1, 1)
    if not (run_id is None or isinstance(run_id, str) and 0 < len(run_id) <= 128 and run_id.isprintable()) \
            or not isinstance(spec_hash, str) or len(spec_hash) > 64 or not all(c in "0123456789abcdef"
                                                                                for c in spec_hash):
        log.info("peer %s answered which run it trains with something else", peer)
        return None
    return RunAnswer(peer=peer, run_id=run_id, spec_hash=spec_hash)


async def runs_of(p2p: P2P, peers: list[str]) -> list[RunAnswer]:
    """What `peers` (base58 ids) answer, asked at once; those that gave none left out."""
    answers = await asyncio.gather(*(call_which_run(p2p, peer) for peer in peers))
    return [a for a in answers if a is not None]


def not_ours(answers: list[RunAnswer], run_id: str, spec_hash: bytes, *, private: bool) -> str | None:
    """Why the peers that answered are not a swarm of our run (None: one of them may be
    ours, or none answered): every answer names another run or another spec of ours, or,
    where our run is open, a private run."""
    ours = spec_hash.hex()[:16]
    if not answers or any(a.run_id == run_id and a.spec_hash == ours or a.run_id is None and private
                          for a in answers):
        return None
    return "; ".join(a.describe() for a in answers)
