"""How a flat tensor of `numel` elements is cut into power-of-two chunks for top-k.

Every chunk but the last holds `chunk` elements and sends `k` of them; the last holds
`last_len` = numel − (num_chunks − 1)·chunk elements and sends `k_last` = min(k, last_len).
A tensor smaller than the configured chunk uses the next power of two at or above its size
so that its indices need fewer bits. Sender and receiver derive the same layout from
(numel, chunk, k), so none of these derived counts travel on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True, slots=True)
class ChunkLayout:
    numel: int
    """Elements of the flattened tensor (> 0)."""
    chunk: int
    """Elements per chunk, a power of two."""
    k: int
    """Entries kept in each full chunk (1 ≤ k ≤ chunk)."""

    def __post_init__(self) -> None:
        assert self.numel > 0, "empty tensor"
        assert self.chunk > 0 and self.chunk & (self.chunk - 1) == 0, "chunk must be a power of two"
        assert 1 <= self.k <= self.chunk, "k out of range"

    @classmethod
    def for_tensor(cls, numel: int, chunk: int, density: float) -> ChunkLayout:
        """The layout the compressor uses for a tensor: chunk shrunk to fit small tensors,
        k = round(density · chunk), at least 1."""
        c = min(chunk, next_pow2(numel))
        k = min(c, max(1, round(density * c)))
        return cls(numel=numel, chunk=c, k=k)

    @property
    def num_chunks(self) -> int:
        return -(-self.numel // self.chunk)

    @property
    def last_len(self) -> int:
        return self.numel - (self.num_chunks - 1) * self.chunk

    @property
    def k_last(self) -> int:
        return min(self.k, self.last_len)

    @property
    def num_selected(self) -> int:
        return (self.num_chunks - 1) * self.k + self.k_last

    @property
    def index_bits(self) -> int:
        """Bits per packed index: log2(chunk), at least 1."""
        return max(1, self.chunk.bit_length() - 1)
