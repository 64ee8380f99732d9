"""On CUDA the reference kernels select, quantize and pack exactly what they do on the CPU,
and decode + aggregate is bitwise repeatable. Skipped without a CUDA device."""

from __future__ import annotations

import pytest
import torch

from locoswarm.kernels import ChunkLayout, chunked_topk, dequantize, fused, pack_bits, quantize, unpack_bits
from locoswarm.optim import CompressionConfig, ErrorFeedbackCompressor, aggregate, delta_spec
from locoswarm.protocol import DeltaMessage, decode_delta, encode_delta

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("numel", [1, 1000, 4096, 4097, 1_000_003])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_cuda_selection_codes_and_packing_equal_the_cpu(numel, bits):
    gen = torch.Generator().manual_seed(numel * 10 + bits)
    x = torch.randn(numel, generator=gen) * torch.rand(numel, generator=gen)
    lay = ChunkLayout.for_tensor(numel, 4096, 0.01)
    idx_c, val_c = chunked_topk(x, lay)
    idx_g, val_g = chunked_topk(x.cuda(), lay)
    assert torch.equal(idx_c, idx_g.cpu()) and torch.equal(val_c, val_g.cpu())
    codes_c, scales_c = quantize(val_c, lay, bits)
    codes_g, scales_g = quantize(val_g, lay, bits)
    assert torch.equal(codes_c, codes_g.cpu()) and torch.equal(scales_c, scales_g.cpu())
    assert torch.equal(pack_bits(idx_c, lay.index_bits), pack_bits(idx_g, lay.index_bits).cpu())
    packed = pack_bits(codes_g, bits)
    assert torch.equal(unpack_bits(packed, bits, lay.num_selected), codes_g)
    dec = dequantize(codes_g, scales_g, lay, bits)
    assert torch.isfinite(dec).all()
    torch.testing.assert_close(dec.cpu(), dequantize(codes_c, scales_c, lay, bits), rtol=1e-6, atol=0)


def test_cuda_decode_and_aggregate_is_bitwise_repeatable():
    shapes = [("w", (512, 700)), ("b", (33,))]
    cfg = CompressionConfig(density=0.01, bits=2)
    spec = delta_spec(shapes, cfg, run_id="r", spec_hash=b"h" * 32, max_tokens=1 << 20)
    gen = torch.Generator().manual_seed(3)
    decoded = []
    for i in range(4):
        comp = ErrorFeedbackCompressor(spec.tensors, cfg, "cuda")
        packed, _ = comp.compress([torch.randn(s, generator=gen).cuda() for _, s in shapes])
        msg = DeltaMessage(run_id="r", spec_hash=b"h" * 32, round=0, sender=f"p{i}", num_tokens=100 + i,
                           tensors=tuple(packed))
        decoded.append(decode_delta(encode_delta(msg), spec))
    for rule in ("mean", "masked"):
        runs = [aggregate(decoded[::s], [s_ for _, s_ in shapes], "cuda", rule=rule) for s in (1, -1, 1)]
        for other in runs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_cuda_trainer_picks_bf16_and_fits_a_big_batch_under_a_memory_cap():
    """On an Ampere-or-newer card the trainer computes in bf16; capped at 4 % of the card, a
    batch whose activations cannot fit is split into micro-batches that do, the step runs,
    and the memory torch reserved stays under the cap."""
    import threading
    from dataclasses import replace

    from locoswarm.node.hardware import activation_bytes_per_sequence
    from locoswarm.node.spec import RunSpec
    from locoswarm.node.trainer import Trainer
    from locoswarm.workload.tokenizer import get_tokenizer

    dev = torch.device("cuda")
    spec = replace(RunSpec(), model="small", batch_size=256, data=replace(RunSpec().data, seq_len=256))
    free, total = torch.cuda.mem_get_info(dev)
    cap = 0.04
    try:
        t = Trainer(spec, spec.hash(), shard=0, device=dev, memory_fraction=cap)
        whole = spec.batch_size * activation_bytes_per_sequence(spec, get_tokenizer(spec.tokenizer).vocab_size)
        print(f"micro-batch {t.micro_batch} of {spec.batch_size}; whole batch ≈{whole / 2**30:.1f} GiB, "
              f"cap {cap * total / 2**30:.1f} GiB")
        assert t.precision == ("bf16" if torch.cuda.get_device_capability(dev)[0] >= 8 else "fp16")
        assert t.micro_batch < spec.batch_size and spec.batch_size % t.micro_batch == 0
        torch.cuda.reset_peak_memory_stats(dev)
        t.train_until(threading.Event(), lambda n: n >= 2 * t.tokens_per_step)
        assert all(torch.isfinite(torch.tensor(t.losses)))
        assert torch.cuda.max_memory_reserved(dev) <= cap * total
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, torch.cuda.current_device())
        torch.cuda.empty_cache()


def test_the_default_runs_the_cuda_c_kernel_on_a_large_tensor_with_the_triton_kernels_bits(monkeypatch):
    """Past COMPRESS_CUDA_MIN entries the default is the CUDA C kernel (on Hopper its capped
    entry point), launched once, with the Triton kernel's bits."""
    if fused.triton is None:
        pytest.skip("Triton is not installed")
    n = fused.COMPRESS_CUDA_MIN + 4096 * 3 + 5
    lay = ChunkLayout.for_tensor(n, 4096, 64 / 4096)
    d = torch.randn(n, generator=torch.Generator().manual_seed(11)).cuda()
    dev = torch.device("cuda")
    launched, launch = [], fused.cuda_module.launch
    monkeypatch.setattr(fused.cuda_module, "launch", lambda f, *a: (launched.append(f.value), launch(f, *a)))
    outs = []
    for kernel in (fused.COMPRESS_KERNEL, "triton"):
        err = torch.full((n,), float("nan"), device="cuda")
        outs.append((*fused.compress(err, d, lay, 4, kernel=kernel), err))
    assert launched == [fused._cuda_function(fused.COMPRESS_PTX, fused._compress_entry(256, dev), dev).value]
    assert all(torch.equal(a, b) for a, b in zip(*outs))
