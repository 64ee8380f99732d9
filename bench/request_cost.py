"""What a delta request costs on the wire besides the delta: two p2pd on loopback, a real
DeltaServer serving a delta of `size` bytes, and a client asking for it `count` times, once
with a stream opened per request (node/streams.py call_framed) and once on one kept stream
(KeptStreams). Bytes are the kernel's counters of both p2pd processes' sockets
(bench/tcpio.py), both ways, less the requests' and answers' own bytes: what libp2p's
negotiation and framing add per request. bench/scale_model.py's `request_bytes` and
`stream_open_bytes` come from here.

usage: python -m locoswarm.bench.request_cost [COUNT] [SIZE]
"""

from __future__ import annotations

import asyncio
import sys

from locoswarm.bench.tcpio import TcpMeter


async def _measure(count: int, size: int) -> dict[str, float]:
    import psutil
    from hivemind.p2p import P2P

    from locoswarm.node.exchange import PROTOCOL, REQUEST_LEN, DeltaServer, delta_streams
    from locoswarm.node.streams import PeerLimits, call_framed
    from locoswarm.protocol.framing import HEADER

    server_p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    client_p2p = None
    try:
        server = DeltaServer(server_p2p)
        server.limits = PeerLimits(max_concurrent=2, rate=1e6, burst=10**6)  # 50 requests at once, not 10 a second
        await server.start()
        maddrs = [str(a) for a in await server_p2p.get_visible_maddrs()]
        client_p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=maddrs)
        pids = {c.pid for c in psutil.Process().children() if c.name() == "p2pd"}
        kept = delta_streams(client_p2p)
        rounds = iter(range(1, 1 << 62))

        async def ask(on_kept: bool) -> None:
            # Each request is for a round's delta published for it: a server sends one round's
            # delta to a peer at most MAX_SENDS_PER_ROUND times (protocol/deltabook.py).
            round_ = next(rounds)
            server.publish(round_, b"x" * size)
            request = round_.to_bytes(8, "big") + bytes(8)
            if on_kept:
                await kept.call(server_p2p.peer_id, request, limit=1 << 24, limit_name="limit", timeout_s=10)
            else:
                await call_framed(client_p2p, server_p2p.peer_id, PROTOCOL, request, limit=1 << 24,
                                  limit_name="limit", timeout_s=10)

        # One of each first: the connection and both handlers' set-up are not what is measured.
        await ask(False)
        await ask(True)
        payload = count * (REQUEST_LEN + HEADER + size)
        out = {}
        for name in ("stream_per_request", "kept_stream"):
            meter = TcpMeter()
            meter.read(pids)
            for _ in range(count):
                await ask(name == "kept_stream")
            await asyncio.sleep(0.5)  # closes and window updates on the wire
            # Each byte crosses loopback once but is counted by the sender and the receiver.
            out[name] = (sum(meter.read(pids)) / 2 - payload) / count
        out["kept_streams_opened"] = kept.num_opened
        kept.close()
        out["unary_rpc"] = await _unary_rpc(server_p2p, client_p2p, pids, count)
        return out
    finally:
        if client_p2p is not None:
            await client_p2p.shutdown()
        await server_p2p.shutdown()


async def _unary_rpc(server_p2p, client_p2p, pids: set[int], count: int) -> float:
    """A unary DHT RPC's bytes beside its protobuf request and answer: hivemind's
    DHTProtocol.call_find of one missing key between two DHT nodes on the same p2pd pair."""
    from hivemind.dht.node import DHTNode
    from hivemind.dht.routing import DHTID
    from hivemind.proto import dht_pb2

    server = await DHTNode.create(p2p=server_p2p)
    client = await DHTNode.create(p2p=client_p2p, initial_peers=[str(a) for a in await server_p2p.get_visible_maddrs()])
    try:
        key = DHTID.generate(source="request_cost")
        request = dht_pb2.FindRequest(keys=[key.to_bytes()], peer=client.protocol.node_info)
        await client.protocol.call_find(server_p2p.peer_id, [key])
        meter = TcpMeter()
        meter.read(pids)
        for _ in range(count):
            await client.protocol.call_find(server_p2p.peer_id, [key])
        await asyncio.sleep(0.5)
        protobuf = count * (request.ByteSize() + dht_pb2.FindResponse(
            results=[dht_pb2.FindResult(type=dht_pb2.NOT_FOUND, nearest_node_ids=[client.node_id.to_bytes()],
                                        nearest_peer_ids=[client_p2p.peer_id.to_bytes()])],
            peer=server.protocol.node_info).ByteSize())
        return (sum(meter.read(pids)) / 2 - protobuf) / count
    finally:
        await client.shutdown()
        await server.shutdown()


def main(argv: list[str]) -> None:
    count = int(argv[0]) if argv else 50
    size = int(argv[1]) if len(argv) > 1 else 6000
    got = asyncio.run(_measure(count, size))
    print(f"{count} requests for a {size}-byte delta between two p2pd on loopback; per request, beyond the "
          f"request and its answer: {got['stream_per_request']:.0f} B with a stream opened for each, "
          f"{got['kept_stream']:.0f} B on a kept stream ({got['kept_streams_opened']} opened); a unary DHT "
          f"RPC (call_find, {count} calls): {got['unary_rpc']:.0f} B beside its protobuf request and answer")


if __name__ == "__main__":
    main(sys.argv[1:])
