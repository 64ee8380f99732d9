"""What a volunteer watching the terminal sees of the rounds: a rich progress bar of the
swarm's tokens in the current round. Only on a terminal: a service's journal or a pipe gets
the plain round lines alone (the daemon prints one per round either way)."""

from __future__ import annotations

import sys


class RoundBar:
    def __init__(self, console=None) -> None:
        """`console`: a rich Console to draw on; default: stderr when stdout and stderr are
        both a terminal (the round lines go above the bar then), else no bar at all."""
        self._console = console
        self.enabled = console is not None or (sys.stdout.isatty() and sys.stderr.isatty())
        self._bar = None
        self._task = None

    def start(self) -> None:
        if not self.enabled or self._bar is not None:
            return
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(
            TextColumn("{task.description}"), BarColumn(),
            TextColumn("{task.completed:>9,.0f}/{task.total:,.0f} tokens"), TimeElapsedColumn(),
            console=self._console or Console(stderr=True), transient=True)
        self._bar.start()
        self._task = self._bar.add_task("starting", total=1)

    def update(self, round_: int, done: float, target: int, peers: int, state: str) -> None:
        """The swarm's tokens `done` of `target` in round `round_`, with `peers` counted."""
        if self._bar is None:
            return
        self._bar.update(self._task, description=f"round {round_} · {peers} peer{'s' * (peers != 1)} · {state}",
                         completed=min(done, target), total=max(1, target))

    def print(self, line: str) -> bool:
        """Print `line` above the bar, as it is (no markup, no wrapping); False when no bar
        is drawn (the caller prints it)."""
        if self._bar is None:
            return False
        self._bar.console.print(line, markup=False, highlight=False, soft_wrap=True)
        return True

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
