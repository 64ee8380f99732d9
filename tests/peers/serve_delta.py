"""A real peer process for the exchange tests: serves one delta (or, with a `mode`, a
malicious frame) on loopback, prints its multiaddr, and runs until killed or stdin closes.

usage: python serve_delta.py MODE   (MODE: good | garbage | truncated | oversized | silent | wrong_round)
"""

from __future__ import annotations

import asyncio
import os
import sys

from hivemind.p2p import P2P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # loaded by file path from tests/test_exchange.py too
from delta_fixture import ROUND, SHAPES, SPEC, good_blob  # noqa: E402

__all__ = ["ROUND", "SHAPES", "SPEC", "good_blob"]  # what the tests read from here
from locoswarm.node.exchange import PROTOCOL, REQUEST_LEN, DeltaServer


async def main(mode: str) -> None:
    p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    if mode in ("good", "wrong_round"):
        server = DeltaServer(p2p)
        await server.start()
        server.publish(ROUND, good_blob(ROUND if mode == "good" else ROUND + 1))
        server.training(ROUND + 1)
    else:
        async def evil(info, reader, writer):
            await reader.readexactly(REQUEST_LEN)
            if mode == "garbage":
                junk = bytes(range(256)) * 4
                writer.write(len(junk).to_bytes(8, "big") + junk)
            elif mode == "truncated":
                blob = good_blob()
                writer.write(len(blob).to_bytes(8, "big") + blob[: len(blob) // 2])
            elif mode == "oversized":
                writer.write((1 << 40).to_bytes(8, "big") + b"\0" * 1024)
            elif mode == "silent":
                await asyncio.sleep(3600)
            await writer.drain()
            writer.close()

        await p2p.add_binary_stream_handler(PROTOCOL, evil)
    maddrs = await p2p.get_visible_maddrs()
    print(str(maddrs[0]), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the test closes stdin
    await p2p.shutdown()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
