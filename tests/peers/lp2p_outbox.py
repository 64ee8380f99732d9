"""The progress teller of locoswarm.net (net/progress.py) between two py-libp2p hosts, for
tests/test_net_progress.py; no hivemind here. The receiver is a raw handler that decodes
every message each stream carries, in order, with protocol/progresswire.py's decoder (as a
daemon does), and can reset a stream or stop its host. In turn:

1. the sender tells its record and round 3 twice and round 4: the receiver gets the record
   first and each round's latest progress;
2. a new record of the same base goes on the same stream as an update;
3. the receiver resets the stream (a handler that restarted): the sender opens a new one
   and tells everything again, its record whole first;
4. the receiver's host stops: the sender's next news finds no stream opening and reports
   the peer gone (`on_gone`, with served = True).

Prints one JSON object: {"streams": [[[kind, round or null, tokens or seq], …], …], …}.

usage: python lp2p_outbox.py
"""

from __future__ import annotations

import json
import sys
import time

import multiaddr
import trio
from libp2p.custom_types import TProtocol

from lp2p_rpc import identity_file

from locoswarm.net.framed import read_exactly
from locoswarm.net.host import key_pair_of, make_host, peer_info
from locoswarm.net.progress import ProgressStreams
from locoswarm.protocol.progresswire import PROTOCOL, StreamDecoder
from locoswarm.protocol.records import PeerRecord, Progress

LIFETIME_S = 120.0
SPEC_HASH = bytes(range(32))


class Receiver:
    """A progress-stream reader that keeps what each stream carried, in order."""

    def __init__(self) -> None:
        self.streams: list[list] = []
        self.open: list = []

    async def handle(self, stream) -> None:
        log: list = []
        self.streams.append(log)
        self.open.append(stream)
        decoder = StreamDecoder(str(stream.muxed_conn.peer_id), SPEC_HASH)
        try:
            while True:
                kind = await read_exactly(stream, 1)
                head = await read_exactly(stream, 2)
                if len(kind) < 1 or len(head) < 2:
                    return
                body = await read_exactly(stream, int.from_bytes(head, "big"))
                told = decoder.decode(kind[0], body)
                if isinstance(told, Progress):
                    log.append([kind[0], told.round, told.tokens])
                else:
                    log.append([kind[0], None, told.seq])
        except Exception as e:  # a reset stream: the log shows what came before
            log.append(["ended", None, type(e).__name__])


async def wait_for(check, timeout_s: float = 30.0) -> bool:
    with trio.move_on_after(timeout_s):
        while not check():
            await trio.sleep(0.05)
        return True
    return False


def record(peer_id: str, seq: int, round_: int) -> PeerRecord:
    return PeerRecord(peer_id=peer_id, addrs=("/ip4/127.0.0.1/tcp/1",), device="cpu", tokens_per_s=10.0,
                      round=round_, spec_hash=SPEC_HASH, paused=False, incarnation=1, seq=seq)


def progress(round_: int, tokens: int) -> Progress:
    return Progress(tokens=tokens, tokens_per_s=10.0, done=False, round=round_)


async def serve_receiver(receiver: Receiver, key_pair, listen: str, *, task_status=trio.TASK_STATUS_IGNORED):
    host = make_host(key_pair)
    async with host.run(listen_addrs=[multiaddr.Multiaddr(listen)]):
        host.set_stream_handler(TProtocol(PROTOCOL), receiver.handle)
        stop = trio.Event()
        task_status.started((host, stop))
        await stop.wait()


async def main() -> dict:
    sender_keys, sender_id = key_pair_of(identity_file())
    receiver_keys, _ = key_pair_of(identity_file())
    receiver = Receiver()
    gone: list = []
    out: dict = {}
    with trio.fail_after(LIFETIME_S):
        async with trio.open_nursery() as nursery:
            r_host, r_stop = await nursery.start(serve_receiver, receiver, receiver_keys, "/ip4/127.0.0.1/tcp/0")
            r_addr = f"{r_host.get_addrs()[0]}"
            if "/p2p/" not in r_addr:
                r_addr += f"/p2p/{r_host.get_id().to_base58()}"
            s_host = make_host(sender_keys)
            async with s_host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
                streams = ProgressStreams(s_host, SPEC_HASH, on_gone=lambda peer, served: gone.append([peer, served]))
                streams.start(nursery)
                info = peer_info(r_addr)
                await s_host.connect(info)
                peer = info.peer_id
                # 1. the record, a round told twice, another round
                streams.tell(peer, record=record(sender_id.peer_id, 1, 3), progress=progress(3, 100))
                streams.tell(peer, progress=progress(3, 200))
                streams.tell(peer, progress=progress(4, 50))
                has = lambda log, entry: entry in log  # noqa: E731
                out["first_came"] = await wait_for(lambda: receiver.streams and has(receiver.streams[0], [1, 3, 200])
                                                   and has(receiver.streams[0], [1, 4, 50]))
                # 2. a new record of the same base: an update on the same stream
                streams.tell(peer, record=record(sender_id.peer_id, 2, 4))
                out["update_came"] = await wait_for(lambda: has(receiver.streams[0], [3, None, 2]))
                # 3. the receiver resets the stream: everything again on a new one
                await receiver.open[0].reset()
                out["second_came"] = await wait_for(lambda: len(receiver.streams) >= 2
                                                    and has(receiver.streams[1], [1, 4, 50]))
                out["telling"] = streams.telling(peer)
                # 4. the receiver's host stops: the next news finds the peer gone
                r_stop.set()
                await wait_for(lambda: not streams.telling(peer), 10.0)
                started = time.monotonic()
                streams.tell(peer, progress=progress(5, 10))
                out["gone_came"] = await wait_for(lambda: gone)
                out["gone_after_s"] = round(time.monotonic() - started, 2)
                out["gone"], out["gone_map"] = gone, sorted(streams.gone)
                out["streams_opened"] = streams.streams_opened
                await streams.close()
            nursery.cancel_scope.cancel()
    out["streams"] = receiver.streams
    out["receiver"], out["sender"] = str(peer), sender_id.peer_id
    out["hivemind_loaded"] = any(m == "hivemind" or m.startswith("hivemind.") for m in sys.modules)
    return out


if __name__ == "__main__":
    print(json.dumps(trio.run(main)), flush=True)
