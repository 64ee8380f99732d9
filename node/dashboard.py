"""What the dashboard page (node/static/dashboard.html) draws beyond the status JSON, as
`GET /history` serves it: each peer's contribution as this daemon saw it (the tokens of its
deltas taken into the outer steps, its deltas accepted, refused or missing), and the curve of
a lone-peer baseline run when one is named (`--baseline`, the `--events` file of a swarm of
one on the same spec, shard and token budget: what `locoswarm demo` runs beside its swarm).
The rounds themselves are NodeStats.history, appended by the round loop."""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass

from locoswarm.node.events import EventTail

MAX_PEERS = 256
"""Peers whose contribution is kept; past it the one seen longest ago goes (a flood of
identities must not grow the daemon's memory)."""
MAX_BASELINE_ROUNDS = 2000
"""Baseline rounds kept, as NodeStats.history keeps the node's own."""


@dataclass(slots=True)
class Contribution:
    tokens: int = 0
    """Tokens its accepted deltas were weighted by (its claim, or the screen's cap)."""
    accepted: int = 0
    """Its deltas taken into this peer's outer steps."""
    refused: int = 0
    """Its deltas refused: malformed, misattributed, non-finite, over the norm rule, excluded."""
    missing: int = 0
    """Rounds it trained in whose delta did not come (gone, stalled, unreachable)."""
    last_round: int = -1
    """The last round it was seen in."""


class Contributions:
    """Per peer, what this daemon took from it over the rounds it aggregated."""

    def __init__(self, max_peers: int = MAX_PEERS) -> None:
        self.max_peers = max_peers
        self.by_peer: dict[str, Contribution] = {}

    def _entry(self, peer: str, round_: int) -> Contribution:
        entry = self.by_peer.get(peer)
        if entry is None:
            if len(self.by_peer) >= self.max_peers:
                stalest = min(self.by_peer, key=lambda p: self.by_peer[p].last_round)
                del self.by_peer[stalest]
            entry = self.by_peer[peer] = Contribution()
        entry.last_round = max(entry.last_round, round_)
        return entry

    def round(self, round_: int, *, accepted: dict[str, int], refused: set[str], missing: set[str]) -> None:
        """One aggregated round: `accepted` sender → tokens it was weighted by; `refused` and
        `missing` the peers whose delta was refused or did not come."""
        for peer, tokens in accepted.items():
            entry = self._entry(peer, round_)
            entry.accepted += 1
            entry.tokens += tokens
        for peer in refused:
            self._entry(peer, round_).refused += 1
        for peer in missing - refused:
            self._entry(peer, round_).missing += 1

    def rows(self, own: str | None) -> list[dict]:
        """One row a peer, most tokens first; `own` (this peer's id) is flagged."""
        ranked = sorted(self.by_peer.items(), key=lambda kv: (-kv[1].tokens, kv[0]))
        return [{"peer_id": peer, "self": peer == own, "tokens": c.tokens, "accepted": c.accepted,
                 "refused": c.refused, "missing": c.missing, "last_round": c.last_round} for peer, c in ranked]


class Baseline:
    """The rounds a lone-peer run wrote to its events file so far, read a little more at each
    request (the run may still be going: the file may not exist yet, or grow)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._tail = EventTail(path)
        self.rounds: collections.deque = collections.deque(maxlen=MAX_BASELINE_ROUNDS)
        self.started_unix_s: float | None = None
        self.final_eval_loss: float | None = None
        self.error: str | None = None
        """Why the file stopped being read (not an events file); None while it is read."""
        self._tokens = 0

    def read(self) -> dict:
        if self.error is None:
            try:
                events = self._tail.poll()
            except ValueError as e:
                self.error = str(e)
                events = []
            self._tail.seen.clear()  # the rounds are kept below, bounded
            for e in events:
                self._take(e)
        return {"path": os.path.abspath(self.path), "rounds": list(self.rounds), "started_unix_s": self.started_unix_s,
                "final_eval_loss": self.final_eval_loss, "error": self.error}

    def _take(self, e: dict) -> None:
        if self.started_unix_s is None:
            self.started_unix_s = e["time"]  # its first event: the run had started by then
        if e["event"] == "round":
            self._tokens += e["tokens"]
            self.rounds.append({"round": e["round"], "loss": e["loss"], "eval_loss": e["eval_loss"],
                                "tokens": e["tokens"], "tokens_total": self._tokens, "time": e["time"]})
        elif e["event"] == "final":
            self.final_eval_loss = e["eval_loss"]
