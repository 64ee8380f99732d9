"""The DiLoCo outer optimizer: SGD (optionally Nesterov) on fp32 master parameters, with
the averaged pseudo-gradient as its gradient. Same update as
`torch.optim.SGD(lr, momentum, nesterov=…, dampening=0)`; kept here as plain tensor code so
that its state can live on the CPU while the model trains on the GPU."""

from __future__ import annotations

import torch
from torch import Tensor

from locoswarm.optim.config import OuterConfig


class OuterOptimizer:
    def __init__(self, params: list[Tensor], cfg: OuterConfig, device: torch.device | str | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        where = "cpu" if cfg.device == "cpu" else (device or params[0].device)
        self.params = [p.detach().to(where, dtype=torch.float32, copy=True) for p in params]
        """The outer (consensus) parameters θ, fp32."""
        self.momentum = [torch.zeros_like(p) for p in self.params] if cfg.momentum > 0 else []
        self.num_steps = 0

    @torch.no_grad()
    def step(self, grads: list[Tensor]) -> None:
        """θ ← θ − lr·u with u the (Nesterov) momentum update of the pseudo-gradient `grads`."""
        assert len(grads) == len(self.params), "one pseudo-gradient per parameter"
        mu, lr = self.cfg.momentum, self.cfg.lr
        for i, (p, g) in enumerate(zip(self.params, grads)):
            g = g.to(p.device, dtype=torch.float32)
            if mu > 0:
                buf = self.momentum[i]
                if self.num_steps == 0:
                    buf.copy_(g)  # torch's SGD starts the buffer at the first gradient
                else:
                    buf.mul_(mu).add_(g)
                g = g.add(buf, alpha=mu) if self.cfg.nesterov else buf
            p.add_(g, alpha=-lr)
        self.num_steps += 1

    def state_tensors(self) -> dict[str, Tensor]:
        out = {f"param.{i}": p for i, p in enumerate(self.params)}
        out.update({f"momentum.{i}": m for i, m in enumerate(self.momentum)})
        return out
