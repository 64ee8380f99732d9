"""What an identity costs in a run that asks for proof of work (protocol/work.py): the time of
one scrypt evaluation (a check, and a mining try) and the time to mine a nonce at a few small
difficulties, measured; the expected time at larger ones follows (2^bits tries), for one
honest peer and for an attacker minting a thousand identities.
"""

from __future__ import annotations

import os
import statistics
import time

from locoswarm.protocol.work import SCRYPT_MEMORY_BYTES, SCRYPT_N, SCRYPT_R, mine, work_digest


def measure(bits: tuple[int, ...] = (8, 10, 12), *, evaluations: int = 200, mines: int = 5,
            project: tuple[int, ...] = (12, 16, 20, 24)) -> dict:
    """Median seconds of one evaluation over `evaluations`; for each of `bits`, the mean
    seconds and tries of `mines` minings (fresh random peer ids: the tries are geometric, the
    mean estimates 2^bits); the projection of each of `project` from the evaluation time."""
    spec_hash = os.urandom(32)
    times = []
    for i in range(evaluations):
        t0 = time.perf_counter()
        work_digest(spec_hash, "12D3KooWBench", i)
        times.append(time.perf_counter() - t0)
    eval_s = statistics.median(times)
    mined = {}
    for b in bits:
        runs = []
        for _ in range(mines):
            peer = "12D3KooW" + os.urandom(16).hex()
            t0 = time.perf_counter()
            nonce = mine(spec_hash, peer, b)
            runs.append((time.perf_counter() - t0, nonce + 1))
        mined[b] = {"seconds_mean": statistics.fmean(s for s, _ in runs),
                    "tries_mean": statistics.fmean(t for _, t in runs), "runs": len(runs), "expected_tries": 2 ** b}
    return {"scrypt": {"n": SCRYPT_N, "r": SCRYPT_R, "memory_bytes": SCRYPT_MEMORY_BYTES},
            "evaluation_s": eval_s, "mined": mined,
            "projected": {b: {"one_identity_s": eval_s * 2 ** b, "thousand_identities_core_h": eval_s * 2 ** b * 1000 / 3600}
                          for b in project}}


def format_result(r: dict) -> str:
    lines = [f"scrypt N={r['scrypt']['n']}, r={r['scrypt']['r']} ({r['scrypt']['memory_bytes'] >> 20} MiB): "
             f"{1000 * r['evaluation_s']:.2f} ms an evaluation (a check of one identity, once)"]
    for b, m in r["mined"].items():
        lines.append(f"  mined at {b:2d} bits: {m['seconds_mean']:.2f} s, {m['tries_mean']:,.0f} tries "
                     f"(mean of {m['runs']}; 2^{b} = {m['expected_tries']:,} expected)")
    for b, p in r["projected"].items():
        lines.append(f"  at {b:2d} bits: {p['one_identity_s']:,.0f} s of one core per identity; "
                     f"a thousand identities {p['thousand_identities_core_h']:,.1f} core-hours")
    return "\n".join(lines)
