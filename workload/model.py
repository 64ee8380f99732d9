"""The model peers train: a Llama-style decoder (RMSNorm, rotary position embeddings,
SwiGLU MLP, causal SDPA attention, tied input/output embeddings), in named sizes, or a
Hugging Face `transformers` model built from a config (the `hf` extra).

The loss goes through `linear_cross_entropy`: full-vocabulary logits exist one slice at a
time and are never kept for backward (GPT-2's 50k vocabulary makes them the largest
tensor of a step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    vocab_size: int
    """Token ids are in [0, vocab_size)."""
    dim: int
    """Model width."""
    num_layers: int
    """Transformer blocks."""
    num_heads: int
    """Attention heads; dim must divide by it."""
    ffn_dim: int
    """Hidden width of the SwiGLU MLP."""
    max_seq_len: int = 1024
    """Longest sequence the rotary table covers."""
    rope_theta: float = 10000.0
    """Rotary base."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""

    def validate(self) -> None:
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"model.dim {self.dim} must split into {self.num_heads} heads of even width")


# Named sizes. Parameter counts with GPT-2's 50257 vocabulary (tiny: with the 257-entry
# byte vocabulary it trains on CPU): tiny ≈1.2M (byte), small ≈30M, base ≈124M, 1b, 2b.
SIZES: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=257, dim=128, num_layers=6, num_heads=4, ffn_dim=352),
    "small": ModelConfig(vocab_size=50257, dim=384, num_layers=6, num_heads=6, ffn_dim=1024),
    "base": ModelConfig(vocab_size=50257, dim=768, num_layers=12, num_heads=12, ffn_dim=2048),
    "1b": ModelConfig(vocab_size=50257, dim=2048, num_layers=18, num_heads=16, ffn_dim=5632),  # ≈1.03B
    "2b": ModelConfig(vocab_size=50257, dim=2560, num_layers=24, num_heads=20, ffn_dim=6912),  # ≈2.03B
}


PAD_VOCAB_FROM = 4096
"""Vocabularies this large get their embedding rows padded to a multiple of 64."""


def padded_vocab(vocab_size: int) -> int:
    """Rows of the (tied) embedding: the vocabulary, padded to a multiple of 64 when it is
    large. GPT-2's 50257 is odd, and a bf16 matrix product whose leading dimension is not a
    multiple of 8 cannot use Hopper's matmul kernels: on an H100 the output layer's three
    products ran on sm_75 kernels and took 29 % of a 1B model's step (profiled). The padded
    rows start at zero, are never a token, and their logits are masked out of the loss, so
    they stay zero and change nothing."""
    if vocab_size < PAD_VOCAB_FROM:
        return vocab_size
    return -(-vocab_size // 64) * 64


def check_model_name(name: str) -> None:
    """ValueError naming the field unless `name` is a known size or 'hf:llama'."""
    if name not in SIZES and name != "hf:llama":
        raise ValueError(f"model: unknown size {name!r}; known: {', '.join(sorted(SIZES))}, hf:llama")


def model_config(size: str, vocab_size: int, max_seq_len: int) -> ModelConfig:
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; known: {sorted(SIZES)} (or 'hf:llama')")
    return replace(SIZES[size], vocab_size=vocab_size, max_seq_len=max_seq_len)


def _rope_table(head_dim: int, seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv)  # (T, hd/2)
    return freqs.cos(), freqs.sin()


def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: (B, H, T, hd); rotate pairs (x1, x2) of the two halves
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.mlp_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.gate_up = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=False)
        self.down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, self.num_heads, d // self.num_heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, H, T, hd)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(padded_vocab(cfg.vocab_size), cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        cos, sin = _rope_table(cfg.dim // cfg.num_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.checkpoint_activations = False
        """Keep only each block's input for backward and recompute the rest (≈1/3 more
        compute for a fraction of the activation memory)."""
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = 0.02
        residual_std = std / math.sqrt(2 * self.cfg.num_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.ones_(p)
            elif name == "embed.weight":
                nn.init.normal_(p[: self.cfg.vocab_size], std=std)  # the same draws as an unpadded table
                nn.init.zeros_(p[self.cfg.vocab_size:])
            elif name.endswith(("proj.weight", "down.weight")):
                nn.init.normal_(p, std=residual_std)
            else:
                nn.init.normal_(p, std=std)

    def hidden(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds model.max_seq_len {self.cfg.max_seq_len}")
        x = self.embed(tokens)
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        for block in self.blocks:
            if self.checkpoint_activations and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        return self.norm(x)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits (B, T, vocab). For training use `loss`, which never holds them all."""
        return F.linear(self.hidden(tokens), self.embed.weight[: self.cfg.vocab_size])

    def loss(self, tokens: Tensor, targets: Tensor, slice_tokens: int = 0) -> Tensor:
        """Mean next-token cross-entropy through the tied output layer
        (`linear_cross_entropy`): full-vocabulary logits exist one slice at a time, in the
        forward pass and never again."""
        h = self.hidden(tokens).reshape(-1, self.cfg.dim)
        return linear_cross_entropy(h, self.embed.weight, targets.reshape(-1), slice_tokens,
                                    num_classes=self.cfg.vocab_size)


LOGITS_PER_SLICE = {"cuda": 1 << 27, "other": 1 << 25}
"""Default slice: about this many logits at a time (512 MB in fp32 on a GPU, where bigger
slices keep the matrix units busy; 128 MB elsewhere)."""


class _LinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(h_i · Wᵀ, y_i) whose backward needs no logits: each slice's logits are
    made, turned into the loss and into their gradient (softmax − one-hot) and multiplied
    out into the gradients of h and W during the forward pass, then dropped. What is saved
    for backward is dL/dh (N × D) and dL/dW (V × D, fp32): no N × V tensor outlives its
    slice. (The approach of Liger Kernel's fused linear cross-entropy and of Apple's Cut
    Cross-Entropy, here in plain torch.) Under autocast the two matrix products per slice
    run in the autocast dtype; the softmax, the loss and dL/dW's accumulation in fp32."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, slice_tokens: int, num_classes: int) -> Tensor:
        n = h.shape[0]
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, n, slice_tokens):
            hs, ys = h[start:start + slice_tokens], targets[start:start + slice_tokens]
            logits = F.linear(hs, weight).float()  # (n_s, V)
            if num_classes < logits.shape[1]:
                logits[:, num_classes:] = -torch.inf  # padding rows: probability 0, gradient 0
            lse = torch.logsumexp(logits, dim=-1)
            rows = torch.arange(hs.shape[0], device=h.device)
            total += (lse - logits[rows, ys]).sum()
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            probs[rows, ys] -= 1.0  # d(sum of CE)/d(logits)
            g = probs.to(torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type)
                         else h.dtype)
            grad_h[start:start + slice_tokens] = (g @ weight.to(g.dtype)).to(h.dtype)
            grad_w += (g.t() @ hs.to(g.dtype)).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.n = n
        ctx.weight_dtype = weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_out / ctx.n
        return grad_h * scale.to(grad_h.dtype), (grad_w * scale).to(ctx.weight_dtype), None, None, None


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, slice_tokens: int = 0,
                         num_classes: int | None = None) -> Tensor:
    """Mean cross-entropy of the logits h · Wᵀ (h: N × D, W: V × D) against `targets` (N,),
    never holding more than one slice of `slice_tokens` rows of logits (default: about
    LOGITS_PER_SLICE's logits). Only the first `num_classes` rows of W are classes (default:
    all); the rest are padding. Targets must be in [0, num_classes)."""
    num_classes = weight.shape[0] if num_classes is None else num_classes
    if slice_tokens <= 0:
        per_slice = LOGITS_PER_SLICE["cuda" if h.is_cuda else "other"]
        slice_tokens = max(1, per_slice // weight.shape[0])
    if not (h.requires_grad or weight.requires_grad) or not torch.is_grad_enabled():
        total = h.new_zeros((), dtype=torch.float32)
        for start in range(0, h.shape[0], slice_tokens):
            logits = F.linear(h[start:start + slice_tokens], weight[:num_classes]).float()
            total = total + F.cross_entropy(logits, targets[start:start + slice_tokens], reduction="sum")
        return total / h.shape[0]
    return _LinearCrossEntropy.apply(h, weight, targets, slice_tokens, num_classes)


class HFCausalLM(nn.Module):
    """A `transformers` LlamaForCausalLM built from a config (no download), behind the same
    `loss` interface as `Decoder`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        try:
            from transformers import LlamaConfig, LlamaForCausalLM
        except ImportError as e:  # optional dependency, or one that is installed but fails to import
            # Name the real failure: a package shadowed by a folder on sys.path, or a broken
            # install, reads the same as a missing one otherwise.
            raise ValueError(f"model 'hf:llama' needs the transformers package (pip install 'locoswarm[hf]'); "
                             f"importing it failed: {type(e).__name__}: {e}") from e
        cfg.validate()
        self.cfg = cfg
        hf_cfg = LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.dim,
            intermediate_size=cfg.ffn_dim,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_heads,
            max_position_embeddings=cfg.max_seq_len,
            rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta,
            tie_word_embeddings=True,
            attn_implementation="sdpa",
        )
        self.inner = LlamaForCausalLM(hf_cfg)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.inner(input_ids=tokens).logits

    def loss(self, tokens: Tensor, targets: Tensor, slice_tokens: int = 8192) -> Tensor:
        logits = self.forward(tokens).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def build_model(size: str, vocab_size: int, max_seq_len: int, seed: int) -> nn.Module:
    """Build a model with deterministic initial weights (the run's genesis seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if size.startswith("hf:"):
            arch = size[3:]
            if arch != "llama":
                raise ValueError(f"unknown Hugging Face architecture {arch!r}; supported: 'hf:llama'")
            return HFCausalLM(_hf_config(vocab_size, max_seq_len))
        return Decoder(model_config(size, vocab_size, max_seq_len))


def _hf_config(vocab_size: int, max_seq_len: int) -> ModelConfig:
    """The `hf:llama` size: the `tiny` shape, so that it runs in CPU tests."""
    return replace(SIZES["tiny"], vocab_size=vocab_size, max_seq_len=max_seq_len)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
