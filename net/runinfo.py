"""The "which run?" question (`locoswarm/run/1`, protocol/runanswer.py) on py-libp2p: answer it
for this peer's run, and ask it of a peer, as node/runinfo.py does on p2pd."""

from __future__ import annotations

import logging

from libp2p.abc import IHost
from libp2p.peer.id import ID

from locoswarm.net.framed import KeptStreams, serve_framed
from locoswarm.protocol.admission import PeerLimits
from locoswarm.protocol.runanswer import MAX_ANSWER, PROTOCOL, REQUEST, RunAnswer, decode_run_answer, encode_run_answer

log = logging.getLogger(__name__)
ASK_TIMEOUT_S = 5.0


def serve_run_info(host: IHost, run_id: str, spec_hash: bytes, *, private: bool) -> None:
    """Answer "which run?" for this peer's run (a private run says only that it is private)."""
    answer = encode_run_answer(run_id, spec_hash, private=private)

    async def respond(peer: str, request: bytes) -> bytes:
        return answer

    serve_framed(host, PROTOCOL, respond, request_len=len(REQUEST), what="run",
                 limits=PeerLimits(max_concurrent=1, rate=1.0, burst=4), timeout_s=ASK_TIMEOUT_S)


async def call_which_run(host: IHost, peer: ID) -> RunAnswer | None:
    """`peer`'s answer, None when it gave none that could be read (logged)."""
    streams = KeptStreams(host, PROTOCOL)
    try:
        body = await streams.call(peer, REQUEST, limit=MAX_ANSWER, limit_name="the run answer's limit",
                                  timeout_s=ASK_TIMEOUT_S)
        return decode_run_answer(str(peer), body)
    except Exception as e:  # anything: an answer we cannot use proves nothing either way
        log.info("peer %s did not say which run it trains: %s: %s", peer, type(e).__name__, e)
        return None
    finally:
        await streams.close()
