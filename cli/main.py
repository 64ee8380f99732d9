"""The `locoswarm` command. Sub-apps live one per file and are mounted here; nothing at
import time pulls in torch, so `locoswarm --help` stays instant."""

from __future__ import annotations

import signal
import sys

import typer

from locoswarm import __version__
from locoswarm.cli import bench, config, demo, doctor, node, run
from locoswarm.node.portable import stop_signals

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


DAEMON = ["node", "join"]


def main() -> None:
    if sys.argv[1:3] == DAEMON:
        # The daemon's contract: SIGINT or SIGTERM at any moment is a stop with exit 0. Its
        # event loop takes the signals over once it runs; until then (typer alone imports
        # pydantic for 0.3 s before the command runs, then torch and hivemind load for
        # seconds) a signal is recorded, and the start ends where it looks (node.join, the
        # daemon's serve). Not raised where it lands: an exception thrown into a module's
        # import mid-way ended in a RecursionError once.
        for sig in stop_signals():
            signal.signal(sig, lambda signum, frame: node.STOPPED_EARLY.set())
    app()
