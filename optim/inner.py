"""The DiLoCo inner optimizer (AdamW, betas 0.9/0.95, weight decay on matrices) and the
pseudo-gradient Δ = θ_outer − θ_local taken after the inner phase. A replica keeps its
AdamW state across rounds, as in the paper."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from locoswarm.optim.config import InnerConfig


class InnerAdamW(torch.optim.AdamW):
    """torch's AdamW, without its CUDA-graph check where no parameter is on a GPU. Before
    each step torch asks whether a graph is being captured on the accelerator's current
    stream; on a CUDA build with a GPU present, asking for that stream initialises CUDA, so
    a CPU peer's first step created a CUDA context and held the volunteer's VRAM (seen in
    nvidia-smi). No graph is captured for tensors on the CPU, so there is nothing to check."""

    def _accelerator_graph_capture_health_check(self) -> None:
        if all(p.device.type == "cpu" for group in self.param_groups for p in group["params"]):
            return
        super()._accelerator_graph_capture_health_check()


def make_inner_optimizer(model: nn.Module, cfg: InnerConfig) -> torch.optim.AdamW:
    cfg.validate()
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    on_cuda = all(p.is_cuda for p in decay + no_decay)
    # CUDA: one fused kernel for the whole update (torch's fused AdamW); elsewhere foreach.
    return InnerAdamW(groups, lr=cfg.lr, betas=cfg.betas, **({"fused": True} if on_cuda else {"foreach": True}))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


@torch.no_grad()
def pseudo_gradients(outer_params: list[Tensor], model: nn.Module) -> list[Tensor]:
    """Δ = θ_outer − θ_local per parameter, fp32 on the outer parameters' device."""
    return [o - p.detach().to(o.device, dtype=torch.float32) for o, p in zip(outer_params, model.parameters())]


@torch.no_grad()
def load_params(model: nn.Module, params: list[Tensor], offsets: list[Tensor] | None = None) -> None:
    """Copy the outer parameters, minus `offsets` (flat, per parameter) when given, into
    the model: the start of the next inner phase."""
    for i, (p, src) in enumerate(zip(model.parameters(), params)):
        if offsets is None:
            p.copy_(src.to(p.device, dtype=p.dtype))
        else:
            p.copy_((src - offsets[i].view(src.shape).to(src.device)).to(p.device, dtype=p.dtype))
