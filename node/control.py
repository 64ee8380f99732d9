"""The daemon's control API: HTTP on 127.0.0.1 only, so nothing beyond this machine can
reach it. `GET /status` answers the status JSON that `locoswarm node status` prints;
`GET /metrics` the same figures for Prometheus (prometheus-client's text format); `GET /`
a dashboard page (loss against tokens and time beside a lone-peer baseline, each round's
time, each peer's contribution, the peers, traffic, state and why paused) that polls
`/status` and `GET /history` (node/dashboard.py says what it holds). The
port is chosen by the OS and written, with the daemon's pid, to `control.json` in the state
directory, which is how `node status` finds the daemon.

The status JSON's schema is STATUS_SCHEMA below (JSON Schema 2020-12, every key always
present, nothing else); `locoswarm node status --schema` prints it.

The API is up from the moment the daemon holds its state directory, before p2pd starts, so
that a start still dialling its initial peers or downloading the state says so; in the
short moment before it answers, `read_status` tells a held state directory (its lock is
taken) from one no daemon runs on.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import time
from typing import Callable

from locoswarm.node.files import write_atomic
from locoswarm.node.portable import pid_alive
from locoswarm.node.statedir import LOCK_FILE

_STATES = ["starting", "dialling", "proving", "syncing", "waiting", "paused", "training", "exchanging", "stopping"]
_TIME = {"type": ["number", "null"], "minimum": 0}
NUM_WARNINGS = 5
"""Warnings the status keeps, the newest last."""
_COUNT = {"type": "integer", "minimum": 0}
_LOSS = {"type": ["number", "null"]}
_STATUS_KEYS = {
    "state": ({"enum": _STATES}, "what the daemon is doing; dialling: reaching the initial peers (see "
              "dialling_since); proving: the proof of work the run asks of its identity (once); syncing: taking "
              "the swarm's state; waiting: for --min-peers"),
    "dialling_since": (_TIME, "unix time the daemon began dialling its initial peers (null: not dialling)"),
    "dial_attempts": (_COUNT, "p2pd starts tried to reach the initial peers, each dialling all of them"),
    "paused": ({"type": ["string", "null"]}, "why the idle governor paused training (null: not paused)"),
    "round": (_COUNT, "the round being trained"),
    "loss": (_LOSS, "mean training loss of the last finished round (null before one)"),
    "eval_loss": (_LOSS, "held-out loss at the last evaluation (null before one)"),
    "num_peers": (_COUNT, "live peers of this run spec other than this one (in this peer's partial view)"),
    "peers_estimate": ({"type": "number", "minimum": 0}, "the swarm's size as estimated from the registry buckets read"),
    "peers_found_gone": (_COUNT, "peers dropped from the view since start because no progress stream opened to them "
                                 "(a record with nothing behind it counted once)"),
    "bytes_sent": (_COUNT, "bytes this peer wrote to delta and state streams"),
    "bytes_received": (_COUNT, "bytes this peer read from delta and state streams"),
    "deltas_rejected": (_COUNT, "deltas refused (malformed, oversized, misattributed) since start"),
    "requests_refused": (_COUNT, "stream requests refused by the per-peer limits (concurrency, rate, sends of a round's delta) or the upload budget since start"),
    "checkpoint_round": ({"type": ["integer", "null"]}, "round of the last checkpoint written or resumed from"),
    "checkpoint_error": ({"type": ["string", "null"]}, "why the last checkpoint was not written (null: it was)"),
    "last_round_at": (_TIME, "unix time this peer last ended a round (null: none yet)"),
    "warnings": ({"type": "array", "items": {"type": "string"}, "maxItems": NUM_WARNINGS},
                 f"the last {NUM_WARNINGS} warnings and errors logged, oldest first, each after its local time "
                 "(HH:MM:SS)"),
    "peer_id": ({"type": ["string", "null"]}, "this peer's libp2p id (null before p2pd started)"),
    "addrs": ({"type": "array", "items": {"type": "string"}}, "the multiaddrs peers can dial"),
    "transport": ({"enum": ["p2pd", "libp2p", None]}, "what the peer speaks the swarm's protocols over: hivemind's "
                  "p2pd, or py-libp2p in the daemon's process (null before the network started)"),
    "device": ({"enum": ["cuda", "mps", "cpu", None]}, "the training device (null before the trainer exists)"),
    "precision": ({"enum": ["bf16", "fp16", "fp32", None]}, "what the inner steps compute in"),
    "micro_batch": ({"type": ["integer", "null"], "minimum": 1}, "sequences per forward pass"),
    "tokens_per_s": ({"type": "number", "minimum": 0}, "training throughput of the current round"),
    "rounds_completed": (_COUNT, "rounds this peer aggregated"),
    "rounds_discarded": (_COUNT, "rounds given up after a failure (logged), the node training on"),
    "shard": ({"type": ["integer", "null"]}, "the data shard this peer trains on"),
    "established_peers": (_COUNT, "peers the outer state's ledger counts as established (earned weight, docs/trust.md)"),
    "earned_rounds": ({"type": "number", "minimum": 0}, "this peer's credit in the ledger, in rounds of its planned "
                      "work (established from the spec's diloco.robust.earn_rounds on)"),
    "checks": (_COUNT, "other peers' deltas this peer checked against its own work since start (docs/trust.md)"),
    "checks_failed": (_COUNT, "of them, those that failed (each logged as a warning and told to the swarm)"),
    "least_agreement": (_LOSS, "the lowest agreement of the last round's checks (honest deltas: 0.3 and up; "
                        "null: none checked)"),
    "excluded_peers": (_COUNT, "peers the outer state's ledger excludes: their deltas failed the checks of "
                       "established peers holding a majority of the earned weight"),
}
STATUS_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "locoswarm node status",
    "type": "object",
    "properties": {k: {**schema, "description": doc} for k, (schema, doc) in _STATUS_KEYS.items()},
    "required": list(_STATUS_KEYS),
    "additionalProperties": False,
}

CONTROL_FILE = "control.json"
log = logging.getLogger(__name__)


class RecentWarnings(logging.Handler):
    """Keeps the last warnings and errors logged (by any thread) for the status: a volunteer
    asking `node status` why nothing happens reads them there, not in a journal."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._kept: collections.deque[str] = collections.deque(maxlen=NUM_WARNINGS)

    def emit(self, record: logging.LogRecord) -> None:
        self._kept.append(f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {record.getMessage()}")

    @property
    def lines(self) -> list[str]:
        return list(self._kept)


class StatusCollector:
    """Prometheus metrics read from the status at scrape time (nothing to keep in sync)."""

    def __init__(self, status: Callable[[], dict]) -> None:
        self.status = status

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        st = self.status()
        gauges = {"round": ("the round being trained", st["round"]),
                  "loss": ("mean training loss of the last round", st["loss"]),
                  "eval_loss": ("held-out loss at the last evaluation", st["eval_loss"]),
                  "peers": ("live peers of this run spec besides this one", st["num_peers"]),
                  "peers_estimate": ("the swarm's size as estimated from the registry", st["peers_estimate"]),
                  "tokens_per_second": ("training throughput", st["tokens_per_s"]),
                  "excluded_peers": ("peers the swarm's checks excluded", st["excluded_peers"])}
        for name, (doc, value) in gauges.items():
            if value is not None:
                yield GaugeMetricFamily(f"locoswarm_{name}", doc, value=value)
        counters = {"rounds_completed": ("rounds this peer aggregated", st["rounds_completed"]),
                    "rounds_discarded": ("rounds given up after a failure", st["rounds_discarded"]),
                    "bytes_sent": ("bytes written to delta and state streams", st["bytes_sent"]),
                    "bytes_received": ("bytes read from delta and state streams", st["bytes_received"]),
                    "deltas_rejected": ("deltas refused as malformed or misattributed", st["deltas_rejected"]),
                    "requests_refused": ("stream requests refused by the per-peer limits", st["requests_refused"]),
                    "checks": ("other peers' deltas checked against this peer's work", st["checks"]),
                    "checks_failed": ("checks of other peers' deltas that failed", st["checks_failed"])}
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"locoswarm_{name}", doc, value=value)
        state = GaugeMetricFamily("locoswarm_state", "1 for the daemon's current state", labels=["state"])
        state.add_metric([st["state"]], 1)
        yield state


class ControlServer:
    def __init__(self, state_dir: str, status: Callable[[], dict],
                 history: Callable[[], dict] = lambda: {"rounds": [], "peers": []}) -> None:
        from prometheus_client import CollectorRegistry

        self.state_dir = state_dir
        self.status = status
        self.history = history
        self.registry = CollectorRegistry()
        self.registry.register(StatusCollector(status))
        as_json = lambda fn: lambda: (json.dumps(fn()).encode(), "application/json")  # noqa: E731
        self._routes: dict[str, Callable[[], tuple[bytes, str]]] = {
            "/status": as_json(status), "/history": as_json(history), "/metrics": self._metrics,
            "/": lambda: (_dashboard(), "text/html; charset=utf-8"),
            "/index.html": lambda: (_dashboard(), "text/html; charset=utf-8"),
        }
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, host="127.0.0.1", port=0)
        port = self._server.sockets[0].getsockname()[1]
        write_atomic(os.path.join(self.state_dir, CONTROL_FILE), json.dumps({"port": port, "pid": os.getpid()}))
        return port

    def _metrics(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        try:
            os.unlink(os.path.join(self.state_dir, CONTROL_FILE))
        except FileNotFoundError:
            pass

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            line = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            method, path = (line + ["", ""])[:2]
            code, body, kind = "404 Not Found", b'{"error": "GET /, /status, /history or /metrics"}', "application/json"
            if method == "GET" and path in self._routes:
                code = "200 OK"
                body, kind = self._routes[path]()
            writer.write(f"HTTP/1.0 {code}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + body)
            await asyncio.wait_for(writer.drain(), 5.0)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError) as e:
            log.info("control request dropped: %s", type(e).__name__)
        finally:
            writer.close()


def _dashboard() -> bytes:
    from importlib.resources import files

    return files("locoswarm.node").joinpath("static/dashboard.html").read_bytes()


def read_status(state_dir: str, timeout_s: float = 5.0) -> dict:
    """Ask the daemon that owns `state_dir` for its status; raises RuntimeError saying why not."""
    import http.client

    path = os.path.join(state_dir, CONTROL_FILE)
    try:
        with open(path) as fh:
            info = json.load(fh)
        port = int(info["port"])
    except FileNotFoundError:
        holder = lock_holder(state_dir)
        if holder is not None:
            raise RuntimeError(f"a daemon (pid {holder}) holds state directory {state_dir} but is not answering "
                               "yet: it is starting or stopping") from None
        raise RuntimeError(f"no daemon is running with state directory {state_dir} ({path} does not exist)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise RuntimeError(f"{path} is unreadable: {e}") from None
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
        conn.request("GET", "/status")
        resp = conn.getresponse()
        body = resp.read(1 << 20)
    except OSError as e:
        holder = lock_holder(state_dir)
        if holder is None:  # a daemon killed (SIGKILL, power loss) leaves its control file behind
            raise RuntimeError(f"no daemon is running with state directory {state_dir} (pid {info.get('pid')}, "
                               f"which wrote {path}, is gone)") from None
        raise RuntimeError(f"the daemon of {state_dir} (pid {holder}) does not answer on port {port} ({e}); "
                           "it may be stopping") from None
    if resp.status != 200:
        raise RuntimeError(f"the daemon answered {resp.status}")
    return json.loads(body)


def lock_holder(state_dir: str) -> int | None:
    """The pid of the daemon holding `state_dir`, None when none does: open_state_dir writes
    its pid into the lock file once it holds the lock, and the file keeps it after the
    process ended, so the pid must also be alive. Read, not tested by taking the lock: a
    status asked at the moment a daemon starts must not make the start fail as "in use"."""
    try:
        with open(os.path.join(state_dir, LOCK_FILE)) as fh:
            pid = int(fh.read(32).strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None
