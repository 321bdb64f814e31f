"""NVFP4 epilogue helpers shared by the quant, SiLU-and-mul and attention kernels.

The arithmetic is the op contract's (``fxfuse/ops/nvfp4.py``), step for step in fp32:
``sf = e4m3(min(vmax / 6 * gs, 448))``, ``inv = gs / sf`` (0 where ``sf == 0``), E2M1
codes of ``v * inv`` rounded to nearest with ties to the even index, zero always +0.
Every division is ``div_rn`` (IEEE), as torch divides.
"""

from typing import Optional

import torch
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
    codes = e2m1_code(blocks, inv[:, :, None])  # bit-equal to e2m1_codes(blocks * inv), half the work
    pairs = tl.reshape(codes, (ROWS, COLS // 2, 2))
    lo, hi = tl.split(pairs)
    return (lo | (hi << 4)).to(tl.uint8), sf8


@triton.jit
def swizzled_offset(m, k, kb_pad):
    """Byte offset of the scale of row ``m``, block column ``k`` in the 128x4 swizzled layout."""
    return ((m // 128) * (kb_pad // 4) + k // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + k % 4


# --------------------------------------------------------------------------- word-pair tiles
#
# The kernels below lay out the NVFP4 tile in their loads instead of reshaping registers
# (a reshape of a register tile is lowered through shared memory): a 16-bit input is read
# as int32 words, each holding the two elements of one output byte (little-endian: the
# even element in the low half), as two [ROWS, BLOCKS, 4] tiles per 16-element block
# (words 0-3 and 4-7). One thread then holds whole blocks, so the block max and the scale
# math stay in registers, and the packed byte of a word is built in place.

#: Input kinds of the word kernels (their ``KIND`` constexpr: an int32 pointer does not say).
KIND_BF16 = 0
KIND_FP16 = 1
# RNE to one mantissa bit at bit 22, then the E2M1 index from the exponent: see e2m1_code.
_E2M1_BIAS = tl.constexpr(0x1FFFFF - (252 << 22))


def word_kind(x: torch.Tensor) -> Optional[int]:
    """``KIND_*`` of a tensor the word kernels can read, or None (fp32, or a 16-bit tensor
    not 4-byte aligned, which cannot be read as int32 words).

    >>> word_kind(torch.zeros(2, 16, dtype=torch.bfloat16))
    0
    """
    kinds = {torch.bfloat16: KIND_BF16, torch.float16: KIND_FP16}
    if x.dtype not in kinds or x.data_ptr() % 4 != 0 or x.storage_offset() % 2 != 0:
        return None
    return kinds[x.dtype]


def check_word_config(config: tuple[int, int, int]) -> tuple[int, int, int]:
    """``(ROWS, BLOCKS, num_warps)`` of a word-kernel launch, checked: powers of two."""
    if len(config) != 3 or any(int(v) < 1 or int(v) & (int(v) - 1) for v in config):
        raise ValueError(f"NVFP4 word kernels: config (ROWS, BLOCKS, num_warps) must be powers of two, got {config}")
    return tuple(int(v) for v in config)


def word_tiles(rows: int, n_blocks: int, tile_blocks: int, max_blocks: int, warps: int) -> tuple[int, int, int]:
    """A default ``(ROWS, BLOCKS, num_warps)``: up to ``max_blocks`` blocks of a row per
    program, rows added until the tile holds ``tile_blocks`` blocks (fewer at small sizes)."""
    blocks = min(max_blocks, triton.next_power_of_2(n_blocks))
    tile_rows = max(1, min(tile_blocks // blocks, triton.next_power_of_2(rows)))
    return tile_rows, blocks, warps


@triton.jit
def swizzled_offset_bits(m, k, kb_pad):
    """`swizzled_offset` in shifts and masks (``m``, ``k`` >= 0, ``kb_pad`` a multiple of 4).

    The same offsets; written with ``%`` the compiler sees runs of 4 consecutive bytes,
    gives the scale store a layout of its own and converts the scales to it through
    shared memory (a barrier per program), which this form avoids.
    """
    return (((m >> 7) * (kb_pad >> 2) + (k >> 2)) << 9) + ((m & 31) << 4) + (((m >> 5) & 3) << 2) + (k & 3)


@triton.jit
def split_words(w, KIND: tl.constexpr):
    """fp32 values of the (even, odd) 16-bit elements packed in int32 words ``w``."""
    if KIND == 0:  # bf16 is the top half of an fp32: shifts only, no conversion
        lo = (w << 16).to(tl.float32, bitcast=True)
        hi = (w & -65536).to(tl.float32, bitcast=True)
    else:
        lo = w.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def e2m1_code(x, inv):
    """4-bit E2M1 code of fp32 ``x * inv`` (``inv >= 0``), bit-equal to `e2m1_codes`.

    Fewer operations than the threshold chain. From 1 up, the E2M1 values are the fp32
    values with one mantissa bit: ``a = |x * inv|`` is rounded half to even at bit 22 of
    its fp32 bits, and the rounded ``2^e * (1 + m/2)`` has index ``2(e + 1) + m``, its top
    bits minus ``2 * 126`` (clamped at 7: saturation and inf). Below 1 the grid is
    uniform (0, 0.5, 1): index 2 from the 0.75 tie, 1 above the 0.25 tie, else 0 without
    a sign; a NaN fails the comparisons and is 0, as in `e2m1_codes`. Integer and compare
    work only, so no multiply-add contraction can change a rounding.
    """
    a = tl.abs(x) * inv  # |x * inv| exactly: rounding is symmetric
    bits = a.to(tl.int32, bitcast=True)
    idx = (bits + (((bits >> 22) & 1) + _E2M1_BIAS)) >> 22  # 1 for a in [0.75, 0.875): raised to 2
    idx = tl.where(a >= 0.75, tl.minimum(tl.maximum(idx, 2), 7), 1)
    sign = (x.to(tl.int32, bitcast=True) >> 28) & 8
    return tl.where(a > 0.25, idx | sign, 0)


@triton.jit
def quantize_word_halves(lo0, hi0, lo1, hi1, gs, EXACT_CASTS: tl.constexpr):
    """NVFP4 of blocks given as fp32 ``[ROWS, BLOCKS, 4]`` tiles of their words 0-3
    (``lo0`` even, ``hi0`` odd elements) and 4-7 (``lo1``, ``hi1``).

    Returns ``(bytes of words 0-3, bytes of words 4-7)`` uint8 ``[ROWS, BLOCKS, 4]`` and
    the fp8 scales ``[ROWS, BLOCKS]``; masked elements must be 0.
    """
    # Each quarter is reduced on its own before the elementwise max: the interpreter's
    # elementwise max propagates NaN where its reductions (and the GPU's) skip it.
    vmax = tl.maximum(
        tl.maximum(tl.max(tl.abs(lo0), axis=2), tl.max(tl.abs(hi0), axis=2)),
        tl.maximum(tl.max(tl.abs(lo1), axis=2), tl.max(tl.abs(hi1), axis=2)),
    )
    sf8, inv = block_scales(vmax, gs, EXACT_CASTS)
    inv = inv[:, :, None]
    b0 = e2m1_code(lo0, inv) | (e2m1_code(hi0, inv) << 4)
    b1 = e2m1_code(lo1, inv) | (e2m1_code(hi1, inv) << 4)
    return b0.to(tl.uint8), b1.to(tl.uint8), sf8


@triton.jit
def word_tile(n_rows, n_blocks, ROWS: tl.constexpr, BLOCKS: tl.constexpr):
    """This program's ``ROWS`` x ``BLOCKS`` tile of a word kernel's grid: ``(rows64, blocks,
    ok, words)``, where ``words`` [ROWS, BLOCKS, 4] are the offsets of words 0-3 of each
    block in a row-major array of 8 words (16 elements of output, 8 bytes) per block, which
    is both the input layout of the quant kernel and the output layout of every word kernel."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    blocks = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
    ok = (rows[:, None] < n_rows) & (blocks[None, :] < n_blocks)
    rows64 = rows.to(tl.int64)
    words = (rows64[:, None] * (8 * n_blocks) + blocks[None, :] * 8)[:, :, None] + tl.arange(0, 4)[None, None, :]
    return rows64, blocks, ok, words


@triton.jit
def store_word_tile(q_ptr, sf_ptr, words, rows64, blocks, ok, b0, b1, sf8, kb_pad):
    """Store a word tile's packed bytes (``b0`` of words 0-3, ``b1`` of 4-7, at the offsets
    `word_tile` gave) and its block scales in the swizzled layout."""
    tl.store(q_ptr + words, b0, mask=ok[:, :, None])
    tl.store(q_ptr + words + 4, b1, mask=ok[:, :, None])
    tl.store(sf_ptr + swizzled_offset_bits(rows64[:, None], blocks[None, :], kb_pad), sf8, mask=ok)
