"""What a daemon tells about itself: its status (`node status`, the control API, the Docker
healthcheck) and its history (the dashboard's rounds, peers, contributions and baseline),
read off the daemon's parts without changing them."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from locoswarm.node.daemon import Daemon


def history_of(daemon: Daemon) -> dict:
    """The last rounds (for the dashboard's chart) and the live peers' records."""
    records = daemon.membership.records if daemon.membership is not None else []
    peers = [{"peer_id": r.peer_id, "device": r.device, "tokens_per_s": r.tokens_per_s, "round": r.round,
              "paused": r.paused} for r in records]
    return {"rounds": list(daemon.stats.history), "peers": peers, "started_unix_s": daemon.stats.started_unix_s,
            "contributions": daemon.stats.contributions.rows(daemon.peer_id),
            "baseline": None if daemon.baseline is None else daemon.baseline.read()}

def status_of(daemon: Daemon) -> dict:
    """The daemon's state for `node status` and the control API (STATUS_SCHEMA, node/control.py)."""
    t, st = daemon.trainer, daemon.stats
    return {
        "state": "dialling" if st.state == "starting" and daemon.dialling.since is not None else st.state,
        "dialling_since": daemon.dialling.since,
        "dial_attempts": daemon.dialling.attempts,
        "round": 0 if t is None else t.round,
        "loss": st.loss,
        "eval_loss": st.eval_loss,
        "num_peers": 0 if daemon.membership is None else daemon.membership.num_peers,
        "peers_estimate": 1.0 if daemon.membership is None else daemon.membership.peers_estimate,
        "peers_found_gone": 0 if daemon.membership is None else daemon.membership.found_gone,
        "bytes_sent": daemon.bytes_sent,
        "bytes_received": st.bytes_received,
        "peer_id": daemon.peer_id or None,
        "addrs": daemon.addrs,
        "transport": daemon.transport,
        "device": None if t is None else t.device.type,
        "precision": None if t is None else t.precision,
        "micro_batch": None if t is None else t.micro_batch,
        "tokens_per_s": 0.0 if t is None else t.tokens_per_s,
        "rounds_completed": st.rounds_completed,
        "rounds_discarded": st.rounds_discarded,
        "shard": daemon.shard,
        "deltas_rejected": st.deltas_rejected,
        "requests_refused": 0 if daemon.streams is None else daemon.streams.requests_refused,
        "paused": daemon.idle.paused,
        "checkpoint_round": daemon.checkpoints.round,
        "checkpoint_error": daemon.checkpoints.error,
        "last_round_at": st.last_round_at,
        "warnings": daemon.warnings.lines,
        "established_peers": 0 if t is None else len(t.ledger.established_peers()),
        "earned_rounds": 0.0 if t is None else max(0, t.ledger.credits.get(daemon.peer_id, 0))
        / t.ledger.per_peer_tokens,
        "checks": st.checks,
        "checks_failed": st.checks_failed,
        "least_agreement": st.least_agreement,
        "excluded_peers": 0 if t is None else t.ledger.num_banned,
    }
