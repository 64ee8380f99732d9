"""The training side of one peer (issue 3): its replica of the model, inner AdamW, data
shard, error-feedback compressor and the outer optimizer, driven by the daemon round by
round. The same algorithm as the in-process simulation (bench/convergence.py
`run_diloco`), one replica's share of it; every method runs on the daemon's one training
thread, so torch work never blocks the event loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from locoswarm.node.hardware import next_micro_batch
from locoswarm.node.spec import RunSpec
from locoswarm.workload.data import Corpus
from locoswarm.workload.model import build_model
from locoswarm.workload.tokenizer import get_tokenizer
from locoswarm.optim import (
    ErrorFeedbackCompressor,
    OuterOptimizer,
    aggregate,
    coverage,
    delta_spec,
    lr_at,
    make_inner_optimizer,
    set_lr,
)
from locoswarm.optim.inner import load_params
from locoswarm.protocol import DecodedDelta, DeltaMessage, decode_delta, encode_delta
from locoswarm.protocol.state import StateSpec, encode_state

log = logging.getLogger(__name__)

MAX_TOKENS_FACTOR = 64
"""A delta may claim at most this many times the per-peer token target of a round."""


def pick_device(name: str) -> torch.device:
    """`auto` takes CUDA, then MPS, then the CPU; an explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is present")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: Apple MPS is not available here")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise ValueError(f"--device must be auto, cuda, mps or cpu, got {name!r}")
    return torch.device(name)


@dataclass(slots=True)
class RoundWork:
    """One finished inner phase, handed from the training thread to the exchange."""

    round: int
    tokens: int
    loss: float
    snapshot: list[torch.Tensor]
    """The replica's parameters at the boundary, fp32 on the outer state's device."""


class Trainer:
    def __init__(self, spec: RunSpec, spec_hash: bytes, *, shard: int, device: torch.device,
                 eval_sequences: int = 64, precision: str = "auto", micro_batch: int = 0,
                 memory_fraction: float = 0.0, activation_checkpointing: bool = False,
                 compile: bool = False) -> None:
        """`precision`: auto, bf16, fp16 or fp32 (hardware.choose_precision). `micro_batch`:
        sequences per forward pass, a divisor of the spec's batch (0: the largest that fits
        the free memory); the step accumulates gradients over the batch, so the spec's batch
        per step is kept. `memory_fraction` (0: no cap) caps this process's share of the
        GPU's memory (torch's per-process fraction). `activation_checkpointing`: recompute
        each block's activations in backward instead of keeping them. `compile`:
        torch.compile each transformer block (CUDA only; the first steps are slow)."""
        if spec.diloco.compression is None:
            raise ValueError("the swarm exchanges compressed deltas: the run spec needs diloco.compression")
        if not 0 <= shard < spec.num_shards:
            raise ValueError(f"shard {shard} outside [0, {spec.num_shards})")
        from locoswarm.node.hardware import activation_bytes_per_sequence, choose_precision

        if micro_batch < 0 or (micro_batch and spec.batch_size % micro_batch):
            raise ValueError(f"micro_batch {micro_batch} must divide the spec's batch size {spec.batch_size}")
        if not 0.0 <= memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in [0, 1], got {memory_fraction}")
        self.spec = spec
        self.device = device
        self.precision = choose_precision(device, precision)
        self.scaler = torch.amp.GradScaler(device.type) if self.precision == "fp16" else None
        """fp16 has too little range for small gradients: the loss is scaled up and the step
        skipped when the scaled gradients overflow."""
        if memory_fraction > 0 and device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            torch.cuda.set_per_process_memory_fraction(memory_fraction, index)
        self.memory_fraction = memory_fraction
        tok = get_tokenizer(spec.tokenizer)
        corpus = Corpus.load(spec.data, tok)
        self.model = build_model(spec.model, tok.vocab_size, spec.data.seq_len, spec.seed).to(device)
        if activation_checkpointing:
            if not hasattr(self.model, "checkpoint_activations"):
                raise ValueError(f"activation checkpointing is not available for model {spec.model!r}")
            self.model.checkpoint_activations = True
        if compile and device.type == "cuda" and hasattr(self.model, "blocks"):
            for block in self.model.blocks:
                block.compile()
        self.inner = make_inner_optimizer(self.model, spec.diloco.inner)
        # The same shard and seed the simulation gives replica `shard` of `num_shards`.
        self.sampler = corpus.sampler(shard, spec.num_shards, seed=spec.seed * 1000 + shard)
        self.eval = corpus.eval_batches(eval_sequences, spec.batch_size * 2)
        self.outer = OuterOptimizer(list(self.model.parameters()), spec.diloco.outer, device=device)
        named = [(n, tuple(p.shape)) for n, p in self.model.named_parameters()]
        self.tokens_per_step = spec.batch_size * spec.data.seq_len
        self.round_tokens = spec.diloco.inner_steps * self.tokens_per_step
        """The per-peer share of a round's global token target."""
        self.delta_spec = delta_spec(named, spec.diloco.compression, run_id=spec.run_id, spec_hash=spec_hash,
                                     max_tokens=MAX_TOKENS_FACTOR * self.round_tokens)
        self.compressor = ErrorFeedbackCompressor(self.delta_spec.tensors, spec.diloco.compression,
                                                  self.outer.params[0].device)
        self.state_spec = StateSpec(run_id=spec.run_id, spec_hash=spec_hash,
                                    tensors=tuple((n, tuple(t.shape)) for n, t in self.outer.state_tensors().items()))
        self.round = 0
        """The round being trained: the number of outer steps this replica has taken part in."""
        self.tokens = 0
        """Tokens trained on in the current round (read by the event loop for progress)."""
        self.tokens_per_s = 0.0
        self.losses: list[float] = []
        """Training losses of the current round."""
        self._shift: list[torch.Tensor] | None = None
        """The restart of an overlapped round, waiting for the training thread."""
        per_sequence = activation_bytes_per_sequence(spec, tok.vocab_size)
        if activation_checkpointing:
            per_sequence //= 4  # block inputs and one block's recomputation, not every block's intermediates
        self.micro_batch = micro_batch or self._fit_micro_batch(per_sequence)
        """Sequences per forward pass; halved (to the next divisor) when a step runs out of memory."""

    def _fit_micro_batch(self, per_sequence: int) -> int:
        """The largest divisor of the batch whose activations fit what is free on the
        device, once AdamW's moments and the gradients (not allocated before the first
        step) are set aside."""
        import psutil

        from locoswarm.node.hardware import fit_micro_batch

        params = sum(p.numel() for p in self.model.parameters())
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            if self.memory_fraction > 0:
                free = min(free, int(self.memory_fraction * total) - torch.cuda.memory_reserved(self.device))
        else:
            free = psutil.virtual_memory().available
        return fit_micro_batch(self.spec.batch_size, per_sequence, free - 12 * params)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One inner step on the batch (x, y), accumulated over micro-batches; returns the
        batch's mean loss (a tensor: no device sync here). Out of device memory, the
        micro-batch shrinks to the next divisor and the step starts over."""
        while True:
            try:
                return self._accumulate(x, y)
            except torch.OutOfMemoryError:
                self.inner.zero_grad(set_to_none=True)
                smaller = next_micro_batch(self.spec.batch_size, self.micro_batch)
                if smaller is None:
                    raise
            log.warning("out of device memory at micro-batch %d: retrying the step at %d (batch %d)",
                        self.micro_batch, smaller, self.spec.batch_size)
            self.micro_batch = smaller
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _accumulate(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        total = torch.zeros((), device=self.device)
        for start in range(0, batch, self.micro_batch):
            xs, ys = x[start:start + self.micro_batch], y[start:start + self.micro_batch]
            with self.autocast():
                loss = self.model.loss(xs, ys) * (xs.shape[0] / batch)  # equal weight to every sequence
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total += loss.detach().float()
        clip = self.spec.diloco.inner.grad_clip
        if self.scaler is not None:
            self.scaler.unscale_(self.inner)  # clip the true gradients, not the scaled ones
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if self.scaler is not None:
            self.scaler.step(self.inner)
            self.scaler.update()
        else:
            self.inner.step()
        self.inner.zero_grad(set_to_none=True)
        return total

    # ------------------------------------------------------------------ the inner phase

    def train_until(self, stop: threading.Event, should_stop: Callable[[int], bool]) -> int:
        """Inner steps until `stop` is set or `should_stop(tokens so far)` says the swarm's
        round target is reached (at least one step); returns this round's tokens."""
        dl = self.spec.diloco
        steps = 0
        started = time.perf_counter()
        while True:
            self._take_shift()
            # Global progress drives the schedule, as in the simulation: step = round·H + s.
            set_lr(self.inner, lr_at(self.round * dl.inner_steps + min(steps, dl.inner_steps - 1),
                                     self.spec.total_steps, dl.inner))
            x, y = (t.to(self.device, non_blocking=True) for t in self.sampler.next_batch(self.spec.batch_size))
            self.losses.append(float(self._step(x, y)))
            steps += 1
            self.tokens += self.tokens_per_step
            elapsed = time.perf_counter() - started
            self.tokens_per_s = self.tokens / elapsed if elapsed > 0 else 0.0
            if stop.is_set() or should_stop(self.tokens):
                return self.tokens

    # ------------------------------------------------------------------ the exchange

    def end_round(self) -> RoundWork:
        """The round boundary (training thread): take in a pending restart shift, snapshot
        the replica's parameters, and count the next round from here."""
        self._take_shift()
        snapshot = [p.detach().to(self.outer.params[0].device, torch.float32, copy=True)
                    for p in self.model.parameters()]
        work = RoundWork(round=self.round, tokens=max(1, self.tokens), snapshot=snapshot,
                         loss=sum(self.losses) / len(self.losses) if self.losses else float("nan"))
        self.round += 1
        self.tokens = 0
        self.losses = []
        return work

    def encode(self, work: RoundWork, sender: str) -> bytes:
        """The round's pseudo-gradient θ_outer − θ_replica, compressed (committing the
        residual) and encoded."""
        deltas = [o - s for o, s in zip(self.outer.params, work.snapshot)]
        packed, _ = self.compressor.compress(deltas)
        msg = DeltaMessage(run_id=self.spec.run_id, spec_hash=self.delta_spec.spec_hash, round=work.round,
                           sender=sender, num_tokens=work.tokens, tensors=tuple(packed))
        return encode_delta(msg)

    def decode(self, blob: bytes) -> DecodedDelta:
        return decode_delta(blob, self.delta_spec)

    @torch.no_grad()
    def apply(self, work: RoundWork, received: list[DecodedDelta], *, overlapped: bool) -> None:
        """Token-weighted aggregate of the round's deltas (this peer's own among them), the
        outer step, and the replica's restart at θ_outer − its unsent residual. When the
        next round's training already started from the snapshot (`overlapped`), the restart
        is handed to the training thread as a shift, applied before its next step: the
        replica ends where it would have, plus the progress it made meanwhile."""
        cfg = self.spec.diloco.compression
        device = self.outer.params[0].device
        shapes = [tuple(p.shape) for p in self.outer.params]
        masked = cfg.aggregation == "masked"
        shares = coverage(received, device) if masked else None
        self.outer.step(aggregate(received, shapes, device, rule=cfg.aggregation, shares=shares,
                                  trim=self.spec.diloco.robust.trim))
        if masked:
            self.compressor.forget([share > 0 for share in shares])
        start = self._restart_point()
        if overlapped:
            self._shift = [st - s for st, s in zip(start, work.snapshot)]
        else:
            load_params(self.model, start)

    def _restart_point(self) -> list[torch.Tensor]:
        if self.spec.diloco.compression.residual != "model":
            return self.outer.params
        offsets = self.compressor.model_offsets()
        return [o - off.view(o.shape) for o, off in zip(self.outer.params, offsets)]

    @torch.no_grad()
    def _take_shift(self) -> None:
        shift, self._shift = self._shift, None
        if shift is not None:
            for p, d in zip(self.model.parameters(), shift):
                p.add_(d.to(p.device, p.dtype))

    # ------------------------------------------------------------------ state for joiners

    def state_snapshot(self) -> dict[str, torch.Tensor]:
        """Copies of the outer state (parameters and momentum), on the CPU."""
        return {n: t.detach().to("cpu", torch.float32, copy=True) for n, t in self.outer.state_tensors().items()}

    def state_digest(self) -> str:
        """SHA-256 of the outer state's wire body: equal on a donor and on a joiner that took its state."""
        _, body = encode_state(self.state_spec, self.state_snapshot(), self.round)
        return hashlib.sha256(body).hexdigest()

    # ------------------------------------------------------------------ checkpoints

    @torch.no_grad()
    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Copies of everything a restart needs, taken at a round boundary on the training
        thread (nothing else is running): the outer state, the replica (its unsent progress
        included: it is sent with the next delta), the residuals, AdamW's state, and the
        data order. Returns (tensors, JSON-able metadata)."""
        self._take_shift()
        cpu = lambda t: t.detach().to("cpu", copy=True)  # noqa: E731
        tensors = {name: cpu(t).to(torch.uint8) if t.dtype == torch.bool else cpu(t)
                   for name, t in self._fixed_tensors().items()}
        params = [p for group in self.inner.param_groups for p in group["params"]]
        for i, p in enumerate(params):
            for key, value in self.inner.state.get(p, {}).items():
                tensors[f"adam.{i}.{key}"] = cpu(value).reshape(-1) if value.dim() == 0 else cpu(value)
        meta = {"round": self.round, "outer_steps": self.outer.num_steps,
                "sampler": self.sampler.rng.bit_generator.state}
        return tensors, meta

    def _fixed_tensors(self) -> dict[str, torch.Tensor]:
        """The checkpointed tensors whose names and shapes the spec fixes (AdamW's state
        appears only after the first step), as views of the live ones: no copies."""
        out = {f"outer.{n}": t for n, t in self.outer.state_tensors().items()}
        out.update({f"model.{n}": p.detach() for n, p in self.model.named_parameters()})
        for i, (err, mask) in enumerate(zip(self.compressor.errors, self.compressor.sent_masks)):
            out[f"residual.{i}"] = err
            out[f"sent.{i}"] = mask
        return out

    @torch.no_grad()
    def restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Take a checkpoint written by `checkpoint_state` for this spec; ValueError, with
        nothing changed, when its tensors do not fit this model."""
        need = self._fixed_tensors()  # views: only names, shapes and dtypes are read
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
        for name, live in need.items():
            live.copy_(tensors[name])  # a sent mask comes back from uint8 to bool by copy_
        params = [p for group in self.inner.param_groups for p in group["params"]]
        for i, p in enumerate(params):
            state = {key[len(f"adam.{i}."):]: value for key, value in tensors.items() if key.startswith(f"adam.{i}.")}
            if state:
                self.inner.state[p] = {k: (v.reshape(()) if k == "step" else v.to(p.device)) for k, v in state.items()}
        try:
            self.sampler.rng.bit_generator.state = meta["sampler"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"checkpoint's data order unreadable: {e}") from None
        self.outer.num_steps = outer_steps
        self.round = round_
        self.tokens = 0
        self.losses = []
        self._shift = None

    @torch.no_grad()
    def load_state(self, round_: int, state: dict[str, torch.Tensor]) -> None:
        """Take a donor's outer state: parameters, momentum and round; the residual starts empty."""
        for name, tensor in state.items():
            self.outer.state_tensors()[name].copy_(tensor)
        self.outer.num_steps = round_  # > 0: the momentum buffer is live, not to be re-seeded
        for err in self.compressor.errors:
            err.zero_()
        self.round = round_
        self._shift = None
        load_params(self.model, self.outer.params)
        self.tokens = 0
        self.losses = []

    def save_model(self, path: str) -> None:
        """The replica's parameters as safetensors (no pickle), written atomically."""
        from safetensors.torch import save_file

        self._take_shift()
        tmp = f"{path}.tmp"
        try:
            save_file({n: p.detach().to("cpu", torch.float32).contiguous() for n, p in self.model.named_parameters()},
                      tmp)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @torch.no_grad()
    def evaluate(self) -> float:
        """Held-out loss of the replica (training thread: a pending restart is applied first)."""
        self._take_shift()
        total, count = 0.0, 0
        for x, y in self.eval:
            with self.autocast():
                loss = self.model.loss(x.to(self.device), y.to(self.device))
            total += float(loss) * y.numel()
            count += y.numel()
        return total / count
