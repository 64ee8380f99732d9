"""`locoswarm run …`: write and inspect run specs. Thin: the logic is in locoswarm.node.spec."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="Run specs: what every peer of a training run agrees on.", no_args_is_help=True)


@app.command()
def init(
    path: Path = typer.Argument(Path("run.toml"), help="Where to write the spec."),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="Name of the run."),
    model: Optional[str] = typer.Option(None, help="tiny, small, base or hf:llama."),
    tokenizer: Optional[str] = typer.Option(None, help="gpt2 or byte."),
    data: Optional[str] = typer.Option(None, help="builtin:shakespeare, builtin:kjv, a folder, or several joined by '+'."),
    seed: Optional[int] = typer.Option(None, help="Genesis seed."),
    peer: Optional[list[str]] = typer.Option(None, help="Initial peer multiaddr (repeatable)."),
    force: bool = typer.Option(False, help="Overwrite an existing file."),
) -> None:
    """Write a run spec (the embedded default, with these changes) as TOML, atomically."""
    from dataclasses import replace

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
        write_spec(spec, str(path), force=force)
    except ValueError as e:
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
