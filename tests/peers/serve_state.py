"""A real donor process for the state-download tests: serves a seeded outer state on
loopback, prints its multiaddr, runs until stdin closes or it is killed.

usage: python serve_state.py MODE   (MODE: good | corrupt | stale | forged | shedding | mute | cutting | budget
                                     | own-residual | no-residual | nan-residual)

Every donor serves its residual (RESIDUAL_SEED) with the state, except: own-residual serves
another one (OWN_RESIDUAL_SEED); no-residual none (as a donor of an older release);
nan-residual one holding NaN.

forged: serves another state, FORGED_ROUNDS ahead, on another chain (FORGED_CHAIN), as peers
that invented a lineage do;

shedding: closes every other stream unanswered, as a donor over its stream limits does;
mute: closes every stream unanswered; cutting: cuts the first answer for each chunk in the
middle of its body, as a reset stream on a lossy link does; budget: serves at most
BUDGET_BYTES_PER_S, all joiners together.
"""

from __future__ import annotations

import asyncio
import os
import sys

from hivemind.p2p import P2P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # loaded by file path from the tests too
from locoswarm.node.statesync import PROTOCOL, StateServer  # noqa: E402
from state_fixture import (BUDGET_BYTES_PER_S, CHAIN, CHUNK_BYTES, FORGED_CHAIN, FORGED_ROUNDS, LEDGER,  # noqa: E402
                           OWN_RESIDUAL_SEED, RESIDUAL_SEED, RESIDUAL_SPEC, ROUND, SPEC, residual, state)

__all__ = ["BUDGET_BYTES_PER_S", "CHAIN", "CHUNK_BYTES", "FORGED_CHAIN", "FORGED_ROUNDS", "LEDGER", "OWN_RESIDUAL_SEED",
           "RESIDUAL_SEED", "RESIDUAL_SPEC", "ROUND", "SPEC", "residual", "state"]  # what the tests read from here


async def main(mode: str) -> None:
    p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    server = StateServer(p2p, SPEC, chunk_bytes=CHUNK_BYTES,
                         upload_bytes_per_s=BUDGET_BYTES_PER_S if mode == "budget" else 0.0,
                         residual_spec=RESIDUAL_SPEC)
    await server.start()
    if mode == "forged":
        server.publish(state(6), ROUND + FORGED_ROUNDS, FORGED_CHAIN, LEDGER, residual(mode))
    else:
        server.publish(state(), ROUND - 1 if mode == "stale" else ROUND, CHAIN, LEDGER, residual(mode))
    if mode == "corrupt":
        manifest, body = await server.encoded(ROUND)
        server.book.states[ROUND] = (manifest, bytes(b ^ 0xFF for b in body))  # every chunk fails its hash
    if mode in ("shedding", "mute"):
        served = server.rpc_get_state
        streams = []

        async def shed(info, reader, writer):
            streams.append(info)
            if mode == "mute" or len(streams) % 2 == 1:
                writer.close()  # what serve_framed does with a stream over the limits
                return
            await served(info, reader, writer)

        await p2p.remove_binary_stream_handler(PROTOCOL)
        await p2p.add_binary_stream_handler(PROTOCOL, shed)
    if mode == "cutting":
        answer = server._answer
        cut: set[bytes] = set()

        async def serve_cut(info, reader, writer):
            request = await reader.readexactly(25)
            body = await answer(request)
            if request[0] == 1 and request[9:17] not in cut:
                cut.add(request[9:17])
                writer.write(len(body).to_bytes(8, "big") + body[: len(body) // 2])
            else:
                writer.write(len(body).to_bytes(8, "big") + body)
            await writer.drain()
            writer.close()

        await p2p.remove_binary_stream_handler(PROTOCOL)
        await p2p.add_binary_stream_handler(PROTOCOL, serve_cut)
    print(str((await p2p.get_visible_maddrs())[0]), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await p2p.shutdown()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
