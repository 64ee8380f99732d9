"""How a daemon's stop is bounded (docs/status.md, "every stop path"): a step of the start
gives way to a stop (`unless_stopped`), each network step of the stop has its bound, and
StopWatch forces a stop that overruns its grace, after uvicorn's force_exit: the first
signal asks for a graceful stop, a deadline, not the volunteer, ends one that hangs.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import threading
import time
from typing import Any

log = logging.getLogger(__name__)
STOP_GRACE_S = 8.0
"""The longest a stop asked by a signal may take, from the signal to the process's end,
before StopWatch forces it: Docker and Kubernetes kill a container 10 s after their SIGTERM,
and a volunteer's Ctrl-C must not hang. A stop takes 1-3 s; the leave checkpoint of a model
too big to write in the time is cut (the periodic checkpoint before it stays)."""
OWN_STOP_GRACE_S = 30.0
"""The same for a stop of the daemon's own (--max-rounds, an error), which nobody waits on
with a SIGKILL: on a loaded machine its bounded steps may add up past STOP_GRACE_S."""
STOP_STEP_S = 2.0
"""The longest one network step of the stop (withdrawing our record, the DHT's stop) may take."""


class StopWatch:
    """Ends the process should a stop overrun its grace (something in a thread, a pool's
    work or hivemind's shutdown that hangs): every thread's stack to stderr, so the hang can
    be found, p2pd killed, and the exit code the stop would have given (0 after a signal:
    the volunteer asked to leave, and checkpoints are written atomically, so nothing on disk
    is half done). A daemon thread, so it never holds the exit up itself."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._deadline: float | None = None
        self.code = 0

    def start(self, grace_s: float, code: int) -> None:
        """The stop began, or was asked again: force it `grace_s` from now, exiting with
        `code`, unless an earlier start set a sooner deadline (a signal during a stop of the
        daemon's own shortens it)."""
        with self._changed:
            deadline = time.monotonic() + grace_s
            first = self._deadline is None
            if first or deadline < self._deadline:
                self._deadline, self.code = deadline, code
                self._changed.notify()
        if first:
            threading.Thread(target=self._watch, name="locoswarm-stop-watch", daemon=True).start()

    def _watch(self) -> None:
        with self._changed:
            while (left := self._deadline - time.monotonic()) > 0:
                self._changed.wait(left)
        log.error("the stop overran its grace: forcing the exit (the threads' stacks follow)")
        faulthandler.dump_traceback(all_threads=True)
        kill_children()
        os._exit(self.code)


def kill_children() -> None:
    """SIGKILL this process's children (p2pd, and a second p2pd checking our identity):
    a forced exit must not leave them running."""
    import psutil

    for child in psutil.Process().children():
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


async def unless_stopped(aw, should_stop: asyncio.Event) -> tuple[bool, Any]:
    """(True, `aw`'s result), or (False, its result or None) when `should_stop` was set
    first: `aw` is then cancelled and awaited, so that a stop never waits out a step (a dial,
    the state download, a round's delta pull) and no task is left behind."""
    task = asyncio.ensure_future(aw)
    stop = asyncio.ensure_future(should_stop.wait())
    try:
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
    if task.done() and not should_stop.is_set():
        return True, task.result()
    task.cancel()
    result = (await asyncio.gather(task, return_exceptions=True))[0]
    return False, None if isinstance(result, BaseException) else result


_ABANDONED = (
    (asyncio.InvalidStateError, "ControlClient._read_from_persistent_conn",
     lambda e: "p2pd answered a call given up (hivemind's client cannot take the answer): ignored"),
    (asyncio.IncompleteReadError, "ControlClient._handler",
     lambda e: f"a peer closed a stream before its header came ({len(e.partial)} of {e.expected} bytes read): ignored"),
)
"""(exception, the hivemind function it comes out of, the line logged) for each case
`quiet_abandoned_calls` quiets."""


def quiet_abandoned_calls(loop: asyncio.AbstractEventLoop) -> None:
    """Make `loop` log at INFO, not as an error with a traceback, the two exceptions hivemind's
    p2pd client raises in its own tasks when peers or our stop leave a conversation half done
    (`_ABANDONED`), each known by its type and the function its traceback passed through:
    - its reader task sets the result of a future our stop (or a timeout) cancelled when p2pd
      answers a call we had given up (InvalidStateError in ControlClient._read_from_persistent_conn;
      once in twenty SIGINTs while p2pd started, clean-clone CI, 2026-12-06);
    - its stream handler reads the header of a stream p2pd opened for a peer that closed it before
      sending one (IncompleteReadError in ControlClient._handler, which asyncio reports as an
      "Unhandled exception in client_connected_cb"; seen as peers left at a fault case's end,
      clean-clone CI, 2026-12-06). The stream is gone; nothing was lost.
    Any other unhandled exception goes to the handler that was there before."""
    previous = loop.get_exception_handler()

    def handle(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exception = context.get("exception")
        for kind, where, line in _ABANDONED:
            if isinstance(exception, kind) and _raised_in(exception, where):
                log.info(line(exception))
                return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handle)


def _raised_in(exception: BaseException, qualname: str) -> bool:
    """Whether `exception` passed through a function of this qualified name on its way up."""
    tb = exception.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_qualname == qualname:
            return True
        tb = tb.tb_next
    return False
