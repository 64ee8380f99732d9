"""When the round loop evaluates its replica on the held-out split.

An evaluation runs on the training thread (it reads the replica's weights), so every second
it takes is a second not trained. Evaluating after every round, the daemon's default until
2026-12-07, took 27 % of a peer's time on the default spec (64 held-out sequences forward
take about half as long as a round's five steps): 3 peers on 2 cores trained 73 % of the
time, 94 % with this schedule (bench/results/eval-budget/). By default a peer now evaluates after
its first round and then as often as keeps evaluation under EVAL_SHARE of its time: the
next one waits until the last took that share of the time since. `--eval-every N` still
evaluates every N rounds, and 0 only at the end.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")

EVAL_SHARE = 0.05
"""Of a peer's time, the most its evaluations take by default."""


class EvalSchedule:
    """Whether a round's end evaluates: every `every` rounds (0: never), or with `every`
    None, within EVAL_SHARE of the time (`took` tells it what an evaluation cost)."""

    def __init__(self, every: int | None, *, share: float = EVAL_SHARE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if every is not None and every < 0 or not 0 < share < 1:
            raise ValueError(f"eval schedule: every must be None or >= 0 (got {every}), share in (0, 1) (got {share})")
        self.every = every
        self.share = share
        self.clock = clock
        self._next_at = float("-inf")
        """When the budget allows the next evaluation (-inf: at the first round)."""

    def due(self, rounds_completed: int) -> bool:
        """Whether to evaluate now that this peer has completed `rounds_completed` rounds."""
        if self.every is not None:
            return self.every > 0 and rounds_completed % self.every == 0
        return self.clock() >= self._next_at

    def took(self, seconds: float) -> None:
        """An evaluation that just ended took `seconds` of the training thread."""
        if self.every is None:
            self._next_at = self.clock() + seconds * (1 - self.share) / self.share


def timed(work: Callable[[], T]) -> tuple[T, float]:
    """`work()` and the seconds it took on the thread that ran it (not those it waited to start)."""
    t0 = time.perf_counter()
    return work(), time.perf_counter() - t0
