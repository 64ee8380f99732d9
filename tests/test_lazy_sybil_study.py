"""bench/lazy_sybil.py, issue 19's study of deltas made from the public outer state: every
replica checks every other honest delta and each lazy kind each round from the second, with
the figures the docs quote (docs/trust.md)."""

from __future__ import annotations

from locoswarm.bench.lazy_sybil import KINDS, THRESHOLD, measure


def test_every_replica_checks_the_honest_deltas_and_each_lazy_kind_from_the_second_round():
    out = measure("quick", replicas=2, rounds=3)
    assert out["honest"]["checks"] == 2 * 1 * 2  # each of 2 replicas checks the other, rounds 1 and 2
    for kind in KINDS[1:]:
        r = out[kind]
        assert r["checks"] == 2 * 2, (kind, r)  # each replica checks the kind's delta, rounds 1 and 2
        assert -1 <= r["min"] <= r["median"] <= r["max"] <= 1
        assert r["pass_share_late"] is None  # no round past the first ones in 3 rounds
    assert out["honest"]["min"] > THRESHOLD, out["honest"]  # honest deltas of a coherent start agree


def test_copies_pass_the_agreement_but_leave_no_novelty_where_an_honest_delta_keeps_its_own():
    from locoswarm.bench.lazy_sybil import COPY_KINDS

    out = measure("quick", replicas=3, rounds=3, copies=True)
    for kind in COPY_KINDS[:-1]:  # the joiner joins later than 3 rounds
        r = out[kind]
        assert r["checks"] == 3 * 2, (kind, r)
        if kind != "quarter":  # it agrees less: three quarters of it are noise
            assert r["min"] > THRESHOLD, (kind, r)  # they agree as their sources do
        assert r["novelty_own"]["max"] < 0.1 and r["majority_below"]["0.1"] == 1.0, (kind, r)
    honest = out["honest"]
    assert honest["novelty_own"]["min"] > THRESHOLD and honest["majority_below"]["0.15"] == 0.0, honest
    assert honest["novelty_own"]["median"] < honest["median"]  # the others' part is taken out
    assert out["joiner"]["checks"] == 0
