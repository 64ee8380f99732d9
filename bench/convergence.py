"""The convergence benchmark: on the same data and the same number of tokens, train

  ddp         one model, global batch = replicas × local batch, a step on every batch
              (what data-parallel training with an all-reduce per step reaches);
  diloco      N replicas, H inner AdamW steps, full-precision pseudo-gradients averaged
              (Douillard et al. 2023);
  compressed  the same with every pseudo-gradient compressed (top-k + b-bit + error
              feedback) and sent through encode → bytes → decode_delta → aggregate;
  local       replica 0 alone on its own shard, no communication (what a volunteer gets
              without the swarm);

all from the same genesis weights, and evaluate each on the same held-out split.

Traffic, bytes each replica sends: ddp counts a ring all-reduce of fp32 gradients each step,
2·(N−1)/N·4·P; diloco the same all-reduce once per round; compressed an all-to-all of the
encoded deltas, (N−1)·len(bytes) per round, which is what the swarm does (sparse deltas
with different supports cannot be ring-reduced without densifying them).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import torch
from torch import nn

from locoswarm.bench.grid import GroupConfig
from locoswarm.optim import (
    CompressionConfig,
    DiLoCoConfig,
    OuterOptimizer,
    average_dense,
    lr_at,
    make_inner_optimizer,
    pseudo_gradients,
    set_lr,
)
from locoswarm.optim.inner import load_params
from locoswarm.optim.round import RoundStep
from locoswarm.workload.data import Corpus, DataConfig
from locoswarm.workload.model import build_model, check_model_name, num_params
from locoswarm.workload.tokenizer import check_tokenizer_name, get_tokenizer

RUNS = ("ddp", "diloco", "compressed", "local")


@dataclass(kw_only=True, slots=True)
class BenchConfig:
    preset: str = "custom"
    """Name of the preset these settings came from."""
    model: str = "tiny"
    """Model size (see locoswarm.workload.model.SIZES) or 'hf:llama'."""
    tokenizer: str = "byte"
    """'byte' or 'gpt2'."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus, sequence length and split."""
    replicas: int = 4
    """N, simulated peers."""
    batch_size: int = 8
    """Sequences per replica per inner step."""
    total_steps: int = 400
    """Inner steps of every run (ddp and local take the same number of steps)."""
    diloco: DiLoCoConfig = field(default_factory=DiLoCoConfig)
    """Algorithm settings shared by the diloco and compressed runs."""
    eval_sequences: int = 64
    """Held-out sequences in every evaluation."""
    device: str = "cpu"
    """'cpu', 'cuda' or 'mps'."""
    seed: int = 0
    """Genesis seed: initial weights and every replica's data order."""
    groups: GroupConfig = field(default_factory=GroupConfig)
    """The compressed run's exchange: the full swarm (group_size 0) or rotating grid groups."""

    def validate(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if self.eval_sequences < 1:
            raise ValueError(f"eval_sequences must be >= 1, got {self.eval_sequences}")
        check_model_name(self.model)
        check_tokenizer_name(self.tokenizer)
        if self.device not in ("cpu", "cuda", "mps") and not self.device.startswith("cuda:"):
            raise ValueError(f"device: unknown device {self.device!r}; use cpu, cuda or mps")
        self.data.validate()
        self.diloco.validate()
        self.groups.validate(self.replicas)


PRESETS: dict[str, BenchConfig] = {
    # ≤ 5 min on 2 CPU cores for all four runs.
    "quick": BenchConfig(
        preset="quick",
        model="tiny",
        tokenizer="byte",
        data=DataConfig(source="builtin:shakespeare", seq_len=64),
        batch_size=8,
        total_steps=320,
        diloco=DiLoCoConfig(),
        eval_sequences=64,
    ),
    # ≤ 10 min on one H100 for all four runs, ≥ 100M parameters.
    "gpu": BenchConfig(
        preset="gpu",
        model="base",
        tokenizer="gpt2",
        data=DataConfig(source="builtin:shakespeare+builtin:kjv", seq_len=256),
        batch_size=16,
        total_steps=500,
        diloco=DiLoCoConfig(
            inner=replace(DiLoCoConfig().inner, lr=6e-4, warmup_steps=50),
            outer=replace(DiLoCoConfig().outer, device="model"),
        ),
        eval_sequences=256,
        device="cuda",
    ),
}


@dataclass(slots=True)
class RunResult:
    eval_loss: float
    bytes_sent_per_replica: int
    wall_s: float
    curve: list[tuple[int, float]]
    rounds: int = 0
    consensus_eval_loss: float | None = None
    replica_eval_loss: float | None = None
    """Replica 0's model alone (eval_loss is the mean over the replicas when they differ)."""
    spread: float | None = None
    """max over pairs of ‖θi − θj‖ / ‖θi‖ of the replicas' outer states at the end (0: one state)."""
    spread_curve: list[tuple[int, float]] | None = None
    mix_bytes_per_replica: int = 0
    """Of bytes_sent_per_replica, what the grouped run's state mixing sent."""
    group: dict | None = None


class Workload:
    """Corpus, eval batches and genesis model shared by every run of one benchmark."""

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        tok = get_tokenizer(cfg.tokenizer)
        self.corpus = Corpus.load(cfg.data, tok)
        self.vocab_size = tok.vocab_size
        self.eval = self.corpus.eval_batches(cfg.eval_sequences, cfg.batch_size * 2)
        self.genesis = self.new_model()
        self.params = num_params(self.genesis)
        self.shapes = [(n, tuple(p.shape)) for n, p in self.genesis.named_parameters()]

    def new_model(self) -> nn.Module:
        return build_model(self.cfg.model, self.vocab_size, self.cfg.data.seq_len, self.cfg.seed).to(self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        total, count = 0.0, 0
        for x, y in self.eval:
            with self.autocast():
                loss = model.loss(x.to(self.device), y.to(self.device))
            total += float(loss) * y.numel()
            count += y.numel()
        return total / count

    def samplers(self, n: int) -> list:
        return [self.corpus.sampler(i, self.cfg.replicas, seed=self.cfg.seed * 1000 + i) for i in range(n)]

    def train_inner(self, models: list[nn.Module], opts: list, samplers: list, step: int, steps: int) -> None:
        """One inner phase: `steps` steps of every replica from global step `step`, replica
        after replica, each on its own sampler."""
        for model, opt, sampler in zip(models, opts, samplers):
            for s in range(steps):
                self.train_step(model, opt, sampler.next_batch(self.cfg.batch_size), step + s)

    def train_step(self, model: nn.Module, opt: torch.optim.Optimizer, batch, step: int) -> None:
        inner = self.cfg.diloco.inner
        set_lr(opt, lr_at(step, self.cfg.total_steps, inner))
        x, y = (t.to(self.device, non_blocking=True) for t in batch)
        with self.autocast():
            loss = model.loss(x, y)
        loss.backward()
        if inner.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), inner.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)


def trained_rounds(w: Workload, dl: DiLoCoConfig, models: list, opts: list, samplers: list) -> Iterator[tuple[int, int]]:
    """Train every replica H inner steps a round (fewer in the last) until the run's steps
    are done; after each round's training yield (steps so far, tokens each replica trained)."""
    step, tokens_per_step = 0, w.cfg.batch_size * w.cfg.data.seq_len
    while step < w.cfg.total_steps:
        h = min(dl.inner_steps, w.cfg.total_steps - step)
        w.train_inner(models, opts, samplers, step, h)
        step += h
        yield step, h * tokens_per_step


def encode_replicas(round_step: RoundStep, compressors: list, outer_params: Callable[[int], list], models: list,
                    round_: int, tokens: int) -> list[tuple[bytes, object]]:
    """Every replica's delta of the round as a peer sends it: (encoded bytes, decoded delta),
    replica r's taken against `outer_params(r)`."""
    out = []
    for r, m in enumerate(models):
        blob = round_step.encode(compressors[r], outer_params(r), list(m.parameters()), round_=round_,
                                 sender=f"replica-{r:04d}", tokens=tokens)
        out.append((blob, round_step.decode(blob)))
    return out


def step_consensus(round_step: RoundStep, outer: OuterOptimizer, deltas: list, compressors: list,
                   models: list, owed: list[tuple[list[int], list]] = ()) -> None:
    """The one outer state steps with `deltas` (no screening: the simulated replicas are
    honest, optim/round.py says why) and every replica restarts from it. `owed`: (replicas,
    errors) that those replicas' residuals take on after the step (after a "masked" round's
    forgetting: not theirs to forget) and before they restart: what an aggregate above them
    did not send (bench/groups.py run_tree)."""
    round_step.apply(outer, deltas, compressors)
    with torch.no_grad():
        for replicas, errors in owed:
            for r in replicas:
                for e, unsent in zip(compressors[r].errors, errors):
                    e.add_(unsent)
    for r, m in enumerate(models):
        load_params(m, round_step.restart(outer, compressors[r]))


def _ring_allreduce_bytes(params: int, n: int) -> float:
    return 2 * (n - 1) / n * 4 * params


def run_single(w: Workload, *, data_parallel: bool) -> RunResult:
    """ddp (`data_parallel`: every replica's batch, one model) or local (replica 0 alone)."""
    cfg = w.cfg
    t0 = time.perf_counter()
    model = w.new_model()
    opt = make_inner_optimizer(model, cfg.diloco.inner)
    samplers = w.samplers(cfg.replicas if data_parallel else 1)
    curve = []
    H = cfg.diloco.inner_steps
    for step in range(cfg.total_steps):
        batches = [s.next_batch(cfg.batch_size) for s in samplers]
        batch = tuple(torch.cat(parts) for parts in zip(*batches)) if len(batches) > 1 else batches[0]
        w.train_step(model, opt, batch, step)
        if (step + 1) % H == 0 or step + 1 == cfg.total_steps:
            curve.append((step + 1, w.evaluate(model)))
    sent = _ring_allreduce_bytes(w.params, cfg.replicas) * cfg.total_steps if data_parallel else 0
    return RunResult(curve[-1][1], int(sent), time.perf_counter() - t0, curve)


def run_diloco(
    w: Workload, compression: CompressionConfig | None, diloco: DiLoCoConfig | None = None,
    on_round: Callable[[int, float], None] | None = None,
    keep: dict | None = None,
) -> RunResult:
    """N replicas with H inner steps per round; `compression` None exchanges fp32 deltas.
    `keep`, when given, receives the final models, outer optimizer and compressors.
    With `cfg.groups.group_size` set the compressed run exchanges in rotating groups
    (bench/groups.py); the uncompressed run always exchanges with the full swarm."""
    cfg = w.cfg
    dl = diloco or cfg.diloco
    if compression is not None and cfg.groups.group_size:
        from locoswarm.bench.groups import run_grouped

        return run_grouped(w, compression, dl, on_round, keep)
    t0 = time.perf_counter()
    n = cfg.replicas
    models, opts, samplers, outer = start_replicas(w, dl)
    tokens_per_step = cfg.batch_size * cfg.data.seq_len
    if compression is not None:
        # The peers' round step (optim/round.py), N replicas sharing one outer optimizer.
        round_step = RoundStep(replace(dl, compression=compression), w.shapes, run_id="bench",
                               spec_hash=b"\0" * 32, max_tokens=tokens_per_step * dl.inner_steps)
        compressors = [round_step.compressor(outer.params[0].device) for _ in range(n)]
    sent = 0.0
    curve = []
    rounds = 0
    for step, tokens in trained_rounds(w, dl, models, opts, samplers):
        if compression is None:
            deltas = [pseudo_gradients(outer.params, m) for m in models]
            outer.step(average_dense([(f"replica-{r:04d}", tokens, d) for r, d in enumerate(deltas)]))
            sent += _ring_allreduce_bytes(w.params, n)
            for m in models:
                load_params(m, outer.params)
        else:
            encoded = encode_replicas(round_step, compressors, lambda r: outer.params, models, rounds, tokens)
            sent += sum((n - 1) * len(blob) / n for blob, _ in encoded)  # mean over replicas of what each uploads
            step_consensus(round_step, outer, [delta for _, delta in encoded], compressors, models)
        rounds += 1
        loss = w.evaluate(models[0])
        curve.append((step, loss))
        if on_round is not None:
            on_round(rounds, loss)
    result = RunResult(curve[-1][1], int(round(sent)), time.perf_counter() - t0, curve, rounds)
    result.spread = 0.0  # one outer state shared by every replica
    if keep is not None:
        keep.update(models=models, outer=outer, compressors=compressors if compression is not None else None)
    if compression is not None and compression.residual == "model":
        # Replicas differ by their unsent residuals: report the mean over the models the
        # peers hold, and the consensus parameters alone.
        losses = [w.evaluate(m) for m in models]
        result.eval_loss = sum(losses) / n
        result.replica_eval_loss = losses[0]
        load_params(models[0], outer.params)
        result.consensus_eval_loss = w.evaluate(models[0])
    return result


@contextlib.contextmanager
def flush_denormals():
    """AdamW's second moments of rarely-updated rows decay into denormals, which make CPU
    arithmetic many times slower; flush them to zero while training, and restore the
    process-wide setting afterwards (other code may rely on IEEE subnormals)."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def start_replicas(w: Workload, dl: DiLoCoConfig) -> tuple[list, list, list, OuterOptimizer]:
    """The run's `w.cfg.replicas` replicas from one start: (models, inner optimizers, data
    samplers, the outer optimizer they share)."""
    n = w.cfg.replicas
    models = [w.new_model() for _ in range(n)]
    opts = [make_inner_optimizer(m, dl.inner) for m in models]
    return models, opts, w.samplers(n), OuterOptimizer(list(models[0].parameters()), dl.outer, device=w.device)


def run_study(preset: str, run: Callable[[Workload], dict], *, steps: int = 0, device: str = "",
              seed: int | None = None, json_path: str = "") -> dict:
    """One run of an issue study that replaces the compressed round (bench/support.py,
    bench/transform.py): `run` on the preset's workload (`steps`, `device` and `seed`
    overriding its own), seeded as the benchmark is and with denormals flushed; its result
    with the preset, steps, replicas and seed added, written to `json_path` when given."""
    import json

    cfg = PRESETS[preset]
    if steps:
        cfg = replace(cfg, total_steps=steps)
    if device:
        cfg = replace(cfg, device=device)
    if seed is not None:
        cfg = replace(cfg, seed=seed)
    torch.manual_seed(cfg.seed)
    with flush_denormals():
        out = run(Workload(cfg))
    out.update(preset=cfg.preset, steps=cfg.total_steps, replicas=cfg.replicas, seed=cfg.seed)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


def run_benchmark(cfg: BenchConfig, runs: tuple[str, ...] = RUNS, log: Callable[[str], None] = print) -> dict:
    with flush_denormals():
        return _run_benchmark(cfg, runs, log)


def _run_benchmark(cfg: BenchConfig, runs: tuple[str, ...], log: Callable[[str], None]) -> dict:
    cfg.validate()
    for name in runs:
        if name not in RUNS:
            raise ValueError(f"unknown run {name!r}; known: {RUNS}")
    torch.manual_seed(cfg.seed)
    w = Workload(cfg)
    log(f"model {cfg.model}: {w.params:,} parameters; corpus {w.corpus.num_tokens:,} tokens; "
        f"{cfg.replicas} replicas × batch {cfg.batch_size} × {cfg.data.seq_len} tokens × {cfg.total_steps} steps")
    results: dict[str, RunResult] = {}
    for name in runs:
        if name == "ddp":
            results[name] = run_single(w, data_parallel=True)
        elif name == "local":
            results[name] = run_single(w, data_parallel=False)
        elif name == "diloco":
            results[name] = run_diloco(w, None)
        else:
            if cfg.diloco.compression is None:
                raise ValueError("the compressed run needs diloco.compression")
            results[name] = run_diloco(w, cfg.diloco.compression)
        r = results[name]
        log(f"  {name:<10} eval loss {r.eval_loss:.4f}  ({r.wall_s:.0f} s)")
    from locoswarm.bench.convergence_report import summarize

    return summarize(w, results)
