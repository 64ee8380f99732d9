"""Wire formats and their validation. Nothing here trusts its input."""

from locoswarm.protocol.delta import (
    FORMAT_VERSION,
    DecodedDelta,
    DeltaMessage,
    DeltaSpec,
    PackedTensor,
    SparseTensor,
    TensorSpec,
    decode_delta,
    encode_delta,
)
from locoswarm.protocol.errors import (
    IndexOutOfRange,
    MalformedMessage,
    NonFiniteValue,
    OversizedMessage,
    ProtocolError,
    ShapeMismatch,
    SpecMismatch,
    VersionMismatch,
)

__all__ = [
    "FORMAT_VERSION",
    "DecodedDelta",
    "DeltaMessage",
    "DeltaSpec",
    "IndexOutOfRange",
    "MalformedMessage",
    "NonFiniteValue",
    "OversizedMessage",
    "PackedTensor",
    "ProtocolError",
    "ShapeMismatch",
    "SparseTensor",
    "SpecMismatch",
    "TensorSpec",
    "VersionMismatch",
    "decode_delta",
    "encode_delta",
]
