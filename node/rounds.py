"""Round agreement and the per-round delta pull.

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
on the participants (a peer seen by some and not by others splits the outer state). After
its own delta is out, a peer pulls theirs concurrently (at most `fanout`, chosen at random
in bigger swarms), retrying "not yet" answers until the round's deadline; a peer whose
stream fails or that sends a bad delta is dropped from the round, logged, never waited on.

Progress entries are signed like peer records (hivemind's signature validator, the subkey
naming the peer id and its identity key): an entry is taken only when the signing key is
the identity of the peer it names, so no peer can report, inflate or stall the round for
another; with an access policy, entries of peers not admitted are ignored.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Callable

from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, PeerID
from hivemind.utils import get_dht_time

from locoswarm.node.exchange import DeltaGone, DeltaUnavailable, call_get_delta
from locoswarm.node.registry import subkey_author
from locoswarm.node.replicas import ReplicaStore
from locoswarm.optim.screen import median
from locoswarm.protocol import DecodedDelta, DeltaSpec, ProtocolError
from locoswarm.protocol.framing import TruncatedBody
from locoswarm.protocol.records import Progress, decode_progress, encode_progress

log = logging.getLogger(__name__)
EXTRAPOLATE_INTERVALS = 4
"""Another peer's progress is extrapolated for at most this many report intervals."""
RETRY_S = (0.02, 1.5, 0.25)
"""Asking again for a delta that is not ready yet: after 20 ms, growing ×1.5 to at most
250 ms (≤ 4 requests a second per peer once waiting long; servers refuse more than 10)."""
ATTEMPT_TIMEOUT_S = 8.0
"""Longest wait for one delta request."""
STREAM_RETRY_S = (0.5, 1.0, 2.0, 4.0, 8.0)
"""Waits before asking again after a failed stream (a lost SYN, a dial in libp2p's dial
backoff, which starts at 5 s and grows with each failed dial): dropping a peer's delta at
the first failure made peers aggregate different sets of deltas over a lossy link, and
their outer states split (seen over 1 % loss)."""


UNREACHABLE_S = 2.0
"""A peer whose dials fail at once (its connection closed: the process is gone, the port
shut, or it gave no address) for this long is not waited for this round. Slow failures (a
lossy link) keep the STREAM_RETRY_S schedule."""
REFUSED_RETRY_S = 0.5
"""Wait between two dials of a peer whose dials are refused."""
LIVENESS_S = 2.0
"""How long a peer that has not proven itself (no delta delivered yet, no progress reported
in the round) is given to answer at all ("not yet" counts) before the round goes on
without it: a record alone holds a round at most this long, once per SILENT_ROUNDS."""


def dial_refused(e: BaseException) -> bool:
    """A stream that p2pd refused outright: no connection and none to be made now (refused,
    in libp2p's dial backoff after a refused dial, or no address known for the peer), or a
    peer that does not serve deltas (no daemon behind its p2pd: a crashed daemon's p2pd
    lingers and answers "protocols not supported")."""
    from hivemind.p2p.p2p_daemon_bindings.utils import ControlFailure

    text = str(e)
    return isinstance(e, ControlFailure) and any(
        sign in text for sign in ("failed to dial", "failed to find any peer", "protocols not supported"))


REPORT_KEEPALIVE_S = 1.0
"""An unchanged progress report is stored again after this long (and not before)."""
CLAIM_FACTOR = 4.0

def progress_key(run_id: str, spec_hash: bytes, round_: int) -> str:
    return f"locoswarm:{run_id}:{spec_hash[:8].hex()}:progress:{round_}"


@dataclass(slots=True)
class _Seen:
    progress: Progress
    at: float
    """time.monotonic() when we read it."""


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
        is younger than REPORT_KEEPALIVE_S: a reader takes an unchanged count for no news (its
        extrapolation runs from when the count last changed), so repeating it only costs."""
        now = time.monotonic()
        if (tokens, done) == self._reported[:2] and now - self._reported[2] < REPORT_KEEPALIVE_S:
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
        """Read the round's progress: every copy of the key near it, merged (`latest=True`).
        A read that stops at the first fresh copy is cheaper, but a replica's own storage
        then answers it alone, and holds only what reached it: a peer restarted before it
        had met this replica stores elsewhere, and was never seen here (a churn run ended on
        two digests that way)."""
        found = await self.dht.get(self.key, latest=True)
        if found is None or not isinstance(found.value, dict):
            return
        now = time.monotonic()
        others = dict(self._others)
        for subkey, item in found.value.items():
            peer = self._author(subkey)
            if peer is None or peer == self.peer_id:
                continue
            try:
                seen = decode_progress(item.value)
            except ProtocolError as e:
                self.rejected += 1
                log.warning("progress of %s refused: %s", peer, e)
                continue
            old = others.get(peer)
            if old is None or old.progress != seen:
                others[peer] = _Seen(seen, now)
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


@dataclass(slots=True)
class Gathered:
    deltas: list[DecodedDelta] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    """peer id → why its delta is not in this round."""
    bytes_received: int = 0
    rejected: int = 0
    """Deltas refused as bad (not merely missing)."""
    unreachable: set[str] = field(default_factory=set)
    """Peers dropped because their dials were refused, or because they will serve no delta."""
    silent: set[str] = field(default_factory=set)
    """Unproven peers that did not answer within LIVENESS_S."""


async def gather_deltas(p2p: P2P, progress: RoundProgress, round_: int, spec: DeltaSpec, *, deadline_s: float,
                        fanout: int, rng: random.Random,
                        keep: Callable[[str, list[str]], bool] | None = None) -> Gathered:
    """Pull round `round_`'s deltas from its participants (at most `fanout`) until every
    one is in or `deadline_s` has passed. Participants are the peers that report progress
    in the round; a proven peer expected in it (`progress.expected()`) that has not reported
    yet is asked too, and waited for while it answers "not yet", so that peers agree on who
    took part. A peer that says it will serve no delta for the round, or whose dials are
    refused for UNREACHABLE_S, is dropped at once (`Gathered.unreachable`). Whatever did not
    arrive by the deadline is left out of the round. `keep(sender, others)`: a test's fault injector
    (node/roundloop.py RoundFaults), False drops a delta that arrived as if it had not."""
    out = Gathered()
    stop_at = time.monotonic() + deadline_s
    pulls: dict[str, asyncio.Task] = {}

    async def pull(peer: str, probe: bool) -> None:
        """`probe`: an unproven peer, given LIVENESS_S to answer at all."""
        pid = PeerID.from_base58(peer)
        wait, grow, longest = RETRY_S
        failures = 0
        refused_since: float | None = None
        answer_by = time.monotonic() + LIVENESS_S if probe else None

        async def retry(what: str) -> bool:
            """After a failed or cut stream: wait the next of STREAM_RETRY_S and say True,
            while retries are left and the deadline allows the wait."""
            nonlocal failures
            if failures >= len(STREAM_RETRY_S) or stop_at - time.monotonic() <= STREAM_RETRY_S[failures]:
                return False
            log.info("delta of %s for round %d%s, asking again in %g s", peer, round_, what, STREAM_RETRY_S[failures])
            await asyncio.sleep(STREAM_RETRY_S[failures])
            failures += 1
            return True

        while True:
            now = time.monotonic()
            left = stop_at - now
            if answer_by is not None and now >= answer_by:
                if peer in progress.participants():  # it reported progress meanwhile: a participant
                    answer_by = None
                else:
                    out.failed[peer] = f"not proven and no answer within {LIVENESS_S:g} s"
                    out.silent.add(peer)
                    return
            if left <= 0:
                out.failed[peer] = f"no delta before the {deadline_s:g} s deadline"
                return
            limit = min(left, ATTEMPT_TIMEOUT_S) if answer_by is None else max(0.05, min(left, answer_by - now))
            try:
                # One attempt may hang (a stream opened on a starved or cut peer): bound it
                # below the deadline and ask again, as after any failed stream.
                delta = await call_get_delta(p2p, pid, round_, spec, timeout_s=limit,
                                             incarnation=progress.incarnation_of(peer))
            except DeltaGone:
                out.failed[peer] = "will serve no delta for this round (restarted, gave it up, or took another state)"
                out.unreachable.add(peer)
                return
            except DeltaUnavailable:
                answer_by = None  # it answered: live, training the round
                if peer in progress.withdrawn():
                    out.failed[peer] = "gave the round up"
                    return
                await asyncio.sleep(wait)  # still training: ask again
                wait = min(longest, wait * grow)
                continue
            except TruncatedBody as e:
                # Cut inside the body: a lossy link, or a bad peer. Ask again like after a
                # failed stream; only when those retries are spent is it held against the peer.
                if await retry(f" cut short ({e})"):
                    continue
                log.warning("delta of %s for round %d rejected: MalformedMessage: %s", peer, round_, e)
                out.rejected += 1
                out.failed[peer] = f"MalformedMessage: {e}"
                return
            except ProtocolError as e:
                # A bad delta costs the sender its place in this round, never ours.
                log.warning("delta of %s for round %d rejected: %s: %s", peer, round_, type(e).__name__, e)
                out.rejected += 1
                out.failed[peer] = f"{type(e).__name__}: {e}"
                return
            except Exception as e:  # the stream failed or hung (peer gone, refused, lossy link): retry, then drop
                if answer_by is not None:
                    await asyncio.sleep(min(REFUSED_RETRY_S, max(0.0, answer_by - time.monotonic())))
                    continue  # an unproven peer: asked again until its liveness bound
                if dial_refused(e) and failures == 0:
                    # Its connection is closed and no new one can be made: a dead or fake peer.
                    # Not waited for past UNREACHABLE_S (a restart on the same port answers in time).
                    now = time.monotonic()
                    refused_since = now if refused_since is None else refused_since
                    if now - refused_since >= UNREACHABLE_S:
                        out.failed[peer] = f"unreachable for {UNREACHABLE_S:g} s (dials refused)"
                        out.unreachable.add(peer)
                        return
                    await asyncio.sleep(REFUSED_RETRY_S)
                    continue
                if isinstance(e, asyncio.TimeoutError) and stop_at - time.monotonic() <= 0:
                    out.failed[peer] = f"no delta before the {deadline_s:g} s deadline"
                    return
                if await retry(f": stream failed ({type(e).__name__}: {str(e).strip().replace(chr(10), ' ')})"):
                    continue
                log.info("delta of %s for round %d unavailable: %s: %s", peer, round_, type(e).__name__, e)
                out.failed[peer] = f"{type(e).__name__}: {e}"
                return
            if delta.sender != peer:
                log.warning("delta from %s names sender %s: rejected", peer, delta.sender)
                out.rejected += 1
                out.failed[peer] = f"delta names sender {delta.sender}"
                return
            if keep is not None:
                others = sorted((set(progress.participants()) | set(progress.expected())) - {progress.peer_id})
                if not keep(peer, others):
                    log.warning("round %d: delta of %s left out by a fault injector", round_, peer)
                    out.failed[peer] = "left out by a fault injector"
                    return
            out.deltas.append(delta)
            out.bytes_received += delta.nbytes + 8
            return

    try:
        while True:
            # Expected peers that have not reported yet are asked too: a live one answers
            # "not yet" and is waited for, a restarted one says "never" and a dead one refuses
            # the dial, so neither holds the round.
            withdrawn = progress.withdrawn()
            known = (set(progress.participants()) | set(progress.expected())) - {progress.peer_id} - withdrawn
            probes = set(progress.candidates()) - known - {progress.peer_id} - withdrawn
            new = sorted(p for p in known | probes if p not in pulls)
            room = fanout - len(pulls)
            for peer in (rng.sample(new, room) if len(new) > room else new):
                pulls[peer] = asyncio.create_task(pull(peer, probe=peer in probes))
            pending = [t for t in pulls.values() if not t.done()]
            if not pending or time.monotonic() >= stop_at:
                break
            await asyncio.wait(pending, timeout=progress.interval_s)
            try:
                await progress.refresh()
            except Exception as e:  # the DHT is slow: go on with the participants known
                log.info("progress refresh failed: %s", e)
    finally:
        for task in pulls.values():
            task.cancel()
        await asyncio.gather(*pulls.values(), return_exceptions=True)
    return out
