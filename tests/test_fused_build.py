"""The fused Triton kernels on a machine without a GPU (as CI is): they compile for Hopper
(sm_90) through Triton's own compiler and ptxas, and they give the torch references' bits
under Triton's CPU interpreter. Skipped where Triton is not installed (it is in the test
extra on Linux x86-64) and, for the interpreter run, where CUDA is there (tests/test_fused.py
then runs on the GPU itself)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (test extra, Linux x86-64 only)")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from locoswarm.kernels import fused, fused_select  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
COMPRESS_SIG = {"err_ptr": "*fp32", "delta_ptr": "*fp32", "decay": "fp32", "recip": "fp32", "idx_ptr": "*i32",
                "code_ptr": "*i32", "scale_ptr": "*fp32", "sent_ptr": "*u8", "todo_ptr": "*i32", "numel": "i64"}
ACCUMULATE_SIG = {"acc_ptr": "*fp32", "cover_ptr": "*fp32", "idx_ptr": "*i32", "code_ptr": "*i32", "scale_ptr": "*fp32",
                  "shares_ptr": "*fp32", "recip": "fp32", "numel": "i64", "idx_words": "i64", "code_words": "i64",
                  "num_peers": "i32"}


def _compile(fn, signature: dict, constexprs: dict, num_warps: int):
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=HOPPER, options={"num_warps": num_warps})


@pytest.mark.parametrize("k, bits, mode, sent", [(64, 4, 1, False), (15, 2, 0, True), (410, 8, 2, False)])
def test_the_compression_kernels_compile_for_hopper(k, bits, mode, sent):
    """Both compression kernels, for the layouts of the bench (k 64), the default spec (k 15)
    and a dense one (10 %): a branch whose variables differ in shape, say, fails here, not
    on the lent GPU."""
    cb = max(16, min(2048, triton.next_power_of_2(8 * k)))
    rows = triton.next_power_of_2(k)
    common = dict(CHUNK=4096, K=k, INDEX_BITS=12, BITS=bits, SENT=sent, EXACT=True)
    main = _compile(fused_select.compress_kernel, COMPRESS_SIG, dict(common, ROWS=rows, CB=cb, MODE=mode),
                    fused.compress_warps(4096))
    full = _compile(fused_select.compress_full_kernel, COMPRESS_SIG, common, fused.FULL_WARPS)
    for kernel in (main, full):
        assert re.findall(r"\satom\.global\.[\w.]*\bor\.b32", kernel.asm["ptx"]) and kernel.asm["cubin"], "no stream OR"


def test_the_accumulate_kernel_compiles_for_hopper_without_atomics():
    """Decode and accumulate must stay free of atomics (its sums would depend on their order)."""
    kernel = _compile(fused._accumulate_kernel, ACCUMULATE_SIG,
                      dict(NUM_GROUPS=2, CHUNK=4096, K=64, KB=64, GROUP=8, INDEX_BITS=12, BITS=4, COVER=True,
                           EXACT=True), 4)
    assert kernel.asm["cubin"] and not re.findall(r"\s(atom|red)\.", kernel.asm["ptx"])


SHIPPED = [(fused.ACCUMULATE_PTX, "accumulate_kernel"), (fused.COMPRESS_PTX, "compress_kernel")]
CAPPED_SPILL_BYTES = 32
"""Spill stores compress.cu's register-capped entry point may make (20 bytes on sm_90a)."""


@pytest.mark.parametrize("ptx, entry", SHIPPED, ids=lambda v: getattr(v, "name", v))
@pytest.mark.parametrize("arch", ["sm_75", "sm_90a"])
def test_the_shipped_ptx_assembles_for_turing_and_hopper(ptx, entry, arch, tmp_path):
    """kernels/*.ptx is what CUDA peers run (their driver compiles it): it must be valid PTX
    for the oldest and newest GPUs we serve, with no spills; decode and accumulate stays free
    of atomics (its sums would depend on their order), compression ORs its streams with them."""
    text = ptx.read_text()
    assert f".entry {entry}" in text
    atomics = re.findall(r"\s(atom|red)\.", text)
    assert bool(atomics) == (entry == "compress_kernel"), atomics
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    done = subprocess.run([str(ptxas), f"-arch={arch}", "-v", str(ptx), "-o", str(tmp_path / "k.cubin")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    spills = {name: int(stores) for name, stores in
              re.findall(r"Function properties for (\w+)\n\s*\d+ bytes stack frame, (\d+) bytes spill stores", done.stderr)}
    assert entry in spills and spills[entry] == 0, done.stderr
    # The capped entry trades a few spilled words for a fifth block a multiprocessor.
    assert all(stores == 0 or (name == "compress_kernel_256" and stores <= CAPPED_SPILL_BYTES)
               for name, stores in spills.items()), spills


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc here to regenerate the PTX with")
@pytest.mark.parametrize("ptx, entry", SHIPPED, ids=lambda v: getattr(v, "name", v))
def test_the_shipped_ptx_is_what_its_cuda_source_compiles_to(ptx, entry, tmp_path):
    """The PTX is made by hand from its .cu (fused.ACCUMULATE_PTX's docstring says how): a
    source changed without regenerating it fails here wherever that same nvcc is installed."""
    out = tmp_path / ptx.name
    done = subprocess.run(["nvcc", "-arch=compute_75", "-ptx", "-O3", str(ptx.with_suffix(".cu")), "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    build = [line for line in ptx.read_text().splitlines() if line.startswith("// Compiler Build ID")]
    if build != [line for line in out.read_text().splitlines() if line.startswith("// Compiler Build ID")]:
        pytest.skip(f"this nvcc is not the one that made {ptx.name} ({build}): its PTX may differ")

    def body(text: str) -> list[str]:  # the code, without the compiler's banner and PTX version
        return [line for line in text.splitlines() if not line.startswith(("//", ".version"))]

    assert body(out.read_text()) == body(ptx.read_text()), f"{ptx.name} is stale: regenerate it from its .cu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, tests/test_fused.py runs on the GPU itself")
@pytest.mark.timeout(600)
def test_the_fused_kernels_give_the_references_bits_under_the_interpreter():
    root = Path(__file__).resolve().parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-m", "pytest", str(root / "test_fused.py"), "-q", "-p", "no:cacheprovider"],
                          env=env, capture_output=True, text=True, timeout=540)
    tail = done.stdout[-3000:]
    assert done.returncode == 0, tail
    assert " passed" in tail and "skipped" not in tail.splitlines()[-1], tail
