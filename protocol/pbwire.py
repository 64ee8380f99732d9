"""The protobuf messages of hivemind's DHT as they cross the wire, read and written without
the protobuf library, so that a peer that cannot import hivemind (py-libp2p on Windows,
issue 22) still speaks them (docs/protocol.md, "Speaking the swarm without hivemind").

The codec is generic: the messages themselves (p2pd's unary calls, hivemind's dht.proto
and auth.proto, libp2p's keys) are frozen dataclasses in protocol/pbmessages.py whose
fields carry their protobuf number and kind (`pb`). `encode` writes a message as the
protobuf library does (fields in number order, proto3 defaults left out, repeated numbers
packed, required and oneof fields always written) and `decode` reads it back.
`write_delimited`/`read_delimited` are the uvarint length prefix around each message on a
unary call's stream.

`decode` trusts nothing: a message is at most `max_size` bytes (p2pd's 4 MiB by default,
OversizedMessage above), every length stays inside its enclosing message, unknown fields
are skipped and anything else wrong (a truncated or overlong varint, a bad wire type or
field number, a missing required field, a second copy of a sub-message, invalid UTF-8) is a
MalformedMessage naming the message path, the field and the byte offset.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import struct
from typing import Any, NamedTuple

from locoswarm.protocol.errors import MalformedMessage, OversizedMessage

MAX_MESSAGE_SIZE = 4 << 20
"""p2pd's persistentConnMaxMsgSize (hivemind's DEFAULT_MAX_MSG_SIZE): larger messages are refused."""
VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5
"""The wire types this codec reads (3 and 4, the deprecated groups, are refused)."""
_MAX_FIELD_NUMBER = (1 << 29) - 1
_UINT64 = (1 << 64) - 1


# ---------------------------------------------------------------- varints and framing

def encode_uvarint(value: int) -> bytes:
    if not 0 <= value <= _UINT64:
        raise ValueError(f"uvarint {value} outside [0, 2**64)")
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _uvarint(buf: bytes, pos: int, end: int, where: str) -> tuple[int, int]:
    """The varint at `pos` and the position after it; MalformedMessage when it runs past `end`
    or past 10 bytes or 2**64 − 1."""
    value = shift = 0
    start = pos
    while True:
        if pos >= end:
            raise MalformedMessage(f"{where}: varint at offset {start} runs past the end at offset {end}")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift >= 70:
            raise MalformedMessage(f"{where}: varint at offset {start} is longer than 10 bytes")
    if value > _UINT64:
        raise MalformedMessage(f"{where}: varint at offset {start} is above 2**64 - 1")
    return value, pos


def write_delimited(message: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> bytes:
    """`message` behind its uvarint length, as a unary call's stream carries it."""
    if len(message) > max_size:
        raise OversizedMessage(f"message of {len(message)} bytes is above the limit of {max_size}")
    return encode_uvarint(len(message)) + bytes(message)


def read_delimited(buffer: bytes | bytearray | memoryview, *,
                   max_size: int = MAX_MESSAGE_SIZE) -> tuple[bytes, int] | None:
    """The first length-delimited message in `buffer` and the bytes it took with its prefix,
    or None while `buffer` holds less than the whole message (read more and call again).
    A declared length above `max_size` is OversizedMessage as soon as the prefix is complete,
    before any of the body is waited for; a prefix longer than 10 bytes is MalformedMessage."""
    length = shift = 0
    for pos in range(min(len(buffer), 10)):
        byte = buffer[pos]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if length > max_size:
                raise OversizedMessage(f"delimited message announces {length} bytes, above the limit of {max_size}")
            end = pos + 1 + length
            return (bytes(buffer[pos + 1:end]), end) if len(buffer) >= end else None
        shift += 7
        if length > max_size:  # more prefix bytes can only make it larger
            raise OversizedMessage(f"delimited message announces over {max_size} bytes, the limit")
    if len(buffer) >= 10:
        raise MalformedMessage("delimited message: length prefix longer than 10 bytes")
    return None


# ---------------------------------------------------------------- the schema

class _Field(NamedTuple):
    number: int
    name: str
    kind: Any
    """bytes, str, bool, float (a double), an IntEnum (an enum) or a message dataclass."""
    repeated: bool
    required: bool
    oneof: str | None


def pb(number: int, kind: Any, *, repeated: bool = False, required: bool = False, oneof: str | None = None) -> Any:
    """A dataclass field that is protobuf field `number` of `kind` (see _Field). Its default
    is the protobuf default: empty, 0, or None (absent) for a sub-message or a oneof member."""
    if repeated:
        default: Any = ()
    elif oneof is not None or dataclasses.is_dataclass(kind):
        default = None
    else:
        default = kind(0) if issubclass(kind, enum.IntEnum) else kind()
    return dataclasses.field(default=default, metadata={"pb": (number, kind, repeated, required, oneof)})


@functools.cache
def _schema(cls: type) -> tuple[_Field, ...]:
    fields = (_Field(f.metadata["pb"][0], f.name, *f.metadata["pb"][1:]) for f in dataclasses.fields(cls))
    return tuple(sorted(fields, key=lambda f: f.number))


def _wire_type(kind: Any) -> int:
    return FIXED64 if kind is float else VARINT if kind is bool or issubclass(kind, enum.IntEnum) else LENGTH


# ---------------------------------------------------------------- encoding

def encode(message: Any) -> bytes:
    """`message` (a dataclass of protocol/pbmessages.py) in protobuf wire format. A wrong
    Python type in a field is a TypeError, two members of one oneof a ValueError."""
    out = bytearray()
    _encode_into(message, out)
    return bytes(out)


def _encode_into(message: Any, out: bytearray) -> None:
    name = type(message).__name__
    oneofs: dict[str, str] = {}
    for f in _schema(type(message)):
        value = getattr(message, f.name)
        tag = encode_uvarint(f.number << 3 | _wire_type(f.kind))
        if f.repeated:
            if _wire_type(f.kind) != LENGTH and value:  # proto3 packs repeated numbers
                packed = b"".join(_scalar(f, v, name) for v in value)
                out += encode_uvarint(f.number << 3 | LENGTH) + encode_uvarint(len(packed)) + packed
            elif value:
                for v in value:
                    out += tag + _scalar(f, v, name)
            continue
        if value is None:
            if f.required:
                raise ValueError(f"{name}.{f.name} is required")
            continue
        if f.oneof is not None:
            if f.oneof in oneofs:
                raise ValueError(f"{name}: {oneofs[f.oneof]} and {f.name} are both set in oneof {f.oneof}")
            oneofs[f.oneof] = f.name
        elif not f.required and not dataclasses.is_dataclass(f.kind) and _is_default(f.kind, value):
            continue  # proto3 leaves defaults off the wire (but writes -0.0, whose bits are not zero)
        out += tag + _scalar(f, value, name)


def _is_default(kind: Any, value: Any) -> bool:
    return value == 0 and struct.pack("<d", value) == bytes(8) if kind is float else not value


def _scalar(f: _Field, value: Any, name: str) -> bytes:
    kind = f.kind
    if dataclasses.is_dataclass(kind):
        if type(value) is not kind:
            raise TypeError(f"{name}.{f.name} must be a {kind.__name__}, got {type(value).__name__}")
        return _length_prefixed(encode(value))
    if kind is float:
        return struct.pack("<d", float(value))
    if kind is bool or issubclass(kind, enum.IntEnum):
        if not isinstance(value, int):
            raise TypeError(f"{name}.{f.name} must be an integer, got {type(value).__name__}")
        return encode_uvarint(int(value) & _UINT64)  # a negative enum is 10 bytes, as int32 is sign-extended
    if kind is str:
        if not isinstance(value, str):
            raise TypeError(f"{name}.{f.name} must be a str, got {type(value).__name__}")
        return _length_prefixed(value.encode())
    if not isinstance(value, (bytes, bytearray)):
        raise TypeError(f"{name}.{f.name} must be bytes, got {type(value).__name__}")
    return _length_prefixed(bytes(value))


def _length_prefixed(payload: bytes) -> bytes:
    return encode_uvarint(len(payload)) + payload


# ---------------------------------------------------------------- decoding

def decode(cls: type, data: bytes | bytearray | memoryview, *, max_size: int = MAX_MESSAGE_SIZE) -> Any:
    """Message `cls` read from `data`; OversizedMessage above `max_size` bytes, MalformedMessage
    naming the field and offset for anything else wrong (see the module docstring)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedMessage(f"{cls.__name__} must be bytes, got {type(data).__name__}")
    if len(data) > max_size:
        raise OversizedMessage(f"{cls.__name__} of {len(data)} bytes is above the limit of {max_size}")
    buf = bytes(data)
    return _decode(cls, buf, 0, len(buf), cls.__name__)


def _decode(cls: type, buf: bytes, pos: int, end: int, path: str) -> Any:
    fields = {f.number: f for f in _schema(cls)}
    values: dict[str, Any] = {}
    while pos < end:
        at = pos
        tag, pos = _uvarint(buf, pos, end, f"{path} tag")
        number, wire = tag >> 3, tag & 7
        f = fields.get(number)
        where = f"{path}.{f.name}" if f else f"{path} field {number}"
        if not 1 <= number <= _MAX_FIELD_NUMBER:
            raise MalformedMessage(f"{path}: field number {number} at offset {at} is out of range")
        if wire == VARINT:
            raw, pos = _uvarint(buf, pos, end, where)
        elif wire in (FIXED64, FIXED32):
            size = 8 if wire == FIXED64 else 4
            if end - pos < size:
                raise MalformedMessage(f"{where} at offset {at}: {size}-byte value runs past the end at offset {end}")
            raw, pos = (pos, pos + size), pos + size
        elif wire == LENGTH:
            length, pos = _uvarint(buf, pos, end, where)
            if length > end - pos:
                raise MalformedMessage(f"{where} at offset {at}: length {length} runs past the end "
                                       f"({end - pos} bytes left)")
            raw, pos = (pos, pos + length), pos + length
        else:
            raise MalformedMessage(f"{where} at offset {at}: wire type {wire} is not supported")
        if f is None:
            continue  # an unknown field: skipped, as protobuf readers do
        if f.repeated and wire == LENGTH and _wire_type(f.kind) != LENGTH:  # packed numbers
            lo, hi = raw
            items = values.setdefault(f.name, [])
            while lo < hi:
                item, lo = _packed_item(f, buf, lo, hi, where)
                items.append(item)
            continue
        if wire != _wire_type(f.kind):
            raise MalformedMessage(f"{where} at offset {at}: wire type {wire}, expected {_wire_type(f.kind)}")
        if f.repeated:
            items = values.setdefault(f.name, [])
            items.append(_value(f, buf, raw, f"{where}[{len(items)}]", at))
            continue
        if dataclasses.is_dataclass(f.kind) and f.name in values:
            raise MalformedMessage(f"{where} at offset {at}: a second copy of a singular sub-message")
        if f.oneof is not None:  # the last member of a oneof read wins, as in protobuf
            for other in fields.values():
                if other.oneof == f.oneof:
                    values.pop(other.name, None)
        values[f.name] = _value(f, buf, raw, where, at)
    for f in fields.values():
        if f.required and f.name not in values:
            raise MalformedMessage(f"{path}.{f.name}: a required field is missing")
        if f.repeated and f.name in values:
            values[f.name] = tuple(values[f.name])
    return cls(**values)


def _packed_item(f: _Field, buf: bytes, pos: int, end: int, where: str) -> tuple[Any, int]:
    if f.kind is float:
        if end - pos < 8:
            raise MalformedMessage(f"{where}: packed doubles end inside a value at offset {pos}")
        return struct.unpack_from("<d", buf, pos)[0], pos + 8
    raw, pos = _uvarint(buf, pos, end, where)
    return _value(f, buf, raw, where, pos), pos


def _value(f: _Field, buf: bytes, raw: Any, where: str, at: int) -> Any:
    kind = f.kind
    if kind is float:
        return struct.unpack_from("<d", buf, raw[0])[0]
    if kind is bool:
        return raw != 0  # any non-zero varint is true, as protobuf reads it
    if isinstance(kind, type) and issubclass(kind, enum.IntEnum):
        value = raw & 0xFFFFFFFF  # int32: the low 32 bits, sign-extended
        value -= (value & 0x80000000) << 1
        try:
            return kind(value)
        except ValueError:
            return value  # proto3 enums are open: an unknown value is kept, for the reader to judge
    lo, hi = raw
    if dataclasses.is_dataclass(kind):
        return _decode(kind, buf, lo, hi, where)
    if kind is str:
        try:
            return buf[lo:hi].decode()
        except UnicodeDecodeError:
            raise MalformedMessage(f"{where} at offset {at}: string is not valid UTF-8") from None
    return buf[lo:hi]

