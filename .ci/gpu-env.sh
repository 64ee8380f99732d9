# Sourced by the .ci/gpu-*.sh scripts on a lent GPU machine: installs the pure-Python
# dependencies the bare machine lacks from the wheels in .whl/, puts the repository root on
# the path as the package `locoswarm` (not installed), and records the GPU and versions
# in "$out/gpu.txt". Expects `out` set.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/locoswarm
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$out/gpu.txt"
python3 -c "import triton; print('triton', triton.__version__)" 2>/dev/null | tee -a "$out/gpu.txt" || true
