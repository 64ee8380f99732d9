"""`locoswarm config show`: the daemon's effective settings and where each came from."""

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
