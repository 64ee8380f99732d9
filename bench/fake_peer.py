"""A fake identity for `locoswarm bench swarm --fakes K`: the cheapest attack on a round's
membership. It joins the swarm's DHT and keeps a validly signed peer record of its own in the
run's registry, copying the swarm's newest round so that it looks like a peer of every round,
but it trains nothing and serves nothing (its p2pd answers no delta request). What it
measures: whether a record alone can hold the honest peers' rounds (node/membership.py: it
must not).

Two more attacks of issue 19, each announced once a first line arrives on stdin (so that the
caller picks the moment) and told over the progress streams to every peer it reads, as an
attacker would (the registry shows a record only at its next read); the fake answers those
streams, so it stays in the others' view. What they measure: that no peer with earned weight
in its ledger follows them (node/lineage.py), and with `bench swarm --fake-mode ahead|chain`
(ahead:20, told when the fake phase begins) what they cost the swarm's round rate.
- `ahead:K`: its record shows the slowest record's round plus K, at a dialable address that
  serves no state.
- `chain`: its record shows an invented round chain at round 0 (an anchor every record
  shows), the same for every fake of the run: a group of fakes that outnumbers the honest
  peers wins the silent-split vote where identities are counted.

A third, for `locoswarm bench swarm --fakes K --fake-mode stall`, from its start:
- `stall`: it claims every round done over the progress streams (one token trained, like a
  participant) and answers every delta request "not yet": live, and serving nothing. What it
  measures: that a round waits for such an identity once, not every round (node/pull.py
  UNPROVEN_WAIT_S, node/membership.py withholding).

A fourth, for `locoswarm bench swarm --fakes K --fake-mode loud`, from its start:
- `loud`: it claims every round done, as `stall` does, and answers every delta request with
  a well-formed delta of the round asked, a random direction at about ten times an honest
  delta's values (issue 19's sybil group: K of them against fewer honest peers would hold a
  median counted by identities). What it measures: what such a group costs the swarm's round
  rate and eval loss once earned weight pools them, the clip bounds them and the checks
  exclude them.

And a cheaper one, for `locoswarm bench swarm --fakes K --fake-mode keys`, announced once a
first line arrives on stdin (the bench starts it early: its start takes seconds):
- `keys:K`: K identities from one process, its own and K − 1 keys without a host of their
  own, each with a validly signed record (its peer id the hash of the key that signs it)
  copying the swarm's round, at an address where no host of that id answers. Keys cost
  milliseconds; what it measures is that records alone, however many, neither hold a round
  nor split the swarm (issue 19's "40 such keys": 23.6 → 3.2 rounds a minute and two digests).

usage: python -m locoswarm.bench.fake_peer MADDR SPEC_PATH [ahead:K | chain | stall | loud | keys:K]
(runs until stdin closes or it is killed; prints "fake <peer id> announced" once its records are
first stored)
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import secrets
import shutil
import sys
import tempfile
from dataclasses import replace
from typing import Callable

REFRESH_S = 1.0
CLAIMING = ("stall", "loud")
"""Modes that claim every round done, as a participant would."""
LOUD_SCALE = 5e-2
"""Per entry, about ten times an honest delta's values after a round of the default spec (5e-3)."""


def delta_layout(spec):
    """The wire layout of `spec`'s deltas (node/trainer.py's, without a trainer: the model is
    built for its parameters' names and shapes)."""
    from locoswarm.node.trainer import MAX_TOKENS_FACTOR
    from locoswarm.optim import delta_spec
    from locoswarm.workload.model import build_model
    from locoswarm.workload.tokenizer import get_tokenizer

    model = build_model(spec.model, get_tokenizer(spec.tokenizer).vocab_size, spec.data.seq_len, spec.seed)
    named = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    return delta_spec(named, spec.diloco.compression, run_id=spec.run_id, spec_hash=spec.hash(),
                      max_tokens=MAX_TOKENS_FACTOR * spec.diloco.inner_steps * spec.batch_size * spec.data.seq_len)


def crafted(mode: str, round_: int, me: str, dspec, cfg, tokens: int = 2560) -> bytes:
    """A well-formed delta of layout `dspec` for `round_` from `me`, bad as `mode` says: nan
    (a scale pair of NaN), huge (values about 1000 times an honest delta's), loud (about 10
    times), wrong_round (a delta of another round), inflated (a claim of the layout's maximum
    token count); any other mode: an honest delta's size, a random direction."""
    import zlib

    import torch

    from locoswarm.optim import ErrorFeedbackCompressor
    from locoswarm.protocol import DeltaMessage, encode_delta

    gen = torch.Generator().manual_seed(zlib.crc32(f"{me}:{round_}".encode()))  # each identity its own noise
    scale = {"huge": 5.0, "loud": LOUD_SCALE}.get(mode, 5e-3)
    comp = ErrorFeedbackCompressor(dspec.tensors, cfg, "cpu")
    packed, _ = comp.compress([scale * torch.randn(t.shape, generator=gen) for t in dspec.tensors])
    if mode == "nan":
        first = packed[0]
        packed[0] = type(first)(**{**{f: getattr(first, f) for f in first.__slots__},
                                   "scales": b"\xc0\x7f" * (len(first.scales) // 2)})
    msg = DeltaMessage(run_id=dspec.run_id, spec_hash=dspec.spec_hash,
                       round=round_ + 7 if mode == "wrong_round" else round_, sender=me,
                       num_tokens=dspec.max_tokens if mode == "inflated" else tokens, tensors=tuple(packed))
    return encode_delta(msg)


def parse_mode(mode: str) -> tuple[int, int]:
    """(K of ahead:K, else 0; K of keys:K, else 1); SystemExit naming the modes for any other."""
    try:
        ahead = int(mode.removeprefix("ahead:")) if mode.startswith("ahead:") else 0
        keys = int(mode.removeprefix("keys:")) if mode.startswith("keys:") else 1
    except ValueError:
        ahead = keys = -1
    named = mode in CLAIMING + ("chain",) or mode.startswith("keys:")
    if ahead < 0 or keys < 1 or mode and not ahead and not named:
        raise SystemExit(f"unknown mode {mode!r}: ahead:K (K > 0), chain, stall, loud or keys:K (K > 0)")
    return ahead, keys


def waits_to_be_told(mode: str) -> bool:
    """Whether a fake of `mode` waits for a line on its stdin before it shows itself (keys:K,
    ahead:K, chain), as bench/churn.py's Fakes tells it when its phase begins; a plain record
    and stall show themselves at once."""
    return mode.startswith(("keys:", "ahead:")) or mode == "chain"


async def main(maddr: str, spec_path: str, mode: str = "") -> None:
    from hivemind.dht.node import DHTNode

    from locoswarm.node.config import NodeConfig
    from locoswarm.node.statedir import IDENTITY_FILE, identity_key, open_state_dir
    from locoswarm.node.exchange import PROTOCOL as DELTA_PROTOCOL
    from locoswarm.node.progress import PROTOCOL as PROGRESS_PROTOCOL, progress_frame, record_frame
    from locoswarm.node.registry import PeerRegistry
    from locoswarm.node.signers import CachedSignatureValidator, peer_id_of_owner
    from locoswarm.node.spec import load_spec
    from locoswarm.protocol.records import PeerRecord, Progress

    ahead, keys = parse_mode(mode)
    claims = mode in CLAIMING
    told_modes = bool(ahead) or mode in CLAIMING + ("chain",)
    """Modes that tell the peers over progress streams (and answer theirs)."""
    spec = load_spec(spec_path)
    invented = ((0, hashlib.blake2b(b"invented" + spec.hash(), digest_size=16).hexdigest()),) if mode == "chain" else ()
    state = tempfile.mkdtemp(prefix="locoswarm-fake-")
    try:
        os.close(open_state_dir(state))
        validator = CachedSignatureValidator(identity_key(state))
        dht = await DHTNode.create(initial_peers=[maddr], host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                   record_validator=validator, identity_path=os.path.join(state, IDENTITY_FILE))
        me = dht.protocol.p2p.peer_id.to_base58()
        addrs = tuple(str(a) for a in await dht.protocol.p2p.get_visible_maddrs())[:4]
        # The daemons' record lifetime: with a shorter one the registry refuses their records
        # as expiring too far ahead, and a fake saw no round but 0 (found 2026-12-05).
        ttl_s = NodeConfig.__dataclass_fields__["record_ttl_s"].default
        registries = [(me, addrs, PeerRegistry(dht, spec.run_id, spec.hash(), ttl_s=ttl_s, validator=validator))]
        registry = registries[0][2]
        for ghost in _ghosts(keys - 1):
            ghost_id = peer_id_of_owner(ghost.get_public_key().to_bytes())
            at = tuple(a.rsplit("/p2p/", 1)[0] + f"/p2p/{ghost_id}" for a in addrs)  # no host of that id answers
            registries.append((ghost_id, at, PeerRegistry(dht, spec.run_id, spec.hash(), ttl_s=ttl_s, peer_id=ghost_id,
                                                          validator=CachedSignatureValidator(ghost), signs=True)))
        incarnation = secrets.randbelow(2**62) + 1
        loop = asyncio.get_running_loop()
        if mode.startswith("keys:"):  # ready: announce when told (a line on stdin), as the told modes do below
            await loop.run_in_executor(None, sys.stdin.readline)
        if told_modes:
            # Progress streams to it open (and are read to the end): a peer whose streams
            # fail is out of the others' view within seconds (node/membership.py gone).
            await dht.protocol.p2p.add_binary_stream_handler(PROGRESS_PROTOCOL, _drain)
        if mode == "loud":
            layout = delta_layout(spec)
            plan = spec.diloco.inner_steps * spec.batch_size * spec.data.seq_len
            made: dict[int, bytes] = {}

            def loud(round_: int) -> bytes:
                """Each round's delta made once for every asker (it costs the machine the peers share)."""
                if round_ not in made:
                    made.clear()
                    made[round_] = crafted("loud", round_, me, layout, spec.diloco.compression, tokens=plan)
                return made[round_]

            import torch

            torch.set_num_threads(1)  # the peers' cores are the ones it shares
            loud(0)  # torch's first compression takes seconds: done before it shows itself, as an attacker would
            await dht.protocol.p2p.add_binary_stream_handler(DELTA_PROTOCOL, functools.partial(_answer, loud))
        elif claims:
            await dht.protocol.p2p.add_binary_stream_handler(DELTA_PROTOCOL, _not_yet)
        elif told_modes:
            await loop.run_in_executor(None, sys.stdin.readline)
        stdin_closed = loop.run_in_executor(None, sys.stdin.read)
        shown, seq = False, 1
        while not stdin_closed.done():
            ours = {peer for peer, _, _ in registries}
            records = [r for r in await registry.peers() if r.peer_id not in ours]
            rounds, others = [r.round for r in records], [r.peer_id for r in records]
            # Ahead of the slowest record, not the newest: several fakes ahead of each
            # other's rounds would run away together.
            newest = (min if ahead else max)(rounds, default=0)
            record = PeerRecord(peer_id=me, addrs=addrs, device="cuda", tokens_per_s=1e5, round=newest + ahead,
                                spec_hash=spec.hash(), incarnation=incarnation, seq=seq, anchors=invented)
            seq += 1
            stored = all(await asyncio.gather(*(
                store.announce(replace(record, peer_id=peer, addrs=at)) for peer, at, store in registries)))
            if told_modes:
                told = record_frame(record)
                if claims:  # done with a token in the rounds around the swarm's: a participant to pull from
                    told += b"".join(progress_frame(Progress(tokens=1, tokens_per_s=0.0, done=True,
                                                             incarnation=incarnation, round=r))
                                     for r in range(max(0, min(rounds, default=0) - 1), max(rounds, default=0) + 3))
                await asyncio.gather(*(_tell(dht.protocol.p2p, peer, told) for peer in others))
            if stored and not shown:
                print(f"fake {me} announced", flush=True)  # the bench's fake phase starts here (bench/churn.py)
                shown = True
            await asyncio.wait([stdin_closed], timeout=REFRESH_S)
        await dht.shutdown()
    finally:
        shutil.rmtree(state, ignore_errors=True)


def _ghosts(count: int) -> list:
    """`count` fresh RSA keys (hivemind's: the kind that signs records), ~70 ms each."""
    from hivemind.utils.crypto import RSAPrivateKey

    return [RSAPrivateKey() for _ in range(count)]


async def _drain(info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while await reader.read(1 << 16):
            pass
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def _not_yet(info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer every delta request on the stream "not yet" (node/exchange.py: a length of 0)."""
    await _answer(lambda round_: b"", info, reader, writer)


async def _answer(delta: Callable[[int], bytes], info, reader: asyncio.StreamReader,
                  writer: asyncio.StreamWriter) -> None:
    """Answer every delta request on the stream with `delta(round asked)` (b"": "not yet")."""
    from locoswarm.node.exchange import REQUEST_LEN

    try:
        while True:
            body = delta(int.from_bytes((await reader.readexactly(REQUEST_LEN))[:8], "big"))
            writer.write(len(body).to_bytes(8, "big") + body)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def _tell(p2p, peer: str, message: bytes) -> None:
    from hivemind.p2p import PeerID

    from locoswarm.node.progress import PROTOCOL as PROGRESS_PROTOCOL

    try:
        _, _, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(PeerID.from_base58(peer),
                                                                             PROGRESS_PROTOCOL), 5.0)
        writer.write(message)
        await asyncio.wait_for(writer.drain(), 5.0)
        writer.close()
    except Exception:  # noqa: BLE001 - a peer gone or unreachable: the next pass tries again
        pass


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
