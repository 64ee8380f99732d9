"""The bounded registry's arithmetic (node/buckets.py): a peer's bucket is a prefix of
sha256 of its id and each level halves the buckets above it; a reader meets every writer
whose size estimate is within a factor √2 of its own; the estimate is a median, so one odd
sample does not move the level; the partial view drops what its bucket no longer shows,
ages out what is not re-read, and never holds more than VIEW_MAX records."""

from __future__ import annotations

import hashlib
import math

import numpy as np

from locoswarm.node import buckets
from locoswarm.node.buckets import PartialView, SizeEstimate, buckets_to_sample, level_of, read_level, write_levels
from locoswarm.protocol.records import PeerRecord, bucket_key, bucket_of


def _record(peer: str, round_: int = 0) -> PeerRecord:
    return PeerRecord(peer_id=peer, addrs=("/ip4/127.0.0.1/tcp/1",), device="cpu", tokens_per_s=1.0, round=round_,
                      spec_hash=b"s" * 32)


def test_a_bucket_is_the_first_level_bits_of_sha256_of_the_peer_id_and_levels_nest(np_rng):
    for i in range(200):
        peer = f"Qm{int(np_rng.integers(0, 2**62)):x}"
        bits = bin(int.from_bytes(hashlib.sha256(peer.encode()).digest(), "big"))[2:].rjust(256, "0")
        assert bucket_of(peer, 0) == 0
        for level in (1, 3, 8, 13, 24):
            assert bucket_of(peer, level) == int(bits[:level], 2)
            assert bucket_of(peer, level + 1) >> 1 == bucket_of(peer, level)  # a bucket splits into two below it
    assert bucket_key("run", 3, 5) == "locoswarm:run:peers:3:5"


def test_a_reader_meets_every_writer_whose_estimate_is_within_a_factor_sqrt2(np_rng):
    for _ in range(20000):
        writer = float(np_rng.uniform(0.5, 2e6)) if np_rng.random() < 0.5 else float(np.exp(np_rng.uniform(0, 15)))
        reader = writer * float(np_rng.uniform(1 / math.sqrt(2), math.sqrt(2)) * 0.99999)
        assert read_level(reader) in write_levels(writer), (reader, writer)


def test_estimates_a_factor_1_5_apart_can_miss_each_other_so_the_bound_is_tight():
    writer = 32 * 2 ** 1.0  # ℓ = 1: writes levels 1 and 2
    reader = writer / 1.5  # ℓ ≈ 0.415: reads level 0
    assert write_levels(writer) == (1, 2) and read_level(reader) == 0


def test_small_swarms_read_level_0_and_write_it_alone_below_32_over_sqrt2():
    for n in (0, 1, 3, 10, 22.6):
        assert level_of(n) < 0.5 and read_level(n) == 0 and write_levels(n) == (0,)
    for n in (22.7, 32, 45):
        assert level_of(n) < 0.5 and read_level(n) == 0 and write_levels(n) == (0, 1)
    assert read_level(46) == 1  # 32·√2 ≈ 45.25
    assert level_of(10**30) == buckets.MAX_LEVEL


def test_a_view_read_covers_about_sample_entries_and_never_more_buckets_than_exist():
    assert buckets_to_sample(0, 40.0) == 1
    assert buckets_to_sample(5, 32.0) == 2 and buckets_to_sample(5, 16.0) == 4 and buckets_to_sample(5, 23.0) == 3
    assert buckets_to_sample(2, 1.0) == 4 and buckets_to_sample(8, 0.0) == 256
    assert buckets_to_sample(9, 200.0) == 1


def test_the_estimate_is_the_median_of_the_last_samples_so_one_outlier_does_not_move_it():
    est = SizeEstimate()
    assert est.value == 1.0
    for mean in (30, 31, 29, 30):
        est.add(mean, 5)
    est.add(500, 5)  # one stuffed bucket
    assert est.value == 30 * 32
    est.reset(100.0)
    assert est.value == 100.0


def test_the_view_drops_a_peer_its_bucket_no_longer_shows_and_one_withdrawn():
    now = [0.0]
    view = PartialView(keep_s=50.0, clock=lambda: now[0])
    view.update("k0", [_record("A"), _record("B")], set())
    view.update("k1", [_record("C")], set())
    assert [r.peer_id for r in view.records()] == ["A", "B", "C"]
    view.update("k0", [_record("A", 1)], set())  # B is gone from its bucket
    assert [(r.peer_id, r.round) for r in view.records()] == [("A", 1), ("C", 0)]
    view.update("k1", [], {"C"})
    assert [r.peer_id for r in view.records()] == ["A"] and view.aged_out == set()


def test_one_replica_copies_merge_by_expiration_and_their_records_go_when_their_entries_expire():
    """A copy from one replica (`expires` given) may have missed stores: a peer missing from
    it stays, an older entry sets nothing back, a tombstone newer than the record drops it,
    and a record leaves once its entry's expiration time has passed."""
    now, dht_now = [0.0], [1000.0]
    view = PartialView(keep_s=50.0, clock=lambda: now[0], dht_clock=lambda: dht_now[0])
    view.update("k0", [_record("A", 3), _record("B", 3)], set(), {"A": 1010.0, "B": 1010.0})
    view.update("k0", [_record("A", 2)], set(), {"A": 1009.0})  # a replica that missed A's last store, and B
    assert [(r.peer_id, r.round) for r in view.records()] == [("A", 3), ("B", 3)]
    view.update("k0", [], {"B"}, {"B": 1005.0})  # an old tombstone (B left, then came back)
    assert [r.peer_id for r in view.records()] == ["A", "B"]
    view.update("k0", [], {"B"}, {"B": 1012.0})  # B left after its last record
    assert [r.peer_id for r in view.records()] == ["A"]
    dht_now[0] = 1010.5  # A's entry expired (a SIGKILLed peer refreshes it no more)
    assert view.records() == [] and view.aged_out == set()


def test_the_view_ages_out_what_is_not_reread_and_keeps_the_freshest_view_max(monkeypatch):
    monkeypatch.setattr(buckets, "VIEW_MAX", 5)
    now = [0.0]
    view = PartialView(keep_s=50.0, clock=lambda: now[0])
    view.update("old", [_record(f"O{i}") for i in range(4)], set())
    now[0] = 10.0
    view.update("new", [_record(f"N{i}") for i in range(4)], set())
    kept = {r.peer_id for r in view.records()}
    assert len(kept) == 5 and {"N0", "N1", "N2", "N3"} <= kept
    assert len(view.aged_out) == 3 and all(p.startswith("O") for p in view.aged_out)
    now[0] = 61.0  # nothing re-read for longer than keep_s
    assert view.records() == [] and view.aged_out == kept
