"""Inner learning-rate schedule: linear warm-up then cosine decay, driven by the swarm's
global progress (global step = global tokens / tokens per step), never by a peer's local
step count, so a peer that joins late or runs slow gets the rate the swarm is at."""

from __future__ import annotations

import math

from locoswarm.optim.config import InnerConfig


def lr_at(global_step: float, total_steps: int, cfg: InnerConfig) -> float:
    """The inner learning rate at `global_step` of a run planned for `total_steps`."""
    if cfg.warmup_steps > 0 and global_step < cfg.warmup_steps:
        return cfg.lr * min(1.0, (global_step + 1) / cfg.warmup_steps)
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, max(0.0, (global_step - cfg.warmup_steps) / span))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)
