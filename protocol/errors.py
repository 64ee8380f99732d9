"""One exception family for everything a peer can send wrong.

Callers catch `ProtocolError` to discard a message (never the node); the subclass and
its message say what was wrong so that the rejection can be logged with the peer.
"""


class ProtocolError(ValueError):
    """A message from the network failed validation."""


class MalformedMessage(ProtocolError):
    """Not decodable, a field missing, of the wrong type, or of the wrong length."""


class OversizedMessage(ProtocolError):
    """Larger than the run's spec allows."""


class VersionMismatch(ProtocolError):
    """A wire-format version this build does not speak."""


class SpecMismatch(ProtocolError):
    """From another run, or from a peer with another run spec."""


class ShapeMismatch(ProtocolError):
    """A tensor whose name, shape or compression layout differs from the spec's."""


class IndexOutOfRange(ProtocolError):
    """An index outside its chunk, or indices not strictly increasing within a chunk."""


class NonFiniteValue(ProtocolError):
    """A NaN or infinity, or a scale that is negative or out of order."""
