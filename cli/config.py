"""`locoswarm config show`: the daemon's effective settings and where each came from;
`locoswarm config check`: whether `node join` would start with them (a service runs it first)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="The daemon's settings: defaults < config file < LOCOSWARM_* < flags.", no_args_is_help=True)


@app.command()
def show(
    config: Optional[Path] = typer.Option(None, "--config", help="Config file; default: the platform's config dir, "
                                          "or $LOCOSWARM_CONFIG."),
    as_json: bool = typer.Option(False, "--json", help="Print {name: {value, source, env, flag}} as JSON."),
) -> None:
    """Print every setting's effective value, its source (default, file or env) and how to set it."""
    from locoswarm.node.userconfig import SETTINGS, config_file, resolve

    config_path = None if config is None else str(config)
    try:
        values, sources = resolve({}, config_path=config_path)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps({s.name: {"value": values[s.name], "source": sources[s.name], "env": s.env,
                                        "flag": f"--{s.flag}"} for s in SETTINGS}, indent=2))
        return
    path, _ = config_file(config_path)
    typer.echo(f"# config file: {path}{'' if os.path.exists(path) else ' (none there)'}")
    width = max(len(s.name) for s in SETTINGS)
    for s in SETTINGS:
        value = "(unset)" if values[s.name] is None else json.dumps(values[s.name])  # TOML's syntax for these
        typer.echo(f"{s.name:<{width}} = {value:<34} # {sources[s.name]} "
                   f"(set by {s.env} or --{s.flag})")


NO_PEERS = ("no peer to join: set `invite` or `peers` in {path} (a list of multiaddrs), or LOCOSWARM_INVITE or "
            "LOCOSWARM_PEERS (comma-separated), or run without --require-peers to start a new swarm")


@app.command()
def check(
    config: Optional[Path] = typer.Option(None, "--config", help="Config file; default: the platform's config dir, "
                                          "or $LOCOSWARM_CONFIG."),
    require_peers: bool = typer.Option(False, "--require-peers", help="Fail when there is no peer to join (neither "
                                       "the peers setting nor the run spec's initial peers): a service should not "
                                       "start a swarm of its own by mistake."),
) -> None:
    """Check the settings and the run spec as `node join` reads them, starting nothing: exit 0
    when it would start, 2 with the error when not."""
    from locoswarm.cli.node import prepare_join
    from locoswarm.node.userconfig import config_file

    config_path = None if config is None else str(config)
    try:
        _, _, _, cfg = prepare_join({}, config)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if require_peers and not cfg.net.peers:
        typer.echo(f"error: {NO_PEERS.format(path=config_file(config_path)[0])}", err=True)
        raise typer.Exit(2)
    peers = cfg.net.peers
    typer.echo(f"ok: joins through {len(peers)} peer{'s' * (len(peers) != 1)}" if peers else
               "ok: no peer given, starts a new swarm")
