"""A py-libp2p peer of the delta exchange, for tests/test_net_deltas.py, with no hivemind in its
process: it serves delta_fixture's delta of round ROUND, trains round ROUND + 1 (its delta
published when a line "publish" comes on stdin) and, given a hivemind peer's multiaddr, pulls
that peer's delta of ROUND twice (one kept stream), a round it never trained and ROUND from an
incarnation it is not. Prints JSON lines: {"maddr"} once listening, {"pulled": …} after the
pulls, {"bytes_sent", "hivemind_loaded"} when stdin closes.

usage: python lp2p_delta.py IDENTITY_FILE HIVEMIND_MADDR|- HOLD_S
       python lp2p_delta.py IDENTITY_FILE pull MADDR[,MADDR…] TIMEOUT_S
The second form pulls round ROUND once from each peer in turn (tests/peers/serve_delta.py's
bad answers among them), then from the first again, and prints {"pulled": [outcome, …]}.
"""

from __future__ import annotations

import hashlib
import json
import sys

import trio

from delta_fixture import ROUND, SPEC, good_blob
from locoswarm.net.deltas import DeltaServer, call_get_delta, delta_streams
from locoswarm.net.host import dial, key_pair_of, run_host
from locoswarm.net.runinfo import serve_run_info

LIFETIME_S = 120.0


def say(**fields) -> None:
    print(json.dumps(fields), flush=True)


async def outcome(call) -> list:
    try:
        delta = await call
        return ["ok", delta.sender, delta.round, hashlib.sha256(delta.wire).hexdigest()]
    except Exception as e:
        return [type(e).__name__, str(e)]


async def main(identity_path: str, hivemind_maddr: str, hold_s: str) -> None:
    key_pair, _ = key_pair_of(open(identity_path, "rb").read())
    with trio.fail_after(LIFETIME_S):
        async with run_host(key_pair) as host:
            server = DeltaServer(host, incarnation=5, hold_s=float(hold_s))
            server.start()
            server.publish(ROUND, good_blob(ROUND, sender="lp2p"))
            server.training(ROUND + 1)
            serve_run_info(host, SPEC.run_id, SPEC.spec_hash, private=False)
            maddr = str(host.get_addrs()[0])
            say(maddr=maddr if "/p2p/" in maddr else f"{maddr}/p2p/{host.get_id()}")
            if hivemind_maddr != "-":
                peer = await dial(host, hivemind_maddr)
                streams = delta_streams(host)
                pulled = {}
                for case, round_, incarnation in (("first", ROUND, 0), ("again", ROUND, 0), ("never", ROUND - 1, 0),
                                                  ("old_life", ROUND, 99)):
                    pulled[case] = await outcome(call_get_delta(streams, peer, round_, SPEC, timeout_s=10.0,
                                                                incarnation=incarnation))
                pulled["streams_opened"] = streams.num_opened
                say(pulled=pulled)
            stdin = trio.wrap_file(sys.stdin)
            async for line in stdin:
                if line.strip() == "publish":
                    server.publish(ROUND + 1, good_blob(ROUND + 1, sender="lp2p", seed=12))
                    say(published=ROUND + 1)
            server.stop()
    say(bytes_sent=server.bytes_sent,
        hivemind_loaded=any(m == "hivemind" or m.startswith("hivemind.") for m in sys.modules))


async def pull_each(identity_path: str, maddrs: str, timeout_s: str) -> None:
    key_pair, _ = key_pair_of(open(identity_path, "rb").read())
    results = []
    with trio.fail_after(LIFETIME_S):
        async with run_host(key_pair) as host:
            streams = delta_streams(host)
            targets = maddrs.split(",")
            for maddr in targets + targets[:1]:
                async def pull(maddr: str = maddr):
                    peer = await dial(host, maddr)
                    return await call_get_delta(streams, peer, ROUND, SPEC, timeout_s=float(timeout_s))
                results.append(await outcome(pull()))
    say(pulled=results)


if __name__ == "__main__":
    if sys.argv[2] == "pull":
        trio.run(pull_each, sys.argv[1], *sys.argv[3:5])
    else:
        trio.run(main, *sys.argv[1:4])
