"""The state the state-download tests serve: its layout, round, chain and earned weight, and
seeded tensors. No hivemind here, so that the py-libp2p side (lp2p_bridge.py) serves the very
state the p2pd donor (serve_state.py) does."""

from __future__ import annotations

import torch

from locoswarm.protocol.state import StateSpec

SPEC = StateSpec(run_id="state-test", spec_hash=b"t" * 32,
                 tensors=(("param.0", (64, 100)), ("param.1", (7,)), ("momentum.0", (64, 100))))
ROUND = 7
CHAIN = "cd" * 16
LEDGER = (("QmDonorA", 9000), ("QmDonorB", 120))
"""The round chain the donor's manifest gives (the same for every mode: one lineage)."""
FORGED_ROUNDS = 3
FORGED_CHAIN = "ee" * 16
CHUNK_BYTES = 4096
RESIDUAL_SPEC = StateSpec(run_id=SPEC.run_id, spec_hash=SPEC.spec_hash, dtype="bfloat16",
                          tensors=(("residual.0", (64, 100)), ("residual.1", (7,))))
RESIDUAL_SEED, OWN_RESIDUAL_SEED = 11, 12
BUDGET_BYTES_PER_S = 20_000


def state(seed: int = 5, spec: StateSpec = SPEC) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen) for n, s in spec.tensors}


def residual(mode: str) -> dict[str, torch.Tensor] | None:
    """What a donor of `mode` serves as its residual (bfloat16, as a trainer does)."""
    if mode == "no-residual":
        return None
    out = state(OWN_RESIDUAL_SEED if mode == "own-residual" else RESIDUAL_SEED, RESIDUAL_SPEC)
    if mode == "nan-residual":
        out["residual.1"][3] = float("nan")
    return {n: t.to(torch.bfloat16) for n, t in out.items()}
