"""`locoswarm node …`: run the volunteer daemon and ask it how it is doing. Thin: the
daemon is locoswarm.node.daemon; settings resolve through locoswarm.node.userconfig
(defaults < config file < LOCOSWARM_* environment < these flags)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="The volunteer daemon: join a swarm, ask it for its status.", no_args_is_help=True)


class JsonFormatter(logging.Formatter):
    """One JSON object per log line, for log collectors (journald, Docker, Loki)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname,
               "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time: above the round bar while it is drawn
    (rich redirects sys.stderr then), not through it."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


CONFIG_HELP = "Config file (TOML); default: the platform's config dir, or $LOCOSWARM_CONFIG."


@app.command()
def join(
    run: Optional[Path] = typer.Option(None, "--run", help="Run spec (TOML); the embedded default when omitted."),
    peer: Optional[list[str]] = typer.Option(None, "--peer", help="Multiaddr of a peer to join through (repeatable)."),
    listen: Optional[list[str]] = typer.Option(None, "--listen", help="Multiaddr to listen on (repeatable); default "
                                               "TCP and QUIC on all interfaces, ports chosen by the OS."),
    announce: Optional[list[str]] = typer.Option(None, "--announce", help="Public multiaddr to announce (repeatable)."),
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help="Identity, lock, checkpoints, control file."),
    device: Optional[str] = typer.Option(None, help="auto, cuda, mps or cpu."),
    max_rounds: Optional[int] = typer.Option(None, "--max-rounds", help="Leave after N rounds (0: run until stopped)."),
    min_peers: Optional[int] = typer.Option(None, "--min-peers", help="Wait for K peers (this one included) first."),
    shard: Optional[int] = typer.Option(None, help="Data shard (default: derived from the peer id)."),
    threads: Optional[int] = typer.Option(None, help="Torch CPU threads (0: torch's default)."),
    precision: Optional[str] = typer.Option(None, help="auto, bf16, fp16 or fp32 (auto: bf16 on Ampere+, fp16 on "
                                            "older CUDA, fp32 on CPU and MPS)."),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help="Sequences per forward pass, a divisor of "
                                              "the spec's batch (0: fit to free memory)."),
    max_gpu_memory: Optional[int] = typer.Option(None, "--max-gpu-memory", help="Take at most this % of the GPU's "
                                                 "memory (0: no cap)."),
    activation_checkpointing: Optional[bool] = typer.Option(None, "--activation-checkpointing/--no-activation-"
                                                            "checkpointing", help="Recompute activations in backward "
                                                            "(less memory, ≈1/3 more compute)."),
    compile_: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the transformer "
                                            "blocks (CUDA)."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Evaluate every N rounds (0: only at the end)."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Checkpoint every N rounds (0: never)."),
    keep_checkpoints: Optional[int] = typer.Option(None, "--keep-checkpoints", help="Checkpoints kept."),
    fanout: Optional[int] = typer.Option(None, help="F: at most this many peers' deltas pulled per round."),
    auto_relay: Optional[bool] = typer.Option(None, "--auto-relay/--no-auto-relay", help="Look for a relay behind NAT."),
    allowed_hours: Optional[str] = typer.Option(None, "--allowed-hours", help="Train only in these local hours, "
                                                "e.g. 22-8."),
    max_other_cpu: Optional[int] = typer.Option(None, "--max-other-cpu", help="Pause while other processes use "
                                                "more than this % of the CPUs (0: off)."),
    config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP),
    log_format: str = typer.Option("text", "--log-format", help="text (readable lines) or json (one object a line)."),
    events: Optional[Path] = typer.Option(None, "--events", help="Also write the daemon's events (rounds, syncs, the "
                                          "final state) to this file, one JSON object a line, for programs."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Debug logging."),
) -> None:
    """Join a swarm (or start one) and train until stopped: Ctrl-C or SIGTERM leaves cleanly."""
    if log_format not in ("text", "json"):
        typer.echo(f"error: --log-format must be text or json, got {log_format!r}", err=True)
        raise typer.Exit(2)
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    for noisy in ("hivemind", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not verbose else logging.DEBUG)
    from locoswarm.node.daemon import run_daemon
    from locoswarm.node.spec import load_spec
    from locoswarm.node.hardware import pick_device
    from locoswarm.node.userconfig import node_config, resolve

    flags = {"run": None if run is None else str(run), "peers": peer or None, "listen": listen or None,
             "announce": announce or None, "state_dir": None if state_dir is None else str(state_dir),
             "device": device, "max_rounds": max_rounds, "min_peers": min_peers, "shard": shard, "threads": threads,
             "precision": precision, "micro_batch": micro_batch, "max_gpu_memory_percent": max_gpu_memory,
             "activation_checkpointing": activation_checkpointing, "compile": compile_,
             "eval_every": eval_every, "checkpoint_every": checkpoint_every, "checkpoint_keep": keep_checkpoints,
             "fanout": fanout, "auto_relay": auto_relay, "allowed_hours": allowed_hours,
             "max_other_cpu_percent": max_other_cpu}
    try:
        values, _ = resolve(flags, config_path=None if config is None else str(config))
        spec = load_spec(values["run"])
        cfg = node_config(values, spec.initial_peers)
        pick_device(cfg.device)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(run_daemon(spec, cfg, emit=lambda line: typer.echo(line),
                                events_path=None if events is None else str(events)))


@app.command()
def status(
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help="The daemon's state directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON (see --schema)."),
    schema: bool = typer.Option(False, "--schema", help="Print the status JSON's schema (JSON Schema) and exit."),
    config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Ask the running daemon for its state, round, loss, peers and traffic."""
    if schema:
        from locoswarm.node.control import STATUS_SCHEMA

        typer.echo(json.dumps(STATUS_SCHEMA, indent=2))
        return
    from locoswarm.node.control import read_status
    from locoswarm.node.userconfig import resolve

    try:
        values, _ = resolve({"state_dir": None if state_dir is None else str(state_dir)},
                            config_path=None if config is None else str(config))
        st = read_status(values["state_dir"])
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except RuntimeError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(st, indent=2))
        return
    loss = "—" if st["loss"] is None else f"{st['loss']:.4f}"
    ev = "—" if st["eval_loss"] is None else f"{st['eval_loss']:.4f}"
    typer.echo(f"{st['state']}: round {st['round']}, loss {loss}, eval loss {ev}, {st['num_peers']} other peers, "
               f"sent {st['bytes_sent']:,} B, received {st['bytes_received']:,} B, {st['tokens_per_s']:.0f} tokens/s")
    typer.echo(f"peer {st['peer_id']} on {st['device']}")
