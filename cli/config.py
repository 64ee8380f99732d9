"""`locoswarm config show`: the daemon's effective settings and where each came from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="The daemon's settings: defaults < config file < LOCOSWARM_* < flags.", no_args_is_help=True)


@app.command()
def show(
    config: Optional[Path] = typer.Option(None, "--config", help="Config file; default: the platform's config dir, "
                                          "or $LOCOSWARM_CONFIG."),
    as_json: bool = typer.Option(False, "--json", help="Print {name: {value, source}} as JSON."),
) -> None:
    """Print every setting's effective value and its source (default, file, env or flag)."""
    from locoswarm.node.userconfig import SETTINGS, default_config_path, env_name, resolve

    try:
        values, sources = resolve({}, config_path=None if config is None else str(config))
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps({s.name: {"value": values[s.name], "source": sources[s.name]} for s in SETTINGS},
                              indent=2))
        return
    typer.echo(f"# config file: {config or default_config_path()}")
    for s in SETTINGS:
        source = sources[s.name]
        where = source if source.startswith("env ") else f"{source} (env {env_name(s.name)})"
        typer.echo(f"{s.name:<17} = {json.dumps(values[s.name]):<40} # {where}")
