"""What a peer answers on the delta stream protocol, whatever carries the stream: hivemind's
p2pd or py-libp2p (node/exchange.py on both, net/bridge.py carrying it on py-libp2p): what is
answered, apart from the I/O.

A request is REQUEST_LEN bytes: the round and the incarnation of the process it is asked of
(0: whichever runs), 8 bytes each, big-endian. The answer is one frame of
protocol/framing.py: empty ("not yet": the peer trains the round or encodes its delta), the
one byte GONE ("never": another incarnation is asked, or the peer is past the round without
a delta), or the encoded delta. A request for a round still pending is held until its delta
is published or given up (at most LONG_POLL_S, then "not yet"): the transport waits on
`waiter(round)`, which the book wakes.
"""

from __future__ import annotations

from typing import Callable, Protocol

from locoswarm.protocol.delta import DecodedDelta, DeltaSpec, decode_delta
from locoswarm.protocol.errors import MalformedMessage

PROTOCOL = "locoswarm/delta/4"
REQUEST_LEN = 16
"""Round and incarnation, 8 bytes each."""
ROUNDS_KEPT = 2
GONE = b"\x00"
"""The answer for a round whose delta this peer will never serve (a delta is never one byte)."""
LONG_POLL_S = 1.0
"""Longest a request for a pending round is held before "not yet" (below node/rounds.py's
LIVENESS_S, so a probed peer's answer arrives within the probe's bound)."""
MAX_SENDS_PER_ROUND = 6
"""A peer is sent one round's delta at most this many times: an honest puller asks once, and
again after each stream cut inside the delta (node/pull.py STREAM_RETRY_S allows five). One
identity asking in a loop then costs a few deltas a round, not its request rate's worth."""


class Waiter(Protocol):
    """A one-shot event of the transport's concurrency library (asyncio or trio)."""

    def set(self) -> None: ...


class TooManySends(Exception):
    """This peer was sent that round's delta MAX_SENDS_PER_ROUND times already."""


class DeltaUnavailable(Exception):
    """The peer has no delta for that round yet: it is still training it."""


class DeltaGone(Exception):
    """The peer will never serve a delta for that round (not training it: restarted, gave it
    up, or past it)."""


def delta_of(answer: bytes | None, peer: object, round_: int, spec: DeltaSpec) -> DecodedDelta:
    """The delta `peer`'s answer (None: an empty frame) to a request for `round_` holds,
    validated against `spec`. Raises DeltaUnavailable for "not yet", DeltaGone for "never",
    a ProtocolError when the bytes are bad (a delta of another round included)."""
    if answer is None:
        raise DeltaUnavailable(f"peer {peer} has no delta for round {round_} yet")
    if answer == GONE:
        raise DeltaGone(f"peer {peer} will serve no delta for round {round_}")
    delta = decode_delta(answer, spec)
    if delta.round != round_:
        raise MalformedMessage(f"peer {peer} answered round {round_} with a delta of round {delta.round}")
    return delta


def encode_request(round_: int, incarnation: int = 0) -> bytes:
    return round_.to_bytes(8, "big") + incarnation.to_bytes(8, "big")


def parse_request(request: bytes) -> tuple[int, int]:
    """(round, incarnation) of a request of REQUEST_LEN bytes."""
    if len(request) != REQUEST_LEN:
        raise ValueError(f"a delta request is {REQUEST_LEN} bytes, got {len(request)}")
    return int.from_bytes(request[:8], "big"), int.from_bytes(request[8:], "big")


class DeltaBook:
    """The deltas this process serves (the last ROUNDS_KEPT rounds), the rounds it still
    trains, and what it answers for each request. `new_waiter()` makes the transport's event
    that a held request waits on."""

    def __init__(self, new_waiter: Callable[[], Waiter], *, incarnation: int = 0) -> None:
        self.incarnation = incarnation
        self._new_waiter = new_waiter
        self._deltas: dict[int, bytes] = {}
        self._pending: set[int] = set()
        """Rounds this process trains, or ended and has not published or given up yet."""
        self._floor = 0
        """The lowest round this process may still train: below it, a round not pending is gone."""
        self._given_up: set[int] = set()
        self._ready: dict[int, Waiter] = {}
        """round → set when its delta is published or given up (wakes held requests)."""
        self._sends: dict[tuple[str, int], int] = {}
        """(peer, round) → times that round's delta was sent to that peer."""
        self.stopping = False

    def training(self, round_: int) -> None:
        """This peer starts training `round_`: its delta is "not yet" until published or given up."""
        self._pending.add(round_)
        self._ready.setdefault(round_, self._new_waiter())
        self._floor = max(self._floor, round_)
        self._given_up = {r for r in self._given_up if r >= round_ - ROUNDS_KEPT}
        for old in [r for r in self._ready if r < round_ - ROUNDS_KEPT]:
            self._wake(old)  # never published nor given up (a state taken meanwhile): let held requests go

    def give_up(self, round_: int) -> None:
        """No delta of `round_` will come from this peer (discarded, withdrawn, or its state replaced)."""
        self._pending.discard(round_)
        self._given_up.add(round_)
        self._wake(round_)

    def publish(self, round_: int, blob: bytes) -> None:
        """Serve `blob` as this peer's delta of `round_`; forget rounds older than the last few."""
        self._deltas[round_] = blob
        self._pending.discard(round_)
        self._wake(round_)
        for old in [r for r in self._deltas if r <= round_ - ROUNDS_KEPT]:
            del self._deltas[old]
        self._sends = {key: n for key, n in self._sends.items() if key[1] > round_ - ROUNDS_KEPT}

    def stop(self) -> None:
        """Leaving: every held request is answered now ("not yet" for what was not published)."""
        self.stopping = True
        for round_ in list(self._ready):
            self._wake(round_)

    def _wake(self, round_: int) -> None:
        waiter = self._ready.pop(round_, None)
        if waiter is not None:
            waiter.set()

    def answer(self, round_: int, incarnation: int = 0) -> bytes:
        """The response body for a request of `round_`'s delta from `incarnation` (0: any)."""
        if incarnation not in (0, self.incarnation):
            return GONE  # asked of an earlier life of this peer: what it promised died with it
        if round_ in self._deltas:
            return self._deltas[round_]
        if round_ in self._pending or (round_ >= self._floor and round_ not in self._given_up):
            return b""
        return GONE

    def waiter(self, round_: int, body: bytes) -> Waiter | None:
        """What a request answered `body` ("not yet") waits on before asking again; None
        when it must not wait (it has its answer, or this peer is leaving)."""
        if body != b"" or self.stopping:
            return None
        return self._ready.get(round_)

    def sent(self, peer: str, round_: int, body: bytes) -> None:
        """Count `body`, about to go to `peer` as its answer for `round_`; TooManySends once
        that round's delta went to it MAX_SENDS_PER_ROUND times."""
        if len(body) <= len(GONE):
            return
        sends = self._sends.get((peer, round_), 0)
        if sends >= MAX_SENDS_PER_ROUND:
            raise TooManySends(f"round {round_}'s delta was sent to it {sends} times already")
        self._sends[(peer, round_)] = sends + 1
