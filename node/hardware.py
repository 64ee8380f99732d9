"""What this machine has, and whether it can take part in a run (`locoswarm doctor`): the
device (CUDA, MPS or CPU) and its memory, the precision the trainer uses on it, and an
estimate of what a run spec needs against what is free.

Nothing here touches CUDA unless the device is CUDA: `pick_device` decides first (asking
only whether CUDA is present, which creates no context), and every call that would create
a context on the GPU — memory, capability, properties — is made for a CUDA device only, so a
CPU peer on a gamer's machine holds no GPU memory (docs/hardware.md).

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

from locoswarm.node.checks import SettingError, check_device


@dataclass(frozen=True, slots=True)
class Device:
    kind: str
    """cuda, mps or cpu."""
    name: str
    total_bytes: int
    free_bytes: int
    precision: str
    """What the trainer computes in (`choose_precision` with "auto")."""


def detect(device: str = "auto") -> Device:
    import psutil
    import torch

    dev = pick_device(device)
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        name = torch.cuda.get_device_name(dev)
        return Device("cuda", name, total, free, choose_precision(dev))
    mem = psutil.virtual_memory()
    if dev.type == "mps":
        return Device("mps", "Apple GPU (unified memory)", mem.total, mem.available, choose_precision(dev))
    import platform

    return Device("cpu", platform.processor() or platform.machine(), mem.total, mem.available, choose_precision(dev))


def pick_device(name: str):
    """The torch.device to train on: `auto` takes CUDA, then MPS, then the CPU; an explicit
    device that is absent is a SettingError naming it."""
    import torch

    check_device("device", name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SettingError("device", name, "no CUDA device is present")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        last = torch.cuda.device_count() - 1
        raise SettingError("device", name, f"this process sees CUDA devices cuda:0..cuda:{last} "
                                           "(after CUDA_VISIBLE_DEVICES)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SettingError("device", name, "Apple MPS is not available here")
    return torch.device(name)


@dataclass(frozen=True, slots=True)
class GpuId:
    """One physical GPU, named the same way by CUDA and by NVML (whose device numbering
    differs from torch's under CUDA_VISIBLE_DEVICES or another CUDA_DEVICE_ORDER)."""

    uuid: str
    """Lower case, without NVML's "GPU-"/"MIG-" prefix; empty where torch does not say."""
    pci_bus_id: str
    """"domain:bus:device.function" in lower-case hex ("0000:3b:00.0"); empty where torch does not say."""


def gpu_id(device) -> GpuId | None:
    """The GPU a CUDA `device` (a torch.device) is, None for any other device; for a CUDA
    device this initialises CUDA (the peer trains there anyway)."""
    if device.type != "cuda":
        return None
    import torch

    props = torch.cuda.get_device_properties(device)
    uuid = str(getattr(props, "uuid", "") or "").lower().removeprefix("gpu-").removeprefix("mig-")
    bus = ""
    if all(hasattr(props, f) for f in ("pci_domain_id", "pci_bus_id", "pci_device_id")):
        bus = f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    return GpuId(uuid=uuid, pci_bus_id=bus)


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def choose_precision(device, requested: str = "auto") -> str:
    """What the inner steps compute in on `device` (a torch.device): bf16 autocast on CUDA
    of compute capability 8 (Ampere) or newer; fp16 autocast with a loss scaler on older
    CUDA, whose tensor cores have fp16 but no bf16; fp32 on the CPU (autocast there is
    slower than fp32 on most CPUs) and on Apple MPS, where mixed precision has not been
    tried on a Mac by this project. An explicit `requested` precision is honoured, except
    bf16 on a CUDA card without it (ValueError)."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    has_bf16 = True
    if device.type == "cuda":
        import torch

        has_bf16 = torch.cuda.get_device_capability(device)[0] >= 8
    if requested != "auto":
        if requested == "bf16" and not has_bf16:
            raise SettingError("precision", requested, "this CUDA card predates bf16 (compute capability < 8); "
                                                       "use fp16")
        return requested
    if device.type == "cuda":
        return "bf16" if has_bf16 else "fp16"
    return "fp32"


def fit_micro_batch(batch: int, per_sequence_bytes: int, free_bytes: int, headroom: float = 0.8) -> int:
    """The largest divisor of `batch` whose activations (`per_sequence_bytes` each) fit in
    `headroom` of `free_bytes`; at least 1. A divisor, so the spec's batch per step is
    kept exactly: the step accumulates batch / micro equal micro-batches."""
    budget = headroom * max(0, free_bytes)
    for micro in range(batch, 0, -1):
        if batch % micro == 0 and micro * per_sequence_bytes <= budget:
            return micro
    return 1


def next_micro_batch(batch: int, micro: int) -> int | None:
    """The next smaller divisor of `batch` below `micro` (after running out of memory), or None."""
    return next((m for m in range(micro - 1, 0, -1) if batch % m == 0), None)


def _model_config(spec, vocab_size: int):
    from locoswarm.workload.model import model_config

    if spec.model == "hf:llama":
        from locoswarm.workload.model import _hf_config

        return _hf_config(vocab_size, spec.data.seq_len)
    return model_config(spec.model, vocab_size, spec.data.seq_len)


def activation_bytes_per_sequence(spec, vocab_size: int) -> int:
    """Activations kept for backward for one sequence of the spec's length (fp32 figure;
    bf16 autocast needs less)."""
    cfg = _model_config(spec, vocab_size)
    seq = spec.data.seq_len
    return 34 * seq * cfg.dim * cfg.num_layers + 8 * seq * cfg.vocab_size


def estimate_bytes(spec, vocab_size: int, micro_batch: int | None = None) -> dict[str, int]:
    """Planning estimate of a spec's memory, split by where it lives; activations for
    `micro_batch` sequences at a time (default: the whole batch)."""
    cfg = _model_config(spec, vocab_size)
    per_layer = 4 * cfg.dim * cfg.dim + 3 * cfg.dim * cfg.ffn_dim + 2 * cfg.dim
    from locoswarm.workload.model import padded_vocab

    params = cfg.num_layers * per_layer + padded_vocab(cfg.vocab_size) * cfg.dim + cfg.dim  # head tied to embedding
    activations = (micro_batch or spec.batch_size) * activation_bytes_per_sequence(spec, vocab_size)
    outer = 17 * params
    return {"params": params, "training": 16 * params + activations, "outer": outer}


def report(spec, device: str = "auto", memory_fraction: float = 0.0) -> dict:
    """Everything `locoswarm doctor` prints, as a dict (its --json). `memory_fraction`
    (0: none) caps the share of the GPU's memory the daemon may take."""
    import psutil

    from locoswarm.workload.tokenizer import get_tokenizer

    dev = detect(device)
    vocab = get_tokenizer(spec.tokenizer).vocab_size
    per_sequence = activation_bytes_per_sequence(spec, vocab)
    need = estimate_bytes(spec, vocab, micro_batch=1)
    outer_on_device = spec.diloco.outer.device == "model"
    fixed = need["training"] - per_sequence + (need["outer"] if outer_on_device else 0)
    host_free = psutil.virtual_memory().available
    on_host = 0 if outer_on_device else need["outer"]
    usable = dev.free_bytes
    if memory_fraction > 0 and dev.kind == "cuda":
        usable = min(usable, int(memory_fraction * dev.total_bytes))
    if dev.kind == "cpu":
        usable = min(usable, host_free - on_host)  # one memory for both
    micro = fit_micro_batch(spec.batch_size, per_sequence, usable - fixed)
    on_device = fixed + micro * per_sequence
    fits = on_device <= usable and on_host <= host_free
    return {"device": asdict(dev), "spec_hash": spec.hash().hex(), "model": spec.model, "params": need["params"],
            "batch_size": spec.batch_size, "micro_batch": micro, "need_on_device_bytes": on_device,
            "need_on_host_bytes": on_host, "usable_bytes": usable, "host_free_bytes": host_free, "fits": fits}
