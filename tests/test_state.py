"""State-transfer frames: a joiner rebuilds the donor's exact outer state from verified
chunks in any order, refuses a corrupted chunk without losing the others, and refuses a
manifest that does not match its own run spec before allocating anything."""

from __future__ import annotations

import msgpack
import pytest
import torch

from locoswarm.protocol import MalformedMessage, NonFiniteValue, ShapeMismatch, SpecMismatch, VersionMismatch
from locoswarm.protocol.state import StateAssembler, StateSpec, decode_manifest, encode_state

SPEC = StateSpec(run_id="r", spec_hash=b"s" * 32, tensors=(("param.0", (33, 70)), ("param.1", (9,)), ("momentum.0", (33, 70))))


def _state(gen):
    return {n: torch.randn(s, generator=gen) for n, s in SPEC.tensors}


def test_state_rebuilds_bit_for_bit_from_chunks_in_any_order(gen):
    state = _state(gen)
    manifest_b, body = encode_state(SPEC, state, round_=12, chunk_bytes=1024, chain="ab" * 16)
    m = decode_manifest(manifest_b, SPEC)
    assert m.round == 12 and len(m.chunks) == -(-SPEC.total_bytes // 1024) and m.chain == "ab" * 16
    asm = StateAssembler(SPEC, m)
    order = list(range(len(m.chunks)))[::-1]
    for i in order:
        asm.add(i, body[i * 1024 : (i + 1) * 1024])
    out = asm.finish()
    assert all(torch.equal(out[n], state[n]) for n in state)


def test_a_corrupted_chunk_is_refused_and_can_be_fetched_again(gen):
    manifest_b, body = encode_state(SPEC, _state(gen), round_=1, chunk_bytes=1024)
    asm = StateAssembler(SPEC, decode_manifest(manifest_b, SPEC))
    bad = bytearray(body[:1024])
    bad[100] ^= 1
    with pytest.raises(MalformedMessage, match="does not match its hash"):
        asm.add(0, bytes(bad))
    assert 0 in asm.missing()
    with pytest.raises(MalformedMessage, match="incomplete"):
        asm.finish()
    for i in asm.missing():
        asm.add(i, body[i * 1024 : (i + 1) * 1024])
    assert asm.missing() == [] and len(asm.finish()) == 3


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda m: m.update(v=1), VersionMismatch),
        (lambda m: m.update(chain="AB" * 16), MalformedMessage),
        (lambda m: m.update(chain=b"x" * 16), MalformedMessage),
        (lambda m: m.pop("chain"), MalformedMessage),
        (lambda m: m.update(run="other"), SpecMismatch),
        (lambda m: m.update(spec=b"x" * 32), SpecMismatch),
        (lambda m: m.update(tensors=[["param.0", [3300, 70]], ["param.1", [9]], ["momentum.0", [33, 70]]]), ShapeMismatch),
        (lambda m: m.update(chunk_bytes=1), MalformedMessage),
        (lambda m: m.update(chunks=m["chunks"][:-1]), MalformedMessage),
        (lambda m: m.update(digest=b"short"), MalformedMessage),
        (lambda m: m.update(round=-1), MalformedMessage),
        (lambda m: m.update(extra=1), MalformedMessage),
    ],
)
def test_a_manifest_that_does_not_match_the_run_spec_is_refused(gen, mutate, error):
    manifest_b, _ = encode_state(SPEC, _state(gen), round_=1, chunk_bytes=1024)
    m = msgpack.unpackb(manifest_b, raw=False)
    mutate(m)
    with pytest.raises(error):
        decode_manifest(msgpack.packb(m, use_bin_type=True), SPEC)


def test_garbage_manifest_is_malformed():
    with pytest.raises(MalformedMessage):
        decode_manifest(b"\xc1\xff\x00garbage", SPEC)


def test_a_non_finite_state_is_refused_even_with_matching_hashes(gen):
    state = _state(gen)
    state["param.1"][3] = float("nan")
    manifest_b, body = encode_state(SPEC, state, round_=1, chunk_bytes=1 << 20)
    asm = StateAssembler(SPEC, decode_manifest(manifest_b, SPEC))
    asm.add(0, body)
    with pytest.raises(NonFiniteValue, match="param.1"):
        asm.finish()


def test_wrong_chunk_size_or_index_is_refused(gen):
    manifest_b, body = encode_state(SPEC, _state(gen), round_=1, chunk_bytes=1024)
    asm = StateAssembler(SPEC, decode_manifest(manifest_b, SPEC))
    with pytest.raises(MalformedMessage, match="bytes, expected"):
        asm.add(0, body[:1000])
    with pytest.raises(MalformedMessage, match="outside"):
        asm.add(10_000, body[:1024])


def test_a_bfloat16_body_carries_a_residual_bit_for_bit_at_half_the_bytes(gen):
    """A donor's residual travels as bfloat16 (protocol/state.py): every 16-bit pattern,
    negative zero and subnormals included, comes back as the float32 it widens to."""
    spec = StateSpec(run_id="r", spec_hash=b"s" * 32, dtype="bfloat16",
                     tensors=(("residual.0", (33, 17)), ("residual.1", (5,))))
    assert spec.total_bytes == 2 * (33 * 17 + 5)
    residual = {n: torch.randn(s, generator=gen).to(torch.bfloat16) for n, s in spec.tensors}
    residual["residual.1"][:3] = torch.tensor([-0.0, 1e-40, -3e38]).to(torch.bfloat16)
    manifest, body = encode_state(spec, residual, 4, chunk_bytes=1024)
    asm = StateAssembler(spec, decode_manifest(manifest, spec))
    for i in reversed(asm.missing()):
        asm.add(i, body[i * 1024 : (i + 1) * 1024])
    out = asm.finish()
    for name, want in residual.items():
        assert out[name].dtype == torch.float32
        assert torch.equal(out[name].to(torch.bfloat16).view(torch.int16), want.view(torch.int16)), name
    with pytest.raises(ShapeMismatch):  # a residual's manifest is no outer state's, nor the reverse
        decode_manifest(manifest, SPEC)
    with pytest.raises(ValueError, match="dtype"):
        StateSpec(run_id="r", spec_hash=b"s" * 32, tensors=(), dtype="float16")
