#!/usr/bin/env bash
# Runs the GPU tests and `locoswarm bench convergence --preset gpu` on a lent GPU machine (not CI: CI has no
# GPU). The machine is bare: the pure-Python dependencies it lacks travel as wheels in
# .whl/ (see README, "GPU preset"), and the repository root is put on the path as the
# package `locoswarm` without installing it. Usage: .ci/gpu-bench.sh OUTDIR [extra flags]
set -euo pipefail
out=${1:?output folder}; shift
source "$(dirname "$0")/gpu-env.sh"
python3 -P -m pytest tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log"
python3 -P -m locoswarm bench convergence --preset gpu --json "$out/gpu.json" "$@" 2>&1 | tee "$out/gpu.log"
