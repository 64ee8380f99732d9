"""Which thread runs what in a daemon, and the one hand-off between them.

| thread | runs |
|---|---|
| event loop (the main thread) | all networking: p2pd, the DHT node, the delta and state servers, the peer record, round progress, the delta pull, the control API; the round loop's decisions |
| training (`locoswarm-train`) | every touch of the replica: building it, inner steps (`Trainer.train_until`), the round boundary (`end_round`), evaluation, checkpoints, loading a donor's state, the final model; and, when rounds do not overlap, the exchange's compute too |
| exchange (`locoswarm-exchange`) | when rounds overlap: round r's encode, decode, screening, outer step and state snapshot, while the training thread trains round r + 1 |

Each pool has one thread, so the work given to it runs in order. The loop runs no training
compute: it hands that work to a pool and awaits it (it only turns the bytes it receives,
deltas and a donor's state, into tensors). What one thread produces for another crosses
through a `Handoff`, under its lock, and through nothing else:

- the training progress (tokens this round, tokens per second), written by the training
  thread after each step and read by the loop for its progress reports;
- the restart of an overlapped round, put by the exchange thread after the outer step
  (or after a discarded round) and taken by the training thread before its next step: a
  shift to add to the replica, or, after a replica went non-finite, the point to reset it to;
- the outer steps taken, published by whichever thread changed the outer state, read by
  the loop for the peer record.

The round boundary's snapshot (`RoundWork`) is handed over as the result of the training
pool's future, which the loop awaits before it gives the exchange its work.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True, slots=True)
class Progress:
    tokens: int = 0
    """Tokens trained on in the current round."""
    tokens_per_s: float = 0.0
    """This round's training rate so far."""


class Handoff:
    """The state the daemon's threads share (module docstring), each item behind one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._progress = Progress()
        self._shift: list | None = None
        self._reset = False
        self._outer_steps = 0

    @property
    def progress(self) -> Progress:
        with self._lock:
            return self._progress

    def report(self, progress: Progress) -> None:
        with self._lock:
            self._progress = progress

    def put_shift(self, shift: list | None, *, reset: bool = False) -> None:
        """The restart of an overlapped round: a shift to add, or with `reset` the
        parameters to load (None clears a pending one)."""
        with self._lock:
            self._shift, self._reset = shift, reset

    @property
    def has_shift(self) -> bool:
        """Whether a restart shift waits for the training thread."""
        with self._lock:
            return self._shift is not None

    def take_shift(self) -> tuple[list | None, bool]:
        """(the pending restart or None, whether it is a reset), clearing it."""
        with self._lock:
            shift, reset = self._shift, self._reset
            self._shift, self._reset = None, False
            return shift, reset

    @property
    def outer_steps(self) -> int:
        with self._lock:
            return self._outer_steps

    def publish_outer_steps(self, steps: int) -> None:
        with self._lock:
            self._outer_steps = steps


def _thread_init(threads: int) -> None:
    import torch

    # Per thread on x86 (MXCSR): AdamW's denormal second moments slow CPU steps ~10×.
    torch.set_flush_denormal(True)
    if threads > 0:
        torch.set_num_threads(threads)


class Pools:
    """The training and exchange threads (module docstring), one thread each."""

    def __init__(self, threads: int) -> None:
        """`threads`: torch CPU threads of each (0: torch's default)."""
        self.training = concurrent.futures.ThreadPoolExecutor(1, "locoswarm-train", _thread_init, (threads,))
        self.exchange = concurrent.futures.ThreadPoolExecutor(1, "locoswarm-exchange", _thread_init, (threads,))

    def train(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Run `fn(*args)` on the training thread; await the result on the loop."""
        return asyncio.get_running_loop().run_in_executor(self.training, fn, *args)

    def exchange_compute(self, overlap: bool) -> Callable[..., asyncio.Future]:
        """Where a round's exchange compute runs: the exchange thread when rounds overlap
        (training goes on meanwhile), else the training thread."""
        pool = self.exchange if overlap else self.training
        return lambda fn, *args: asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def close_exchange(self) -> None:
        """Wait for the exchange's queued work and stop its thread: nothing may touch the
        outer state while the last checkpoint copies it."""
        await asyncio.to_thread(self.exchange.shutdown, True)

    def shutdown(self) -> None:
        """Drop the work not begun and return at once: a stop must not wait behind queued
        work, nor on the loop for a step in progress (the process waits for that at exit)."""
        self.training.shutdown(wait=False, cancel_futures=True)
        self.exchange.shutdown(wait=False, cancel_futures=True)
