"""`locoswarm node …`: run the volunteer daemon and ask it how it is doing. Thin: the
daemon is locoswarm.node.daemon."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="The volunteer daemon: join a swarm, ask it for its status.", no_args_is_help=True)
DEFAULT_STATE_DIR = os.path.join(os.path.expanduser("~"), ".locoswarm", "node")


@app.command()
def join(
    run: Optional[Path] = typer.Option(None, "--run", help="Run spec (TOML); the embedded default when omitted."),
    peer: Optional[list[str]] = typer.Option(None, "--peer", help="Multiaddr of a peer to join through (repeatable)."),
    listen: Optional[list[str]] = typer.Option(None, "--listen", help="Multiaddr to listen on (repeatable); default "
                                               "TCP and QUIC on all interfaces, ports chosen by the OS."),
    announce: Optional[list[str]] = typer.Option(None, "--announce", help="Public multiaddr to announce (repeatable)."),
    state_dir: Path = typer.Option(Path(DEFAULT_STATE_DIR), "--state-dir", help="Identity, lock and control file."),
    device: str = typer.Option("auto", help="auto, cuda, mps or cpu."),
    max_rounds: int = typer.Option(0, "--max-rounds", help="Leave after this many rounds (0: run until stopped)."),
    min_peers: int = typer.Option(1, "--min-peers", help="Wait for this many peers (this one included) first."),
    shard: Optional[int] = typer.Option(None, help="Data shard (default: derived from the peer id)."),
    threads: int = typer.Option(0, help="Torch CPU threads (0: torch's default)."),
    eval_every: int = typer.Option(1, "--eval-every", help="Evaluate every N rounds (0: only at the end)."),
    checkpoint_every: int = typer.Option(10, "--checkpoint-every", help="Checkpoint every N rounds (0: never)."),
    keep_checkpoints: int = typer.Option(3, "--keep-checkpoints", help="Checkpoints kept."),
    fanout: int = typer.Option(16, help="F: at most this many peers' deltas pulled per round."),
    auto_relay: bool = typer.Option(False, "--auto-relay", help="Look for a relay when behind NAT."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Debug logging."),
) -> None:
    """Join a swarm (or start one) and train until stopped: Ctrl-C or SIGTERM leaves cleanly."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s "
                        "%(name)s: %(message)s")
    for noisy in ("hivemind", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not verbose else logging.DEBUG)
    from locoswarm.node.config import NodeConfig
    from locoswarm.node.daemon import run_daemon
    from locoswarm.node.host import DEFAULT_LISTEN, NetworkConfig
    from locoswarm.node.spec import load_spec

    try:
        spec = load_spec(None if run is None else str(run))
        peers = list(peer or []) or list(spec.initial_peers)
        cfg = NodeConfig(state_dir=str(state_dir), device=device, max_rounds=max_rounds, min_peers=min_peers,
                         shard=shard, threads=threads, eval_every=eval_every, fanout=fanout,
                         checkpoint_every=checkpoint_every, checkpoint_keep=keep_checkpoints,
                         net=NetworkConfig(listen=list(listen or DEFAULT_LISTEN), announce=list(announce or []),
                                           peers=peers, auto_relay=auto_relay))
        cfg.validate()
        from locoswarm.node.trainer import pick_device

        pick_device(device)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(run_daemon(spec, cfg, emit=lambda line: typer.echo(line)))


@app.command()
def status(
    state_dir: Path = typer.Option(Path(DEFAULT_STATE_DIR), "--state-dir", help="The daemon's state directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON (keys documented in the README)."),
) -> None:
    """Ask the running daemon for its state, round, loss, peers and traffic."""
    from locoswarm.node.control import read_status

    try:
        st = read_status(str(state_dir))
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
