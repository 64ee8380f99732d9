"""The `locoswarm` command. Sub-apps live one per file and are mounted here; nothing at
import time pulls in torch, so `locoswarm --help` stays instant."""

from __future__ import annotations

import typer

from locoswarm import __version__
from locoswarm.cli import bench, config, demo, doctor, node, run

app = typer.Typer(
    name="locoswarm",
    help="Peer-to-peer volunteer training of open models (DiLoCo with compressed pseudo-gradients).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(bench.app, name="bench")
app.add_typer(run.app, name="run")
app.add_typer(node.app, name="node")
app.add_typer(config.app, name="config")
app.command(name="demo")(demo.demo)
app.command(name="doctor")(doctor.doctor)


@app.command()
def version() -> None:
    """Print the locoswarm version."""
    typer.echo(__version__)


def main() -> None:
    app()
