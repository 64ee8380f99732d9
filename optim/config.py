"""Configuration of the DiLoCo algorithm (Douillard et al. 2023, arXiv:2311.08105) and of
the compressed exchange (top-k + quantization + error feedback, as in SparseLoCo and DeMo).

Defaults are the settings chosen by `locoswarm bench convergence --sweep` (docs/algorithm.md,
"Defaults, and how they were chosen"; the sweep's table is in docs/convergence.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from locoswarm.kernels.quant import SUPPORTED_BITS


@dataclass(kw_only=True, slots=True)
class InnerConfig:
    lr: float = 1e-3
    """Peak AdamW learning rate of the inner steps."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (DiLoCo's)."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (not norms)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this before each step; 0 disables."""
    warmup_steps: int = 50
    """Linear warm-up length, in global steps."""
    min_lr_ratio: float = 0.1
    """The cosine decays to this fraction of `lr` at the end of the run."""

    def validate(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"inner.lr must be > 0, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"inner.betas must lie in [0, 1), got {self.betas}")
        if self.weight_decay < 0:
            raise ValueError(f"inner.weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip < 0:
            raise ValueError(f"inner.grad_clip must be >= 0, got {self.grad_clip}")
        if self.warmup_steps < 0:
            raise ValueError(f"inner.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"inner.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")


@dataclass(kw_only=True, slots=True)
class OuterConfig:
    lr: float = 0.7
    """Outer SGD learning rate applied to the averaged pseudo-gradient (paper: 0.7)."""
    momentum: float = 0.5
    """Outer momentum (paper: 0.9, Nesterov). 0 with lr 1 is plain averaging."""
    nesterov: bool = True
    """Nesterov momentum when momentum > 0."""
    device: str = "cpu"
    """Where the fp32 outer parameters and momentum live: "cpu" or "model" (the model's device)."""

    def validate(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"outer.lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"outer.momentum must lie in [0, 1), got {self.momentum}")
        if self.device not in ("cpu", "model"):
            raise ValueError(f"outer.device must be 'cpu' or 'model', got {self.device!r}")


@dataclass(kw_only=True, slots=True)
class CompressionConfig:
    density: float = 0.00375
    """Fraction of each chunk's entries sent (top-k by magnitude)."""
    bits: int = 2
    """Bits per sent value: 2, 4 or 8."""
    chunk: int = 4096
    """Chunk size for top-k, a power of two; indices take log2(chunk) bits."""
    ef_decay: float = 1.0
    """Error-feedback decay β: e ← β·e + Δ before compressing (SparseLoCo). 1 keeps everything."""
    residual: str = "model"
    """Where the untransmitted residual e lives between rounds. "buffer": aside, and the
    replica restarts every round from the consensus parameters (SparseLoCo, DeMo).
    "model": applied in the replica's own parameters, which restart at θ_outer − β·e, so a
    peer never throws away its own unsent progress."""

    aggregation: str = "masked"
    """How received sparse deltas combine. "mean": DiLoCo's average, unsent entries count
    as 0. "masked": per coordinate, the average over the peers that sent it; with residual
    "model" a peer then drops its own unsent residual where the consensus moved."""

    def validate(self) -> None:
        if self.aggregation not in ("mean", "masked"):
            raise ValueError(f"compression.aggregation must be 'mean' or 'masked', got {self.aggregation!r}")
        if not 0 < self.density <= 1:
            raise ValueError(f"compression.density must lie in (0, 1], got {self.density}")
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"compression.bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.chunk < 2 or self.chunk & (self.chunk - 1) or self.chunk > 1 << 20:
            raise ValueError(f"compression.chunk must be a power of two in [2, 2^20], got {self.chunk}")
        if not 0 <= self.ef_decay <= 1:
            raise ValueError(f"compression.ef_decay must lie in [0, 1], got {self.ef_decay}")
        if self.residual not in ("buffer", "model"):
            raise ValueError(f"compression.residual must be 'buffer' or 'model', got {self.residual!r}")


@dataclass(kw_only=True, slots=True)
class RobustConfig:
    """How a round's deltas are screened before aggregation (optim/screen.py)."""

    norm_rule: str = "clip"
    """clip: a contribution whose norm exceeds norm_factor × the round's median is scaled
    down to it; reject: it is left out; none: no norm rule. Non-finite deltas are always
    refused."""
    norm_factor: float = 1.0
    """κ: how far above the round's median norm a contribution may go. 1 (Templar's rule,
    clip to the median): with κ = 4 and a token cap of 4×, two noise-sending peers among
    three honest ones lifted the honest loss 15 % above a clean run; with 1 and 2×, 6.6–7.3 %
    (tests/test_faults.py), and a clean run lost nothing measurable (3.67 vs 3.70–3.75)."""
    token_factor: float = 2.0
    """A claimed token count above token_factor × the round's median claim is cut to it."""
    trim: float = 0.0
    """β of a coordinate-wise trimmed mean (optim/trimmed.py): ⌊β·n⌋ of n values cut at each end; 0: off."""
    earn_rounds: int = 8
    """Rounds of a peer's full planned work after which it is established (optim/credit.py):
    only established peers set the clip reference and the token-claim median and count in
    decisions whose state to follow, and the round's newcomers share one peer's weight.
    0: off, every peer counts from its first delta (the rule before earned weight)."""
    check_agreement: float = 0.15
    """A received delta whose agreement with this peer's own pseudo-gradient (optim/check.py)
    is below this fails its check; a peer that established peers holding a majority of the
    earned weight find failing is excluded. Honest deltas measured 0.30 and up, noise below
    0.10. 0: no checks (the rule before checked contributions)."""

    def validate(self) -> None:
        if not 0 <= self.trim < 0.5:
            raise ValueError(f"diloco.robust.trim must lie in [0, 0.5), got {self.trim}")
        if self.norm_rule not in ("clip", "reject", "none"):
            raise ValueError(f"diloco.robust.norm_rule must be clip, reject or none, got {self.norm_rule!r}")
        if type(self.earn_rounds) is not int or not 0 <= self.earn_rounds <= 10_000:
            raise ValueError(f"diloco.robust.earn_rounds must be an integer in [0, 10000], got {self.earn_rounds!r}")
        if not 0.0 <= self.check_agreement < 1.0:
            raise ValueError(f"diloco.robust.check_agreement must lie in [0, 1), got {self.check_agreement}")
        if not self.norm_factor >= 1.0 or not self.token_factor >= 1.0:
            raise ValueError("diloco.robust.norm_factor and token_factor must be >= 1")


@dataclass(kw_only=True, slots=True)
class DiLoCoConfig:
    inner_steps: int = 5
    """H: inner steps between two outer steps."""
    inner: InnerConfig = field(default_factory=InnerConfig)
    """The inner optimizer."""
    outer: OuterConfig = field(default_factory=OuterConfig)
    """The outer optimizer."""
    compression: CompressionConfig | None = field(default_factory=CompressionConfig)
    """How pseudo-gradients are compressed; None sends them in full fp32."""
    robust: RobustConfig = field(default_factory=RobustConfig)
    """Screening of received deltas: norm rule and token-claim cap."""

    def validate(self) -> None:
        if self.inner_steps < 1:
            raise ValueError(f"inner_steps must be >= 1, got {self.inner_steps}")
        self.robust.validate()
        self.inner.validate()
        self.outer.validate()
        if self.compression is not None:
            self.compression.validate()
