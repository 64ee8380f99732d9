"""What a round tells about itself once its outer step is in (node/roundloop.py): its
timings (when it started, its boundary, its checks and its exchange's phases), the failed
checks as warnings, the dashboard's history and the `RoundEnded` event (node/events.py)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from locoswarm.node.events import RoundEnded
from locoswarm.optim.check import SCALE, failing

if TYPE_CHECKING:
    from locoswarm.node.roundcontext import RoundContext
    from locoswarm.node.trainer import RoundWork

log = logging.getLogger("locoswarm.node.roundloop")  # the round's lines, where operators look for them


@dataclass(frozen=True)
class ExchangePhases:
    """How long a round's exchange took (seconds; node/events.py RoundEnded says what each is)."""
    send_s: float = 0.0
    pull_s: float = 0.0
    step_s: float = 0.0
    sent_at: float = 0.0
    screen_s: float = 0.0
    rows_s: float = 0.0


class RoundReport:
    """The round loop's account of its rounds, round by round."""

    def __init__(self, ctx: RoundContext) -> None:
        self.ctx = ctx
        self._started: dict[int, float] = {}
        """round → when its training started (time.perf_counter)."""
        self._boundary: dict[int, tuple[float, float]] = {}
        """round → (waited for the previous exchange, the rest of its boundary), seconds."""
        self._check_s = 0.0
        """Seconds the last round's checks took (optim/check.py)."""

    def started(self, round_: int, t0: float) -> None:
        self._started[round_] = t0

    def boundary(self, round_: int, wait_s: float, rest_s: float) -> None:
        self._boundary[round_] = (wait_s, rest_s)

    def checked(self, round_: int, checks: list, seconds: float) -> None:
        """Failed checks as warnings (they go out with our next delta); the round's least
        agreement for status and the round event."""
        ctx, threshold = self.ctx, self.ctx.spec.diloco.robust.check_agreement
        self._check_s = seconds
        for c in failing(checks, threshold):
            ctx.stats.checks_failed += 1
            log.warning("round %d: delta of %s failed our check: it agrees with our own pseudo-gradient at %.2f "
                        "of our delta's agreement (below %.2f); told to the swarm with our next delta",
                        round_, c.sender, c.agreement / SCALE, threshold)
        ctx.stats.checks += len(checks)
        ctx.stats.least_agreement = min((c.agreement / SCALE for c in checks), default=None)

    def ended(self, work: RoundWork, deltas: int, participants: int, train_s: float, overlap: bool, *,
              rows: int = 1, phases: ExchangePhases | None = None) -> None:
        """Round `work.round` is in: the dashboard's history and the round event. `phases`:
        how long its exchange took, by phase."""
        phases = phases or ExchangePhases()
        ctx, r = self.ctx, work.round
        started = self._started.pop(r, None) or time.perf_counter()
        ended = self._started.get(r + 1) if overlap else None
        wait_s, boundary_s = self._boundary.pop(r, (0.0, 0.0))
        loss = None if math.isnan(work.loss) else work.loss
        round_s = (ended or time.perf_counter()) - started
        ctx.stats.tokens_trained += work.tokens
        ctx.stats.history.append({"round": r, "loss": loss, "eval_loss": ctx.stats.eval_loss, "deltas": deltas,
                                  "participants": participants, "tokens": work.tokens,
                                  "tokens_total": ctx.stats.tokens_trained, "time": time.time(), "train_s": train_s,
                                  "wait_s": wait_s, "boundary_s": boundary_s, "round_s": round_s})
        ctx.events(RoundEnded(round=r, deltas=deltas, participants=participants, tokens=work.tokens, loss=loss,
                              eval_loss=ctx.stats.eval_loss, train_s=train_s,
                              round_s=round_s, wait_s=wait_s,
                              boundary_s=boundary_s, sent=ctx.bytes_sent(), progress_sent=ctx.progress.bytes_sent,
                              progress_messages=ctx.progress.messages_sent,
                              progress_records=ctx.progress.records_sent,
                              progress_writes=ctx.progress.writes_sent, delta_requests=ctx.stats.delta_requests,
                              delta_streams=ctx.delta_streams.num_opened,
                              registry_sent=ctx.registry_sent(),
                              received=ctx.stats.bytes_received, least_agreement=ctx.stats.least_agreement,
                              check_s=self._check_s, rows=rows, send_s=phases.send_s, pull_s=phases.pull_s,
                              step_s=phases.step_s, screen_s=phases.screen_s, rows_s=phases.rows_s,
                              sent_at=phases.sent_at))
