"""Checked contributions (optim/check.py): the check itself on deltas of real training, the
exclusion the screening decides from the checks a round's deltas carry (optim/screen.py),
the ledger that remembers it (optim/credit.py), and the checks' travel inside a delta
(protocol/delta.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import protocol_cases as cases
from locoswarm.kernels.bitpack import pack_bits
from locoswarm.bench import convergence as conv
from locoswarm.optim.check import SCALE, check_round, failing
from locoswarm.optim.config import RobustConfig
from locoswarm.optim.credit import EXCLUSION_ROUNDS, MAX_BANNED, MAX_ENTRIES, Ledger
from locoswarm.optim.round import RoundStep
from locoswarm.optim.screen import screen
from locoswarm.protocol import MalformedMessage, decode_delta, encode_delta
from locoswarm.protocol.delta import MAX_CHECKS
from locoswarm.protocol.state import check_ledger

from test_credit import PLAN, _delta, _ledger

THRESHOLD = RobustConfig().check_agreement


@pytest.fixture(scope="module")
def trained_round():
    """Three replicas of the tiny model after two rounds of the compressed swarm on their own
    shards (bench/convergence.py, the quick preset's data): the outer parameters of round 2,
    each replica's parameters at its boundary, and their deltas as every peer decodes them."""
    cfg = replace(conv.PRESETS["quick"], replicas=3, total_steps=15)
    w = conv.Workload(cfg)
    dl = cfg.diloco
    models = [w.new_model() for _ in range(3)]
    opts = [conv.make_inner_optimizer(m, dl.inner) for m in models]
    samplers = w.samplers(3)
    outer = conv.OuterOptimizer(list(models[0].parameters()), dl.outer, device="cpu")
    tokens = cfg.batch_size * cfg.data.seq_len * dl.inner_steps
    step = RoundStep(dl, w.shapes, run_id="bench", spec_hash=b"\0" * 32, max_tokens=tokens)
    comps = [step.compressor("cpu") for _ in range(3)]
    with conv.flush_denormals():
        for r, _ in enumerate(conv.trained_rounds(w, dl, models, opts, samplers)):
            deltas = [d for _, d in conv.encode_replicas(step, comps, lambda i: outer.params, models, r, tokens)]
            if r == 2:
                replicas = [[p.detach().clone() for p in m.parameters()] for m in models]
                return step, [p.clone() for p in outer.params], replicas, deltas, tokens
            conv.step_consensus(step, outer, deltas, comps, models)


def _dense(d) -> list[torch.Tensor]:
    """`d`'s values as one flat dense tensor per model tensor."""
    from locoswarm.kernels import dequantize
    from locoswarm.kernels.topk import chunk_ids

    dense = []
    for t in d.tensors:
        lay = t.layout
        flat = torch.zeros(lay.numel)
        flat[chunk_ids(lay, "cpu") * lay.chunk + t.indices] = dequantize(t.codes, t.scales, lay, t.bits)
        dense.append(flat)
    return dense


def _encoded(step: RoundStep, dense: list[torch.Tensor], like, sender: str):
    """The delta a sender whose pseudo-gradient is `dense` sends (the round's compressor, fresh),
    in `like`'s round and with its tokens."""
    zero = [torch.zeros_like(x) for x in dense]  # the delta sent is zero − replica
    blob = step.encode(step.compressor("cpu"), zero, [-x for x in dense], round_=like.round, sender=sender,
                       tokens=like.num_tokens)
    return step.decode(blob)


def _negated(step: RoundStep, d, sender: str):
    """`d`'s values with the opposite sign, re-encoded as `sender` (what a turned peer sends:
    an honest norm, the opposite direction)."""
    return _encoded(step, [-x for x in _dense(d)], d, sender)


def _noise(step: RoundStep, d, sender: str, gen: torch.Generator):
    """`d`'s support and magnitudes with random signs: a delta of an honest norm that
    carries no training."""
    import dataclasses

    tensors = []
    for t in d.tensors:
        half = 1 << (t.bits - 1)  # sign-magnitude codes: the top bit is the sign
        flip = torch.randint(0, 2, t.codes.shape, generator=gen) * half
        codes = t.codes ^ flip
        tensors.append(dataclasses.replace(t, codes=codes, packed_codes=pack_bits(codes, t.bits)))
    return dataclasses.replace(d, sender=sender, tensors=tuple(tensors))


def test_honest_deltas_pass_and_negated_or_noise_deltas_fail_a_peers_check(trained_round, gen):
    step, outer, replicas, deltas, tokens = trained_round
    for me in range(3):
        others = [d for i, d in enumerate(deltas) if i != me]
        bad = [_negated(step, others[0], "x-negated"), _noise(step, others[0], "y-noise", gen)]
        checked = check_round(outer, replicas[me], deltas[me], others + bad + [deltas[me]], plan_tokens=tokens)
        checks = {c.sender: c.agreement for c in checked}
        assert deltas[me].sender not in checks, "a peer does not check itself"
        honest = [checks[d.sender] for d in others]
        assert min(honest) >= 2 * THRESHOLD * SCALE, f"honest agreements {honest}"
        assert checks["x-negated"] == pytest.approx(-checks[others[0].sender], abs=0.1 * SCALE)
        assert checks["x-negated"] < 0 and checks["y-noise"] < THRESHOLD * SCALE, checks
        told = {c.sender for c in failing(check_round(outer, replicas[me], deltas[me], others + bad,
                                                      plan_tokens=tokens), THRESHOLD)}
        assert told == {"x-negated", "y-noise"}


def test_a_check_decodes_every_tensor_of_every_delta_from_the_wire_at_once_as_dequantize_does_one_by_one(
        trained_round):
    from locoswarm.kernels import dequantize
    from locoswarm.kernels.topk import chunk_ids
    from locoswarm.optim.check import _Layout

    _, _, _, deltas, _ = trained_round
    shapes = tuple((t.layout, t.bits) for t in deltas[0].tensors)
    values, positions = _Layout(shapes, torch.device("cpu")).values(deltas[1:])
    assert values.shape == positions.shape == (len(deltas) - 1, sum(t.layout.num_selected for t in deltas[0].tensors))
    for row, d in enumerate(deltas[1:]):
        offset, want_v, want_p = 0, [], []
        for t in d.tensors:
            lay = t.layout
            want_v.append(dequantize(t.codes, t.scales, lay, t.bits))
            want_p.append(chunk_ids(lay, "cpu") * lay.chunk + t.indices + offset)
            offset += lay.numel
        assert torch.equal(values[row], torch.cat(want_v)) and torch.equal(positions[row], torch.cat(want_p))


def test_a_decoded_deltas_payloads_are_read_whole_without_a_copy_and_a_replaced_tensors_by_a_copy(trained_round):
    import dataclasses

    from locoswarm.optim.check import _layout, joined

    _, _, _, deltas, _ = trained_round
    d = deltas[1]
    lay = _layout(tuple((t.layout, t.bits) for t in d.tensors), torch.device("cpu"))
    for field, (offsets, total) in lay.pieces.items():
        pieces = [getattr(t, field) for t in d.tensors]
        whole = joined(pieces, offsets, total)
        assert whole.data_ptr() == pieces[0].data_ptr(), f"{field}: copied"
        assert torch.equal(whole, torch.cat([p.reshape(-1) for p in pieces])) and whole.numel() == total
    t = d.tensors[len(d.tensors) // 2]
    other = dataclasses.replace(t, packed_codes=t.packed_codes.clone() ^ 1)
    pieces = [other.packed_codes if x is t else x.packed_codes for x in d.tensors]
    offsets, total = lay.pieces["packed_codes"]
    whole = joined(pieces, offsets, total)
    assert whole.data_ptr() != pieces[0].data_ptr() and torch.equal(whole, torch.cat(pieces)), "a stale payload read"


@pytest.mark.parametrize("widths", [(2, 2, 1), (12, 5, 17), (20, 3, 31)])
def test_entries_of_several_packed_streams_end_to_end_read_back_exactly(widths, gen):
    """optim/check.py `_Stream` against kernels/bitpack.py's packing: streams of each width
    (int32 words up to 17 bits, int64 above), each padded to a whole byte, two rows at once."""
    from locoswarm.kernels.bitpack import packed_nbytes
    from locoswarm.optim.check import _Stream

    counts = (37, 1, 64)
    at, width, rows = [], [], [[], []]
    offset = 0
    for w, n in zip(widths, counts):
        entry = torch.arange(n, dtype=torch.int64)
        at.append(8 * offset + w * entry)
        width.append(torch.full((n,), w, dtype=torch.int64))
        offset += packed_nbytes(n, w)
        for row in rows:
            row.append(torch.randint(0, 1 << w, (n,), generator=gen, dtype=torch.int64))
    stream = _Stream(torch.cat(at), torch.cat(width))
    packed = torch.stack([torch.cat([pack_bits(v, w) for v, w in zip(row, widths)]) for row in rows])
    got = stream.read(packed, torch.device("cpu"))
    assert got.dtype == (torch.int32 if max(widths) <= 17 else torch.int64)
    assert torch.equal(got.long(), torch.stack([torch.cat(row) for row in rows]))


def test_checks_in_batches_of_any_size_judge_every_delta_as_one_batch_does(trained_round, monkeypatch):
    from locoswarm.optim import check

    _, outer, replicas, deltas, tokens = trained_round
    whole = check_round(outer, replicas[0], deltas[0], deltas, plan_tokens=tokens)
    entries = sum(t.layout.num_selected for t in deltas[0].tensors)
    monkeypatch.setattr(check, "MAX_ENTRIES", entries)  # one delta a batch
    assert len(whole) == len(deltas) - 1
    assert check_round(outer, replicas[0], deltas[0], deltas, plan_tokens=tokens) == whole


def _copies(step: RoundStep, source, gen: torch.Generator, name: str) -> list:
    """What a sybil that holds `source` (a delta of the round) sends to earn weight without
    work: it again, under its own name; it plus noise of 1.5 times its norm (so that it agrees
    with its source about as well as two honest deltas do), re-encoded."""
    import dataclasses

    dense = _dense(source)
    noisy = [x + 1.5 * x * (torch.randint(0, 2, x.shape, generator=gen) * 2 - 1) for x in dense]
    return [dataclasses.replace(source, sender=f"{name}-copy"), _encoded(step, noisy, source, f"{name}-copy-noise")]


def test_a_newcomers_copy_of_an_established_peers_delta_or_of_the_checkers_own_fails_an_honest_one_passes(
        trained_round, gen):
    step, outer, replicas, deltas, tokens = trained_round
    me, established, newcomer = deltas
    copies = _copies(step, established, gen, "x") + _copies(step, me, gen, "y")
    known = frozenset({established.sender})
    plain = {c.sender: c.agreement for c in check_round(outer, replicas[0], me, deltas + copies, plan_tokens=tokens)}
    judged = {c.sender: c.agreement for c in check_round(outer, replicas[0], me, deltas + copies, plan_tokens=tokens,
                                                        established=known)}
    # Without earned weight every copy passes: it agrees with this peer as its source does.
    assert all(plain[c.sender] >= 2 * THRESHOLD * SCALE for c in copies), plain
    # A newcomer's delta must add to this peer's own and the established peers': a copy, with
    # noise or not, adds nothing that agrees with anything.
    assert all(abs(judged[c.sender]) < THRESHOLD * SCALE for c in copies), judged
    assert judged[newcomer.sender] >= THRESHOLD * SCALE, judged  # what its own data taught it
    assert judged[newcomer.sender] <= plain[newcomer.sender]
    assert judged[established.sender] == plain[established.sender]  # established: its agreement alone
    told = {c.sender for c in failing(check_round(outer, replicas[0], me, deltas + copies, plan_tokens=tokens,
                                                  established=known), THRESHOLD)}
    assert told == {c.sender for c in copies}


def test_a_newcomers_novelty_is_its_least_squares_residual_against_the_established_and_own_deltas(trained_round,
                                                                                                 monkeypatch):
    from locoswarm.optim import check

    _, outer, replicas, deltas, tokens = trained_round
    me, established, newcomer = deltas
    g = torch.cat([(o - r).reshape(-1) for o, r in zip(outer, replicas[0])]).double()
    flat = [torch.cat(_dense(d)).double() for d in deltas]
    span = torch.stack([flat[0], flat[1]], dim=1)
    residual = flat[2] - span @ torch.linalg.lstsq(span, flat[2].unsqueeze(1)).solution.squeeze(1)
    want = (residual @ g / residual.norm()) / (flat[0] @ g / flat[0].norm())
    agreement = (flat[2] @ g / flat[2].norm()) / (flat[0] @ g / flat[0].norm())
    assert want < agreement  # what the others hold is taken out
    monkeypatch.setattr(check, "NOVELTY_WEIGHT", 1.0)  # the novelty itself, not weighed
    got = {c.sender: c.agreement for c in check_round(outer, replicas[0], me, deltas, plan_tokens=tokens,
                                                     established=frozenset({established.sender}))}
    assert got[newcomer.sender] == pytest.approx(SCALE * float(want), abs=1)
    monkeypatch.setattr(check, "MAX_ENTRIES", 1)  # one delta a batch
    assert {c.sender: c.agreement for c in check_round(outer, replicas[0], me, deltas, plan_tokens=tokens,
                                                       established=frozenset({established.sender}))} == got


def test_a_peer_whose_own_round_is_no_measure_checks_nothing_and_small_claims_go_unchecked(trained_round):
    step, outer, replicas, deltas, tokens = trained_round
    assert check_round(outer, replicas[0], deltas[0], deltas, plan_tokens=8 * tokens) == [], \
        "own round of an eighth of the plan: no measure"
    small = replace(deltas[1], num_tokens=tokens // 8)
    assert [c.sender for c in check_round(outer, replicas[0], deltas[0], [small, deltas[2]], plan_tokens=tokens)] \
        == [deltas[2].sender]
    off = RoundStep(replace(step.cfg, robust=replace(step.cfg.robust, check_agreement=0.0)),
                    [(t.name, t.shape) for t in step.spec.tensors], run_id="bench", spec_hash=b"\0" * 32,
                    max_tokens=tokens)
    assert off.check(outer, replicas[0], deltas[0], deltas, tokens) == []


# --------------------------------------------------------------------------- exclusion


def _with_checks(d, checks):
    return replace(d, checks=tuple(sorted(checks)))


def _fail(peer: str) -> tuple[str, int]:
    return (peer, -400)


def test_peers_holding_a_majority_of_the_earned_weight_exclude_a_sender_and_its_delta_of_the_round(gen):
    led = _ledger(["a", "b", "c", "d", "e"])
    cfg = RobustConfig()
    deltas = [_with_checks(_delta(gen, "a"), [_fail("e")]), _with_checks(_delta(gen, "b"), [_fail("e")]),
              _with_checks(_delta(gen, "c"), [_fail("e"), ("d", 900)]), _delta(gen, "d"), _delta(gen, "e")]
    out = screen(deltas, cfg, led)
    assert out.banned == ("e",)
    assert [d.sender for d in out.deltas] == ["a", "b", "c", "d"]
    [rejection] = out.rejected
    assert rejection.sender == "e"
    assert ("failed the checks of 3 established peers holding 60% of the established weight (agreement -0.40, -0.40, "
            "-0.40; threshold 0.15): excluded") in rejection.reason
    assert "e" not in out.earned, "an excluded peer earns nothing"


def test_a_minority_of_the_earned_weight_or_newcomers_cannot_exclude_anyone(gen):
    led = _ledger(["a", "b", "c", "d"])
    cfg = RobustConfig()
    # Two of four established peers accuse the other two: half of the weight is no majority
    # (the accused peer's own weight counts, or two peers could exclude two others).
    half = [_with_checks(_delta(gen, "a"), [_fail("c"), _fail("d")]),
            _with_checks(_delta(gen, "b"), [_fail("c"), _fail("d")]), _delta(gen, "c"), _delta(gen, "d")]
    assert screen(half, cfg, led).banned == ()
    # Twenty fresh identities accuse an established peer: newcomers' checks do not count.
    crowd = [_with_checks(_delta(gen, f"n{i:02d}", tokens=PLAN), [_fail("a")]) for i in range(20)]
    out = screen([_delta(gen, "a"), _delta(gen, "b"), *crowd], cfg, led)
    assert out.banned == () and "a" in out.earned
    # Before anyone is established nobody is excluded: identities would decide.
    fresh = Ledger(earn_rounds=8, per_peer_tokens=PLAN)
    assert screen([_with_checks(_delta(gen, "a"), [_fail("c")]), _with_checks(_delta(gen, "b"), [_fail("c")]),
                   _delta(gen, "c")], cfg, fresh).banned == ()
    # Checks off (check_agreement 0): a majority's failed checks exclude nobody.
    off = RobustConfig(check_agreement=0.0)
    assert screen([_with_checks(_delta(gen, "a"), [_fail("c")]), _with_checks(_delta(gen, "b"), [_fail("c")]),
                   _delta(gen, "c")], off, _ledger(["a", "b", "c"])).banned == ()


def test_a_check_above_the_threshold_or_of_itself_is_no_accusation(gen):
    led = _ledger(["a", "b", "c"])
    ok = [_with_checks(_delta(gen, "a"), [("c", int(THRESHOLD * SCALE))]),
          _with_checks(_delta(gen, "b"), [("b", -900), ("c", 200)]), _delta(gen, "c")]
    assert screen(ok, RobustConfig(), led).banned == ()


def test_an_excluded_peer_stays_out_its_deltas_refused_and_the_peers_agree_on_one_ledger(gen):
    cfg = RobustConfig()
    ledgers = [_ledger(["a", "b", "c", "e"]) for _ in range(2)]
    deltas = [_with_checks(_delta(gen, s), [_fail("e")]) for s in "abc"] + [_delta(gen, "e")]
    for led in ledgers:  # two peers aggregating the same deltas
        out = screen(deltas, cfg, led)
        led.credit(out.earned, out.banned, 7)
    assert ledgers[0].pairs() == ledgers[1].pairs()
    led = ledgers[0]
    assert led.banned("e") and led.banned_at("e") == 7 and not led.established("e") and led.num_banned == 1
    later = screen([_delta(gen, s) for s in "abce"], cfg, led)
    assert [r.sender for r in later.rejected] == ["e"] and "excluded at round 7" in later.rejected[0].reason
    assert dict(check_ledger(list(map(list, led.pairs()))))["e"] == -8, "it travels with the ledger"
    for r in range(8, 7 + EXCLUSION_ROUNDS):
        led.credit({"e": PLAN, "a": PLAN}, (), r)
        assert led.banned("e") and led.banned_at("e") == 7, "an exclusion neither decays nor is earned back"
    led.credit({"a": PLAN}, (), 7 + EXCLUSION_ROUNDS)  # its delta of that round was still refused
    assert not led.banned("e") and "e" not in led.credits, "it lasts EXCLUSION_ROUNDS rounds, then the peer is new"
    back = screen([_delta(gen, s) for s in "abce"], cfg, led)
    assert not back.rejected and "e" in back.earned and not led.established("e")


def test_the_ledger_keeps_the_newest_exclusions_and_they_cannot_push_established_peers_out():
    led = _ledger([f"p{i:04d}" for i in range(8)])
    per_round = MAX_BANNED // 4 + 10
    for r in range(4):  # within EXCLUSION_ROUNDS of each other
        led.credit({f"p{i:04d}": PLAN for i in range(8)}, tuple(f"x{r}{j:05d}" for j in range(per_round)), r)
    assert led.num_banned == MAX_BANNED
    assert led.banned(f"x3{per_round - 1:05d}") and not led.banned(f"x0{per_round - 1:05d}"), "the oldest go first"
    assert all(led.established(f"p{i:04d}") for i in range(8))
    led.credit({f"n{i:05d}": 1 for i in range(MAX_ENTRIES)})
    assert len(led.credits) <= MAX_ENTRIES and led.num_banned == MAX_BANNED
    assert all(led.established(f"p{i:04d}") for i in range(8))


def test_a_delta_taken_from_another_outer_state_is_refused_and_goes_unchecked(gen):
    """A diverged peer's delta moves another outer state than ours: it is left out (and so
    never judged by a check that could not measure it) until the peer takes the swarm's state;
    a delta whose base is unknown on either side is screened as before."""
    ours, theirs = "a1" * 16, "b2" * 16
    deltas = [replace(_delta(gen, "a"), base=ours), replace(_delta(gen, "b"), base=ours),
              replace(_delta(gen, "c"), base=theirs), _delta(gen, "d")]
    out = screen(deltas, RobustConfig(), _ledger(["a", "b", "c", "d"]), ours)
    assert [d.sender for d in out.deltas] == ["a", "b", "d"]
    [rejection] = out.rejected
    assert rejection.sender == "c" and "taken from another outer state (round chain b2b2b2b2b2b2…, ours a1a1a1a1a1a1…)" \
        in rejection.reason
    assert [d.sender for d in screen(deltas, RobustConfig(), None, "").deltas] == ["a", "b", "c", "d"]


# --------------------------------------------------------------------------- on the wire


def test_checks_and_base_travel_inside_a_delta_and_malformed_ones_are_refused_naming_what_is_wrong(gen):
    spec, msg, _, _ = cases.make(gen)
    told = replace(msg, checks=(("peer-b", -412), ("peer-c", 88)), base="0f" * 16)
    got = decode_delta(encode_delta(told), spec)
    assert got.checks == (("peer-b", -412), ("peer-c", 88)) and got.base == "0f" * 16
    assert decode_delta(encode_delta(msg), spec).checks == () and decode_delta(encode_delta(msg), spec).base == ""
    full = replace(msg, checks=tuple((f"{'p' * 120}{i:06d}", -10**6) for i in range(MAX_CHECKS)))
    blob = encode_delta(full)
    assert len(blob) <= spec.max_message_bytes and len(decode_delta(blob, spec).checks) == MAX_CHECKS
    bad = {
        "not a list": ("checks must be a list", {"a": 1}),
        "too many": ("at most 256", [[f"p{i:04d}", 0] for i in range(MAX_CHECKS + 1)]),
        "not a pair": ("not a [peer id, agreement] pair", [["p", 1, 2]]),
        "empty id": ("peer id must be", [["", 1]]),
        "unordered": ("ascending order", [["q", 1], ["p", 1]]),
        "repeated": ("ascending order", [["p", 1], ["p", 2]]),
        "float": ("agreement 0.5 outside", [["p", 0.5]]),
        "huge": ("outside [-1000000, 1000000]", [["p", 10**7]]),
    }
    data = encode_delta(msg)
    for name, (why, value) in bad.items():
        with pytest.raises(MalformedMessage, match=why.replace("[", r"\[")):
            decode_delta(cases.mutated(data, lambda b: b.__setitem__("checks", value)), spec)
    for base in ("0F" * 16, "x", "0" * 65, 7, None):
        with pytest.raises(MalformedMessage, match="base must be a string of at most 64 lowercase hex digits"):
            decode_delta(cases.mutated(data, lambda b: b.__setitem__("base", base)), spec)
