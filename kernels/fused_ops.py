"""Building blocks of the fused Triton kernels (kernels/fused.py, fused_select.py):
correctly rounded single operations, bfloat16 rounding, the quantizer's step as torch
computes it, and reading and setting bit fields of the wire's little-endian streams.

Correctly rounded: on CUDA Triton's `/` is approximate and `a*b+c` may be fused into one
rounding, so each operation the torch references do as its own kernel is spelled out with
libdevice; Triton's CPU interpreter (numpy) has no libdevice but rounds every operation on
its own, so there (EXACT false) the plain operators are exact.
"""

from __future__ import annotations

try:  # Triton is optional: CPU and MPS peers never need it
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - depends on the installation
    triton = None


if triton is not None:
    @triton.jit
    def add(a, b, EXACT: tl.constexpr):
        if EXACT:
            return libdevice.add_rn(a, b)
        return a + b

    @triton.jit
    def sub(a, b, EXACT: tl.constexpr):
        if EXACT:
            return libdevice.sub_rn(a, b)
        return a - b

    @triton.jit
    def mul(a, b, EXACT: tl.constexpr):
        if EXACT:
            return libdevice.mul_rn(a, b)
        return a * b

    @triton.jit
    def div(a, b, EXACT: tl.constexpr):
        if EXACT:
            return libdevice.div_rn(a, b)
        return a / b

    @triton.jit
    def rint(x, EXACT: tl.constexpr):
        """Round half to even, as torch.round."""
        if EXACT:
            return libdevice.rint(x)
        r = tl.floor(x + 0.5)
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0
        return tl.where(((r - x) == 0.5) & odd, r - 1.0, r)

    @triton.jit
    def quant_step(hi, lo, LEVELS: tl.constexpr, recip, EXACT: tl.constexpr):
        """(hi − lo) / (levels − 1) as torch computes it: on CUDA torch divides by a scalar
        as a product with its fp32 reciprocal; on the CPU it divides."""
        if EXACT:
            return libdevice.mul_rn(libdevice.sub_rn(hi, lo), recip)
        return (hi - lo) / (LEVELS - 1.0)

    @triton.jit
    def to_bf16(x):
        """x ≥ 0 rounded to the nearest bfloat16, ties to even, as a float32 (torch's
        .to(torch.bfloat16)); spelled out on the bits because the interpreter truncates."""
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def or_field(words_ptr, entry, value, mask, WIDTH: tl.constexpr):
        """ORs `value` (< 2^WIDTH) into bits entry·WIDTH … of a zeroed little-endian stream
        of int32 words: one word, or two where the field crosses a word boundary."""
        g = entry * WIDTH
        w = g >> 5
        o = (g & 31).to(tl.int32)
        tl.atomic_or(words_ptr + w, value << o, mask=mask, sem="relaxed")
        if 32 % WIDTH != 0:
            tl.atomic_or(words_ptr + w + 1, value >> ((32 - o) & 31), mask=mask & (o + WIDTH > 32), sem="relaxed")

    @triton.jit
    def read_field(words_ptr, entry, mask, WIDTH: tl.constexpr):
        """The WIDTH-bit field of `entry` in a little-endian stream of int32 words."""
        g = entry * WIDTH
        w = g >> 5
        o = (g & 31).to(tl.uint32)
        v = tl.load(words_ptr + w, mask=mask, other=0).to(tl.uint32, bitcast=True) >> o
        if 32 % WIDTH != 0:
            spill = mask & (o + WIDTH > 32)
            hi = tl.load(words_ptr + w + 1, mask=spill, other=0).to(tl.uint32, bitcast=True)
            v = v | tl.where(spill, hi << ((32 - o) & 31), 0)
        return (v & ((1 << WIDTH) - 1)).to(tl.int32)
