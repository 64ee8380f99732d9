#!/usr/bin/env bash
# On a lent many-core GPU machine (no hivemind there): the control-plane checks that depend on
# machine speed. Needs .whl/ and .whl-net/ carried (hivemind 1.1.12, its dependencies and the
# test dependencies as wheels for the machine's Python). Writes logs and JSON to $OUT. Takes
# one or more parts (a call is limited to 10 minutes):
#   kernels: the GPU kernel tests (top-k on CUDA against the CPU rule);
#   swarm4:  bench swarm with 4 CPU peers (train_time_share on a fast machine);
#   fakes:   6 peers and one fake identity (rounds of 0.6 s here: 120 rounds for a fake
#            phase of tens of seconds);
#   keys:    6 peers and 40 fake identities signed by one process (--fake-mode keys), then the
#            test that runs 16 of them among 3 peers (its timing on a fast machine);
#   split:   the silent-split fault case (it failed 2 of 2 on 16 cores before the anchor chains);
#   swarm24: bench swarm with 24 CPU peers (every peer sees the others and trains);
#   validate24: a round's exchange compute on one core (bench checks, 17 deltas), then 24 CPU
#            peers × 32 rounds and `bench scale --validate` of that run (the model against real
#            daemons at 24 peers, with this machine's cores and request round trip);
#   validate16: 16 CPU peers × 96 rounds (one per core, not oversubscribed) and `bench scale
#            --validate` of it: the control bytes with p2pd's closed connections counted
#            (transport_closed_bytes_per_peer_per_round says what the earlier count dropped);
#   catchup: the daemon tests of catching up by the rounds' deltas (a joiner behind, a peer
#            SIGKILLed and restarted, a discarded round);
#   churn:   6 peers, a random one SIGKILLed and restarted every 10 s on average (160 rounds:
#            at 48 the rounds left after the clean phase took less than two restarts here);
#   tree16:  16 CPU peers × 32 rounds with full rounds, then with tree rounds in rows of 4
#            (issue 18 item 2: the same peers, seeds and rounds; loss, requests and bytes); the
#            tree run's peer logs come back as tree16-logs.tgz;
#   loud:    3 peers × 48 rounds clean, then with 4 loud fake identities in the middle half
#            (--fake-mode loud: issue 19's sybil group serving deltas ten times an honest one's);
#   flood:   3 peers, 48 rounds, 3 identities flooding state requests in the middle half, with
#            the default state upload budget (flood3) and without it (flood3-nobudget,
#            LOCOSWARM_STATE_UPLOAD_MBIT=0): how much of the 2-core figures was the flooders
#            sharing the peers' cores.
# Shorthands: overhead = kernels swarm4 fakes; scale = split swarm24.
set -uo pipefail
out=${OUT:?}
[ $# -gt 0 ] || { echo "usage: .ci/gpu-swarm.sh PART..." >&2; exit 2; }
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
parts=()
for p in "$@"; do
    case $p in overhead) parts+=(kernels swarm4 fakes);; scale) parts+=(split swarm24);; *) parts+=("$p");; esac
done
n_split=0
for part in "${parts[@]}"; do
    start=$SECONDS
    case $part in
    kernels)
        timeout 120 pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_kernels.py > "$out/kernels.log" 2>&1
        echo "kernels rc=$?" | tee -a "$out/summary.txt"; tail -3 "$out/kernels.log";;
    swarm4) swarm swarm4 190 --peers 4 --rounds 24;;
    fakes) swarm fakes6 240 --peers 6 --rounds 120 --fakes 1;;
    keys)
        swarm keys40 240 --peers 6 --rounds 120 --fakes 40 --fake-mode keys
        LOCOSWARM_DEVICE=cpu OMP_NUM_THREADS=1 timeout 150 pytest -q -p no:cacheprovider tests/test_swarm_churn.py \
            -k fake_identities > "$out/keys-test.log" 2>&1
        echo "keys-test rc=$?" | tee -a "$out/summary.txt"; tail -3 "$out/keys-test.log";;
    split)  # split.log, then split-2.log, split-3.log… when given more than once
        n_split=$((n_split + 1)); log=$out/split$([ $n_split -gt 1 ] && echo "-$n_split").log
        LOCOSWARM_DEVICE=cpu OMP_NUM_THREADS=1 timeout 150 pytest -q -p no:cacheprovider tests/test_faults.py \
            -k silent_split > "$log" 2>&1
        echo "split rc=$?" | tee -a "$out/summary.txt"; tail -3 "$log";;
    swarm24) swarm swarm24 230 --peers 24 --rounds 4;;
    validate24)  # long enough for the registry's reads to count, then the model against it (issue 18)
        # first, alone on the machine: a round's exchange compute on one of its cores (what
        # bench scale charges per delta was measured on the 2-core machine's)
        LOCOSWARM_DEVICE=cpu OMP_NUM_THREADS=1 timeout 120 python3 -m locoswarm bench checks --device cpu \
            --replicas 17 --json "$out/checks17.json" > "$out/checks17.log" 2>&1
        echo "checks17 rc=$?" | tee -a "$out/summary.txt"; tail -6 "$out/checks17.log"
        swarm swarm24x32 330 --peers 24 --rounds 32
        timeout 150 python3 -m locoswarm bench scale --validate "$out/swarm24x32.json" \
            --json "$out/validate24x32.json" > "$out/validate24x32.log" 2>&1
        echo "validate24 rc=$?" | tee -a "$out/summary.txt"; tail -6 "$out/validate24x32.log";;
    validate16)  # validate16.json, then validate16-2.json… when given more than once
        n_v16=$((${n_v16:-0} + 1)); name=full16x96$([ $n_v16 -gt 1 ] && echo "-$n_v16")
        swarm "$name" 280 --peers 16 --rounds 96
        timeout 120 python3 -m locoswarm bench scale --validate "$out/$name.json" \
            --json "$out/validate-$name.json" > "$out/validate-$name.log" 2>&1
        echo "validate-$name rc=$?" | tee -a "$out/summary.txt"; tail -6 "$out/validate-$name.log";;
    catchup)  # the catch-ups by the rounds' deltas, where rounds are fastest (node/replay.py)
        LOCOSWARM_DEVICE=cpu OMP_NUM_THREADS=1 timeout 400 pytest -q -p no:cacheprovider tests/test_daemon.py \
            tests/test_faults.py -k "catches_up or failed_round" > "$out/catchup.log" 2>&1
        echo "catchup rc=$?" | tee -a "$out/summary.txt"; tail -3 "$out/catchup.log";;
    churn) swarm churn6 300 --peers 6 --rounds 160 --churn 10;;
    loud)
        swarm clean3x48 150 --peers 3 --rounds 48
        swarm loud3x48 200 --peers 3 --rounds 48 --fakes 4 --fake-mode loud;;
    tree16)
        swarm full16x32 250 --peers 16 --rounds 32
        swarm tree16x32 250 --peers 16 --rounds 32 --row-size 4 --keep-dir /tmp/tree16
        # the peers' logs, to read why rows split (their state directories stay behind)
        (cd /tmp/tree16 && tar czf "$out/tree16-logs.tgz" ./*.log ./*.jsonl);;
    flood)
        swarm flood3 150 --peers 3 --rounds 48 --flood 3
        (export LOCOSWARM_STATE_UPLOAD_MBIT=0; swarm flood3-nobudget 150 --peers 3 --rounds 48 --flood 3);;
    *) echo "unknown part $part" >&2; exit 2;;
    esac
    echo "  $part took $((SECONDS - start)) s" | tee -a "$out/summary.txt"
done
