"""The daemon's own settings (not shared with the swarm: those are the run spec's)."""

from __future__ import annotations

from dataclasses import dataclass, field

from locoswarm.node.governor import IdlePolicy
from locoswarm.node.host import NetworkConfig


@dataclass(kw_only=True, slots=True)
class NodeConfig:
    state_dir: str
    """Identity, lock and control file live here."""
    net: NetworkConfig = field(default_factory=NetworkConfig)
    """Listen addresses, initial peers, relay."""
    idle: IdlePolicy = field(default_factory=IdlePolicy)
    """When to step aside for the machine's owner."""
    idle_check_s: float = 2.0
    """How often the machine is read for the idle policy."""
    device: str = "auto"
    """auto, cuda, mps or cpu."""
    max_rounds: int = 0
    """Stop after this many rounds (0: run until stopped)."""
    min_peers: int = 1
    """Wait until this many peers (this one included) are live before training."""
    shard: int | None = None
    """Data shard; None: derived from the peer id."""
    threads: int = 0
    """Torch CPU threads of the training thread (0: torch's default): the cap on CPU use."""
    precision: str = "auto"
    """auto, bf16, fp16 or fp32 (hardware.choose_precision)."""
    micro_batch: int = 0
    """Sequences per forward pass, a divisor of the spec's batch (0: fit to free memory)."""
    max_gpu_memory_percent: int = 0
    """Cap on this process's share of the GPU's memory, in % (0: no cap)."""
    activation_checkpointing: bool = False
    """Recompute activations in backward instead of keeping them (less memory, more compute)."""
    compile: bool = False
    """torch.compile the transformer blocks (CUDA)."""
    eval_every: int = 1
    """Evaluate on the held-out split every this many rounds (0: only at the end)."""
    eval_sequences: int = 64
    """Held-out sequences per evaluation."""
    checkpoint_every: int = 10
    """Write a checkpoint every this many rounds (0: never), and when leaving."""
    checkpoint_keep: int = 3
    """How many checkpoints to keep."""
    fanout: int = 16
    """F: at most this many peers' deltas pulled per round."""
    record_ttl_s: float = 10.0
    """Lifetime of this peer's DHT record; refreshed every third of it."""
    report_interval_s: float = 0.1
    """How often round progress is written to and read from the DHT."""

    def validate(self) -> None:
        if self.max_rounds < 0:
            raise ValueError(f"max_rounds must be >= 0, got {self.max_rounds}")
        if self.min_peers < 1:
            raise ValueError(f"min_peers must be >= 1, got {self.min_peers}")
        if self.checkpoint_every < 0 or self.checkpoint_keep < 1:
            raise ValueError("checkpoint_every must be >= 0 and checkpoint_keep >= 1")
        self.idle.validate()
        if not 0 <= self.max_gpu_memory_percent <= 100:
            raise ValueError(f"max_gpu_memory_percent must be in [0, 100], got {self.max_gpu_memory_percent}")
        if self.micro_batch < 0 or self.threads < 0:
            raise ValueError("micro_batch and threads must be >= 0")
        from locoswarm.node.hardware import PRECISIONS

        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.fanout < 1:
            raise ValueError(f"fanout must be >= 1, got {self.fanout}")
        if self.eval_every < 0 or self.eval_sequences < 1:
            raise ValueError("eval_every must be >= 0 and eval_sequences >= 1")
        if not self.record_ttl_s > 0 or not self.report_interval_s > 0:
            raise ValueError("record_ttl_s and report_interval_s must be > 0")
