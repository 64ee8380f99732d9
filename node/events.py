"""What a daemon reports, as typed events: each is one plain line on stdout for the person
watching (the same words as always), and, on request (`--events FILE`), one JSON object a
line for programs (`locoswarm demo`, `locoswarm bench swarm`, the tests), which read fields
instead of parsing the human text.

Every JSON line carries `event` (the kind, e.g. "round"), `time` (Unix seconds) and the
event's fields; `EVENT_KINDS` lists the kinds and `read_events` parses a file of them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, TextIO


@dataclass(frozen=True, slots=True)
class Listening:
    kind: ClassVar[str] = "listening"
    peer_id: str
    addrs: tuple[str, ...]

    def lines(self) -> list[str]:
        return [f"peer {self.peer_id}"] + [f"listening {a}" for a in self.addrs]


@dataclass(frozen=True, slots=True)
class Resumed:
    kind: ClassVar[str] = "resumed"
    round: int
    """The checkpoint's round."""

    def lines(self) -> list[str]:
        return [f"resumed from checkpoint round {self.round}"]


@dataclass(frozen=True, slots=True)
class Synced:
    kind: ClassVar[str] = "synced"
    round: int
    donors: int
    digest: str
    """SHA-256 of the outer state taken (Trainer.state_digest)."""

    def lines(self) -> list[str]:
        return [f"synced round {self.round} from {self.donors} donors digest {self.digest}"]


@dataclass(frozen=True, slots=True)
class CaughtUp:
    kind: ClassVar[str] = "caught_up"
    start: int
    """The round caught up from."""
    round: int
    deltas: int
    """Delta messages taken, all rounds together."""
    bytes: int
    """All that came: the deltas, and the donor's residual where one did."""
    digest: str
    """SHA-256 of the outer state reached (Trainer.state_digest)."""
    residual_bytes: int = 0
    """The donor's residual's part of `bytes` (0: none came)."""

    def lines(self) -> list[str]:
        return [f"caught up to round {self.round} from {self.start} by {self.deltas} deltas ({self.bytes} bytes) "
                f"digest {self.digest}"]


@dataclass(frozen=True, slots=True)
class ServingState:
    kind: ClassVar[str] = "serving_state"
    round: int
    digest: str

    def lines(self) -> list[str]:
        return [f"serving state round {self.round} digest {self.digest}"]


@dataclass(frozen=True, slots=True)
class RoundEnded:
    kind: ClassVar[str] = "round"
    round: int
    deltas: int
    """Deltas in the outer step, this peer's own included."""
    participants: int
    """Peers that trained the round as this peer saw them, itself included."""
    tokens: int
    """This peer's tokens in the round."""
    loss: float | None
    """Mean training loss of the round (None: no step)."""
    eval_loss: float | None
    """The latest held-out loss (None: not evaluated yet)."""
    train_s: float
    round_s: float
    wait_s: float
    """Of round_s − train_s: how long the round's boundary waited for the previous round's
    exchange (with overlap, its outer step must be in before this round's delta is taken)."""
    boundary_s: float
    """Of round_s − train_s: the rest of the boundary (catching up, a checkpoint, ending the
    round on the training thread)."""
    sent: int
    """Bytes this peer has served so far (deltas and state)."""
    received: int
    """Bytes this peer has received so far."""
    progress_sent: int = 0
    """Bytes this peer has written to progress streams so far (records and progress)."""
    registry_sent: int = 0
    """Signed registry entry bytes this peer has sent to other replicas so far."""
    progress_messages: int = 0
    """Messages (records and progress) written to progress streams so far."""
    progress_records: int = 0
    """Of progress_messages: our record, whole or as an update."""
    progress_writes: int = 0
    """Writes to progress streams so far (each a message or several, framed once by libp2p)."""
    delta_requests: int = 0
    """Delta requests this peer has made so far."""
    delta_streams: int = 0
    """Streams this peer has opened for its delta requests so far (a stream is kept for the next)."""
    least_agreement: float | None = None
    """The lowest agreement of this peer's checks of the round's deltas (optim/check.py; None:
    none checked)."""
    check_s: float = 0.0
    """Seconds the checks took (on the exchange thread, before the outer step)."""
    rows: int = 1
    """The rows of a tree round (node/tree.py); 1: a full round."""
    send_s: float = 0.0
    """Of the round's exchange: encoding and serving this peer's delta."""
    pull_s: float = 0.0
    """Of the round's exchange: pulling the others' deltas (waiting for them to be served
    included)."""
    step_s: float = 0.0
    """Of the round's exchange: the rest (screening, checks, a tree round's rows, the outer
    step, the state served), until the round is reported."""
    screen_s: float = 0.0
    """Of step_s: decoding our own delta, screening the round's deltas and checking them."""
    rows_s: float = 0.0
    """Of step_s: a tree round's rows (agreeing on ours, pulling the others'); 0 in a full round."""
    sent_at: float = 0.0
    """When this peer's delta of the round was served (Unix time; 0: not sent): peers on one
    machine's clock tell from it how late the last of a round's deltas came."""

    def lines(self) -> list[str]:
        loss = "nan" if self.loss is None else f"{self.loss:.4f}"
        ev = "nan" if self.eval_loss is None else f"{self.eval_loss:.4f}"
        return [f"round {self.round} deltas {self.deltas}/{self.participants} tokens {self.tokens} loss {loss} "
                f"eval_loss {ev} train_s {self.train_s:.3f} round_s {self.round_s:.3f} sent {self.sent} "
                f"received {self.received}"]


@dataclass(frozen=True, slots=True)
class RoundDiscarded:
    kind: ClassVar[str] = "round_discarded"
    round: int
    reason: str

    def lines(self) -> list[str]:
        return [f"round {self.round} discarded: {self.reason}"]


@dataclass(frozen=True, slots=True)
class Final:
    kind: ClassVar[str] = "final"
    round: int
    eval_loss: float
    digest: str
    unfinished: int = 0
    """Peers of the last round whose records had not moved past it when we stopped serving
    our delta of it (the linger's deadline came first)."""

    def lines(self) -> list[str]:
        return [f"final round {self.round} eval_loss {self.eval_loss:.4f} digest {self.digest}"]


Event = Listening | Resumed | Synced | CaughtUp | ServingState | RoundEnded | RoundDiscarded | Final
EVENT_KINDS: dict[str, type] = {c.kind: c for c in (Listening, Resumed, Synced, CaughtUp, ServingState, RoundEnded,
                                                    RoundDiscarded, Final)}


def to_json(event: Event, at: float | None = None) -> str:
    """One line of the JSON-lines stream (non-finite floats as null: JSON has none)."""
    body: dict[str, Any] = {"event": event.kind, "time": time.time() if at is None else at}
    for f in dataclasses.fields(event):
        value = getattr(event, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        body[f.name] = list(value) if isinstance(value, tuple) else value
    return json.dumps(body)


class EventTail:
    """Follows a daemon's event file as it grows: each `poll` returns the events completed
    since the last (a line still being written waits for the next poll); `seen` keeps every
    event read so far."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = path
        self.seen: list[dict] = []
        self._offset = 0
        self._partial = b""
        self._line = 0

    def poll(self) -> list[dict]:
        """New events; ValueError naming the line for anything that is not one of ours."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        out = []
        for raw in lines:
            self._line += 1
            try:
                item = json.loads(raw)
            except ValueError as e:
                raise ValueError(f"{self.path}:{self._line}: not JSON: {e}") from None
            if not isinstance(item, dict) or item.get("event") not in EVENT_KINDS:
                raise ValueError(f"{self.path}:{self._line}: not a locoswarm event: {raw[:80]!r}")
            out.append(item)
        self.seen += out
        return out


    def wait_for(self, where: Callable[[dict], bool], timeout_s: float,
                 running: Callable[[], bool] = lambda: True) -> dict:
        """The first event read so far, or read while polling, for which `where` holds;
        TimeoutError once `timeout_s` has passed, RuntimeError when `running()` turns false
        with no such event (the daemon ended)."""
        deadline = time.monotonic() + timeout_s
        while True:
            alive = running()  # before reading: what was written before it ended is read
            self.poll()
            found = [e for e in self.seen if where(e)]
            if found:
                return found[0]
            if not alive:
                raise RuntimeError(f"the daemon ended without the awaited event in {self.path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no awaited event in {self.path} within {timeout_s} s")
            time.sleep(0.05)


def read_events(path: str | os.PathLike) -> list[dict]:
    """The events a daemon wrote to `path` so far (EventTail.poll from the start)."""
    return EventTail(path).poll()


@dataclass(slots=True)
class EventSink:
    """Where a daemon's events go: each as plain lines to `print_line`, and as JSON to
    `stream` when one is open."""

    print_line: Callable[[str], None]
    stream: TextIO | None = None

    @classmethod
    def open(cls, print_line: Callable[[str], None], path: str | None) -> "EventSink":
        """`path`: a file to append the JSON lines to (line-buffered), None for none;
        ValueError naming it when it cannot be opened."""
        try:
            stream = None if path is None else open(path, "a", buffering=1, encoding="utf-8")
        except OSError as e:
            raise ValueError(f"--events {path}: cannot write there: {e.strerror or e}") from None
        return cls(print_line, stream)

    def __call__(self, event: Event) -> None:
        for line in event.lines():
            self.print_line(line)
        if self.stream is not None:
            self.stream.write(to_json(event) + "\n")

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
