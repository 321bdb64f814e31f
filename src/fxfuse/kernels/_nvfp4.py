"""NVFP4 epilogue helpers shared by the quant, SiLU-and-mul and attention kernels.

The arithmetic is the op contract's (``fxfuse/ops/nvfp4.py``), step for step in fp32:
``sf = e4m3(min(vmax / 6 * gs, 448))``, ``inv = gs / sf`` (0 where ``sf == 0``), E2M1
codes of ``v * inv`` rounded to nearest with ties to the even index, zero always +0.
Every division is ``div_rn`` (IEEE), as torch divides.
"""

import triton
import triton.language as tl

from ._rounding import FP8_MAX, round_to_e4m3

E2M1_MAX = tl.constexpr(6.0)


@triton.jit
def e2m1_codes(v):
    """4-bit E2M1 codes (int32, ``sign << 3 | index``) of fp32 ``v``, saturating at +-6."""
    a = tl.abs(v)
    # Midpoints between neighbours; a tie rounds up (>=) exactly when the upper index is even.
    idx = (a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
    idx += (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32)
    negative = (v < 0) & (idx != 0)
    return idx | (negative.to(tl.int32) << 3)


@triton.jit
def block_scales(vmax, gs, EXACT_CASTS: tl.constexpr):
    """E4M3 block scale (fp8) and the fp32 multiplier ``inv`` for blocks with abs max ``vmax``."""
    sf = tl.minimum(tl.div_rn(vmax, E2M1_MAX) * gs, FP8_MAX)
    if EXACT_CASTS:
        sf = round_to_e4m3(sf)
    sf8 = sf.to(tl.float8e4nv)
    sff = sf8.to(tl.float32)
    inv = tl.where(sff != 0.0, tl.div_rn(gs, tl.where(sff != 0.0, sff, 1.0)), 0.0)
    return sf8, inv


@triton.jit
def quantize_rows(v, gs, ROWS: tl.constexpr, COLS: tl.constexpr, EXACT_CASTS: tl.constexpr):
    """NVFP4 of an fp32 tile ``v`` ``[ROWS, COLS]`` (COLS a multiple of 16).

    Returns ``(packed [ROWS, COLS // 2] uint8, scales [ROWS, COLS // 16] fp8)``; masked
    elements must be 0 in ``v``.
    """
    blocks = tl.reshape(v, (ROWS, COLS // 16, 16))
    vmax = tl.max(tl.abs(blocks), axis=2)
    sf8, inv = block_scales(vmax, gs, EXACT_CASTS)
    codes = e2m1_codes(blocks * inv[:, :, None])
    pairs = tl.reshape(codes, (ROWS, COLS // 2, 2))
    lo, hi = tl.split(pairs)
    return (lo | (hi << 4)).to(tl.uint8), sf8


@triton.jit
def swizzled_offset(m, k, kb_pad):
    """Byte offset of the scale of row ``m``, block column ``k`` in the 128x4 swizzled layout."""
    return ((m // 128) * (kb_pad // 4) + k // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + k % 4
