#!/usr/bin/env bash
# On a lent many-core GPU machine (no hivemind there): the control-plane checks that depend on
# machine speed. Needs .whl/ and .whl-net/ carried (hivemind 1.1.12 and its dependencies as
# wheels for the machine's Python). Writes logs and JSON to $OUT. One part per call (a call
# is limited to 10 minutes):
#   overhead: the GPU kernel tests (top-k on CUDA against the CPU rule), bench swarm with 4 CPU
#             peers (train_time_share on a fast machine) and with 6 peers and one fake identity;
#   scale:    the silent-split fault case (it failed 2 of 2 on 16 cores before the anchor
#             chains) and bench swarm with 24 CPU peers (every peer sees the others and trains);
#   churn:    bench swarm with 6 peers, a random one SIGKILLed and restarted every 10 s on
#             average (rounds/min with churn against the same run's clean phase).
set -uo pipefail
out=${OUT:?}
part=${1:?usage: .ci/gpu-swarm.sh overhead|scale|churn}
. .ci/gpu-env.sh >/dev/null
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-net/*.whl >/dev/null 2>&1
chmod +x /tmp/site/hivemind/hivemind_cli/p2pd
nproc > "$out/machine.txt"
swarm() {  # name timeout args...
    local name=$1 limit=$2; shift 2
    LOCOSWARM_DEVICE=cpu OMP_NUM_THREADS=1 timeout "$limit" python3 -m locoswarm bench swarm --no-simulate \
        --json "$out/$name.json" "$@" > "$out/$name.log" 2>&1
    echo "$name rc=$?" | tee -a "$out/summary.txt"; tail -12 "$out/$name.log"
}
if [ "$part" = overhead ]; then
    timeout 120 pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_kernels.py > "$out/kernels.log" 2>&1
    echo "kernels rc=$?" | tee -a "$out/summary.txt"; tail -3 "$out/kernels.log"
    swarm swarm4 190 --peers 4 --rounds 24
    swarm fakes6 240 --peers 6 --rounds 40 --fakes 1
elif [ "$part" = churn ]; then
    swarm churn6 300 --peers 6 --rounds 48 --churn 10
else
    LOCOSWARM_DEVICE=cpu OMP_NUM_THREADS=1 timeout 150 pytest -q -p no:cacheprovider tests/test_faults.py \
        -k silent_split > "$out/split.log" 2>&1
    echo "split rc=$?" | tee -a "$out/summary.txt"; tail -3 "$out/split.log"
    swarm swarm24 230 --peers 24 --rounds 4
fi
