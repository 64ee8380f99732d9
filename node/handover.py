"""A replica's state handed from one peer to another: what a donor serves of the round it
just stepped (its outer state and its own residual, node/statesync.py) and how a peer that
took them starts from them. The donor's side runs where the round's outer step ran (the
exchange thread, or the event loop at start); the taker's on the training thread
(node/threads.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from locoswarm.optim.inner import load_params
from locoswarm.protocol.state import Ledger

if TYPE_CHECKING:
    from locoswarm.node.trainer import Trainer


@dataclass(slots=True)
class StartFrom:
    """Where a replica that took a donor's state, or caught up to it, starts (`offer_residual`)."""

    outer_loss: float | None = None
    """Held-out loss where it would start without the donor's residual (at the outer state,
    or with its own residual: `own`); None when no residual came."""
    donor_loss: float | None = None
    """Held-out loss where the donor's residual puts the replica."""
    own: bool = False
    """The replica had a residual of its own (it caught up by the rounds' deltas)."""

    @property
    def donors(self) -> bool:
        """Whether the replica starts where the donor's did."""
        return self.donor_loss is not None and self.donor_loss < self.outer_loss

    def describe(self) -> str:
        where = "with its own residual" if self.own else "at the outer state"
        if self.outer_loss is None:
            return where if self.own else f"{where} (no donor served its residual)"
        verb = "from" if self.donors else f"{where}, refusing"
        return (f"{verb} the donor's residual (held-out loss {self.donor_loss:.4f} there, "
                f"{self.outer_loss:.4f} {where})")


def served(trainer: Trainer) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """What a donor serves of the round just stepped: the outer state
    (Trainer.state_snapshot) and `residual_snapshot`."""
    return trainer.state_snapshot(), residual_snapshot(trainer)


def residual_snapshot(trainer: Trainer) -> dict[str, torch.Tensor] | None:
    """A bfloat16 copy, on the CPU, of the residual the replica restarts from (half the
    parameters' size), served to joiners with the state; None without a residual_spec."""
    if trainer.residual_spec is None:
        return None
    return {name: e.detach().view(shape).to("cpu", torch.bfloat16, copy=True)
            for (name, shape), e in zip(trainer.residual_spec.tensors, trainer.compressor.errors)}


@torch.no_grad()
def take_state(trainer: Trainer, round_: int, state: dict[str, torch.Tensor], ledger: Ledger = (),
               residual: dict[str, torch.Tensor] | None = None) -> StartFrom:
    """`trainer` takes a donor's outer state: parameters, momentum, round and earned weight
    (validated by the manifest's decoder), and with it the donor's `residual` where it
    helps: the replica then restarts where the donor's did, ahead of the outer state by
    the donor's unsent progress, as every other replica restarts ahead by its own.
    Started at the outer state with an empty residual, a replica trained 0.8 nats
    behind the others in its first round (quick preset) and its deltas failed the
    swarm's checks (docs/trust.md). The residual is one donor's word, not the swarm's:
    it is kept only when its start scores a lower held-out loss than the outer state."""
    trainer.ledger.load(ledger)
    for name, tensor in state.items():
        trainer.outer.state_tensors()[name].copy_(tensor)
    trainer.outer.num_steps = round_  # > 0: the momentum buffer is live, not to be re-seeded
    trainer.handoff.publish_outer_steps(round_)
    for err, sent in zip(trainer.compressor.errors, trainer.compressor.sent_masks):
        err.zero_()
        sent.zero_()  # nothing sent yet
    trainer.round = round_
    trainer.holds = round_
    trainer.handoff.put_shift(None)
    start = offer_residual(trainer, residual)
    trainer.tokens = 0
    trainer.losses = []
    return start


@torch.no_grad()
def offer_residual(trainer: Trainer, residual: dict[str, torch.Tensor] | None, *, own: bool = False) -> StartFrom:
    """The replica restarts from the donor's `residual` where that scores a lower held-out
    loss than where it restarts now (its compressor's residual: empty after take_state, its
    own after a catch-up, `own`); else where it restarts now. Loads the replica either way."""
    load_params(trainer.model, trainer.step.restart(trainer.outer, trainer.compressor))
    start = StartFrom(own=own)
    if residual is None or trainer.residual_spec is None:
        return start
    current = [e.clone() for e in trainer.compressor.errors] if own else None
    start.outer_loss = trainer.evaluate()
    for err, (name, _) in zip(trainer.compressor.errors, trainer.residual_spec.tensors):
        err.copy_(residual[name].reshape(-1))
    load_params(trainer.model, trainer.step.restart(trainer.outer, trainer.compressor))
    start.donor_loss = trainer.evaluate()
    if not start.donors:
        for i, err in enumerate(trainer.compressor.errors):
            if current is None:
                err.zero_()
            else:
                err.copy_(current[i])
        load_params(trainer.model, trainer.step.restart(trainer.outer, trainer.compressor))
    return start
