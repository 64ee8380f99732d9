"""What a peer of a local swarm (bench/swarm.py) reported: its typed events (node/events.py)
folded into a record per peer, with a line per round. bench/swarmbytes.py, bench/churn.py and
bench/swarmbench.py make their figures from these records; bench/swarm.py runs the processes
that write the events and reads their p2pd's sockets into the records' transport fields.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field

from locoswarm.bench.tcpio import TcpMeter
from locoswarm.node.events import EventTail

ALONE = -1
"""Peer.index of the lone-peer baseline."""


@dataclass(slots=True)
class RoundLine:
    round: int
    deltas: int
    participants: int
    tokens: int
    loss: float
    eval_loss: float
    train_s: float
    round_s: float
    ended_unix_s: float = float("nan")
    """When the daemon wrote the event (Unix seconds, its `time` field)."""
    sent: int = 0
    """Delta and state payload bytes the peer had sent by this round's end (cumulative)."""
    received: int = 0
    """Delta and state payload bytes the peer had received by this round's end (cumulative)."""
    wait_s: float = 0.0
    """Of round_s − train_s: waiting for the previous round's exchange."""
    boundary_s: float = 0.0
    """Of round_s − train_s: the rest of the round's boundary."""
    progress_sent: int = 0
    """Bytes written to progress streams by this round's end (cumulative)."""
    registry_sent: int = 0
    """Signed registry entry bytes stored at other replicas by this round's end (cumulative)."""
    progress_messages: int = 0
    """Messages (records and progress) written to progress streams by this round's end (cumulative)."""
    progress_records: int = 0
    """Of progress_messages: the peer's record, whole or as an update (cumulative)."""
    progress_writes: int = 0
    """Writes to progress streams by this round's end (cumulative)."""
    delta_requests: int = 0
    """Delta requests made by this round's end (cumulative)."""
    delta_streams: int = 0
    """Streams opened for delta requests by this round's end (cumulative)."""
    least_agreement: float | None = None
    """The lowest agreement of the peer's checks of the round's deltas (None: none checked)."""
    check_s: float = 0.0
    """Seconds the peer's checks of the round took."""
    rows: int = 1
    """The round's rows (a tree round, node/tree.py); 1: a full round."""
    exchange: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """The round's exchange in seconds: sending the peer's delta, pulling the others', the rest."""
    exchange_detail: tuple[float, float] = (0.0, 0.0)
    """Of the rest: screening and checking the round's deltas, a tree round's rows."""
    sent_at: float = 0.0
    """When the peer served its delta of the round (Unix time; 0: not sent)."""


@dataclass(slots=True)
class Peer:
    index: int
    """Its place in the swarm (its shard); ALONE for the lone-peer baseline."""
    proc: subprocess.Popen
    state_dir: str
    events: EventTail
    argv: list[str]
    """The command of every life of this peer."""
    lives: int = 1
    """Processes started for this peer so far (1 + restarts)."""
    rounds: list[RoundLine] = field(default_factory=list)
    """Every round it reported, over all its lives (a restarted peer may report a round again)."""
    resumed: list[int] = field(default_factory=list)
    """The checkpoint rounds its restarted lives resumed from (`resumed` events)."""
    synced: list[int] = field(default_factory=list)
    """The rounds of the swarm's states it took (`synced` events)."""
    caught_up: list[tuple[int, int, int]] = field(default_factory=list)
    """(from, to, bytes) of each catch-up by the rounds' deltas (`caught_up` events)."""
    life_rounds: int = 0
    """Rounds its current life reported: 0 while a restarted peer is still catching up."""
    final: dict | None = None
    addr: str | None = None
    io_meter: TcpMeter = field(default_factory=TcpMeter)
    """Its p2pd's sockets, read from its `listening` event on, at each of its rounds and between."""
    io_pids: set[int] = field(default_factory=set)
    """The p2pd of its current life (empty before it is found, and once the peer is restarted)."""
    io: tuple[int, int, int] | None = None
    """(bytes sent, bytes received, sent over its connections that closed) by its p2pd over a window that holds its first round's end to
    the run's last round's end, as its own round events time them: set at that round when
    readings bracket it."""
    io_lost: bool = False
    """Its p2pd was not found at one of its rounds, or no reading came before its first round
    ended: the transport does not count this peer."""
    spawned_unix_s: float = float("nan")
    """When its first life was started (Unix seconds)."""

    @property
    def start_s(self) -> float:
        """Seconds from its first start to the end of its first round (nan before it): what a
        daemon's start, dial and first round take on this machine."""
        return self.rounds[0].ended_unix_s - self.spawned_unix_s if self.rounds else float("nan")


def round_line(event: dict) -> RoundLine:
    """A `round` event as a line (fields older daemons do not write take their defaults)."""
    nan = float("nan")
    return RoundLine(event["round"], event["deltas"], event["participants"], event["tokens"],
                     nan if event["loss"] is None else event["loss"],
                     nan if event["eval_loss"] is None else event["eval_loss"],
                     event["train_s"], event["round_s"], event["time"],
                     sent=event.get("sent", 0), received=event.get("received", 0),
                     wait_s=event.get("wait_s", 0.0),
                     boundary_s=event.get("boundary_s", 0.0),
                     progress_sent=event.get("progress_sent", 0),
                     registry_sent=event.get("registry_sent", 0),
                     progress_messages=event.get("progress_messages", 0),
                     progress_records=event.get("progress_records", 0),
                     progress_writes=event.get("progress_writes", 0),
                     delta_requests=event.get("delta_requests", 0),
                     delta_streams=event.get("delta_streams", 0),
                     rows=event.get("rows", 1),
                     least_agreement=event.get("least_agreement"),
                     check_s=event.get("check_s", 0.0),
                     exchange=tuple(event.get(k, 0.0) for k in ("send_s", "pull_s", "step_s")),
                     exchange_detail=(event.get("screen_s", 0.0), event.get("rows_s", 0.0)),
                     sent_at=event.get("sent_at", 0.0))


def record(peer: Peer, event: dict) -> None:
    """Fold one of the peer's events into its record (events of other kinds are not kept)."""
    kind = event["event"]
    if kind == "listening":
        peer.addr = next((a for a in event["addrs"] if "/tcp/" in a), None)
    elif kind == "round":
        peer.rounds.append(round_line(event))
        peer.life_rounds += 1
    elif kind == "resumed":
        peer.resumed.append(event["round"])
    elif kind == "synced":
        peer.synced.append(event["round"])
    elif kind == "caught_up":
        peer.caught_up.append((event["start"], event["round"], event["bytes"]))
    elif kind == "final":
        peer.final = {"round": event["round"], "eval_loss": event["eval_loss"], "digest": event["digest"]}
