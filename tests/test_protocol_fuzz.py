"""Fuzzing the delta decoder: arbitrary bytes, mutated valid messages and valid messages
with one field replaced raise only ProtocolError from `decode_delta`, never anything else."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from locoswarm.protocol import DecodedDelta, DeltaSpec, ProtocolError, decode_delta

import protocol_cases as cases



# --------------------------------------------------------------------------- fuzzing


def _decode_or_protocol_error(data: bytes, spec: DeltaSpec) -> None:
    try:
        result = decode_delta(data, spec)
    except ProtocolError:
        return
    assert isinstance(result, DecodedDelta)
    assert len(result.tensors) == len(spec.tensors)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_decode_of_arbitrary_bytes_raises_only_protocol_errors(data: bytes) -> None:
    spec, _ = cases.fixed_case()
    _decode_or_protocol_error(data, spec)


_MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(min_value=0), st.integers(min_value=0, max_value=7)),
    st.tuples(st.just("set"), st.integers(min_value=0), st.integers(min_value=0, max_value=255)),
    st.tuples(st.just("truncate"), st.integers(min_value=0)),
    st.tuples(st.just("insert"), st.integers(min_value=0), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(min_value=0), st.integers(min_value=1, max_value=16)),
)


def _apply(data: bytes, ops: list[tuple]) -> bytes:
    buf = bytearray(data)
    for op in ops:
        if not buf:
            break
        kind, pos = op[0], op[1] % len(buf)
        if kind == "flip":
            buf[pos] ^= 1 << op[2]
        elif kind == "set":
            buf[pos] = op[2]
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "insert":
            buf[pos:pos] = op[2]
        else:
            del buf[pos : pos + op[2]]
    return bytes(buf)


@settings(max_examples=300, deadline=None)
@given(st.lists(_MUTATION, min_size=1, max_size=6))
def test_decode_of_a_mutated_valid_message_raises_only_protocol_errors(ops: list[tuple]) -> None:
    spec, data = cases.fixed_case()
    _decode_or_protocol_error(_apply(data, ops), spec)


_ANY_VALUE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=9) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.tuples(st.sampled_from(["v", "run", "spec", "round", "sender", "tokens", "tensors"]), st.just(-1)),
        st.tuples(st.integers(min_value=0, max_value=2), st.integers(min_value=0, max_value=7)),
    ),
    _ANY_VALUE,
)
def test_decode_of_a_valid_message_with_one_field_replaced_raises_only_protocol_errors(
    where: tuple[Any, int], value: Any
) -> None:
    spec, data = cases.fixed_case()
    body = cases.unpack(data)
    if where[1] == -1:
        body[where[0]] = value
    else:
        body["tensors"][where[0]][where[1]] = value
    _decode_or_protocol_error(cases.pack(body), spec)
