"""Proof of work on identities (protocol/work.py): a nonce found for one peer and run proves
the work for that pair only, checks are cached, and mining stops when asked."""

from __future__ import annotations

import threading

import pytest

from locoswarm.protocol.work import WorkCheck, leading_zero_bits, meets, mine, work_digest

SPEC = b"s" * 32
PEER = "12D3KooWPeerA"


def test_leading_zero_bits_counts_from_the_first_byte():
    assert leading_zero_bits(b"\x00\x00\x01" + b"\xff" * 29) == 23
    assert leading_zero_bits(b"\x80" + bytes(31)) == 0
    assert leading_zero_bits(bytes(32)) == 256


def test_a_mined_nonce_proves_the_work_for_its_peer_and_run_only():
    nonce = mine(SPEC, PEER, 6)
    assert nonce is not None and meets(SPEC, PEER, nonce, 6)
    assert leading_zero_bits(work_digest(SPEC, PEER, nonce)) >= 6
    # The first nonce that works: every one before it fails.
    assert not any(meets(SPEC, PEER, n, 6) for n in range(nonce))
    # Lifted into another identity or another run, the nonce almost surely proves nothing:
    # count over many peers rather than trust one draw (2^-6 each to pass by chance).
    lifted = sum(meets(SPEC, f"{PEER}{i}", nonce, 6) for i in range(64))
    other_run = sum(meets(bytes([i]) * 32, PEER, nonce, 6) for i in range(64))
    assert lifted <= 8 and other_run <= 8
    assert meets(SPEC, PEER, 12345, 0), "no work asked: anything passes"
    assert not meets(SPEC, PEER, -1, 6) and not meets(SPEC, PEER, 1 << 64, 6), "nonces are 8 bytes"


def test_checks_are_cached_by_identity_and_nonce_and_bounded():
    nonce = mine(SPEC, PEER, 4)
    check = WorkCheck(SPEC, 4, max_entries=3)
    assert check(PEER, nonce) and check(PEER, nonce)
    assert check.evaluations == 1
    bad = next(n for n in range(1000) if not meets(SPEC, PEER, n, 4))
    assert not check(PEER, bad) and not check(PEER, bad)
    assert check.evaluations == 2, "a refusal is remembered too"
    for i in range(5):
        check(f"other{i}", 0)
    assert len(check._verdicts) == 3


def test_mining_stops_when_asked():
    stop = threading.Event()
    stop.set()
    assert mine(SPEC, PEER, 40, stop=stop) is None
    seen = []
    assert mine(SPEC, PEER, 40, stop=stop, progress=lambda tries, s: seen.append(tries)) is None


def test_a_run_asking_for_work_refuses_a_record_without_it_and_admits_one_with_it():
    from locoswarm.node.spec import AccessPolicy, RunSpec

    spec = RunSpec(access=AccessPolicy(work_bits=6))
    spec.validate()
    h = spec.hash()
    assert spec.access.restricted, "peers are admitted one by one"
    nonce = mine(h, PEER, 6)
    bad = next(n for n in range(1000) if not meets(h, PEER, n, 6))
    check = WorkCheck(h, 6)
    assert spec.access.refuse(h, PEER, b"", nonce, check) is None
    assert "no proof of 6 bits of work" in spec.access.refuse(h, PEER, b"", bad, check)
    assert spec.access.refuse(h, PEER, b"", nonce) is None, "checked afresh without a cache"
    # Runs without work hash as they did before the setting existed (computed at 9d6ce54), with
    # earned weight and checks off as they were then: the default spec turned them on, rules
    # that change what peers aggregate and so the hash (optim/credit.py, optim/check.py).
    from dataclasses import replace

    from locoswarm.optim.config import RobustConfig

    before = RunSpec()
    before = replace(before, diloco=replace(before.diloco, robust=RobustConfig(earn_rounds=0, check_agreement=0.0)))
    assert before.hash().hex() == "e410ca7fd8fe62e022c05da164d51679e039bd61fbaf761997ab125ec718441f"
    assert RunSpec().hash() != before.hash()
    private = replace(before, access=AccessPolicy(secret="s" * 16))
    assert private.hash().hex() == "2aa965b742674aa8056aba08854f1d2616d57863d316ee5184767f563cd8a755"
    assert private.hash() != RunSpec(access=AccessPolicy(secret="s" * 16, work_bits=1)).hash()
    for bad_bits in (-1, 33, 1.5):
        with pytest.raises(ValueError, match="access.work_bits"):
            AccessPolicy(work_bits=bad_bits).validate()


def test_a_record_carries_its_nonce_whole_and_as_an_update_base():
    from locoswarm.protocol import MalformedMessage
    from locoswarm.protocol.records import PeerRecord, decode_record, encode_record, record_base

    r = PeerRecord(peer_id=PEER, addrs=("/ip4/127.0.0.1/tcp/1",), device="cpu", tokens_per_s=1.0, round=3,
                   spec_hash=SPEC, work=(1 << 64) - 1)
    assert decode_record(encode_record(r), SPEC).work == (1 << 64) - 1
    assert record_base(r) != record_base(PeerRecord(**{**{f: getattr(r, f) for f in r.__slots__}, "work": 1}))
    import msgpack

    m = msgpack.unpackb(encode_record(r))
    m["work"] = -1
    with pytest.raises(MalformedMessage, match="work"):
        decode_record(msgpack.packb(m, use_bin_type=True), SPEC)


def test_bench_identity_measures_mining_and_refuses_bad_bits(tmp_path):
    import json

    from typer.testing import CliRunner

    from locoswarm.cli.main import app

    out = tmp_path / "identity.json"
    res = CliRunner().invoke(app, ["bench", "identity", "--bits", "2,3", "--json", str(out)])
    assert res.exit_code == 0, res.output
    got = json.loads(out.read_text())
    assert got["evaluation_s"] > 0 and set(got["mined"]) == {"2", "3"}
    assert all(m["runs"] == 5 and m["tries_mean"] >= 1 for m in got["mined"].values())
    assert got["projected"]["16"]["one_identity_s"] == pytest.approx(got["evaluation_s"] * 2 ** 16)
    for bad in ("x", "0", "17", "8,"):
        res = CliRunner().invoke(app, ["bench", "identity", "--bits", bad])
        assert res.exit_code == 2 and "--bits" in res.output, (bad, res.output)
