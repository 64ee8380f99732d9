"""One DiLoCo round's algorithm, in one place (Douillard et al. 2023, with the compressed
exchange of SparseLoCo and DeMo): what a replica sends, how the received deltas are
screened and combined, the outer step, where the replica restarts and how the swarm's token
overshoot carries into the next round.

The daemon (node/trainer.py, one replica per process) and the convergence simulation
(bench/convergence.py, N replicas in one process sharing one outer optimizer) both run
these steps, so the simulation computes what the peers compute:

1. `encode`: Δ = θ_outer − θ_replica, compressed with error feedback (the residual is
   committed against the decode every receiver runs) and framed as a delta message.
2. `screen`: the peers' defence against bad deltas (optim/screen.py), weighing senders by
   the work the outer state's ledger credits them with (optim/credit.py) and excluding
   those whose deltas the established peers' checks failed; `check`: this replica's checks
   of the round's deltas against its own pseudo-gradient (optim/check.py), told with its
   next delta. The simulation's
   replicas are honest and skip it, as its published figures always did (clipping to the
   median norm also moves a clean run a little).
3. `apply`: the token-weighted aggregate (rule "mean" or "masked", optionally a trimmed
   mean), the outer step, and after a "masked" round each replica forgets the residual
   the consensus now holds.
4. `restart`: the next inner phase starts at θ_outer, or at θ_outer − β·e when the
   residual lives in the model (residual "model").
5. `carry`: the token overshoot taken off the next round's target.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from locoswarm.optim.aggregate import aggregate, coverage
from locoswarm.optim.check import Check, check_round
from locoswarm.optim.compress import ErrorFeedbackCompressor, delta_spec
from locoswarm.optim.config import DiLoCoConfig
from locoswarm.optim.credit import Ledger
from locoswarm.optim.outer import OuterOptimizer
from locoswarm.optim.screen import Screened, apply_screen, screen
from locoswarm.protocol import DecodedDelta, DeltaMessage, DeltaSpec, decode_delta, encode_delta


class RoundStep:
    """The compressed DiLoCo round for every replica of one run: stateless itself, it acts
    on the outer optimizer and the replicas' error-feedback compressors handed to it."""

    def __init__(self, cfg: DiLoCoConfig, named_shapes: list[tuple[str, tuple[int, ...]]], *, run_id: str,
                 spec_hash: bytes, max_tokens: int) -> None:
        if cfg.compression is None:
            raise ValueError("the round step exchanges compressed deltas: diloco.compression must be set")
        cfg.validate()
        self.cfg = cfg
        self.compression = cfg.compression
        self.spec: DeltaSpec = delta_spec(named_shapes, cfg.compression, run_id=run_id, spec_hash=spec_hash,
                                          max_tokens=max_tokens)
        """The wire layout of this run's deltas (every peer derives the same)."""

    def compressor(self, device: torch.device | str) -> ErrorFeedbackCompressor:
        """A replica's error-feedback state, empty: one per replica, kept across rounds."""
        return ErrorFeedbackCompressor(self.spec.tensors, self.compression, device)

    @torch.no_grad()
    def encode(self, compressor: ErrorFeedbackCompressor, outer_params: list[Tensor], replica: list[Tensor], *,
               round_: int, sender: str, tokens: int, base: str = "",
               checks: tuple[tuple[str, int], ...] = ()) -> bytes:
        """The round's pseudo-gradient θ_outer − θ_replica, compressed (committing the
        residual) and encoded. `replica`: the replica's parameters at the round boundary.
        ValueError, with nothing committed, when the pseudo-gradient is not finite or
        exceeds the scales' range: such a delta must not be sent. `base`: the round chain of
        `outer_params` ("" unknown); `checks`: the sender's failed checks of the round before
        (optim/check.py), carried with the delta."""
        deltas = [o - p.detach().to(o.device, torch.float32) for o, p in zip(outer_params, replica)]
        packed, _ = compressor.compress(deltas)
        msg = DeltaMessage(run_id=self.spec.run_id, spec_hash=self.spec.spec_hash, round=round_, sender=sender,
                           num_tokens=tokens, tensors=tuple(packed), base=base, checks=checks)
        return encode_delta(msg)

    @torch.no_grad()
    def encode_aggregate(self, deltas: list[DecodedDelta], *, round_: int, base: str = "") -> bytes:
        """A tree round's row aggregate (node/tree.py): the screened `deltas` aggregated by
        the run's rule (as `apply` aggregates them) and compressed again at the deltas'
        layout by a compressor that lives for this message alone (its error dropped), framed
        as a delta message whose sender is the first sender and whose tokens are theirs
        summed. Computed on the CPU whatever the peer trains on, so that every member of a
        row holding the same deltas encodes the same bytes. ValueError when the aggregate is
        not finite."""
        mean, _ = self._aggregate(deltas, "cpu")
        compressor = ErrorFeedbackCompressor(self.spec.tensors, replace(self.compression, residual="buffer"), "cpu")
        packed, _ = compressor.compress(mean, dense=False)
        first = min(d.sender for d in deltas)
        msg = DeltaMessage(run_id=self.spec.run_id, spec_hash=self.spec.spec_hash, round=round_, sender=first,
                           num_tokens=sum(d.num_tokens for d in deltas), tensors=tuple(packed), base=base)
        return encode_delta(msg)

    def decode(self, blob: bytes) -> DecodedDelta:
        """A delta off the wire, validated against this run's layout (ProtocolError if bad)."""
        return decode_delta(blob, self.spec)

    def screen(self, deltas: list[DecodedDelta], ledger: Ledger | None = None, base: str = "") -> Screened:
        """The round's deltas screened (optim/screen.py) against the earned weight of
        `ledger`, refusing deltas taken from another outer state than round chain `base`;
        `kept` of the result is what `apply` takes. The own delta must be among
        them, decoded like everyone's: all peers holding the same deltas then screen and
        aggregate the same values."""
        return screen(deltas, self.cfg.robust, ledger, base)

    def check(self, outer_params: list[Tensor], replica: list[Tensor], own: DecodedDelta,
              deltas: list[DecodedDelta], per_peer_tokens: int, established: frozenset[str] = frozenset()
              ) -> list[Check]:
        """This replica's checks (optim/check.py) of a round's other `deltas`, before the
        round's outer step: `replica` its parameters at the round boundary, `own` its delta
        as decoded, `established` the ledger's established peers (a newcomer's delta must add
        to theirs). Empty while checks are off (diloco.robust.check_agreement 0)."""
        if not self.cfg.robust.check_agreement:
            return []
        return check_round(outer_params, replica, own, deltas, plan_tokens=per_peer_tokens, established=established)

    def ledger(self, per_peer_tokens: int, anchors: list[str] | tuple[str, ...] = ()) -> Ledger:
        """An outer state's earned weight at genesis: one per outer state, credited by `apply`;
        empty, or holding the run's trust `anchors` as established (Ledger.founded)."""
        return Ledger.founded(anchors, earn_rounds=self.cfg.robust.earn_rounds, per_peer_tokens=per_peer_tokens)

    @staticmethod
    def kept(screened: Screened) -> list[DecodedDelta]:
        """The deltas a screening kept, with its clips and token caps applied."""
        return apply_screen(screened)

    @torch.no_grad()
    def apply(self, outer: OuterOptimizer, deltas: list[DecodedDelta],
              compressors: list[ErrorFeedbackCompressor], ledger: Ledger | None = None,
              earned: dict[str, int] | None = None, banned: tuple[str, ...] = ()) -> None:
        """Aggregate `deltas` into one outer step of `outer`; after a "masked" round each of
        `compressors` (the replicas that share this outer state) drops its residual where the
        consensus moved on a coordinate it did not send; `ledger` (the outer state's earned
        weight) is credited with the screening's `earned` and excludes its `banned` (both
        Screened's). ValueError when nothing can be
        aggregated: the outer state and the ledger are then untouched."""
        mean, shares = self._aggregate(deltas, outer.params[0].device)
        outer.step(mean)
        if ledger is not None:
            ledger.credit(earned or {}, banned, outer.num_steps - 1)
        if shares is not None:
            moved = [share > 0 for share in shares]
            for compressor in compressors:
                compressor.forget(moved)

    def _aggregate(self, deltas: list[DecodedDelta], device: torch.device | str) -> tuple[list[Tensor],
                                                                                          list[Tensor] | None]:
        """The token-weighted aggregate of `deltas` by the run's rule, one dense tensor per
        parameter on `device`, and under "masked" the coverage it was taken with (else None)."""
        shares = coverage(deltas, device) if self.compression.aggregation == "masked" else None
        return aggregate(deltas, [ts.shape for ts in self.spec.tensors], device, rule=self.compression.aggregation,
                         shares=shares, trim=self.cfg.robust.trim), shares

    @torch.no_grad()
    def restart(self, outer: OuterOptimizer, compressor: ErrorFeedbackCompressor) -> list[Tensor]:
        """Where a replica's next inner phase starts: θ_outer, or θ_outer − β·e with the
        residual in the model (a peer never throws its own unsent progress away)."""
        if self.compression.residual != "model":
            return outer.params
        return [o - off.view(o.shape) for o, off in zip(outer.params, compressor.model_offsets())]

    @staticmethod
    def carry(carry: int, deltas: list[DecodedDelta], per_peer_tokens: int, shares: int | None = None) -> int:
        """The swarm's accumulated token overshoot (negative: shortfall) after a round whose
        aggregated `deltas` planned `per_peer_tokens` each, or `shares` peers' worth in all
        (Screened.shares: the round's newcomers plan one share together). Integral control:
        the sum, so a steady bias is cancelled rather than halved; bounded by half a round's
        plan so one odd round cannot swing the next far."""
        planned = per_peer_tokens * (len(deltas) if shares is None else shares)
        return max(-planned // 2, min(planned // 2, carry + sum(d.num_tokens for d in deltas) - planned))
