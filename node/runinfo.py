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
from typing import TYPE_CHECKING

from locoswarm.node.streams import PeerLimits, call_framed, peer_id_of, serve_framed
from locoswarm.protocol.runanswer import (MAX_ANSWER, PROTOCOL, REQUEST, RunAnswer, decode_run_answer,
                                          encode_run_answer, not_ours)

if TYPE_CHECKING:  # p2pd's P2P, or py-libp2p's TrioP2P (node/network.py)
    from hivemind.p2p import P2P

__all__ = ["ASK_TIMEOUT_S", "MAX_ANSWER", "PROTOCOL", "REQUEST", "RunAnswer", "RunInfoServer", "call_which_run",
           "not_ours", "runs_of"]
log = logging.getLogger(__name__)
ASK_TIMEOUT_S = 5.0
"""How long a joiner waits for an initial peer's answer: one request, a few hundred bytes."""


class RunInfoServer:
    """Answers "which run?" on PROTOCOL for this daemon's run (protocol/runanswer.py)."""

    def __init__(self, p2p: P2P, run_id: str, spec_hash: bytes, *, private: bool) -> None:
        self.p2p = p2p
        self._answer = encode_run_answer(run_id, spec_hash, private=private)
        self.limits = PeerLimits(max_concurrent=1, rate=1.0, burst=4)

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(PROTOCOL, self.rpc_which_run)

    async def rpc_which_run(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_framed(info, reader, writer, request_len=len(REQUEST), answer=lambda _: self._answer,
                           timeout_s=ASK_TIMEOUT_S, what="run", limits=self.limits)


async def call_which_run(p2p: P2P, peer: str) -> RunAnswer | None:
    """`peer`'s answer, None when it gave none that could be read (logged)."""
    try:
        body = await call_framed(p2p, peer_id_of(p2p, peer), PROTOCOL, REQUEST, limit=MAX_ANSWER,
                                 limit_name="the run answer's limit", timeout_s=ASK_TIMEOUT_S)
        return decode_run_answer(peer, body)
    except Exception as e:  # anything: an answer we cannot use proves nothing either way
        log.info("peer %s did not say which run it trains: %s: %s", peer, type(e).__name__, e)
        return None


async def runs_of(p2p: P2P, peers: list[str]) -> list[RunAnswer]:
    """What `peers` (base58 ids) answer, asked at once; those that gave none left out."""
    answers = await asyncio.gather(*(call_which_run(p2p, peer) for peer in peers))
    return [a for a in answers if a is not None]
