"""A malicious peer for the daemon tests: joins a swarm's DHT through ADDR, claims a place in
every round (finished round progress with a token trained, for rounds 0..15, told over the
progress streams to every peer whose record it reads in the registry, again every
REFRESH_S) so that honest peers count it as a participant and pull its delta, and
answers every delta request with a bad frame. Prints its peer id, then runs until stdin
closes or it is killed.

usage: python evil_delta.py MODE ADDR [SPEC [FIRST]]   (SPEC: a run spec TOML, "" or none for the default
  spec; FIRST: claim rounds FIRST..15 only, an identity that joins late)
  MODE garbage:     a length header, then that many random bytes (not a delta)
  MODE truncated:   a length header larger than what follows, then the stream closes
  MODE oversized:   a length header of 2**40 bytes
  MODE stall:       "not yet" to every request: it claims the rounds and serves nothing
  well-formed deltas of the default spec, bad in one way:
  MODE nan:         a scale pair of NaN
  MODE huge:        values about 1000 times an honest delta's
  MODE loud:        values about 10 times an honest delta's (a sybil group's attack: together
                    they would hold the round's median, so nothing gets clipped)
  MODE wrong_round: a delta of another round than the one asked
  MODE replay:      the first honest peer's delta of the previous round, served again (its
                    newest older one fetched, once that peer no longer serves that round)
  MODE inflated:    a claim of the spec's maximum token count (and 10**9 tokens of progress)
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import sys
import tempfile

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, PeerID

from locoswarm.bench.fake_peer import crafted, delta_layout
from locoswarm.node.exchange import PROTOCOL, REQUEST_LEN
from locoswarm.node.statedir import IDENTITY_FILE, identity_key, open_state_dir
from locoswarm.node.progress import PROTOCOL as PROGRESS_PROTOCOL, progress_frame
from locoswarm.node.registry import PeerRegistry
from locoswarm.node.spec import load_spec
from locoswarm.protocol.records import Progress

ROUNDS = range(16)
"""The rounds claimed: the tests train 6 rounds at most. An honest peer keeps only the
progress of the rounds around its own, so the claims are told again every REFRESH_S."""
REFRESH_S = 1.0


def frame(mode: str, rng: random.Random) -> bytes:
    if mode == "garbage":
        junk = rng.randbytes(4096)
        return len(junk).to_bytes(8, "big") + junk
    if mode == "truncated":  # announced below the default spec's limit (~14 kB), so the cut is what fails
        return (4096).to_bytes(8, "big") + rng.randbytes(100)
    if mode == "oversized":
        return (1 << 40).to_bytes(8, "big") + b"\0" * 1024
    if mode == "stall":
        return (0).to_bytes(8, "big")  # "not yet", for ever
    raise SystemExit(f"unknown mode {mode!r}")


CRAFTED = ("nan", "huge", "loud", "wrong_round", "replay", "inflated")


async def main(mode: str, addr: str, spec_path: str | None = None, first: str = "0") -> None:
    spec = load_spec(spec_path or None)
    rng = random.Random(mode)
    state = tempfile.mkdtemp(prefix="evil-")
    os.close(open_state_dir(state))
    validator = RSASignatureValidator(identity_key(state))
    p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=[addr],
                           identity_path=os.path.join(state, IDENTITY_FILE))
    me = p2p.peer_id.to_base58()

    if mode in CRAFTED:
        import torch

        dspec = delta_layout(spec)
        honest = PeerID.from_base58(addr.split("/p2p/")[1])
        served: dict[int, bytes] = {}
        """Round → the crafted frame answered for it."""
        replayed: dict[int, bytes] = {}
        """Round asked for → the honest peer's delta of the round before, as fetched then."""
        torch.set_num_threads(1)

    async def answer(round_: int) -> bytes:
        if mode not in CRAFTED:
            return frame(mode, rng)
        if round_ in served:  # the same bytes for every asker: compressed once, not once per honest peer
            return served[round_]
        if mode == "replay":
            from locoswarm.node.streams import call_framed

            old = await call_framed(p2p, honest, PROTOCOL, max(0, round_ - 1).to_bytes(8, "big") + bytes(8), limit=1 << 24,
                                    limit_name="limit", timeout_s=10)
            if old:
                replayed[round_] = old
            # An asker a round behind the honest peer finds that round's delta gone from it:
            # replay the newest one fetched instead. Answering "none" would be another attack,
            # a stall that holds the asker's round to its deadline (30 s by default).
            earlier = [r for r in replayed if r <= round_]
            body = replayed[max(earlier)] if earlier else b""
        else:
            body = crafted(mode, round_, me, dspec, spec.diloco.compression)
        framed = len(body).to_bytes(8, "big") + body
        if mode != "replay":  # a replayed answer may change once a newer round is fetched
            served[round_] = framed
        return framed

    async def rpc_get_delta(info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            round_ = int.from_bytes((await reader.readexactly(REQUEST_LEN))[:8], "big")
            writer.write(await answer(round_))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()

    await p2p.add_binary_stream_handler(PROTOCOL, rpc_get_delta)
    dht = await DHTNode.create(p2p=p2p, initial_peers=[addr], record_validator=validator)
    registry = PeerRegistry(dht, spec.run_id, spec.hash(), validator=validator, read_period_s=REFRESH_S, peer_id=me)
    # Done with a token trained: a participant to pull from (done with none would be a peer
    # that gave the round up, which nobody asks).
    claims = b"".join(progress_frame(Progress(tokens=10**9 if mode == "inflated" else 1, tokens_per_s=0.0, done=True,
                                              round=r)) for r in ROUNDS if r >= int(first))

    async def claim_to(peer: str) -> None:
        try:
            _, _, writer = await asyncio.wait_for(
                p2p.call_binary_stream_handler(PeerID.from_base58(peer), PROGRESS_PROTOCOL), 5.0)
            writer.write(claims)
            await asyncio.wait_for(writer.drain(), 5.0)
            writer.close()
        except Exception:  # noqa: BLE001 - an honest peer gone or unreachable: the next pass tries again
            pass

    async def keep_claiming() -> None:
        while True:  # told again and again: honest peers keep only the rounds around their own
            try:
                records = await registry.peers()
            except Exception:  # noqa: BLE001 - the DHT not reachable yet: the next pass tries again
                records = []
            await asyncio.gather(*(claim_to(r.peer_id) for r in records if r.peer_id != me))
            await asyncio.sleep(REFRESH_S)

    claiming = asyncio.create_task(keep_claiming())
    print(me, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the test closes stdin
    claiming.cancel()
    await dht.shutdown()
    await p2p.shutdown()
    shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
