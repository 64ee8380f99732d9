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
    sent: int
    """Bytes this peer has served so far (deltas and state)."""
    received: int
    """Bytes this peer has received so far."""

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

    def lines(self) -> list[str]:
        return [f"final round {self.round} eval_loss {self.eval_loss:.4f} digest {self.digest}"]


Event = Listening | Resumed | Synced | ServingState | RoundEnded | RoundDiscarded | Final
EVENT_KINDS: dict[str, type] = {c.kind: c for c in (Listening, Resumed, Synced, ServingState, RoundEnded,
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


def read_events(path: str | os.PathLike) -> list[dict]:
    """The events a daemon wrote to `path` so far (a line still being written is left
    out); ValueError naming the line for anything that is not one of ours."""
    out = []
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    complete = text[:text.rfind("\n") + 1]
    for number, line in enumerate(complete.splitlines(), 1):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not JSON: {e}") from None
        if not isinstance(item, dict) or item.get("event") not in EVENT_KINDS:
            raise ValueError(f"{path}:{number}: not a locoswarm event: {line[:80]}")
        out.append(item)
    return out


@dataclass(slots=True)
class EventSink:
    """Where a daemon's events go: each as plain lines to `print_line`, and as JSON to
    `stream` when one is open."""

    print_line: Callable[[str], None]
    stream: TextIO | None = None

    @classmethod
    def open(cls, print_line: Callable[[str], None], path: str | None) -> "EventSink":
        """`path`: a file to append the JSON lines to (line-buffered), None for none."""
        stream = None if path is None else open(path, "a", buffering=1, encoding="utf-8")
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
