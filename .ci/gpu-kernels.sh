#!/usr/bin/env bash
# Issue 5 on a lent GPU machine (not CI: CI has no GPU): the GPU tests (reference kernels on
# CUDA, fused kernels, trainer fit) and `locoswarm bench kernels`. The machine is bare: the
# pure-Python dependencies it lacks travel as wheels in .whl/ (see README, "GPU preset").
# Usage: .ci/gpu-kernels.sh OUTDIR [bench flags]
set -euo pipefail
out=${1:?output folder}; shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/locoswarm
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
python3 -m pytest tests/test_gpu.py $(ls tests/test_fused.py 2>/dev/null) -q -p no:cacheprovider -rs 2>&1 \
  | tee "$out/gpu-tests.log" || true
python3 -m locoswarm bench kernels --json "$out/kernels.json" "$@" 2>&1 | tee "$out/kernels.log"
