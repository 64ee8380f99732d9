"""Round agreement: when a round ends and who took part in it.

Round boundaries follow global token progress, as hivemind's Optimizer does with its target
batch size: every peer training round r reports in the DHT how many tokens it has trained
on in r and at what rate, under the round's key (one subkey per peer). The round ends when
the swarm's tokens reach H · batch · seq_len per participating peer, so on average each
peer does the H inner steps of the algorithm, and a fast GPU and a slow CPU both
contribute to every round they reach (each with its own token count, which weighs its
delta). Between reports a peer extrapolates the others' progress from their rate, for at
most a few report intervals: a peer that vanished stops counting. We chose tokens over
wall-clock windows because the simulation, and the learning-rate schedule, are in tokens;
a window would tie the algorithm to the slowest link. Peers see each other's progress a
report late and a step is indivisible, so a round overshoots its target by about a step
per peer; the swarm's accumulated overshoot (or shortfall), from the token counts in the
rounds' deltas, is taken off the next round's target, so over many rounds the swarm trains
the tokens it planned.

The round's participants are the peers that report progress for it. Every live peer of
the registry that should be in the round (its record is at this round or the one before)
counts in the target and is waited for even before its first report, so that peers agree
on the participants (a peer seen by some and not by others splits the outer state). Pulling
the round's deltas from them is node/pull.py's.

Progress entries are signed like peer records (hivemind's signature validator, the subkey
naming the peer id and its identity key): an entry is taken only when the signing key is
the identity of the peer it names, so no peer can report, inflate or stall the round for
another; with an access policy, entries of peers not admitted are ignored.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time

from locoswarm.node.registry import subkey_author
from locoswarm.node.replicas import ReplicaStore
from locoswarm.optim.screen import median
from locoswarm.protocol import ProtocolError
from locoswarm.protocol.records import Progress, decode_progress, encode_progress

log = logging.getLogger(__name__)
EXTRAPOLATE_INTERVALS = 4
"""Another peer's progress is extrapolated for at most this many report intervals."""

REPORT_KEEPALIVE_S = 1.0
"""An unchanged progress report is stored again after this long (and not before)."""
REPORT_SPACING_INTERVALS = EXTRAPOLATE_INTERVALS - 1
"""A changed count (not yet done) is stored at most once per this many report intervals: a
reader extrapolates our count from our rate for EXTRAPOLATE_INTERVALS, which spans the gap
to our next report and one read of its own. Each store goes to every replica of the key, so
storing every interval cost more than all the reads."""
CLAIM_FACTOR = 4.0

def progress_key(run_id: str, spec_hash: bytes, round_: int) -> str:
    return f"locoswarm:{run_id}:{spec_hash[:8].hex()}:progress:{round_}"


@dataclass(slots=True)
class _Seen:
    progress: Progress
    at: float
    """time.monotonic() when we read it."""
    expires: float = float("-inf")
    """Its entry's DHT expiration time: the later, the newer the report."""


class RoundProgress:
    """The swarm's token progress in one round, read and written through the DHT."""

    def __init__(self, dht: DHTNode, run_id: str, spec_hash: bytes, round_: int, peer_id: str, *,
                 per_peer_tokens: int, interval_s: float, ttl_s: float, carry: int = 0,
                 expected: Callable[[], set[str]] = frozenset, candidates: Callable[[], set[str]] = frozenset,
                 incarnation: int = 0, incarnations: Callable[[str], int] = lambda peer: 0, validator=None,
                 admit: Callable[[str], bool] | None = None, store: ReplicaStore | None = None) -> None:
        """`validator`: hivemind's RSASignatureValidator holding this peer's identity key
        (entries are then signed, and unsigned ones ignored); `admit(peer_id)`: whether a
        peer may take part (a private run's policy); `store`: where reports go straight to
        the key's replicas (node/replicas.py; None: through DHTNode.store)."""
        self.dht = dht
        self.store = store
        self.validator = validator
        self.admit = admit
        self.key = progress_key(run_id, spec_hash, round_)
        self._reported: tuple[int, bool, float] = (-1, False, 0.0)
        """(tokens, done, when) of our last stored report."""
        self.peer_id = peer_id
        self.per_peer_tokens = per_peer_tokens
        self.carry = carry
        self.expected = expected
        """Proven peers (node/membership.py) that should train this round, reported or not yet."""
        self.candidates = candidates
        """Unproven peers whose record puts them in this round: probed for liveness."""
        self.incarnation = incarnation
        """This process's incarnation, reported with our progress."""
        self.incarnations = incarnations
        """A peer's incarnation as its record shows it (0: unknown)."""
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self._others: dict[str, _Seen] = {}
        self.rejected = 0
        self.train_s = 0.0
        """Seconds this peer trained in the round (set by the round loop when training ends)."""

    async def report(self, tokens: int, tokens_per_s: float, done: bool = False) -> None:
        """Store our progress, unless it shows the same tokens as the last report and that one
        is younger than REPORT_KEEPALIVE_S (a reader takes an unchanged count for no news: its
        extrapolation runs from when the count last changed, so repeating it only costs), or
        a changed count not yet done within REPORT_SPACING_INTERVALS of the last store. Done
        (and given up) is stored at once."""
        now = time.monotonic()
        age = now - self._reported[2]
        if (tokens, done) == self._reported[:2] and age < REPORT_KEEPALIVE_S:
            return
        if not done and done == self._reported[1] and age < REPORT_SPACING_INTERVALS * self.interval_s:
            return
        value = encode_progress(Progress(tokens=tokens, tokens_per_s=tokens_per_s, done=done,
                                         incarnation=self.incarnation))
        subkey = self.peer_id if self.validator is None else self.peer_id.encode() + self.validator.local_public_key
        if self.store is not None:
            await self.store.store(self.key, subkey, value, get_dht_time() + self.ttl_s)
        else:
            await self.dht.store(self.key, value, get_dht_time() + self.ttl_s, subkey=subkey)
        self._reported = (tokens, done, now)

    async def refresh(self) -> None:
        """Read the round's progress: one copy of the key a read, from its replicas in turn
        (node/replicas.py ReplicaStore.read), merged into what earlier reads saw. A peer's
        entry is taken only when it is newer (expires later) than the one we hold, so a
        replica that missed the writer's last store cannot set its progress back; one that
        missed a writer altogether is made up for by the next replica's copy."""
        if self.store is not None:
            found = await self.store.read(self.key)
        else:
            found = await self.dht.get(self.key, latest=True)
        if found is None or not isinstance(found.value, dict):
            return
        now = time.monotonic()
        others = dict(self._others)
        for subkey, item in found.value.items():
            peer = self._author(subkey)
            if peer is None or peer == self.peer_id:
                continue
            old = others.get(peer)
            if old is not None and not item.expiration_time > old.expires:
                continue
            try:
                seen = decode_progress(item.value)
            except ProtocolError as e:
                self.rejected += 1
                log.warning("progress of %s refused: %s", peer, e)
                continue
            if old is None or old.progress != seen:
                others[peer] = _Seen(seen, now, item.expiration_time)
            else:
                others[peer] = _Seen(old.progress, old.at, item.expiration_time)
        self._others = others

    def _author(self, subkey: object) -> str | None:
        """The peer an entry is from, None when it is not to be taken: unsigned while we
        sign, signed by a key other than the identity of the peer it names, or a peer the
        access policy does not admit."""
        if self.validator is None:
            peer = subkey if isinstance(subkey, str) else None
        else:
            named, _, signer = subkey_author(subkey)
            peer = named if signer == named else None
        if peer is not None and self.admit is not None and not self.admit(peer):
            return None
        return peer

    def incarnation_of(self, peer: str) -> int:
        """The incarnation to ask `peer`'s delta of: the one that reported progress in this
        round, else the one its record shows, else 0 (any)."""
        seen = self._others.get(peer)
        return seen.progress.incarnation if seen is not None else self.incarnations(peer)

    def participants(self) -> list[str]:
        """Peer ids (not ours) that reported progress in this round."""
        return sorted(self._others)

    def withdrawn(self) -> set[str]:
        """Participants that gave the round up (done with no tokens: no delta will come)."""
        return {peer for peer, seen in self._others.items() if seen.progress.done and seen.progress.tokens == 0}

    def reached(self, own_tokens: int) -> bool:
        """Whether the swarm's tokens, ours plus the others' extrapolated, reach the target."""
        done, target = self.totals(own_tokens)
        return done >= target

    def totals(self, own_tokens: int) -> tuple[float, int]:
        """(the swarm's tokens in this round, ours plus the others' extrapolated; the round's
        target, the per-peer share times the peers counted, less the carry)."""
        now = time.monotonic()
        total = own_tokens
        others = self._others  # replaced whole by refresh(), never mutated: safe from the training thread
        counted = set(self.expected())
        claims = {}
        for peer, seen in others.items():
            p = seen.progress
            if p.tokens == 0:
                continue  # an empty claim neither trains nor raises the target (a bare key reporting cannot stall it)
            counted.add(peer)
            ahead = 0.0 if p.done else p.tokens_per_s * min(now - seen.at, EXTRAPOLATE_INTERVALS * self.interval_s)
            claims[peer] = p.tokens + ahead
        # One peer claiming a huge count must not end everyone's round: each claim counts for
        # at most CLAIM_FACTOR × the median claim (ours included), and never less than the
        # per-peer share, so a fast GPU doing most of the work still counts for it.
        if claims:
            cap = max(self.per_peer_tokens, CLAIM_FACTOR * median(list(claims.values()) + [float(max(0, own_tokens))]))
            total += sum(min(c, cap) for c in claims.values())
        counted.discard(self.peer_id)
        return total, self.per_peer_tokens * (1 + len(counted)) - self.carry

    def num_peers(self) -> int:
        """Peers counted in this round's target, this one included."""
        return 1 + len((set(self.expected()) | set(self._others)) - {self.peer_id})
