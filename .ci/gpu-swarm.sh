#!/usr/bin/env bash
# On a lent many-core GPU machine (no hivemind there): the control-plane checks that depend on
# machine speed. Needs .whl/ and .whl-net/ carried (hivemind 1.1.12 and its dependencies as
# wheels for the machine's Python). Writes logs and JSON to $OUT.
#   1. the silent-split fault case (it failed 2 of 2 on 16 cores before the anchor chains);
#   2. bench swarm, 4 CPU peers: train_time_share on a fast machine;
#   3. bench swarm, 24 CPU peers: every peer sees the others and trains.
set -uo pipefail
out=${OUT:?}
. .ci/gpu-env.sh >/dev/null
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-net/*.whl >/dev/null 2>&1
chmod +x /tmp/site/hivemind/hivemind_cli/p2pd
export LOCOSWARM_DEVICE=cpu OMP_NUM_THREADS=1
nproc > "$out/machine.txt"
timeout 150 pytest -q -p no:cacheprovider tests/test_faults.py -k silent_split > "$out/split.log" 2>&1
echo "split rc=$?" | tee -a "$out/summary.txt"
timeout 190 python3 -m locoswarm bench swarm --peers 4 --rounds 24 --no-simulate --json "$out/swarm4.json" \
    > "$out/swarm4.log" 2>&1; echo "swarm4 rc=$?" | tee -a "$out/summary.txt"
timeout 230 python3 -m locoswarm bench swarm --peers 24 --rounds 4 --no-simulate --json "$out/swarm24.json" \
    > "$out/swarm24.log" 2>&1; echo "swarm24 rc=$?" | tee -a "$out/summary.txt"
tail -3 "$out/split.log"; tail -12 "$out/swarm4.log"; tail -12 "$out/swarm24.log"
