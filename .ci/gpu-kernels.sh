#!/usr/bin/env bash
# Issue 5 on a lent GPU machine (not CI: CI has no GPU): the GPU tests (reference kernels on
# CUDA, fused kernels, trainer fit) and `locoswarm bench kernels`. The machine is bare: the
# pure-Python dependencies it lacks travel as wheels in .whl/ (see README, "GPU preset").
# Usage: .ci/gpu-kernels.sh OUTDIR [bench flags]
set -euo pipefail
out=${1:?output folder}; shift
source "$(dirname "$0")/gpu-env.sh"
python3 -P -m pytest tests/test_gpu.py tests/test_fused.py -q -p no:cacheprovider -rs 2>&1 \
  | tee "$out/gpu-tests.log" || true
python3 -P -m locoswarm bench kernels --json "$out/kernels.json" "$@" 2>&1 | tee "$out/kernels.log"
