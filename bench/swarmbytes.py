"""The bytes of a `bench swarm` run, per peer per round, counted at two levels.

At the application: the daemons' own counters, carried by their round events
(node/events.py `RoundEnded`): delta and state payload sent and received, bytes written to
progress streams, registry entries stored at other replicas. They need nothing from the
machine, so they are always there once a peer reported two rounds.

At the transport: the kernel's per-socket TCP counters of each peer's p2pd (bench/tcpio.py,
read by bench/swarm.py from its start, at each of its rounds and between, summed per socket,
over a window that holds the peer's rounds), which add the DHT's own traffic, libp2p's
framing and encryption. Where they cannot be read (not Linux, sock_diag
refused, a p2pd not found) the transport figures are null and `transport_bytes_unavailable`
says why; the application figures stay. Both are taken over each peer's rounds, first to
last.
"""

from __future__ import annotations

import statistics

from locoswarm.bench.swarmpeer import Peer

APP_COUNTERS = {
    "delta_bytes_per_peer_per_round": "sent",
    "delta_bytes_received_per_peer_per_round": "received",
    "progress_bytes_per_peer_per_round": "progress_sent",
    "registry_bytes_per_peer_per_round": "registry_sent",
    "progress_messages_per_peer_per_round": "progress_messages",
    "progress_records_per_peer_per_round": "progress_records",
    "progress_writes_per_peer_per_round": "progress_writes",
    "delta_requests_per_peer_per_round": "delta_requests",
    "delta_streams_per_peer_per_round": "delta_streams",
}
"""JSON key → the cumulative counter of the round events it is the per-round rate of."""
APP_SENT = ("sent", "progress_sent", "registry_sent")
"""What the daemons' code wrote to other peers: `app_bytes_per_peer_per_round` sums them."""
BYTE_KEYS = (*APP_COUNTERS, "app_bytes_per_peer_per_round", "app_bytes_unavailable", "bytes_per_peer_per_round",
             "control_bytes_per_peer_per_round", "transport_closed_bytes_per_peer_per_round", "transport_peers_counted",
             "transport_bytes_unavailable")
"""Every key `byte_figures` writes."""


def _per_round(peer: Peer, *counters: str) -> float:
    """The growth of the round events' `counters` (summed) from the peer's first round to its
    last, per round."""
    first, last = peer.rounds[0], peer.rounds[-1]
    return sum(getattr(last, c) - getattr(first, c) for c in counters) / (len(peer.rounds) - 1)


def byte_figures(peers: list[Peer], transport_unavailable: str | None) -> dict:
    """Per peer per round, means over the peers: the application's counts and, where they
    could be read, the transport's. `transport_unavailable`: why the machine's TCP counters
    could not be read (None: they could)."""
    measured = [p for p in peers if len(p.rounds) > 1]
    out: dict = {key: statistics.fmean(_per_round(p, c) for p in measured) if measured else None
                 for key, c in APP_COUNTERS.items()}
    out["app_bytes_per_peer_per_round"] = (statistics.fmean(_per_round(p, *APP_SENT) for p in measured)
                                           if measured else None)
    out["app_bytes_unavailable"] = None if measured else "no peer reported two rounds"
    # A peer counts at the transport when its p2pd was found at every one of its rounds and
    # readings bracket them (bench/swarm.py).
    counted = [p for p in measured if p.io is not None]
    if transport_unavailable is None and not counted:
        transport_unavailable = ("no peer's p2pd was found at each of its rounds" if measured else
                                 "no peer reported two rounds")
    if counted and transport_unavailable is None:
        transport = statistics.fmean(p.io[0] / (len(p.rounds) - 1) for p in counted)
        # What the transport carried beyond the payload the same peers' code sent over the
        # same rounds: the control plane (DHT, libp2p framing, pings), what docs/scale.md models.
        payload = statistics.fmean(_per_round(p, "sent") for p in counted)
        # What the connections that closed in the window had sent over their lives: what a sum
        # over the open sockets at the window's ends would have dropped (bench/tcpio.py).
        closed = statistics.fmean(p.io[2] / (len(p.rounds) - 1) for p in counted)
        out.update(bytes_per_peer_per_round=transport, control_bytes_per_peer_per_round=transport - payload,
                   transport_closed_bytes_per_peer_per_round=closed)
    else:
        out.update(bytes_per_peer_per_round=None, control_bytes_per_peer_per_round=None,
                   transport_closed_bytes_per_peer_per_round=None)
    out["transport_peers_counted"] = len(counted) if transport_unavailable is None else 0
    out["transport_bytes_unavailable"] = transport_unavailable
    return out


def format_bytes(r: dict) -> list[str]:
    """The byte lines of `bench swarm`'s summary: both levels, or why one is missing."""
    lines = []
    if r.get("app_bytes_per_peer_per_round") is not None:
        lines.append(f"  bytes/peer/round       {r['app_bytes_per_peer_per_round']:,.0f} sent by the daemons' code "
                     f"({r['delta_bytes_per_peer_per_round']:,.0f} deltas and state, "
                     f"{r['progress_bytes_per_peer_per_round']:,.0f} progress, "
                     f"{r['registry_bytes_per_peer_per_round']:,.0f} registry entries), "
                     f"{r['delta_bytes_received_per_peer_per_round']:,.0f} received")
    elif r.get("app_bytes_unavailable"):
        lines.append(f"  bytes/peer/round       not counted by the daemons: {r['app_bytes_unavailable']}")
    if r.get("bytes_per_peer_per_round") is not None:
        lines.append(f"  at the transport       {r['bytes_per_peer_per_round']:,.0f} sent over p2pd's TCP sockets, "
                     f"{r['control_bytes_per_peer_per_round']:,.0f} of them beyond deltas and state "
                     f"(the DHT, libp2p's framing and encryption)")
    elif r.get("transport_bytes_unavailable"):
        lines.append(f"  at the transport       not counted: {r['transport_bytes_unavailable']}")
    return lines
