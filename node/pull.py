"""Pulling a round's deltas from its participants (node/rounds.py says who they are): after
its own delta is out, a peer pulls theirs concurrently (at most `fanout`, chosen at random
in bigger swarms), retrying "not yet" answers until the round's deadline; a peer whose
stream fails or that sends a bad delta is dropped from the round, logged, never waited on,
and one that says it will serve no delta, or whose dials are refused, is dropped at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from locoswarm.node.exchange import DeltaGone, DeltaUnavailable, call_get_delta
from locoswarm.node.rounds import RoundProgress
from locoswarm.node.streams import KeptStreams
from locoswarm.protocol import DecodedDelta, DeltaSpec, ProtocolError
from locoswarm.protocol.framing import TruncatedBody

log = logging.getLogger(__name__)
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
LOST_CHECK_S = 0.25
"""While waiting to ask a peer again, how often to look whether it was found gone or restarted."""
UNPROVEN_WAIT_S = 5.0
"""Longest a peer that has not proven itself (no delta delivered to us in its present life) is
waited for its delta, from the start of the pull, whatever it answers or reports (the round
loop gives at least as long as its own training of the round took): a peer that trained the
round beside us has its delta out within a step and an encode of the round's end. An
identity that reports progress and answers "not yet" for ever (it serves nothing) used to
be waited for until the round's deadline, every round; now a round waits for it this long,
then it is left alone (node/membership.py `withholding`). Proven peers keep the deadline.
With 10 s here, one such identity among three peers whose rounds took 0.76 s cost a 14-round
phase of `bench swarm --fake-mode stall` half its rate (2026-12-06, 2 cores)."""
LIVENESS_S = 2.0
"""How long a peer that has not proven itself (no delta delivered yet, no progress reported
in the round) is given to answer at all ("not yet" counts) before the round goes on
without it: a record alone holds a round at most this long, ever more rarely (node/membership.py
SILENT_ROUNDS)."""


def dial_refused(e: BaseException) -> bool:
    """A stream that p2pd refused outright: no connection and none to be made now (refused,
    in libp2p's dial backoff after a refused dial, or no address known for the peer), or a
    peer that does not serve deltas (no daemon behind its p2pd: a crashed daemon's p2pd
    lingers and answers "protocols not supported"). Asked without importing hivemind: where
    its p2pd bindings are not loaded; a py-libp2p peer's bridge (net/bridge.py) raises
    ConnectionRefusedError for the same cases."""
    if isinstance(e, ConnectionRefusedError):
        return True
    utils = sys.modules.get("hivemind.p2p.p2p_daemon_bindings.utils")
    text = str(e)
    return utils is not None and isinstance(e, utils.ControlFailure) and any(
        sign in text for sign in ("failed to dial", "failed to find any peer", "protocols not supported"))


@dataclass(slots=True)
class Gathered:
    deltas: list[DecodedDelta] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    """peer id → why its delta is not in this round."""
    bytes_received: int = 0
    requests: int = 0
    """Delta requests made, answered or not (`streams.num_opened` counts the streams opened for them)."""
    rejected: int = 0
    """Deltas refused as bad (not merely missing)."""
    refused: set[str] = field(default_factory=set)
    """The peers whose delta was refused as bad (the dashboard's contributions)."""
    unreachable: set[str] = field(default_factory=set)
    """Peers dropped because their dials were refused, or because they will serve no delta."""
    silent: set[str] = field(default_factory=set)
    """Unproven peers that did not answer within LIVENESS_S."""
    stalled: set[str] = field(default_factory=set)
    """Peers the round waited for until its deadline (their delta never came)."""
    unserved: set[str] = field(default_factory=set)
    """Unproven peers whose delta did not come within the UNPROVEN_WAIT_S bound."""
    withheld: set[str] = field(default_factory=set)
    """Of `stalled` and `unserved`, the peers whose last answer was "not yet": live, and
    serving no delta long after the round's end (a stream that failed from the start is
    not counted: a lossy link looks the same)."""


async def gather_deltas(streams: KeptStreams, progress: RoundProgress, round_: int, spec: DeltaSpec, *, deadline_s: float,
                        fanout: int, rng: random.Random,
                        keep: Callable[[str, list[str]], bool] | None = None,
                        gone: Callable[[str], bool] | None = None,
                        skip: Callable[[str], bool] | None = None,
                        unproven_wait_s: float = UNPROVEN_WAIT_S,
                        member: Callable[[str], bool] | None = None) -> Gathered:
    """Pull round `round_`'s deltas from its participants (at most `fanout`), on `streams`,
    until every one is in or `deadline_s` has passed. Participants are the peers that report progress
    in the round; a proven peer expected in it (`progress.expected()`) that has not reported
    yet is asked too, and waited for while it answers "not yet", so that peers agree on who
    took part. A peer that says it will serve no delta for the round, or whose dials are
    refused for UNREACHABLE_S, is dropped at once (`Gathered.unreachable`). Whatever did not
    arrive by the deadline is left out of the round. `keep(sender, others)`: a test's fault injector
    (node/roundcontext.py RoundFaults), False drops a delta that arrived as if it had not.
    `gone(peer)`: whether the peer is found gone (node/membership.py: its progress streams no
    longer open); such a peer, or one whose record shows another incarnation than the one
    asked of (it restarted), is dropped at its next attempt. A peer not expected (unproven)
    is waited for at most `unproven_wait_s` (`Gathered.unserved`); `skip(peer)`: an unproven
    peer left alone this round, whatever it reports (it withheld its delta in a recent one);
    `member(peer)`: whether the peer's delta is ours to pull at all (a tree round's row,
    node/tree.py; None: every participant's)."""
    out = Gathered()
    stop_at = time.monotonic() + deadline_s
    pulls: dict[str, asyncio.Task] = {}
    holding: set[str] = set()
    """Peers whose last answer was "not yet"."""

    async def pull(peer: str, probe: bool) -> None:
        """`probe`: an unproven peer, given LIVENESS_S to answer at all."""
        wait, grow, longest = RETRY_S
        failures = 0
        refused_since: float | None = None
        answer_by = time.monotonic() + LIVENESS_S if probe else None
        unproven_by = None if peer in progress.expected() else time.monotonic() + unproven_wait_s
        asked_of = progress.incarnation_of(peer)

        def lost() -> str | None:
            """Why the delta asked for will never come, if it will not."""
            if gone is not None and gone(peer):
                return "gone (no progress stream opens to it)"
            if progress.incarnations(peer) not in (asked_of, 0):
                return "restarted (its record shows another incarnation)"
            return None

        async def nap(seconds: float) -> None:
            """Sleep `seconds`, less once the delta is known `lost()`."""
            until = time.monotonic() + seconds
            while (left := until - time.monotonic()) > 0 and lost() is None:
                await asyncio.sleep(min(left, LOST_CHECK_S))

        async def retry(what: str) -> bool:
            """After a failed or cut stream: wait the next of STREAM_RETRY_S and say True,
            while retries are left and the deadline allows the wait."""
            nonlocal failures
            if failures >= len(STREAM_RETRY_S) or stop_at - time.monotonic() <= STREAM_RETRY_S[failures]:
                return False
            log.info("delta of %s for round %d%s, asking again in %g s", peer, round_, what, STREAM_RETRY_S[failures])
            await nap(STREAM_RETRY_S[failures])
            failures += 1
            return True

        while True:
            why = lost()
            if why is not None:
                out.failed[peer] = why
                out.unreachable.add(peer)
                return
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
                out.stalled.add(peer)
                return
            if unproven_by is not None and now >= unproven_by:
                out.failed[peer] = f"not proven and no delta within {unproven_wait_s:g} s"
                out.unserved.add(peer)
                return
            limit = min(left, ATTEMPT_TIMEOUT_S) if answer_by is None else max(0.05, min(left, answer_by - now))
            if unproven_by is not None:
                limit = max(0.05, min(limit, unproven_by - now))
            try:
                # One attempt may hang (a stream opened on a starved or cut peer): bound it
                # below the deadline and ask again, as after any failed stream.
                out.requests += 1
                delta = await call_get_delta(streams, peer, round_, spec, timeout_s=limit, incarnation=asked_of)
            except DeltaGone:
                out.failed[peer] = "will serve no delta for this round (restarted, gave it up, or took another state)"
                out.unreachable.add(peer)
                return
            except DeltaUnavailable:
                answer_by = None  # it answered: live, training the round
                holding.add(peer)
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
                out.refused.add(peer)
                out.failed[peer] = f"MalformedMessage: {e}"
                return
            except ProtocolError as e:
                # A bad delta costs the sender its place in this round, never ours.
                log.warning("delta of %s for round %d rejected: %s: %s", peer, round_, type(e).__name__, e)
                out.rejected += 1
                out.refused.add(peer)
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
                # A failed stream is no answer (a lossy link looks the same, and what one peer
                # holds against a peer there, another would not: their rounds would split); an
                # attempt that timed out leaves its last answer standing.
                if not isinstance(e, asyncio.TimeoutError):
                    holding.discard(peer)
                if isinstance(e, asyncio.TimeoutError) and stop_at - time.monotonic() <= 0:
                    out.failed[peer] = f"no delta before the {deadline_s:g} s deadline"
                    out.stalled.add(peer)
                    return
                if isinstance(e, asyncio.TimeoutError) and unproven_by is not None:
                    continue  # its bound is checked at the top
                if await retry(f": stream failed ({type(e).__name__}: {str(e).strip().replace(chr(10), ' ')})"):
                    continue
                log.info("delta of %s for round %d unavailable: %s: %s", peer, round_, type(e).__name__, e)
                out.failed[peer] = f"{type(e).__name__}: {e}"
                return
            if delta.sender != peer:
                log.warning("delta from %s names sender %s: rejected", peer, delta.sender)
                out.rejected += 1
                out.refused.add(peer)
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
            new = sorted(p for p in known | probes if p not in pulls and not (skip is not None and skip(p))
                         and (member is None or member(p)))
            room = fanout - len(pulls)
            for peer in (rng.sample(new, room) if len(new) > room else new):
                pulls[peer] = asyncio.create_task(pull(peer, probe=peer in probes))
            pending = [t for t in pulls.values() if not t.done()]
            if not pending or time.monotonic() >= stop_at:
                break
            await asyncio.wait(pending, timeout=progress.interval_s)
            progress.refresh()
        for peer, task in pulls.items():
            if not task.done():  # still asking at the deadline: the round waited for it to the end
                out.failed.setdefault(peer, f"no delta before the {deadline_s:g} s deadline")
                out.stalled.add(peer)
        out.withheld = holding & (out.stalled | out.unserved)
    finally:
        for task in pulls.values():
            task.cancel()
        await asyncio.gather(*pulls.values(), return_exceptions=True)
    return out
