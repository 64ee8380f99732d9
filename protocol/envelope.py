"""The checks every msgpack message of ours starts with: bounded size, decodable, a map,
the right format version, exactly the expected fields. Each failure is the ProtocolError
subclass that says which, with `what` naming the kind of message."""

from __future__ import annotations

from typing import Any

import msgpack

from locoswarm.protocol.errors import MalformedMessage, OversizedMessage, VersionMismatch


def unpack_envelope(
    blob: Any, what: str, *, max_bytes: int, version: int, keys: frozenset[str], **limits: int
) -> dict[str, Any]:
    """Parse `blob` as a msgpack map of exactly `keys`, at most `max_bytes` long, with
    msgpack's own per-object `limits` (max_bin_len, max_str_len, max_array_len)."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise MalformedMessage(f"{what} must be bytes, got {type(blob).__name__}")
    if len(blob) > max_bytes:
        raise OversizedMessage(f"{what} of {len(blob)} bytes exceeds the limit of {max_bytes}")
    try:
        m = msgpack.unpackb(bytes(blob), raw=False, use_list=True, strict_map_key=True,
                            max_map_len=max(16, len(keys) + 1),
                            max_ext_len=0, **limits)
    except Exception as e:  # msgpack raises many types for bad input; all mean "malformed"
        raise MalformedMessage(f"{what} is not valid msgpack: {type(e).__name__}: {e}") from None
    if not isinstance(m, dict):
        raise MalformedMessage(f"{what} must be a map, got {type(m).__name__}")
    v = m.get("v")
    if type(v) is not int or v != version:
        raise VersionMismatch(f"{what} format version {v!r}; this peer speaks {version}")
    if set(m) != keys:
        # repr: keys may mix str and bytes, which do not sort together
        missing, extra = sorted(keys - set(m)), sorted(map(repr, set(m) - keys))
        raise MalformedMessage(f"{what} fields wrong: missing {missing}, unexpected [{', '.join(extra)}]")
    return m
