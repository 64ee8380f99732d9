"""Compression of pseudo-gradients with error feedback (Karimireddy et al. 2019; the
top-k + low-bit variant of SparseLoCo and DeMo).

Per tensor: b ← β·e + Δ (Δ: this round's fresh progress); keep the top-k entries of each chunk of b, quantize them; the
residual e ← b − decode(encode(b)) is what was not transmitted, computed through the same
decode every receiver runs, so nothing is lost or counted twice: β·e_old + Δ equals the
transmitted values plus e_new, entry by entry (exact where nothing was sent; where a value
was sent, up to the one fp32 rounding of the subtraction).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from locoswarm.kernels import (
    ChunkLayout,
    chunked_topk,
    dequantize,
    fused_kernels,
    pack_bits,
    quantize,
    scatter_chunks,
    unpack_bits,
)
from locoswarm.protocol import DeltaSpec, PackedTensor, SparseTensor, TensorSpec
from locoswarm.optim.config import CompressionConfig


BF16_MAX = float(torch.finfo(torch.bfloat16).max)


def tensor_specs(named_shapes: list[tuple[str, tuple[int, ...]]], cfg: CompressionConfig) -> tuple[TensorSpec, ...]:
    """The per-tensor wire layout every peer of a run derives from the model and config."""
    out = []
    for name, shape in named_shapes:
        numel = 1
        for d in shape:
            numel *= d
        lay = ChunkLayout.for_tensor(numel, cfg.chunk, cfg.density)
        out.append(TensorSpec(name=name, shape=tuple(shape), chunk=lay.chunk, k=lay.k, bits=cfg.bits))
    return tuple(out)


def delta_spec(
    named_shapes: list[tuple[str, tuple[int, ...]]],
    cfg: CompressionConfig,
    *,
    run_id: str,
    spec_hash: bytes,
    max_tokens: int,
) -> DeltaSpec:
    return DeltaSpec(run_id=run_id, spec_hash=spec_hash, tensors=tensor_specs(named_shapes, cfg), max_tokens=max_tokens)


def densify(t: SparseTensor, out: Tensor | None = None, scale: float = 1.0) -> Tensor:
    """Decode a validated sparse tensor into a dense flat fp32 tensor (numel,), times
    `scale`, on `out`'s device (zeroed, (numel,)) when given, else on the CPU."""
    device = out.device if out is not None else t.codes.device
    values = dequantize(t.codes.to(device), t.scales.to(device), t.layout, t.bits)
    if scale != 1.0:
        values = values * scale
    return scatter_chunks(t.indices.to(device), values, t.layout, out=out)


class ErrorFeedbackCompressor:
    """Compresses one peer's pseudo-gradients round after round, keeping the residual."""

    def __init__(self, specs: tuple[TensorSpec, ...], cfg: CompressionConfig, device: torch.device | str) -> None:
        cfg.validate()
        self.specs = specs
        self.cfg = cfg
        self.errors = [torch.zeros(s.layout.numel, dtype=torch.float32, device=device) for s in specs]
        """e per tensor, flat fp32: what has not been transmitted yet."""
        self.sent_masks: list[Tensor] = [torch.zeros(s.layout.numel, dtype=torch.bool, device=device) for s in specs]
        """Per tensor, flat bool: the coordinates this peer sent in its last message."""

    @torch.no_grad()
    def compress(self, deltas: list[Tensor], *, dense: bool = True) -> tuple[list[PackedTensor], list[Tensor]]:
        """Compress this round's deltas; returns the packed tensors and, per tensor, the
        dense values a receiver will decode (flat fp32, for tests and local bookkeeping;
        an empty list with `dense=False`).

        On CUDA with Triton the fused kernels (kernels/fused.py) do it in one pass per
        tensor with the same bits as the torch path below.

        Raises ValueError on a non-finite delta: a diverged replica must not send it."""
        fused = fused_kernels(self.errors[0].device) if self.errors else None
        if fused is not None and all(s.layout.chunk <= 1 << 15 for s in self.specs):
            return self._compress_fused(fused, deltas, dense)
        packed, buffers, transmitted, sent_idx = [], [], [], []
        for spec, err, delta in zip(self.specs, self.errors, deltas):
            d = delta.reshape(-1).to(err.device, dtype=torch.float32)
            if not bool(torch.isfinite(d).all()):
                raise ValueError(f"pseudo-gradient of {spec.name!r} is not finite; refusing to send it")
            if self.cfg.residual == "buffer":
                buf = err * self.cfg.ef_decay + d if self.cfg.ef_decay != 1.0 else err + d
            else:
                buf = d.clone()  # the replica started at θ_outer − β·e, so Δ already holds β·e
            lay = spec.layout
            idx, vals = chunked_topk(buf, lay)
            codes, scales = quantize(vals, lay, spec.bits)
            if not bool(torch.isfinite(scales).all()):
                # A magnitude beyond bfloat16's range: every receiver would reject it. Nothing
                # has been committed to the residuals yet, so the caller can skip the round.
                raise ValueError(f"pseudo-gradient of {spec.name!r} exceeds the bfloat16 range of the scales")
            t = scatter_chunks(idx, dequantize(codes, scales, lay, spec.bits), lay)
            sent_idx.append(idx)
            buffers.append(buf)
            transmitted.append(t)
            packed.append(
                PackedTensor(
                    name=spec.name,
                    shape=spec.shape,
                    chunk=spec.chunk,
                    k=spec.k,
                    bits=spec.bits,
                    indices=pack_bits(idx, lay.index_bits).cpu().numpy().tobytes(),
                    values=pack_bits(codes, spec.bits).cpu().numpy().tobytes(),
                    scales=scales.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes(),
                )
            )
        # Commit the residuals only once every tensor compressed: a refusal loses nothing.
        for err, buf, t in zip(self.errors, buffers, transmitted):
            err.copy_(buf.sub_(t))
        for mask, idx, spec in zip(self.sent_masks, sent_idx, self.specs):
            mask.zero_()
            scatter_chunks(idx, torch.ones_like(idx, dtype=torch.bool), spec.layout, out=mask)
        return packed, transmitted

    def _compress_fused(self, fused, deltas: list[Tensor], dense: bool) -> tuple[list[PackedTensor], list[Tensor]]:
        flat = [d.reshape(-1).to(e.device, dtype=torch.float32) for d, e in zip(deltas, self.errors)]
        # Every refusal is decided before any residual is touched (the kernel writes them in
        # place): one max per tensor sees NaN, inf and magnitudes beyond bfloat16's range.
        decay = self.cfg.ef_decay
        for spec, d, err in zip(self.specs, flat, self.errors):
            peak = float(d.abs().amax())
            if not math.isfinite(peak):
                raise ValueError(f"pseudo-gradient of {spec.name!r} is not finite; refusing to send it")
            if self.cfg.residual == "buffer":
                peak += decay * float(err.abs().amax())
            if peak > BF16_MAX:
                raise ValueError(f"pseudo-gradient of {spec.name!r} exceeds the bfloat16 range of the scales")
        packed, transmitted = [], []
        for spec, d, err, mask in zip(self.specs, flat, self.errors, self.sent_masks):
            lay = spec.layout
            idx, codes, scales = fused.compress(err, d, lay, spec.bits, mode=self.cfg.residual, decay=decay, sent=mask)
            if dense:
                transmitted.append(scatter_chunks(unpack_bits(idx, lay.index_bits, lay.num_selected),
                                                  dequantize(unpack_bits(codes, spec.bits, lay.num_selected), scales,
                                                             lay, spec.bits), lay))
            packed.append(PackedTensor(
                name=spec.name, shape=spec.shape, chunk=spec.chunk, k=spec.k, bits=spec.bits,
                indices=idx.cpu().numpy().tobytes(), values=codes.cpu().numpy().tobytes(),
                scales=scales.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()))
        return packed, transmitted

    @torch.no_grad()
    def hold(self, deltas: list[Tensor]) -> None:
        """A round whose delta is not sent (a peer's first round in a state it took,
        node/trainer.py): the whole pseudo-gradient goes into the residual, as if its top-k
        had been empty, and nothing counts as sent. ValueError, with nothing committed, on a
        non-finite delta."""
        flat = [d.reshape(-1).to(e.device, dtype=torch.float32) for d, e in zip(deltas, self.errors)]
        for spec, d in zip(self.specs, flat):
            if not bool(torch.isfinite(d).all()):
                raise ValueError(f"pseudo-gradient of {spec.name!r} is not finite")
        for err, d, mask in zip(self.errors, flat, self.sent_masks):
            if self.cfg.residual == "buffer":
                err.mul_(self.cfg.ef_decay).add_(d)
            else:
                err.copy_(d)  # the replica started at θ_outer − β·e, so Δ already holds β·e
            mask.zero_()

    @torch.no_grad()
    def forget(self, moved: list[Tensor]) -> None:
        """After a "masked" round: where the consensus moved (`moved`, flat bool, from
        `coverage(...) > 0`) on a coordinate this peer did not send in its last message,
        drop this peer's residual there. The consensus now holds the senders' average for
        it; keeping our own unsent progress as well would count the same progress twice.
        (Blending the two by token share instead measured worse in the sweep; docs/algorithm.md.)"""
        for err, mask, sent in zip(self.errors, moved, self.sent_masks):
            err.masked_fill_(mask & ~sent, 0.0)

    @torch.no_grad()
    def model_offsets(self) -> list[Tensor]:
        """β·e per tensor (flat): with residual "model" a replica restarts at θ_outer − β·e."""
        assert self.cfg.residual == "model", "offsets only apply when the residual lives in the model"
        return [e * self.cfg.ef_decay if self.cfg.ef_decay != 1.0 else e for e in self.errors]
