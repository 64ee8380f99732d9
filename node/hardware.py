"""What this machine has, and whether it can take part in a run (issue 4, `locoswarm
doctor`): the device (CUDA, MPS or CPU) and its memory, the precision the trainer uses on
it, and an estimate of what a run spec needs against what is free.

The estimate counts, per parameter: the replica in fp32 with its gradient and AdamW's two
moments (16 bytes) on the training device; the outer parameters and momentum, the
error-feedback residual, the sent mask and the boundary snapshot (17 bytes) on the outer
state's device; plus activations, ≈ 34 · batch · seq_len · dim bytes per layer (attention
and MLP intermediates kept for backward) and the logits' fp32 values and gradient
(8 · batch · seq_len · vocab). It is a planning figure, checked against the measured peak
of the tiny model on this CPU in the tests, not a promise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True, slots=True)
class Device:
    kind: str
    """cuda, mps or cpu."""
    name: str
    total_bytes: int
    free_bytes: int
    precision: str
    """What the trainer computes in: bf16 autocast on CUDA, fp32 elsewhere."""


def detect(device: str = "auto") -> Device:
    import psutil
    import torch

    from locoswarm.node.trainer import pick_device

    dev = pick_device(device)
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        name = torch.cuda.get_device_name(dev)
        # bf16 autocast needs Ampere (compute capability 8) or newer; older cards would want
        # fp16 with a grad scaler, which the trainer does not do yet.
        major, _ = torch.cuda.get_device_capability(dev)
        return Device("cuda", name, total, free, "bf16 autocast" if major >= 8 else "fp32 (no bf16 before sm_80)")
    mem = psutil.virtual_memory()
    if dev.type == "mps":
        return Device("mps", "Apple GPU (unified memory)", mem.total, mem.available, "fp32")
    import platform

    return Device("cpu", platform.processor() or platform.machine(), mem.total, mem.available, "fp32")


def estimate_bytes(spec, vocab_size: int) -> dict[str, int]:
    """Planning estimate of a spec's memory, split by where it lives."""
    from locoswarm.node.workload.model import model_config

    if spec.model == "hf:llama":
        from locoswarm.node.workload.model import _hf_config

        cfg = _hf_config(vocab_size, spec.data.seq_len)
    else:
        cfg = model_config(spec.model, vocab_size, spec.data.seq_len)
    per_layer = 4 * cfg.dim * cfg.dim + 3 * cfg.dim * cfg.ffn_dim + 2 * cfg.dim
    params = cfg.num_layers * per_layer + cfg.vocab_size * cfg.dim + cfg.dim  # the head is tied to the embedding
    tokens = spec.batch_size * spec.data.seq_len
    activations = 34 * tokens * cfg.dim * cfg.num_layers + 8 * tokens * cfg.vocab_size
    outer = 17 * params
    return {"params": params, "training": 16 * params + activations, "outer": outer}


def report(spec, device: str = "auto") -> dict:
    """Everything `locoswarm doctor` prints, as a dict (its --json)."""
    import psutil

    from locoswarm.node.workload.tokenizer import get_tokenizer

    dev = detect(device)
    need = estimate_bytes(spec, get_tokenizer(spec.tokenizer).vocab_size)
    on_device = need["training"] + (need["outer"] if spec.diloco.outer.device == "model" else 0)
    host_free = psutil.virtual_memory().available
    on_host = need["outer"] if spec.diloco.outer.device == "cpu" else 0
    fits = on_device <= dev.free_bytes and (dev.kind != "cpu" or on_device + on_host <= host_free) \
        and on_host <= host_free
    return {"device": asdict(dev), "spec_hash": spec.hash().hex(), "model": spec.model, "params": need["params"],
            "need_on_device_bytes": on_device, "need_on_host_bytes": on_host, "host_free_bytes": host_free,
            "fits": fits}
