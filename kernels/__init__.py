"""Pure tensor functions for pseudo-gradient compression (chunked top-k, quantization,
bit packing). Plain-torch references that run alike on CPU, CUDA and MPS, and fused Triton
versions for CUDA (kernels/fused.py, imported only where used: it imports Triton) with the
same outputs; `fused_kernels(device)` says whether the fused ones can run there. No I/O, no
knowledge of peers."""

from locoswarm.kernels.bitpack import pack_bits, packed_nbytes, unpack_bits
from locoswarm.kernels.dispatch import fused_kernels
from locoswarm.kernels.layout import ChunkLayout
from locoswarm.kernels.quant import dequantize, quantize
from locoswarm.kernels.topk import chunked_topk, scatter_chunks

__all__ = [
    "ChunkLayout",
    "chunked_topk",
    "dequantize",
    "fused_kernels",
    "pack_bits",
    "packed_nbytes",
    "quantize",
    "scatter_chunks",
    "unpack_bits",
]
