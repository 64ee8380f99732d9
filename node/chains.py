"""Round chains: what names an outer state without hashing a model. A peer's chain after
round r is h_r+1 = BLAKE2b(h_r ‖ r ‖ the sorted (sender, tokens, content digest) of the deltas
its outer step aggregated), from h_0 = BLAKE2b(spec hash): equal chains at a round mean the
same deltas since the same start. Records show the chain at their round, the round before and
two anchor rounds; node/lineage.py decides with them whose state to take, node/replay.py
recomputes them over the deltas of the rounds a peer catches up on."""

from __future__ import annotations

import hashlib

from locoswarm.protocol.records import PeerRecord


def round_chain(previous: str, round_: int, aggregated: list[tuple]) -> str:
    """The chain after aggregating round `round_`: `aggregated` is the (sender, token count)
    or (sender, token count, content digest: `delta_content`) of each delta in the outer
    step, in any order. `previous` is the chain before it (`chain_start` at round 0)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(bytes.fromhex(previous))
    h.update(round_.to_bytes(8, "big"))
    for sender, tokens, *content in sorted(aggregated):
        h.update(sender.encode() + b"\0" + tokens.to_bytes(8, "big") + b"".join(content))
    return h.hexdigest()


def delta_content(d) -> bytes:
    """A digest of what a screened delta adds to the outer state (its packed indices and
    codes and its scales, after the clip): two deltas of one sender with one token count
    but other values (a peer that served a round's delta, then another after taking a
    state, or one that serves each asker a different one) make different chains, where
    (sender, tokens) alone let the outer states part unseen."""
    h = hashlib.blake2b(digest_size=16)
    for t in d.tensors:
        for part in (t.packed_indices, t.packed_codes, t.scales):
            h.update(part.detach().to("cpu").contiguous().numpy().tobytes())
    return h.digest()


def chain_start(spec_hash: bytes) -> str:
    """The chain of a run's initial outer state (round 0)."""
    return hashlib.blake2b(b"locoswarm round chain\0" + spec_hash, digest_size=16).hexdigest()


def known_chains(r: PeerRecord) -> dict[int, str]:
    """The round chains record `r` shows: at its round, at the round before and at its
    anchors, where known."""
    return {k: v for k, v in ((r.round, r.chain), (r.round - 1, r.prev_chain), *r.anchors) if v}


ANCHOR_EVERY = 8
"""Rounds between two anchors: every record shows its chain at the last two multiples of
this (PeerRecord.anchors), so peers whose records stand up to ANCHOR_EVERY rounds apart
share a round to compare at. The timing assumption this makes explicit: a peer's record
reaches the peers it trains with over the progress streams at each change (node/progress.py)
and the others through the registry, refreshed and read every third of the record TTL
(3.3 s by default), so a split is found on any machine that runs fewer than ANCHOR_EVERY
rounds per refresh (2.4 a second); a faster swarm (which the round deadlines and state
downloads do not allow) would compare only when its records happen to meet."""


def anchor_rounds(outer_steps: int) -> list[int]:
    """The anchor rounds a record at `outer_steps` shows: the last two multiples of
    ANCHOR_EVERY at or before it."""
    last = outer_steps - outer_steps % ANCHOR_EVERY
    return [k for k in (last - ANCHOR_EVERY, last) if k >= 0]
