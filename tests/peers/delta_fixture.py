"""The delta the exchange tests serve: its spec and a real compressed delta of it. No
hivemind here, so that the py-libp2p peer (lp2p_delta.py) builds the very bytes that the
p2pd peer (serve_delta.py) does."""

from __future__ import annotations

import torch

from locoswarm.optim import CompressionConfig, ErrorFeedbackCompressor, delta_spec
from locoswarm.protocol import DeltaMessage, encode_delta

SHAPES = [("w", (64, 100)), ("b", (33,))]
CFG = CompressionConfig(density=0.02, bits=2, chunk=1024)
SPEC = delta_spec(SHAPES, CFG, run_id="exchange-test", spec_hash=b"s" * 32, max_tokens=10_000)
ROUND = 3


def good_blob(round_: int = ROUND, *, sender: str = "server", seed: int = 11) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    comp = ErrorFeedbackCompressor(SPEC.tensors, CFG, "cpu")
    packed, _ = comp.compress([torch.randn(s, generator=gen) for _, s in SHAPES])
    return encode_delta(DeltaMessage(run_id="exchange-test", spec_hash=b"s" * 32, round=round_, sender=sender,
                                     num_tokens=1000, tensors=tuple(packed)))
