"""A real peer process for the exchange tests: serves one delta (or, with a `mode`, a
malicious frame) on loopback, prints its multiaddr, and runs until killed or stdin closes.

usage: python serve_delta.py MODE   (MODE: good | garbage | truncated | oversized | silent | wrong_round)
"""

from __future__ import annotations

import asyncio
import sys

import torch
from hivemind.p2p import P2P

from locoswarm.node.exchange import PROTOCOL, REQUEST_LEN, DeltaServer
from locoswarm.optim import CompressionConfig, ErrorFeedbackCompressor, delta_spec
from locoswarm.protocol import DeltaMessage, encode_delta

SHAPES = [("w", (64, 100)), ("b", (33,))]
CFG = CompressionConfig(density=0.02, bits=2, chunk=1024)
SPEC = delta_spec(SHAPES, CFG, run_id="exchange-test", spec_hash=b"s" * 32, max_tokens=10_000)
ROUND = 3


def good_blob(round_: int = ROUND) -> bytes:
    gen = torch.Generator().manual_seed(11)
    comp = ErrorFeedbackCompressor(SPEC.tensors, CFG, "cpu")
    packed, _ = comp.compress([torch.randn(s, generator=gen) for _, s in SHAPES])
    return encode_delta(DeltaMessage(run_id="exchange-test", spec_hash=b"s" * 32, round=round_, sender="server",
                                     num_tokens=1000, tensors=tuple(packed)))


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
