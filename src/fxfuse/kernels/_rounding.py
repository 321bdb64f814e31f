"""Round-half-to-even downcasts that are exact on the GPU and in Triton's interpreter alike.

The GPU's casts round half to even. Triton's CPU interpreter truncates fp32 -> bf16 and
mis-rounds some fp32 -> fp8 values and ties. Rounding onto the target grid explicitly in
fp32 first makes the final cast exact everywhere, so kernels are tested bit for bit on
the CPU. Kernels take ``EXACT_CASTS`` as a constexpr, true only under the interpreter
(`exact_casts()`): the GPU's own casts already round half to even, and the explicit
path's integer work is measurable in kernels that should run at the memory limit.
"""

import triton
import triton.language as tl

from . import interpreted


def exact_casts() -> bool:
    """Whether kernels must round explicitly (Triton's interpreter), for ``EXACT_CASTS``."""
    return interpreted()


# Globals read inside kernels must be constexpr for the compiler.
FP8_MAX = tl.constexpr(448.0)
# Adding and subtracting 1.5 * 2**23 rounds an fp32 of magnitude < 2**22 to an integer,
# half to even (IEEE round-to-nearest-even of the addition).
_RINT_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def round_to_grid(v, MANTISSA: tl.constexpr, MIN_EXP: tl.constexpr):
    """fp32 ``v`` rounded half-to-even onto the grid of a float format with ``MANTISSA``
    stored bits and smallest normal exponent ``MIN_EXP`` (subnormals included)."""
    bits = v.to(tl.int32, bitcast=True)
    exp = ((bits >> 23) & 0xFF) - 127
    exp = tl.maximum(exp, MIN_EXP)  # below the normal range the grid is the subnormal step
    step = ((exp - MANTISSA + 127) << 23).to(tl.float32, bitcast=True)
    inv_step = ((MANTISSA - exp + 127) << 23).to(tl.float32, bitcast=True)
    magnitude = tl.abs(v) * inv_step  # exact: a power of two
    rounded = ((magnitude + _RINT_MAGIC) - _RINT_MAGIC) * step
    # The sign is put back bitwise so that values rounding to zero keep it (-0), as the cast does.
    out = (rounded.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)
    return tl.where(exp == 128, v, out)  # inf and NaN pass through


@triton.jit
def round_to_e4m3(v):
    """``v`` (fp32, already clamped to +-448) rounded half-to-even onto the E4M3 grid."""
    return round_to_grid(v, 3, -6)


@triton.jit
def quantize_fp8(v, inv_scale, EXACT_CASTS: tl.constexpr):
    """fp8(clamp(v * inv_scale, +-448)) with round-half-to-even, for fp32 ``v``."""
    scaled = tl.minimum(tl.maximum(v * inv_scale, -FP8_MAX), FP8_MAX)
    if EXACT_CASTS:
        scaled = round_to_e4m3(scaled)
    return scaled.to(tl.float8e4nv)


@triton.jit
def round_to(v, dtype: tl.constexpr, EXACT_CASTS: tl.constexpr):
    """fp32 ``v`` cast to ``dtype`` (bf16, fp16 or fp32) rounding half to even.

    Compiled, bf16 goes through the hardware's ``cvt.rn.bf16.f32`` as inline assembly:
    a plain ``.to(bf16)`` was seen folded away with a ``.to(fp32)`` after it (a round trip
    the compiler took for the identity), and the integer rounding that replaced it cost
    four instructions an element, which bound the norm kernels on the H200 (RESULTS.md,
    2026-12-03). Under the interpreter, whose casts truncate, bf16 (and fp16, with its
    subnormals) are rounded onto their grid explicitly in fp32 so the cast is exact.
    """
    if dtype == tl.bfloat16:
        if EXACT_CASTS:
            bits = v.to(tl.int32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536  # keep the top 16 bits
            return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
        else:
            return tl.inline_asm_elementwise("cvt.rn.bf16.f32 $0, $1;", "=h,r", [v], dtype=tl.bfloat16,
                                             is_pure=True, pack=1)
    elif dtype == tl.float16 and EXACT_CASTS:
        return round_to_grid(v, 10, -14).to(tl.float16)  # past 65504 this rounds to 65536 -> inf, as the cast
    else:
        return v.to(dtype)
