"""Unit tests of the delta wire format (locoswarm.protocol): round trip against the real
compressor, the size bound and every rejection class (test_protocol_fuzz.py fuzzes it)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from locoswarm.optim import densify
from locoswarm.protocol import (
    FORMAT_VERSION,
    DecodedDelta,
    DeltaMessage,
    DeltaSpec,
    IndexOutOfRange,
    MalformedMessage,
    NonFiniteValue,
    OversizedMessage,
    ShapeMismatch,
    SpecMismatch,
    VersionMismatch,
    decode_delta,
    encode_delta,
)

import protocol_cases as cases



@pytest.fixture
def case(gen: torch.Generator) -> tuple[DeltaSpec, DeltaMessage, list[torch.Tensor], bytes]:
    return cases.make(gen)


# --------------------------------------------------------------------------- round trip and size


def test_decode_inverts_encode_and_densifies_to_the_compressors_sent_values_bitwise(case) -> None:
    spec, msg, sent, data = case
    decoded = decode_delta(data, spec)
    assert isinstance(decoded, DecodedDelta)
    assert (decoded.round, decoded.sender, decoded.num_tokens) == (msg.round, msg.sender, msg.num_tokens)
    assert [t.name for t in decoded.tensors] == [name for name, _ in cases.SHAPES]
    assert len(decoded.tensors) == len(sent)
    for t, s, ts in zip(decoded.tensors, sent, spec.tensors):
        assert t.layout == ts.layout and t.bits == ts.bits
        dense = densify(t)
        assert dense.dtype == torch.float32
        assert torch.equal(dense, s)
        assert int((s != 0).sum()) > 0


def test_decode_accepts_bytearray_and_memoryview(case) -> None:
    spec, msg, _, data = case
    for view in (bytearray(data), memoryview(data)):
        assert decode_delta(view, spec).round == msg.round


def test_encode_is_deterministic(case) -> None:
    _, msg, _, data = case
    assert encode_delta(msg) == data


def test_encoded_size_is_the_byte_length_and_within_the_spec_limit(case) -> None:
    spec, _, _, data = case
    decoded = decode_delta(data, spec)
    assert decoded.nbytes == len(data)
    assert len(data) <= spec.max_message_bytes
    payload = sum(sum(t.payload_nbytes()) for t in spec.tensors)
    assert len(data) > payload


def test_max_message_bytes_bounds_the_largest_valid_message_with_ascii_fields(gen: torch.Generator) -> None:
    spec, msg, _, data = cases.make(gen, sender="s" * 128, round_=2**62, tokens=cases.MAX_TOKENS)
    assert len(data) <= spec.max_message_bytes
    assert decode_delta(data, spec).sender == msg.sender


def test_max_message_bytes_bounds_a_valid_message_with_multibyte_run_id_and_sender(gen: torch.Generator) -> None:
    # A run id of 150 three-byte characters and a sender of the longest allowed length
    # (128 characters, four bytes each) make a valid message. The limit counts the run id
    # and the sender in characters, not in encoded bytes, so it ends up below the message.
    run_id = "训练" * 75
    spec, msg, _, data = cases.make(gen, run_id=run_id, sender="\U0001f600" * 128)
    assert len(data) <= spec.max_message_bytes, (len(data), spec.max_message_bytes)
    assert decode_delta(data, spec).sender == msg.sender


def test_decode_accepts_a_valid_message_whose_run_id_exceeds_1024_bytes(gen: torch.Generator) -> None:
    # Nothing in DeltaSpec limits the run id's length, and max_message_bytes budgets for
    # it, yet the msgpack reader caps every string at 1024 bytes.
    spec, msg, _, data = cases.make(gen, run_id="r" * 1100)
    assert len(data) <= spec.max_message_bytes
    assert decode_delta(data, spec).round == msg.round


# --------------------------------------------------------------------------- rejections


@pytest.mark.parametrize("version", [0, 1, 3, "2", 2.0, True, None])
def test_decode_rejects_another_format_version(case, version: Any) -> None:
    spec, _, _, data = case
    bad = cases.mutated(data, lambda b: b.__setitem__("v", version))
    with pytest.raises(VersionMismatch, match="version"):
        decode_delta(bad, spec)
    assert FORMAT_VERSION == 2


def test_decode_rejects_another_run_id(case) -> None:
    spec, _, _, data = case
    bad = cases.mutated(data, lambda b: b.__setitem__("run", "other-run"))
    with pytest.raises(SpecMismatch, match="run 'other-run'"):
        decode_delta(bad, spec)


def test_decode_rejects_another_spec_hash(case) -> None:
    spec, _, _, data = case
    bad = cases.mutated(data, lambda b: b.__setitem__("spec", bytes(32)))
    with pytest.raises(SpecMismatch, match="spec hash"):
        decode_delta(bad, spec)


def test_decode_rejects_a_missing_tensor(case) -> None:
    spec, _, _, data = case
    bad = cases.mutated(data, lambda b: b["tensors"].pop())
    with pytest.raises(ShapeMismatch, match="carries 2 tensors, the spec has 3"):
        decode_delta(bad, spec)


def test_decode_rejects_an_extra_tensor(case) -> None:
    spec, _, _, data = case
    bad = cases.mutated(data, lambda b: b["tensors"].append(b["tensors"][-1]))
    with pytest.raises(ShapeMismatch, match="carries 4 tensors"):
        decode_delta(bad, spec)


def test_decode_rejects_a_renamed_tensor(case) -> None:
    spec, _, _, data = case
    bad = cases.mutated(data, lambda b: b["tensors"][cases.B].__setitem__(cases.NAME, "bias"))
    with pytest.raises(ShapeMismatch, match="'b' expected, got 'bias'"):
        decode_delta(bad, spec)


def test_decode_rejects_tensors_in_another_order(case) -> None:
    spec, _, _, data = case
    bad = cases.mutated(data, lambda b: b["tensors"].reverse())
    with pytest.raises(ShapeMismatch, match="'w' expected"):
        decode_delta(bad, spec)


def test_decode_rejects_a_tensor_of_another_shape(case) -> None:
    spec, _, _, data = case
    bad = cases.mutated(data, lambda b: b["tensors"][cases.W].__setitem__(cases.SHAPE, [100, 64]))
    with pytest.raises(ShapeMismatch, match="shape"):
        decode_delta(bad, spec)


@pytest.mark.parametrize("field, value", [(cases.BITS, 8), (cases.BITS, 2), (cases.CHUNK, 128), (cases.K, 6)])
def test_decode_rejects_another_chunk_k_or_bits(case, field: int, value: int) -> None:
    spec, _, _, data = case
    bad = cases.mutated(data, lambda b: b["tensors"][cases.W].__setitem__(field, value))
    with pytest.raises(ShapeMismatch, match="chunk/k/bits"):
        decode_delta(bad, spec)


@pytest.mark.parametrize("keep", [0, 1, 10, -1])
def test_decode_rejects_truncated_bytes(case, keep: int) -> None:
    spec, _, _, data = case
    with pytest.raises(MalformedMessage, match="msgpack"):
        decode_delta(data[:keep], spec)


def test_decode_rejects_trailing_bytes(case) -> None:
    spec, _, _, data = case
    with pytest.raises(MalformedMessage, match="msgpack"):
        decode_delta(data + b"\x00", spec)


def test_decode_rejects_bytes_longer_than_the_spec_limit(case) -> None:
    spec, _, _, data = case
    too_long = data + b"\x00" * (spec.max_message_bytes - len(data) + 1)
    assert len(too_long) == spec.max_message_bytes + 1
    with pytest.raises(OversizedMessage, match=f"exceeds the limit of {spec.max_message_bytes}"):
        decode_delta(too_long, spec)


def test_decode_rejects_input_that_is_not_bytes(case) -> None:
    spec, _, _, data = case
    with pytest.raises(MalformedMessage, match="must be bytes"):
        decode_delta(data.decode("latin-1"), spec)  # type: ignore[arg-type]


def test_decode_rejects_a_body_that_is_not_a_map(case) -> None:
    spec, _, _, _ = case
    with pytest.raises(MalformedMessage, match="map"):
        decode_delta(cases.pack([1, 2, 3]), spec)


@pytest.mark.parametrize("key", ["tokens", "sender", "tensors"])
def test_decode_rejects_a_missing_field(case, key: str) -> None:
    spec, _, _, data = case
    bad = cases.mutated(data, lambda b: b.pop(key))
    with pytest.raises(MalformedMessage, match=f"missing \\['{key}'\\]"):
        decode_delta(bad, spec)


def test_decode_rejects_an_unexpected_field(case) -> None:
    spec, _, _, data = case
    bad = cases.mutated(data, lambda b: b.__setitem__("extra", 1))
    with pytest.raises(MalformedMessage, match="unexpected \\['extra'\\]"):
        decode_delta(bad, spec)


def test_decode_rejects_unexpected_fields_with_both_str_and_bytes_keys_as_malformed(case) -> None:
    # strict_map_key lets both str and bytes keys through; the error message sorts the
    # unexpected keys, and sorting a mix of str and bytes raises TypeError.
    spec, _, _, data = case

    def mutate(body: dict) -> None:
        body["extra"] = 1
        body[b"raw"] = 2

    with pytest.raises(MalformedMessage, match="unexpected"):
        decode_delta(cases.mutated(data, mutate), spec)


@pytest.mark.parametrize("blob", [cases.INDICES, cases.VALUES, cases.SCALES])
def test_decode_rejects_a_payload_blob_one_byte_short(case, blob: int) -> None:
    spec, _, _, data = case
    label = {cases.INDICES: "indices", cases.VALUES: "values", cases.SCALES: "scales"}[blob]
    expected = spec.tensors[cases.E].payload_nbytes()[blob - cases.INDICES]
    bad = cases.mutated(data, lambda b: b["tensors"][cases.E].__setitem__(blob, b["tensors"][cases.E][blob][:-1]))
    with pytest.raises(MalformedMessage, match=f"'e': {label} hold {expected - 1} bytes, expected {expected}"):
        decode_delta(bad, spec)


def test_decode_rejects_a_payload_blob_that_is_not_bytes(case) -> None:
    spec, _, _, data = case
    bad = cases.mutated(data, lambda b: b["tensors"][cases.W].__setitem__(cases.INDICES, "not bytes"))
    with pytest.raises(MalformedMessage, match="indices hold str"):
        decode_delta(bad, spec)


def test_decode_rejects_a_tensor_entry_with_missing_fields(case) -> None:
    spec, _, _, data = case
    bad = cases.mutated(data, lambda b: b["tensors"][cases.W].pop())
    with pytest.raises(MalformedMessage, match="8 fields"):
        decode_delta(bad, spec)


def test_decode_rejects_an_index_beyond_the_last_chunk(case) -> None:
    spec, _, _, data = case
    lay = spec.tensors[cases.E].layout
    assert lay.last_len < lay.chunk  # so the index fits its bits but not the chunk

    def edit(idx: torch.Tensor) -> None:
        idx[-1] = lay.last_len  # still increasing, one past the last element

    with pytest.raises(IndexOutOfRange, match=f"beyond the last chunk's {lay.last_len} elements"):
        decode_delta(cases.repack_indices(data, spec, cases.E, edit), spec)


def test_decode_rejects_an_index_beyond_a_single_chunk_tensor(case) -> None:
    spec, _, _, data = case
    lay = spec.tensors[cases.B].layout
    assert (lay.num_chunks, lay.last_len, lay.index_bits) == (1, 7, 3)
    with pytest.raises(IndexOutOfRange, match="beyond the last chunk"):
        decode_delta(cases.repack_indices(data, spec, cases.B, lambda idx: idx.fill_(7)), spec)


def test_decode_rejects_swapped_indices_within_a_full_chunk(case) -> None:
    spec, _, _, data = case

    def edit(idx: torch.Tensor) -> None:
        idx[0], idx[1] = idx[1].item(), idx[0].item()

    with pytest.raises(IndexOutOfRange, match="not strictly increasing within a chunk"):
        decode_delta(cases.repack_indices(data, spec, cases.W, edit), spec)


def test_decode_rejects_a_repeated_index_within_a_full_chunk(case) -> None:
    spec, _, _, data = case
    k = spec.tensors[cases.W].k

    def edit(idx: torch.Tensor) -> None:
        idx[k + 1] = idx[k]  # second chunk

    with pytest.raises(IndexOutOfRange, match="not strictly increasing within a chunk"):
        decode_delta(cases.repack_indices(data, spec, cases.W, edit), spec)


def test_decode_rejects_non_increasing_indices_within_the_last_chunk(case) -> None:
    spec, _, _, data = case

    def edit(idx: torch.Tensor) -> None:
        idx[-1], idx[-2] = idx[-2].item(), idx[-1].item()

    with pytest.raises(IndexOutOfRange, match="not strictly increasing within the last chunk"):
        decode_delta(cases.repack_indices(data, spec, cases.E, edit), spec)


def test_decode_accepts_indices_repacked_unchanged(case) -> None:
    # guards the helpers above: re-packing without an edit must give a valid message
    spec, _, _, data = case
    same = cases.repack_scales(cases.repack_indices(data, spec, cases.E, lambda idx: None), cases.E, lambda s: None)
    assert same == data
    decode_delta(same, spec)


@pytest.mark.parametrize(
    "position, value",
    [((0, 0), float("nan")), ((3, 1), float("nan")), ((0, 1), float("inf")), ((1, 0), float("-inf"))],
)
def test_decode_rejects_a_non_finite_scale(case, position: tuple[int, int], value: float) -> None:
    spec, _, _, data = case

    def edit(s: torch.Tensor) -> None:
        s[position] = value

    with pytest.raises(NonFiniteValue, match="non-finite scale"):
        decode_delta(cases.repack_scales(data, cases.W, edit), spec)


def test_decode_rejects_a_negative_scale(case) -> None:
    spec, _, _, data = case

    def edit(s: torch.Tensor) -> None:
        s[2, 0] = -s[2, 0]

    with pytest.raises(NonFiniteValue, match="0 <= lo <= hi"):
        decode_delta(cases.repack_scales(data, cases.W, edit), spec)


def test_decode_rejects_hi_below_lo(case) -> None:
    spec, _, _, data = case

    def edit(s: torch.Tensor) -> None:
        assert bool(s[4, 0] < s[4, 1])
        s[4] = s[4].flip(0).clone()

    with pytest.raises(NonFiniteValue, match="0 <= lo <= hi"):
        decode_delta(cases.repack_scales(data, cases.E, edit), spec)


def test_decode_rejects_a_token_count_above_the_spec_maximum(case) -> None:
    spec, _, _, data = case
    bad = cases.mutated(data, lambda b: b.__setitem__("tokens", spec.max_tokens + 1))
    with pytest.raises(MalformedMessage, match="'tokens'"):
        decode_delta(bad, spec)
    ok = cases.mutated(data, lambda b: b.__setitem__("tokens", spec.max_tokens))
    assert decode_delta(ok, spec).num_tokens == spec.max_tokens


@pytest.mark.parametrize("key, value", [("round", -1), ("tokens", -1), ("round", 2**62 + 1)])
def test_decode_rejects_an_out_of_range_counter(case, key: str, value: int) -> None:
    spec, _, _, data = case
    bad = cases.mutated(data, lambda b: b.__setitem__(key, value))
    with pytest.raises(MalformedMessage, match=f"'{key}' = {value} outside"):
        decode_delta(bad, spec)


@pytest.mark.parametrize("key", ["round", "tokens"])
@pytest.mark.parametrize("value", ["3", 3.0, True, None, [3]])
def test_decode_rejects_a_non_integer_counter(case, key: str, value: Any) -> None:
    spec, _, _, data = case
    bad = cases.mutated(data, lambda b: b.__setitem__(key, value))
    with pytest.raises(MalformedMessage, match=f"'{key}' must be an integer"):
        decode_delta(bad, spec)


@pytest.mark.parametrize("sender", ["x" * 129, "", 7, b"peer", None])
def test_decode_rejects_a_sender_that_is_not_a_short_string(case, sender: Any) -> None:
    spec, _, _, data = case
    bad = cases.mutated(data, lambda b: b.__setitem__("sender", sender))
    with pytest.raises(MalformedMessage, match="sender"):
        decode_delta(bad, spec)


def test_decode_accepts_a_sender_of_exactly_the_maximum_length(case) -> None:
    spec, _, _, data = case
    ok = cases.mutated(data, lambda b: b.__setitem__("sender", "x" * 128))
    assert decode_delta(ok, spec).sender == "x" * 128


def test_decode_rejects_tensors_that_are_not_a_list(case) -> None:
    spec, _, _, data = case
    bad = cases.mutated(data, lambda b: b.__setitem__("tensors", {"w": 1}))
    with pytest.raises(ShapeMismatch, match="dict tensors"):
        decode_delta(bad, spec)
