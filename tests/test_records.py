"""Peer records: round trip, and every malformed field refused with a ProtocolError that
names the peer and the field; hypothesis garbage never raises anything else."""

from __future__ import annotations

import math

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from locoswarm.protocol import MalformedMessage, OversizedMessage, ProtocolError, SpecMismatch, VersionMismatch
from locoswarm.protocol.records import PeerRecord, apply_update, decode_record, encode_record, encode_update

H = b"h" * 32
GOOD = PeerRecord(peer_id="12D3KooWJTTo2Du6D21zfPSKfqDzGTC3", addrs=("/ip4/127.0.0.1/tcp/4000",), device="cuda",
                  tokens_per_s=12345.5, round=42, spec_hash=H, diverged=True,
                  chain="0123456789abcdef" * 2, prev_chain="fedcba9876543210" * 2, incarnation=2**62 + 5, seq=2**63 - 1,
                  anchors=((32, "ab" * 16), (40, "cd" * 16)))


def test_record_round_trips():
    assert decode_record(encode_record(GOOD), H) == GOOD
    with_proof = PeerRecord(**{**{f: getattr(GOOD, f) for f in GOOD.__slots__}, "proof": b"p" * 32})
    assert decode_record(encode_record(with_proof), H) == with_proof


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (lambda m: m.update(v=8), VersionMismatch, "version"),  # an older daemon's: another protocol
        (lambda m: m.update(spec=b"x" * 32), SpecMismatch, "another run spec"),
        (lambda m: m.update(device="tpu"), MalformedMessage, "device"),
        (lambda m: m.update(tokens_per_s=math.nan), MalformedMessage, "tokens_per_s"),
        (lambda m: m.update(tokens_per_s=-1.0), MalformedMessage, "tokens_per_s"),
        (lambda m: m.update(round=-3), MalformedMessage, "round"),
        (lambda m: m.update(addrs=[]), MalformedMessage, "addrs"),
        (lambda m: m.update(addrs=["not-a-multiaddr"]), MalformedMessage, "addrs"),
        (lambda m: m.update(peer="../../etc"), MalformedMessage, "peer id"),
        (lambda m: m.update(extra=1), MalformedMessage, "fields"),
        (lambda m: m.update(proof=b"short"), MalformedMessage, "proof"),
        (lambda m: m.update(proof="text"), MalformedMessage, "proof"),
        (lambda m: m.update(diverged=1), MalformedMessage, "diverged"),
        (lambda m: m.update(chain="0123456789abcdef"), MalformedMessage, "chain"),
        (lambda m: m.update(chain="0123456789ABCDEF" * 2), MalformedMessage, "chain"),
        (lambda m: m.update(chain="g" * 32), MalformedMessage, "chain"),
        (lambda m: m.update(chain=b"\x00" * 16), MalformedMessage, "chain"),
        (lambda m: m.update(prev_chain="0" * 31), MalformedMessage, "prev_chain"),
        (lambda m: m.update(prev_chain=None), MalformedMessage, "prev_chain"),
        (lambda m: m.update(round=0), MalformedMessage, "prev_chain given at round 0"),
        (lambda m: m.pop("prev_chain"), MalformedMessage, "fields"),
        (lambda m: m.update(inc=-1), MalformedMessage, "incarnation"),
        (lambda m: m.update(inc=2**63), MalformedMessage, "incarnation"),
        (lambda m: m.update(inc=1.5), MalformedMessage, "incarnation"),
        (lambda m: m.update(seq=-1), MalformedMessage, "seq"),
        (lambda m: m.update(seq=True), MalformedMessage, "seq"),
        (lambda m: m.pop("seq"), MalformedMessage, "fields"),
        (lambda m: m.update(anchors=[[8, "ab" * 16]] * 3), MalformedMessage, "anchors"),
        (lambda m: m.update(anchors=[[43, "ab" * 16]]), MalformedMessage, "anchors"),
        (lambda m: m.update(anchors=[[8, "AB" * 16]]), MalformedMessage, "anchors"),
        (lambda m: m.update(anchors=[[-8, "ab" * 16]]), MalformedMessage, "anchors"),
        (lambda m: m.update(anchors={"8": "ab" * 16}), MalformedMessage, "anchors"),
    ],
)
def test_bad_record_is_refused_naming_the_field(mutate, error, message):
    m = msgpack.unpackb(encode_record(GOOD), raw=False)
    mutate(m)
    with pytest.raises(error, match=message):
        decode_record(msgpack.packb(m, use_bin_type=True), H)


def test_oversized_record_is_refused_before_parsing():
    with pytest.raises(OversizedMessage):
        decode_record(b"\x80" * 5000, H)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_garbage_record_raises_only_protocol_errors(blob):
    try:
        decode_record(blob, H)
    except ProtocolError:
        pass


def test_progress_round_trips_and_a_bad_incarnation_or_field_is_refused_by_name():
    from locoswarm.protocol.records import Progress, decode_progress, encode_progress

    good = Progress(tokens=2560, tokens_per_s=1234.5, done=True, incarnation=2**63 - 1, round=2**62 - 1)
    assert decode_progress(encode_progress(good)) == good
    for mutate, message in [(lambda m: m.update(r=-1), "round"), (lambda m: m.update(r=2**62), "round"),
                            (lambda m: m.pop("r"), "fields"), (lambda m: m.update(inc=-1), "incarnation"), (lambda m: m.update(inc="x"), "incarnation"),
                            (lambda m: m.pop("inc"), "fields"), (lambda m: m.update(tokens=-5), "tokens"),
                            (lambda m: m.update(v=2), "version")]:
        m = msgpack.unpackb(encode_progress(good), raw=False)
        mutate(m)
        with pytest.raises(ProtocolError, match=message):
            decode_progress(msgpack.packb(m, use_bin_type=True))


def test_an_update_carries_what_training_changes_and_is_checked_as_a_whole_record():
    base = decode_record(encode_record(GOOD), GOOD.spec_hash)
    later = PeerRecord(**{**{f: getattr(GOOD, f) for f in GOOD.__dataclass_fields__}, "round": GOOD.round + 1,
                          "chain": "c" * 32, "prev_chain": GOOD.chain, "seq": 5, "paused": True})
    blob = encode_update(later)
    assert len(blob) < len(encode_record(later)) / 2
    assert apply_update(base, blob, GOOD.spec_hash) == later
    m = msgpack.unpackb(blob)
    for field, value, message in (("c", b"\x01" * 8, "chain"), ("r", -1, "round"), ("s", "1", "seq"),
                                  ("c", "ab" * 16, "record update"), ("a", [[10**9, b"\xaa" * 16]], "anchors"),
                                  ("x", 1, "x")):
        bad = {**m, field: value}
        with pytest.raises(ProtocolError, match=message):
            apply_update(base, msgpack.packb(bad), GOOD.spec_hash)
    with pytest.raises(OversizedMessage):
        apply_update(base, blob + bytes(600), GOOD.spec_hash)
