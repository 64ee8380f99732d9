"""A py-libp2p peer on the progress streams of two daemons, for tests/test_net_swarm.py,
with no hivemind in its process. It tells each daemon its record (paused: nobody waits for
it), reads the records they tell back, then tells each that it gives up the round its record
shows and the next (done, no tokens: no delta will come) and reads the progress they tell
back in those rounds. Last it tells daemon a, on a stream of its own, the record daemon b
told it, which a must refuse (a record naming another peer than its sender). Prints one JSON
object: {"records": {peer: [round, spec hash hex]}, "progress": {peer: [[round, tokens, done],
…]}, "told_back_after_s", "hivemind_loaded"}.

usage: python lp2p_progress.py IDENTITY_FILE SPEC_HASH_HEX MADDR_A MADDR_B
"""

from __future__ import annotations

import json
import sys
import time

import trio
from libp2p.custom_types import TProtocol

from locoswarm.net.host import dial, key_pair_of, run_host
from locoswarm.net.progress import ProgressStreams
from locoswarm.net.runinfo import call_which_run
from locoswarm.protocol.progresswire import PROTOCOL, record_frame
from locoswarm.protocol.records import PeerRecord, Progress

LIFETIME_S = 120.0


async def wait_for(check, timeout_s: float) -> bool:
    with trio.move_on_after(timeout_s):
        while not check():
            await trio.sleep(0.05)
        return True
    return False


async def main(identity_path: str, spec_hex: str, maddr_a: str, maddr_b: str) -> dict:
    key_pair, identity = key_pair_of(open(identity_path, "rb").read())
    spec_hash = bytes.fromhex(spec_hex)
    out: dict = {}
    with trio.fail_after(LIFETIME_S):
        async with run_host(key_pair) as host, trio.open_nursery() as nursery:
            streams = ProgressStreams(host, spec_hash)
            streams.start(nursery)
            a, b = await dial(host, maddr_a), await dial(host, maddr_b)
            out["runs"] = {}
            for peer in (a, b):
                answer = await call_which_run(host, peer)
                out["runs"][str(peer)] = None if answer is None else [answer.run_id, answer.spec_hash]
            ours = PeerRecord(peer_id=identity.peer_id, addrs=(str(host.get_addrs()[0]),), device="cpu",
                              tokens_per_s=0.0, round=0, spec_hash=spec_hash, paused=True, incarnation=1, seq=1)
            for peer in (a, b):
                streams.tell(peer, record=ours)
            out["records_came"] = await wait_for(lambda: {str(a), str(b)} <= set(streams.records), 30.0)
            started = time.monotonic()
            out["gave_up"] = {}
            for peer in (a, b):
                shown = streams.records[str(peer)].round
                out["gave_up"][str(peer)] = [shown, shown + 1]
                for round_ in (shown, shown + 1):
                    streams.tell(peer, progress=Progress(tokens=0, tokens_per_s=0.0, done=True, round=round_))
            told_back = lambda: all(any(str(p) in seen for seen in streams.progress.values()) for p in (a, b))  # noqa: E731
            out["told_back_after_s"] = round(time.monotonic() - started, 2) if await wait_for(told_back, 30.0) else None
            out["records"] = {p: [r.round, r.spec_hash.hex()] for p, r in streams.records.items()}
            out["progress"] = {}
            for round_, seen in sorted(streams.progress.items()):
                for peer, p in seen.items():
                    out["progress"].setdefault(peer, []).append([round_, p.tokens, p.done])
            forged = await host.new_stream(a, [TProtocol(PROTOCOL)])
            await forged.write(record_frame(streams.records[str(b)]))
            await trio.sleep(1.0)
            await streams.close()
            out["streams_opened"] = streams.streams_opened
    out["a"], out["b"], out["me"] = str(a), str(b), identity.peer_id
    out["hivemind_loaded"] = any(m == "hivemind" or m.startswith("hivemind.") for m in sys.modules)
    return out


if __name__ == "__main__":
    print(json.dumps(trio.run(main, *sys.argv[1:5])), flush=True)
