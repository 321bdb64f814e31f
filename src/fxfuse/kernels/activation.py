"""SiLU-and-mul with an optional static FP8 or NVFP4 epilogue.

Elementwise over ``[rows, d]`` tiles: the gate and up halves of a row are read once,
``silu(g) * u`` is computed in fp32 and rounded to the model dtype (the unfused op's
output), then written as is or quantized in registers. The NVFP4 epilogue of bf16/fp16
input has its own kernel, which reads int32 words (two elements of one output byte) in
the tile layout of its blocks (`_silu_and_mul_nvfp4_kernel`, see ``_nvfp4.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._nvfp4 import (
    check_word_config, quantize_rows, quantize_word_halves, split_words, swizzled_offset,
    store_word_tile, word_kind, word_tile, word_tiles,
)
from ._rounding import exact_casts, quantize_fp8, round_to
from .quant import nvfp4_outputs

OUT_NONE, OUT_FP8, OUT_NVFP4 = 0, 1, 2
# Default tile of the NVFP4 word kernel: up to _NVFP4_BLOCKS 16-element blocks of a row per
# program, rows added up to _NVFP4_TILE. One row of 128 blocks per program, 4 warps, was best
# at every swept shape (benchmarks/nvfp4_sweep.py, H100, RESULTS.md).
_NVFP4_TILE, _NVFP4_BLOCKS, _NVFP4_WARPS = 128, 128, 4


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, scale_ptr, out_ptr, sf_ptr, n_rows, d, kb_pad,
    OUT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, EXACT_CASTS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rows64 = rows.to(tl.int64)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < d)
    in_offs = rows64[:, None] * (2 * d) + cols[None, :]
    g = tl.load(x_ptr + in_offs, mask=mask, other=0.0)
    u = tl.load(x_ptr + in_offs + d, mask=mask, other=0.0).to(tl.float32)
    gf = g.to(tl.float32)
    y = round_to(tl.div_rn(gf, 1.0 + tl.exp(-gf)) * u, g.dtype, EXACT_CASTS)
    if OUT == 0:
        tl.store(out_ptr + rows64[:, None] * d + cols[None, :], y, mask=mask)
    elif OUT == 1:
        inv = tl.div_rn(1.0, tl.load(scale_ptr))
        tl.store(out_ptr + rows64[:, None] * d + cols[None, :], quantize_fp8(y.to(tl.float32), inv, EXACT_CASTS), mask=mask)
    else:
        packed, sf8 = quantize_rows(tl.where(mask, y.to(tl.float32), 0.0), tl.load(scale_ptr), BLOCK_R, BLOCK_D, EXACT_CASTS)
        pcols = tl.program_id(1) * (BLOCK_D // 2) + tl.arange(0, BLOCK_D // 2)
        pmask = (rows[:, None] < n_rows) & (pcols[None, :] < d // 2)
        tl.store(out_ptr + rows64[:, None] * (d // 2) + pcols[None, :], packed, mask=pmask)
        kcols = tl.program_id(1) * (BLOCK_D // 16) + tl.arange(0, BLOCK_D // 16)
        smask = (rows[:, None] < n_rows) & (kcols[None, :] < d // 16)
        tl.store(sf_ptr + swizzled_offset(rows64[:, None], kcols[None, :], kb_pad), sf8, mask=smask)


@triton.jit
def _silu_mul_rounded(gw, uw, KIND: tl.constexpr, EXACT_CASTS: tl.constexpr):
    """fp32 values of ``silu(g) * u`` rounded to the model dtype, for the (even, odd)
    elements of gate and up int32 words: `_silu_and_mul_kernel`'s expression, bit for bit."""
    g_lo, g_hi = split_words(gw, KIND)
    u_lo, u_hi = split_words(uw, KIND)
    y_lo = tl.div_rn(g_lo, 1.0 + tl.exp(-g_lo)) * u_lo
    y_hi = tl.div_rn(g_hi, 1.0 + tl.exp(-g_hi)) * u_hi
    if KIND == 0:
        # round_to's bf16 rounding without its cast to bf16 and back: the result's low
        # 16 bits are zero, so the fp32 is the bf16 value
        lo_bits = y_lo.to(tl.int32, bitcast=True)
        hi_bits = y_hi.to(tl.int32, bitcast=True)
        y_lo = ((lo_bits + (0x7FFF + ((lo_bits >> 16) & 1))) & -65536).to(tl.float32, bitcast=True)
        y_hi = ((hi_bits + (0x7FFF + ((hi_bits >> 16) & 1))) & -65536).to(tl.float32, bitcast=True)
    else:
        y_lo = round_to(y_lo, tl.float16, EXACT_CASTS).to(tl.float32)
        y_hi = round_to(y_hi, tl.float16, EXACT_CASTS).to(tl.float32)
    return y_lo, y_hi


@triton.jit
def _silu_and_mul_nvfp4_kernel(
    w_ptr, gs_ptr, q_ptr, sf_ptr, n_rows, n_blocks, kb_pad,
    KIND: tl.constexpr, ROWS: tl.constexpr, BLOCKS: tl.constexpr, EXACT_CASTS: tl.constexpr,
):
    # w: the input as int32 words [n_rows, 16 * n_blocks], gate words then up words;
    # q: [n_rows, 8 * n_blocks] bytes, one per word of the output.
    rows64, blocks, ok, out_offs = word_tile(n_rows, n_blocks, ROWS, BLOCKS)
    mask = ok[:, :, None]
    in_offs = out_offs + (rows64 * (8 * n_blocks))[:, None, None]  # a row of input is two of output
    up = 8 * n_blocks
    lo0, hi0 = _silu_mul_rounded(tl.load(w_ptr + in_offs, mask=mask, other=0),
                                 tl.load(w_ptr + in_offs + up, mask=mask, other=0), KIND, EXACT_CASTS)
    lo1, hi1 = _silu_mul_rounded(tl.load(w_ptr + in_offs + 4, mask=mask, other=0),
                                 tl.load(w_ptr + in_offs + (up + 4), mask=mask, other=0), KIND, EXACT_CASTS)
    b0, b1, sf8 = quantize_word_halves(lo0, hi0, lo1, hi1, tl.load(gs_ptr), EXACT_CASTS)
    store_word_tile(q_ptr, sf_ptr, out_offs, rows64, blocks, ok, b0, b1, sf8, kb_pad)


#: ``BLOCK_R`` of a launch config that selects `_silu_and_mul_flat_kernel` (``BLOCK_D`` is its XBLOCK).
FLAT = 0


@triton.jit
def _silu_and_mul_flat_kernel(
    x_ptr, scale_ptr, out_ptr, n, d,
    OUT: tl.constexpr, XBLOCK: tl.constexpr, ROW_ALIGNED: tl.constexpr, WIDE: tl.constexpr, EXACT_CASTS: tl.constexpr,
):
    # The outputs as one flat range, XBLOCK per program in memory order (Inductor's layout of
    # the same op): consecutive programs stream consecutive bytes. The math is the tile
    # kernel's, expression for expression, so the two give the same bits.
    pid = tl.program_id(0)
    if WIDE:  # int32 offsets would overflow; int64 division is slow, so only where needed
        pid = pid.to(tl.int64)
    i = pid * XBLOCK + tl.arange(0, XBLOCK)
    if ROW_ALIGNED:
        row = pid // (d // XBLOCK)  # d % XBLOCK == 0: a program stays in one row, one division
    else:
        row = i // d
    mask = i < n
    in_offs = i + row * d  # row * 2d + (i - row * d)
    g = tl.load(x_ptr + in_offs, mask=mask, other=0.0)
    u = tl.load(x_ptr + in_offs + d, mask=mask, other=0.0).to(tl.float32)
    gf = g.to(tl.float32)
    y = round_to(tl.div_rn(gf, 1.0 + tl.exp(-gf)) * u, g.dtype, EXACT_CASTS)
    if OUT == 0:
        tl.store(out_ptr + i, y, mask=mask)
    else:
        inv = tl.div_rn(1.0, tl.load(scale_ptr))
        tl.store(out_ptr + i, quantize_fp8(y.to(tl.float32), inv, EXACT_CASTS), mask=mask)


def _tiles(rows: int, d: int, out: int = OUT_NONE) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_D, num_warps)`` of the default launch, from
    ``benchmarks/silu_sweep.py`` on the H100 (RESULTS.md, 2026-11-25, cold L2): a 1-row
    tile of 1024 for few rows (more programs than the wide tiles give), else the flat
    kernel, which reached 100-102% of copy bandwidth at 4096/32768 tokens where the 2-D
    tiles reached 96% (1024 outputs a program for the model dtype, 2048 for FP8). The
    fp32 NVFP4 fallback keeps its 2-D tiles (its epilogue needs whole rows of blocks).
    """
    block_d = min(1024, triton.next_power_of_2(d))
    if out == OUT_NVFP4:
        block_r = max(1, min(4096 // block_d, triton.next_power_of_2(rows)))
        return block_r, block_d, 4 if block_r * block_d <= 2048 else 8
    if rows <= (16 if out == OUT_NONE else 256):
        return 1, block_d, 4
    return FLAT, 1024 if out == OUT_NONE else 2048, 4


def _launch_flat(x, scale, y, rows: int, d: int, out: int, xblock: int, warps: int) -> None:
    n = rows * d
    _silu_and_mul_flat_kernel[(triton.cdiv(n, xblock),)](
        x, scale if scale is not None else x, y, n, d,
        OUT=out, XBLOCK=xblock, ROW_ALIGNED=d % xblock == 0, WIDE=2 * n + 2 * xblock >= 2**31,
        EXACT_CASTS=exact_casts(), num_warps=warps,
    )


def silu_and_mul(x: torch.Tensor, out: int = OUT_NONE, scale: torch.Tensor | None = None,
                 config: tuple[int, int, int] | None = None):
    """``silu_and_mul`` of a contiguous ``x`` ``[..., 2d]``, optionally quantized.

    ``out=OUT_NONE`` returns ``y`` in ``x.dtype``; ``OUT_FP8`` returns fp8 ``q`` (``scale``
    the static dequant scale); ``OUT_NVFP4`` returns ``(q, block_scales)`` (``scale`` the
    global scale). ``config`` ``(BLOCK_R, BLOCK_D, num_warps)`` overrides `_tiles` for
    ``OUT_NONE`` and ``OUT_FP8`` (tuning; ``BLOCK_R=FLAT``: the flat kernel, ``BLOCK_D``
    elements per program); every config gives the same bits.

    Example:
        >>> y = silu_and_mul(torch.randn(4, 256, device="cuda", dtype=torch.bfloat16))
    """
    d = x.shape[-1] // 2
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if out == OUT_NVFP4 and config is None and d % 16 == 0 and word_kind(x) is not None:
        return silu_and_mul_nvfp4(x, scale)  # fp32 (and unaligned) input: the tile kernel below
    sf = None
    if out == OUT_NONE:
        y = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    elif out == OUT_FP8:
        y = torch.empty((*x.shape[:-1], d), dtype=torch.float8_e4m3fn, device=x.device)
    else:
        y, sf = nvfp4_outputs(rows, d, x.device)
    if config is not None and out == OUT_NVFP4:
        raise ValueError("silu_and_mul: `config` overrides the OUT_NONE and OUT_FP8 launches only")
    if rows and d:
        block_r, block_d, warps = config or _tiles(rows, d, out)
        if block_r == FLAT:
            _launch_flat(x, scale, y, rows, d, out, block_d, warps)
            return y
        grid = (triton.cdiv(rows, block_r), triton.cdiv(d, block_d))
        _silu_and_mul_kernel[grid](
            x, scale if scale is not None else x, y, sf if sf is not None else y, rows, d,
            sf.shape[1] if sf is not None else 0,
            OUT=out, BLOCK_R=block_r, BLOCK_D=block_d, EXACT_CASTS=exact_casts(), num_warps=warps,
        )
    return (y, sf) if out == OUT_NVFP4 else y


def nvfp4_tiles(rows: int, n_blocks: int) -> tuple[int, int, int]:
    """Default ``(ROWS, BLOCKS, num_warps)`` of `_silu_and_mul_nvfp4_kernel` for ``rows``
    rows of ``n_blocks`` 16-element output blocks."""
    return word_tiles(rows, n_blocks, _NVFP4_TILE, _NVFP4_BLOCKS, _NVFP4_WARPS)


def silu_and_mul_nvfp4(x: torch.Tensor, global_scale: torch.Tensor, config: tuple[int, int, int] | None = None):
    """``silu_and_mul_nvfp4_quant`` of a contiguous bf16/fp16 ``x`` ``[..., 2d]`` (4-byte
    aligned, ``d`` a multiple of 16): ``(q, block_scales)``, as ``silu_and_mul(x,
    OUT_NVFP4, global_scale)``. ``config`` ``(ROWS, BLOCKS, num_warps)`` overrides
    `nvfp4_tiles` (tuning; every config gives the same bits).

    Example:
        >>> q, sf = silu_and_mul_nvfp4(torch.randn(4, 256, device="cuda", dtype=torch.bfloat16),
        ...                            torch.tensor([100.0], device="cuda"))
    """
    kind = word_kind(x)
    if kind is None:
        raise ValueError(f"silu_and_mul_nvfp4: `x` must be bf16 or fp16 and 4-byte aligned, got {x.dtype}")
    d = x.shape[-1] // 2
    if d % 16:
        raise ValueError(f"silu_and_mul_nvfp4: `x` must have a last dim 2 * d with d a multiple of 16, got {2 * d}")
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    y, sf = nvfp4_outputs(rows, d, x.device)
    n_blocks = d // 16
    if rows and n_blocks:
        tile_rows, blocks, warps = check_word_config(config) if config is not None else nvfp4_tiles(rows, n_blocks)
        grid = (triton.cdiv(rows, tile_rows), triton.cdiv(n_blocks, blocks))
        _silu_and_mul_nvfp4_kernel[grid](
            x.view(torch.int32), global_scale, y, sf, rows, n_blocks, sf.shape[1],
            KIND=kind, ROWS=tile_rows, BLOCKS=blocks, EXACT_CASTS=exact_casts(), num_warps=warps,
        )
    return y, sf
