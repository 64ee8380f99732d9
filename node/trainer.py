"""One peer's replica: its model, inner AdamW, data shard, and its side of the round
(optim/round.py's RoundStep with this peer's outer optimizer and error-feedback residual),
driven by the daemon round by round. The convergence simulation (bench/convergence.py) runs
the same round step for N replicas in one process.

Threads (node/threads.py says which runs what): inner steps, the round boundary, evaluation
and state loads run on the training thread; encode, screen and the outer step on the
exchange thread when rounds overlap. The training progress, the restart shift and the outer
steps taken cross between them through the trainer's `Handoff`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from locoswarm.node.chains import delta_content
from locoswarm.node.files import atomic_path
from locoswarm.node.hardware import activation_bytes_per_sequence, choose_precision, fit_micro_batch, next_micro_batch
from locoswarm.node.spec import RunSpec
from locoswarm.node.threads import Handoff, Progress
from locoswarm.optim import lr_at, make_inner_optimizer, set_lr
from locoswarm.optim.check import Check, failing
from locoswarm.optim.inner import load_params
from locoswarm.optim.outer import OuterOptimizer
from locoswarm.optim.round import RoundStep
from locoswarm.optim.screen import Screened
from locoswarm.protocol import DecodedDelta
from locoswarm.protocol.delta import MAX_CHECKS
from locoswarm.protocol.rows import (RowAggregate, RowMember, RowMessage, decode_row, encode_row, row_message_limit,
                                     row_spec)
from locoswarm.protocol.state import StateSpec, encode_state, state_digest
from locoswarm.workload.data import Corpus
from locoswarm.workload.model import build_model
from locoswarm.workload.tokenizer import get_tokenizer

log = logging.getLogger(__name__)

MAX_TOKENS_FACTOR = 64
"""A delta may claim at most this many times the per-peer token target of a round."""


@dataclass(slots=True)
class RoundWork:
    """One finished inner phase, handed from the training thread to the exchange."""

    round: int
    tokens: int
    loss: float
    snapshot: list[torch.Tensor]
    """The replica's parameters at the boundary, fp32 on the outer state's device."""
    applied: bool = False
    """The round's outer step is in (set by `Trainer.apply`)."""


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
        self.step = RoundStep(spec.diloco, named, run_id=spec.run_id, spec_hash=spec_hash,
                              max_tokens=MAX_TOKENS_FACTOR * self.round_tokens)
        """The round's algorithm (optim/round.py), shared with the simulation."""
        self.compressor = self.step.compressor(self.outer.params[0].device)
        self.row_spec = row_spec(self.step.spec)
        """The layout a tree round's row aggregates are checked against (protocol/rows.py)."""
        self.row_limit = row_message_limit(self.row_spec)
        self.ledger = self.step.ledger(self.round_tokens, spec.trust.anchors)
        """The outer state's earned weight (optim/credit.py): screened against, credited
        by each outer step, taken with a donor's state; at genesis, the run's trust anchors
        established."""
        self.holds: int | None = None
        """The round whose delta is held, not sent (`hold`): the first one trained in a state
        taken from others; None when there is none."""
        self.told: tuple[int, tuple[tuple[str, int], ...]] = (-1, ())
        """(round, failed checks of its deltas): told with the next round's delta (exchange thread)."""
        self.handoff = Handoff()
        """What the training, exchange and event-loop threads share (node/threads.py)."""
        self.state_spec = StateSpec(run_id=spec.run_id, spec_hash=spec_hash,
                                    tensors=tuple((n, tuple(t.shape)) for n, t in self.outer.state_tensors().items()))
        self.residual_spec = (StateSpec(run_id=spec.run_id, spec_hash=spec_hash, dtype="bfloat16",
                                        tensors=tuple((f"residual.{i}", shape) for i, (_, shape) in enumerate(named)))
                              if spec.diloco.compression.residual == "model" else None)
        """The layout of the residual a donor serves with its state (protocol/state.py);
        None where the residual does not live in the model (a replica then restarts at
        the outer state, as a joiner does)."""
        self.round = 0
        """The round being trained: the number of outer steps this replica has taken part in
        (written at the round boundary, which the event loop awaits)."""
        self.tokens = 0
        """Tokens trained on in the current round (training thread; others read `progress`)."""
        self.losses: list[float] = []
        """Training losses of the current round."""
        per_sequence = activation_bytes_per_sequence(spec, tok.vocab_size)
        if activation_checkpointing:
            per_sequence //= 4  # block inputs and one block's recomputation, not every block's intermediates
        self.micro_batch = micro_batch or self._fit_micro_batch(per_sequence)
        """Sequences per forward pass; halved (to the next divisor) when a step runs out of memory."""

    @property
    def progress(self) -> Progress:
        """This round's tokens and rate, as the training thread last published them."""
        return self.handoff.progress

    @property
    def tokens_per_s(self) -> float:
        return self.handoff.progress.tokens_per_s

    @property
    def outer_steps(self) -> int:
        """Outer steps taken, as last published by the thread that took one (any thread may read)."""
        return self.handoff.outer_steps

    def _fit_micro_batch(self, per_sequence: int) -> int:
        """The largest divisor of the batch whose activations fit what is free on the
        device, once AdamW's moments and the gradients (not allocated before the first
        step) are set aside."""
        import psutil

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
            self.take_shift()
            # Global progress drives the schedule, as in the simulation: step = round·H + s.
            set_lr(self.inner, lr_at(self.round * dl.inner_steps + min(steps, dl.inner_steps - 1),
                                     self.spec.total_steps, dl.inner))
            x, y = (t.to(self.device, non_blocking=True) for t in self.sampler.next_batch(self.spec.batch_size))
            self.losses.append(float(self._step(x, y)))
            steps += 1
            self.tokens += self.tokens_per_step
            elapsed = time.perf_counter() - started
            self.handoff.report(Progress(self.tokens, self.tokens / elapsed if elapsed > 0 else 0.0))
            if stop.is_set() or should_stop(self.tokens):
                return self.tokens

    # ------------------------------------------------------------------ the exchange

    def end_round(self) -> RoundWork:
        """The round boundary (training thread): take in a pending restart shift, snapshot
        the replica's parameters, and count the next round from here."""
        self.take_shift()
        snapshot = [p.detach().to(self.outer.params[0].device, torch.float32, copy=True)
                    for p in self.model.parameters()]
        work = RoundWork(round=self.round, tokens=max(1, self.tokens), snapshot=snapshot,
                         loss=sum(self.losses) / len(self.losses) if self.losses else float("nan"))
        self.round += 1
        self.tokens = 0
        self.losses = []
        self.handoff.report(Progress(0, self.tokens_per_s))  # the rate stands until the next step
        return work

    def encode(self, work: RoundWork, sender: str, base: str = "") -> bytes:
        """The round's pseudo-gradient, compressed (committing the residual) and encoded;
        ValueError, with nothing committed, when it is not finite (RoundStep.encode)."""
        round_, checks = self.told
        return self.step.encode(self.compressor, self.outer.params, work.snapshot, round_=work.round, sender=sender,
                                tokens=work.tokens, base=base, checks=checks if round_ == work.round - 1 else ())

    def hold(self, work: RoundWork) -> None:
        """The round's pseudo-gradient kept whole in the residual, not sent: the replica
        restarts from the next outer state with all of it, so nothing trained is lost.
        A peer holds the first round it trains in a state it took (`holds`): it joined that
        round late, after the others had counted its participants, and where it aggregated
        its own delta and they did not, its outer state split from theirs at once (3 of 4
        restarts in a 6-peer churn run, each healed by one or two more downloads).
        ValueError when it is not finite."""
        self.compressor.hold([o - s for o, s in zip(self.outer.params, work.snapshot)])

    def decode(self, blob: bytes) -> DecodedDelta:
        return self.step.decode(blob)

    def build_row(self, kept: list[DecodedDelta], screened: Screened, *, round_: int, row: int, rows: int,
                  base: str = "") -> bytes:
        """A tree round's aggregate of this peer's row (node/tree.py): the row's `kept`
        deltas (RoundStep.kept of `screened`) aggregated and compressed again, with the
        header that names them (protocol/rows.py). ValueError when it is not finite."""
        members = tuple(RowMember(d.sender, d.num_tokens, min(d.num_tokens, screened.earned.get(d.sender, 0)),
                                  delta_content(d)) for d in sorted(kept, key=lambda d: d.sender))
        blob = self.step.encode_aggregate(kept, round_=round_, base=base)
        return encode_row(RowMessage(run_id=self.spec.run_id, spec_hash=self.step.spec.spec_hash, round=round_,
                                     row=row, rows=rows, members=members, shares=max(1, min(screened.shares,
                                                                                             len(members))),
                                     banned=screened.banned, delta=blob))

    def decode_row(self, blob: bytes) -> RowAggregate:
        """A row's aggregate off the wire, validated against this run's layout (ProtocolError if bad)."""
        return decode_row(blob, self.row_spec)

    def screen(self, deltas: list[DecodedDelta], base: str = "") -> Screened:
        return self.step.screen(deltas, self.ledger, base)

    def check(self, work: RoundWork, deltas: list[DecodedDelta], me: str) -> list[Check]:
        """This peer's checks of the round's `deltas` (its own, `me`'s, among them) before the
        round's outer step (optim/check.py); the failed ones go out with the next delta."""
        own = next((d for d in deltas if d.sender == me), None)
        checks = [] if own is None else self.step.check(self.outer.params, work.snapshot, own, deltas,
                                                         self.round_tokens, self.ledger.established_peers())
        failed = sorted(failing(checks, self.spec.diloco.robust.check_agreement), key=lambda c: c.agreement)
        self.told = (work.round, tuple(sorted((c.sender, c.agreement) for c in failed[:MAX_CHECKS])))
        return checks

    @torch.no_grad()
    def apply(self, work: RoundWork, received: list[DecodedDelta], *, overlapped: bool,
              earned: dict[str, int] | None = None, banned: tuple[str, ...] = ()) -> None:
        """The round's outer step from its screened deltas (this peer's own among them) and
        the replica's restart (RoundStep.restart). When the next round's training already
        started from the snapshot (`overlapped`), the restart is handed to the training
        thread as a shift, applied before its next step: the replica ends where it would
        have, plus the progress it made meanwhile. `earned`: the screening's credits
        (Screened.earned) for the ledger, `banned` the peers it excludes (Screened.banned)."""
        self.step.apply(self.outer, received, [self.compressor], self.ledger, earned, banned)
        work.applied = True
        self.handoff.publish_outer_steps(self.outer.num_steps)
        self._restart(work, overlapped)

    @torch.no_grad()
    def discard(self, work: RoundWork, *, overlapped: bool) -> None:
        """A round given up before its outer step: the replica restarts where it would have
        without it. A replica that went non-finite restarts there outright (what it trained
        since is lost with it), and AdamW's state is dropped if the round left it
        non-finite: a diverged step must not poison the next round."""
        finite = all(bool(torch.isfinite(s).all()) for s in work.snapshot)
        self._restart(work, overlapped, reset=not finite)

    def _restart(self, work: RoundWork, overlapped: bool, *, reset: bool = False) -> None:
        start = self.step.restart(self.outer, self.compressor)
        if not overlapped:
            load_params(self.model, start)
            if reset:
                self._drop_non_finite_moments(work.round)
        elif reset:
            self.handoff.put_shift([st.clone() for st in start], reset=True)
        else:
            self.handoff.put_shift([st - s for st, s in zip(start, work.snapshot)])

    @torch.no_grad()
    def take_shift(self) -> None:
        """Apply a pending restart (training thread): add the shift, or load a reset."""
        shift, reset = self.handoff.take_shift()
        if shift is None:
            return
        if reset:
            load_params(self.model, shift)
            self._drop_non_finite_moments(self.round)
            return
        for p, d in zip(self.model.parameters(), shift):
            p.add_(d.to(p.device, p.dtype))

    def _drop_non_finite_moments(self, round_: int) -> None:
        if not all(bool(torch.isfinite(v).all()) for st in self.inner.state.values() for v in st.values()
                   if torch.is_tensor(v) and v.is_floating_point()):
            log.warning("round %d left AdamW's state non-finite: starting it afresh", round_)
            self.inner.state.clear()

    # ------------------------------------------------------------------ state for joiners (node/handover.py)

    def state_snapshot(self) -> dict[str, torch.Tensor]:
        """Copies of the outer state (parameters and momentum), on the CPU."""
        return {n: t.detach().to("cpu", torch.float32, copy=True) for n, t in self.outer.state_tensors().items()}

    def state_digest(self) -> str:
        """SHA-256 of the outer state's wire body and its ledger (protocol/state.py
        state_digest): equal on a donor and on a joiner that took its state."""
        _, body = encode_state(self.state_spec, self.state_snapshot(), self.round)
        return state_digest(body, self.ledger.pairs())

    def save_model(self, path: str) -> None:
        """The replica's parameters as safetensors (no pickle), written atomically."""
        from safetensors.torch import save_file

        self.take_shift()
        with atomic_path(path) as tmp:
            save_file({n: p.detach().to("cpu", torch.float32).contiguous() for n, p in self.model.named_parameters()},
                      tmp)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Held-out loss of the replica (training thread: a pending restart is applied first)."""
        self.take_shift()
        total, count = 0.0, 0
        for x, y in self.eval:
            with self.autocast():
                loss = self.model.loss(x.to(self.device), y.to(self.device))
            total += float(loss) * y.numel()
            count += y.numel()
        return total / count
