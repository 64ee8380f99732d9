"""Unary calls between two py-libp2p hosts of locoswarm.net, for tests/test_net_dht.py: a good
call, and a callee that raises, stays silent, answers garbage, announces an oversized answer
or is a DHT node answering nonsense. Each must come back as its named error naming the peer,
never a crash. No hivemind here. Prints one JSON object: {case: [outcome class, message]}.

usage: python lp2p_rpc.py
"""

from __future__ import annotations

import json
import sys
import time

import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from libp2p.custom_types import TProtocol

from locoswarm.net.dht import DHTClient, DHTUnreachable
from locoswarm.net.host import dial, key_pair_of, run_host
from locoswarm.net.rpc import call_unary, serve_unary
from locoswarm.protocol.pbmessages import KeyType, PrivateKey
from locoswarm.protocol.pbwire import encode, encode_uvarint


def identity_file() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    return encode(PrivateKey(key_type=KeyType.RSA, data=der))


async def reverse(caller, request: bytes) -> bytes:
    return request[::-1]


async def refuse(caller, request: bytes) -> bytes:
    raise ValueError("this handler refuses")


async def silent(caller, request: bytes) -> bytes:
    await trio.sleep(60)
    return b""


async def nonsense(caller, request: bytes) -> bytes:
    return b"\xff\xff\xff"  # not a PingResponse (a truncated varint tag)


def raw_answer(payload: bytes):
    async def handle(stream) -> None:
        await stream.read(1 << 16)
        await stream.write(payload)
        await stream.close()
    return handle


async def outcome(call) -> list:
    started = time.monotonic()
    try:
        result = await call
        return ["ok", result.decode(errors="replace") if isinstance(result, bytes) else repr(result),
                round(time.monotonic() - started, 2)]
    except Exception as e:
        return [type(e).__name__, str(e), round(time.monotonic() - started, 2)]


async def main() -> dict:
    out: dict = {}
    (server_keys, _), (client_keys, client_identity) = key_pair_of(identity_file()), key_pair_of(identity_file())
    with trio.fail_after(60):
        async with run_host(server_keys) as server, run_host(client_keys) as client:
            serve_unary(server, "t/echo", reverse)
            serve_unary(server, "t/raise", refuse)
            serve_unary(server, "t/silent", silent)
            serve_unary(server, "DHTProtocol.rpc_ping", nonsense)
            server.set_stream_handler(TProtocol("t/garbage"), raw_answer(b"\x05hello"))
            server.set_stream_handler(TProtocol("t/oversized"), raw_answer(encode_uvarint(5 << 20) + b"x" * 100))
            maddr = f"{server.get_addrs()[0]}"
            maddr = maddr if "/p2p/" in maddr else f"{maddr}/p2p/{server.get_id()}"
            peer = await dial(client, maddr)
            out["server"] = str(peer)
            for case in ("echo", "raise", "garbage", "oversized", "missing"):
                out[case] = await outcome(call_unary(client, peer, f"t/{case}", b"abc", timeout_s=5.0))
            out["silent"] = await outcome(call_unary(client, peer, "t/silent", b"abc", timeout_s=1.0))
            dht = DHTClient(client, client_identity)
            try:
                await dht.bootstrap([maddr])
                out["dht_nonsense"] = ["ok", "", 0]
            except DHTUnreachable as e:
                out["dht_nonsense"] = [type(e).__name__, str(e), 0]
            out["dht_failures"] = list(dht.failures)
            out["echo_after_faults"] = await outcome(call_unary(client, peer, "t/echo", b"xyz", timeout_s=5.0))
    out["hivemind_loaded"] = any(m == "hivemind" or m.startswith("hivemind.") for m in sys.modules)
    return out


if __name__ == "__main__":
    print(json.dumps(trio.run(main)), flush=True)
