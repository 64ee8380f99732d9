"""What a restart needs of a peer's replica, as tensors and metadata for node/checkpoint.py:
the outer state and its earned weight (the ledger), the replica (its unsent progress
included: it is sent with the next delta), the error-feedback residuals and sent masks,
AdamW's state and the data order.
Both functions run on the training thread at a round boundary (node/threads.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from locoswarm.protocol.state import check_ledger

if TYPE_CHECKING:
    from locoswarm.node.trainer import Trainer


@torch.no_grad()
def checkpoint_state(trainer: Trainer) -> tuple[dict[str, torch.Tensor], dict]:
    """Copies of everything a restart needs, taken at a round boundary on the training
    thread (nothing else is running): the outer state, the replica (its unsent progress
    included: it is sent with the next delta), the residuals, AdamW's state, and the
    data order. Returns (tensors, JSON-able metadata)."""
    trainer.take_shift()
    cpu = lambda t: t.detach().to("cpu", copy=True)  # noqa: E731
    tensors = {name: cpu(t).to(torch.uint8) if t.dtype == torch.bool else cpu(t)
               for name, t in _fixed_tensors(trainer).items()}
    params = [p for group in trainer.inner.param_groups for p in group["params"]]
    for i, p in enumerate(params):
        for key, value in trainer.inner.state.get(p, {}).items():
            tensors[f"adam.{i}.{key}"] = cpu(value).reshape(-1) if value.dim() == 0 else cpu(value)
    meta = {"round": trainer.round, "outer_steps": trainer.outer.num_steps,
            "sampler": trainer.sampler.rng.bit_generator.state, "ledger": [list(p) for p in trainer.ledger.pairs()]}
    return tensors, meta


def _fixed_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The checkpointed tensors whose names and shapes the spec fixes (AdamW's state
    appears only after the first step), as views of the live ones: no copies."""
    out = {f"outer.{n}": t for n, t in trainer.outer.state_tensors().items()}
    out.update({f"model.{n}": p.detach() for n, p in trainer.model.named_parameters()})
    for i, (err, mask) in enumerate(zip(trainer.compressor.errors, trainer.compressor.sent_masks)):
        out[f"residual.{i}"] = err
        out[f"sent.{i}"] = mask
    return out


@torch.no_grad()
def restore(trainer: Trainer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Take a checkpoint written by `checkpoint_state` for this spec; ValueError, with
    nothing changed, when its tensors do not fit this model."""
    need = _fixed_tensors(trainer)  # views: only names, shapes and dtypes are read
    stored = lambda t: torch.uint8 if t.dtype == torch.bool else t.dtype  # noqa: E731
    missing = [k for k in need if k not in tensors]
    wrong = [k for k in need if k in tensors and (tensors[k].shape != need[k].shape
                                                  or tensors[k].dtype != stored(need[k]))]
    if missing or wrong:
        raise ValueError(f"checkpoint does not fit this model: missing {missing[:3]}, wrong shape {wrong[:3]}")
    if not all(bool(torch.isfinite(tensors[k]).all()) for k in need if tensors[k].is_floating_point()):
        raise ValueError("checkpoint holds non-finite values")
    round_, outer_steps = meta.get("round"), meta.get("outer_steps")
    if type(round_) is not int or type(outer_steps) is not int or round_ < 0 or outer_steps < 0:
        raise ValueError(f"checkpoint metadata invalid: round {round_!r}, outer_steps {outer_steps!r}")
    # A checkpoint from before earned weight has none: the peer starts with an empty
    # ledger, as a run's first peers do, and learns the swarm's with its next state taken.
    ledger = check_ledger(meta.get("ledger", []), "checkpoint ledger")
    for name, live in need.items():
        live.copy_(tensors[name])  # a sent mask comes back from uint8 to bool by copy_
    params = [p for group in trainer.inner.param_groups for p in group["params"]]
    for i, p in enumerate(params):
        state = {key[len(f"adam.{i}."):]: value for key, value in tensors.items() if key.startswith(f"adam.{i}.")}
        if state:
            trainer.inner.state[p] = {k: (v.reshape(()) if k == "step" else v.to(p.device)) for k, v in state.items()}
    try:
        trainer.sampler.rng.bit_generator.state = meta["sampler"]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"checkpoint's data order unreadable: {e}") from None
    trainer.outer.num_steps = outer_steps
    trainer.ledger.load(ledger)
    trainer.handoff.publish_outer_steps(outer_steps)
    trainer.round = round_
    trainer.tokens = 0
    trainer.losses = []
    trainer.handoff.put_shift(None)
