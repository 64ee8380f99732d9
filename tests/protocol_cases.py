"""Shared by the delta wire-format tests (test_protocol.py, test_protocol_fuzz.py): a real
compressed message and helpers that edit its msgpack body."""

from __future__ import annotations

import functools
from typing import Any, Callable

import msgpack
import torch

from locoswarm.kernels import pack_bits, unpack_bits
from locoswarm.optim import CompressionConfig, ErrorFeedbackCompressor, delta_spec
from locoswarm.protocol import DeltaMessage, DeltaSpec, encode_delta

SHAPES = [("w", (64, 100)), ("b", (7,)), ("e", (5000,))]
CFG = CompressionConfig(density=0.02, bits=4, chunk=256)
RUN_ID = "unit-run"
SPEC_HASH = bytes(range(32))
MAX_TOKENS = 1 << 20

# Positions inside one tensor entry: [name, shape, chunk, k, bits, indices, values, scales]
NAME, SHAPE, CHUNK, K, BITS, INDICES, VALUES, SCALES = range(8)
W, B, E = 0, 1, 2  # tensor positions in SHAPES


def make(
    gen: torch.Generator,
    *,
    run_id: str = RUN_ID,
    sender: str = "peer-a",
    round_: int = 3,
    tokens: int = 4096,
    rounds_before: int = 1,
) -> tuple[DeltaSpec, DeltaMessage, list[torch.Tensor], bytes]:
    """A spec, a message compressed by the real compressor (after `rounds_before` earlier
    rounds, so the residual is non-zero), the dense values it sends, and its bytes."""
    spec = delta_spec(SHAPES, CFG, run_id=run_id, spec_hash=SPEC_HASH, max_tokens=MAX_TOKENS)
    comp = ErrorFeedbackCompressor(spec.tensors, CFG, "cpu")
    for _ in range(rounds_before + 1):
        packed, sent = comp.compress([torch.randn(shape, generator=gen) for _, shape in SHAPES])
    msg = DeltaMessage(
        run_id=run_id, spec_hash=SPEC_HASH, round=round_, sender=sender, num_tokens=tokens, tensors=tuple(packed)
    )
    return spec, msg, sent, encode_delta(msg)


@functools.lru_cache(maxsize=1)
def fixed_case() -> tuple[DeltaSpec, bytes]:
    """One valid message, built once for the hypothesis tests (which cannot take fixtures)."""
    spec, _, _, data = make(torch.Generator().manual_seed(1234))
    return spec, data


def unpack(data: bytes) -> dict[str, Any]:
    return msgpack.unpackb(data, raw=False)


def pack(body: Any) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def mutated(data: bytes, mutate: Callable[[dict[str, Any]], None]) -> bytes:
    body = unpack(data)
    mutate(body)
    return pack(body)


def repack_indices(data: bytes, spec: DeltaSpec, tensor: int, edit: Callable[[torch.Tensor], None]) -> bytes:
    lay = spec.tensors[tensor].layout
    body = unpack(data)
    blob = body["tensors"][tensor][INDICES]
    idx = unpack_bits(torch.frombuffer(bytearray(blob), dtype=torch.uint8), lay.index_bits, lay.num_selected)
    edit(idx)
    body["tensors"][tensor][INDICES] = pack_bits(idx, lay.index_bits).numpy().tobytes()
    return pack(body)


def repack_scales(data: bytes, tensor: int, edit: Callable[[torch.Tensor], None]) -> bytes:
    body = unpack(data)
    blob = body["tensors"][tensor][SCALES]
    scales = torch.frombuffer(bytearray(blob), dtype=torch.bfloat16).clone().view(-1, 2)
    edit(scales)
    body["tensors"][tensor][SCALES] = scales.reshape(-1).view(torch.int16).numpy().tobytes()
    return pack(body)
