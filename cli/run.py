"""`locoswarm run …`: write and inspect run specs. Thin: the logic is in locoswarm.node.spec."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="Run specs: what every peer of a training run agrees on.", no_args_is_help=True)


def _anchor_id(given: str) -> str:
    """`run init --anchor`: a state directory (a path, or a folder that exists) names its
    identity's peer id; anything else must be a base58 peer id."""
    from hivemind.p2p import PeerID

    from locoswarm.node.statedir import state_dir_peer_id

    if os.sep in given or given.startswith((".", "~")) or os.path.isdir(given):
        return state_dir_peer_id(os.path.expanduser(given))
    try:
        PeerID.from_base58(given)
    except Exception:  # base58 or multihash: either way not a peer id
        raise ValueError(f"--anchor {given!r} is neither a peer id nor a state directory") from None
    return given


@app.command()
def init(
    path: Path = typer.Argument(Path("run.toml"), help="Where to write the spec."),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="Name of the run."),
    model: Optional[str] = typer.Option(None, help="tiny, small, base or hf:llama."),
    tokenizer: Optional[str] = typer.Option(None, help="gpt2 or byte."),
    data: Optional[str] = typer.Option(None, help="builtin:shakespeare, builtin:kjv, a folder, or several joined by '+'."),
    seed: Optional[int] = typer.Option(None, help="Genesis seed."),
    peer: Optional[list[str]] = typer.Option(None, help="Initial peer multiaddr (repeatable)."),
    anchor: Optional[list[str]] = typer.Option(None, help="A trust anchor (repeatable, at most 8): a peer id, or the "
                                               "state directory of the organiser's node that will be one (its "
                                               "identity is made there when it has none)."),
    force: bool = typer.Option(False, help="Overwrite an existing file."),
) -> None:
    """Write a run spec (the embedded default, with these changes) as TOML, atomically."""
    from dataclasses import replace

    from locoswarm.node.host import NodeError
    from locoswarm.node.spec import RunSpec, write_spec

    spec = RunSpec()
    changes = {k: v for k, v in {"run_id": run_id, "model": model, "tokenizer": tokenizer, "seed": seed}.items()
               if v is not None}
    try:
        spec = replace(spec, **changes)
        if data is not None:
            spec = replace(spec, data=replace(spec.data, source=data))
        if peer:
            spec = replace(spec, initial_peers=list(peer))
        if anchor:
            ids = [_anchor_id(a) for a in anchor]
            spec = replace(spec, trust=replace(spec.trust, anchors=ids))
        write_spec(spec, str(path), force=force)
    except (ValueError, NodeError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {path} (spec hash {spec.hash().hex()})")


@app.command()
def show(path: Optional[Path] = typer.Argument(None, help="A run spec; the embedded default when omitted.")) -> None:
    """Print the effective run spec and its hash."""
    from locoswarm.node.spec import load_spec, to_toml

    try:
        spec = load_spec(None if path is None else str(path))
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(to_toml(spec), nl=False)


@app.command()
def invite(
    path: Optional[Path] = typer.Argument(None, help="The run spec; the embedded default when omitted."),
    run: Optional[Path] = typer.Option(None, "--run", help="The run spec, as node join names it (or give it as "
                                       "the argument)."),
    peer: Optional[list[str]] = typer.Option(None, help="Address to join through, with /p2p/<id> (repeatable); "
                                             "default: the spec's initial peers, else those of the node running "
                                             "on --state-dir."),
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help="The organiser's node: its identity signs "
                                             "the invite. Default: the platform's data folder, as for node join."),
    valid_days: float = typer.Option(0, "--valid-days", help="Refused after this many days (0: never)."),
) -> None:
    """Print a `locoswarm node join --invite …` line: the run's spec and addresses to join
    through, signed by the organiser node's identity."""
    from locoswarm.node.config import default_state_dir
    from locoswarm.node.control import read_status
    from locoswarm.node.host import NodeError
    from locoswarm.node.statedir import IDENTITY_FILE, identity_key
    from locoswarm.node.invite import make_invite
    from locoswarm.node.spec import load_spec

    folder = str(state_dir) if state_dir is not None else default_state_dir()
    try:
        if valid_days < 0:
            raise ValueError(f"--valid-days must be >= 0, got {valid_days}")
        if path is not None and run is not None and path != run:
            raise ValueError(f"two run specs given, {path} and --run {run}: give one")
        chosen = path if path is not None else run
        spec = load_spec(None if chosen is None else str(chosen))
        if not os.path.exists(os.path.join(folder, IDENTITY_FILE)):
            raise ValueError(f"no identity in {folder}: an invite is signed by the organiser's node; start it once "
                             "(`locoswarm node join`) or pass its --state-dir")
        peers = list(peer or spec.initial_peers)
        if not peers:
            try:
                peers = running_node_addrs(read_status(folder))
            except RuntimeError as e:
                raise ValueError(f"no address to put in the invite: pass --peer, give the spec initial peers, or "
                                 f"run this beside the organiser's running node ({e})") from None
        token = make_invite(spec, peers, identity_key(folder), valid_s=valid_days * 86400)
    except (ValueError, OSError, NodeError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"locoswarm node join --invite {token}")


def running_node_addrs(status: dict) -> list[str]:
    """The addresses a running node's status gives, each with its /p2p/<id>; loopback ones
    left out where others exist (they would send a volunteer to their own machine)."""
    peer_id = status.get("peer_id") or ""
    addrs = [a if "/p2p/" in a else f"{a}/p2p/{peer_id}" for a in status.get("addrs") or [] if isinstance(a, str)]
    remote = [a for a in addrs if not a.startswith(("/ip4/127.", "/ip6/::1/"))]
    return remote or addrs
