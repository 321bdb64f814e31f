"""RMSNorm, with or without the residual add, with an optional FP8 epilogue: one pass.

Each program normalizes a tile of ``ROWS`` rows (`norm_launch` picks one: several rows
per program measured slower on the H100 even at 4096 rows): a row is read once (plus the
residual), normalized in fp32, rounded to the model dtype and multiplied by the weight
in it (DESIGN §2), then written as the model dtype, or quantized in registers and
written as FP8 (static scale, or a per-row dynamic scale computed from the rounded row).
The unfused and fused forms run the same code (`rms_norm_rows`). Under Triton's
interpreter that makes them agree bit for bit, whatever ``ROWS`` each uses. Compiled,
the row sum's order follows the register layout the compiler picks per variant, so the
normalized row of the FP8 variants can differ from the model-dtype variant's by one
unit in the last place on rare elements, and a quantized element by one FP8 step (the
"at most one FP8 step on rare elements" of DESIGN §2).

Gemma's RMSNorm (``GEMMA``) runs the same kernel with one change: the weight step is
``x * rstd * (1 + w)`` in fp32, rounded once (the weight is often fp32 there).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._rounding import FP8_MAX, exact_casts, quantize_fp8, round_to

QUANT_NONE, QUANT_STATIC, QUANT_DYNAMIC = 0, 1, 2
_MIN_DYNAMIC_SCALE = tl.constexpr(1.0 / (448.0 * 512.0))


@triton.jit
def _row_sums(v, GROUP: tl.constexpr, EXACT_CASTS: tl.constexpr):
    """Sums of a tile's rows, kept as broadcastable dims: ``[ROWS, 1]`` of a ``[ROWS, BLOCK]``
    tile (``GROUP == 0``), ``[ROWS, 1, 1]`` of a ``[ROWS, G, GROUP]`` one."""
    if GROUP == 0:
        total = tl.sum(v, axis=1, keep_dims=True)
    elif EXACT_CASTS:
        # The interpreter sums with numpy, whose order follows the shape: summing the flat
        # row keeps the 2-D tile's order, so fused group quant equals the unfused norm bit
        # for bit. (Compiled, any tile's order is its register layout's anyway.)
        flat = tl.sum(tl.reshape(v, (v.shape[0], v.shape[1] * v.shape[2])), axis=1)
        total = tl.reshape(flat, (v.shape[0], 1, 1))
    else:
        total = tl.sum(tl.sum(v, axis=2, keep_dims=True), axis=1, keep_dims=True)
    return total


@triton.jit
def norm_tile_offsets(rows, n_rows, n_cols, BLOCK: tl.constexpr, GROUP: tl.constexpr):
    """Offsets of the rows ``rows`` (``[ROWS]`` int64) of a ``[n_rows, n_cols]`` tensor as
    one tile, ``[ROWS, BLOCK]`` when ``GROUP == 0`` else ``[ROWS, BLOCK // GROUP, GROUP]``;
    returns ``(offs, mask, cols, col_mask)`` (``cols`` broadcastable against ``offs``)."""
    if GROUP == 0:
        row_cols = tl.arange(0, BLOCK)
        r = rows[:, None]
    else:
        row_cols = tl.arange(0, BLOCK // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        r = rows[:, None, None]
    cols = tl.expand_dims(row_cols, 0)
    col_mask = cols < n_cols
    mask = (r < n_rows) & col_mask
    offs = r * n_cols + cols
    return offs, mask, cols, col_mask


@triton.jit
def rms_norm_tile(
    x, res_ptr, w_ptr, res_out_ptr, offs, mask, cols, col_mask, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, GROUP: tl.constexpr, EXACT_CASTS: tl.constexpr, GEMMA: tl.constexpr = False,
):
    """(Fused-add) RMSNorm of a tile ``x`` already in registers, in the model dtype (its
    dtype), laid out by `norm_tile_offsets` (masked elements 0): the arithmetic of
    `rms_norm_rows`, for kernels whose rows come from somewhere else than a load (the
    small GEMM's row epilogue). Writes the residual sum when ``HAS_RESIDUAL``."""
    dtype = x.dtype
    # Model-dtype arithmetic is done in fp32 and rounded once: the same value as a
    # bf16/fp16 add or multiply (fp32 holds their products exactly, and a sum rounded
    # through fp32 rounds like the exact sum), and correct in Triton's interpreter, whose
    # bf16 arithmetic is not.
    xf = x.to(tl.float32)
    if HAS_RESIDUAL:
        xf = round_to(xf + tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32), dtype, EXACT_CASTS)
        tl.store(res_out_ptr + offs, xf, mask=mask)
        xf = xf.to(tl.float32)
    var = tl.div_rn(_row_sums(xf * xf, GROUP, EXACT_CASTS), n_cols.to(tl.float32))
    rstd = 1.0 / tl.sqrt_rn(var + eps)
    # The weight is loaded at the tile's shape (re-read per row, from L1): a [1, BLOCK]
    # load gets a register layout of its own, and the compiler then moves the whole tile
    # through shared memory to meet it (seen in the sm_90 TTGIR at ROWS > 1).
    w_offs = tl.broadcast_to(cols, offs.shape)
    w = tl.load(w_ptr + w_offs, mask=tl.broadcast_to(col_mask, offs.shape), other=0.0).to(tl.float32)
    if GEMMA:
        # Gemma (HF Gemma3RMSNorm): the norm times (1 + w), all in fp32, rounded once.
        y = round_to((xf * rstd) * (1.0 + w), dtype, EXACT_CASTS)
    else:
        y = round_to(round_to(xf * rstd, dtype, EXACT_CASTS).to(tl.float32) * w, dtype, EXACT_CASTS)  # weight on the rounded norm
    return y


@triton.jit
def rms_norm_rows(
    x_ptr, res_ptr, w_ptr, res_out_ptr, rows, n_rows, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr, EXACT_CASTS: tl.constexpr,
    GEMMA: tl.constexpr = False,
):
    """(Fused-add) RMSNorm of the rows ``rows`` (``[ROWS]`` int64) in the model dtype;
    returns ``(y, offs, mask)`` of one tile.

    The tile is ``[ROWS, BLOCK]`` when ``GROUP == 0``, else ``[ROWS, BLOCK // GROUP, GROUP]``
    (each row as its quant groups, so a group's max is a plain reduction over axis 2).
    Rows from ``n_rows`` on and columns from ``n_cols`` on are masked and hold 0. Every
    norm kernel (this module's, the group-quant, all-reduce and small-GEMM ones) runs
    `rms_norm_tile`, so fused and unfused forms round identically. Writes the residual
    sum when ``HAS_RESIDUAL``. ``GEMMA`` selects Gemma's weighting (see below); the
    weight may then be fp32.
    """
    offs, mask, cols, col_mask = norm_tile_offsets(rows, n_rows, n_cols, BLOCK, GROUP)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    y = rms_norm_tile(x, res_ptr, w_ptr, res_out_ptr, offs, mask, cols, col_mask, n_cols, eps,
                      HAS_RESIDUAL, GROUP, EXACT_CASTS, GEMMA)
    return y, offs, mask


@triton.jit
def rms_norm_row(
    x_ptr, res_ptr, w_ptr, res_out_ptr, row, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, EXACT_CASTS: tl.constexpr,
):
    """`rms_norm_rows` of the one row ``row``, as ``[BLOCK]`` vectors ``(y, offs, mask)``
    (for kernels that walk rows one at a time, as the all-reduce one)."""
    y, offs, mask = rms_norm_rows(x_ptr, res_ptr, w_ptr, res_out_ptr, row + tl.arange(0, 1), row + 1, n_cols, eps,
                                  HAS_RESIDUAL, BLOCK, 0, EXACT_CASTS)
    return tl.reshape(y, (BLOCK,)), tl.reshape(offs, (BLOCK,)), tl.reshape(mask, (BLOCK,))


@triton.jit
def _rms_norm_quant_kernel(
    x_ptr, res_ptr, w_ptr, scale_ptr, ub_ptr,
    y_ptr, res_out_ptr, q_ptr, row_scale_ptr,
    n_rows, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, QUANT: tl.constexpr, HAS_UB: tl.constexpr, BLOCK: tl.constexpr,
    ROWS: tl.constexpr, EXACT_CASTS: tl.constexpr, GEMMA: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    y, offs, mask = rms_norm_rows(x_ptr, res_ptr, w_ptr, res_out_ptr, rows, n_rows, n_cols, eps,
                                  HAS_RESIDUAL, BLOCK, 0, EXACT_CASTS, GEMMA)
    if QUANT == 0:
        tl.store(y_ptr + offs, y, mask=mask)
    else:
        yf = y.to(tl.float32)
        if QUANT == 1:
            inv = tl.div_rn(1.0, tl.load(scale_ptr))
        else:
            amax = tl.max(tl.where(mask, tl.abs(yf), 0.0), axis=1)
            if HAS_UB:
                amax = tl.minimum(amax, tl.load(ub_ptr))
            s = tl.maximum(tl.div_rn(amax, FP8_MAX), _MIN_DYNAMIC_SCALE)  # exact division, as torch's
            tl.store(row_scale_ptr + rows, s, mask=rows < n_rows)
            inv = tl.div_rn(1.0, s)[:, None]
        tl.store(q_ptr + offs, quantize_fp8(yf, inv, EXACT_CASTS), mask=mask)


def norm_launch(
    rows: int, n_cols: int, rows_per_program: Optional[int] = None, num_warps: Optional[int] = None,
    *, residual: bool = False, dynamic: bool = False,
) -> tuple[int, int, int]:
    """``(BLOCK, ROWS, num_warps)`` of a norm kernel over ``rows`` rows of ``n_cols``.

    One row per program, with warps by variant, from benchmarks/norm_rows_sweep.py on the
    H100 (RESULTS.md, 2026-11-25): the best ROWS was 1 at 4096 and 32768 rows, both
    widths, every variant (2-8 rows per program ran 3-35 points slower), and the best
    warps were ~32 elements a thread (BLOCK / 1024), half that for the dynamic scale's
    second reduction, twice that with the residual's second stream (capped at 16).
    ``rows_per_program`` (a power of two; kept for such sweeps) and ``num_warps``
    override the choice.

    Example:
        >>> norm_launch(32768, 4096)
        (4096, 1, 4)
        >>> norm_launch(4096, 8192, residual=True)
        (8192, 1, 16)
    """
    block = triton.next_power_of_2(n_cols)
    if rows_per_program is None:
        rows_per_program = 1
    elif rows_per_program < 1 or rows_per_program & (rows_per_program - 1):
        raise ValueError(f"rows_per_program must be a power of two, got {rows_per_program}")
    per_warp = 512 if residual else 2048 if dynamic else 1024
    warps = num_warps or min(max(rows_per_program * block // per_warp, 1), 16)
    return block, rows_per_program, warps


def rms_norm_quant(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    residual: Optional[torch.Tensor] = None,
    quant: int = QUANT_NONE,
    scale: Optional[torch.Tensor] = None,
    scale_ub: Optional[torch.Tensor] = None,
    rows_per_program: Optional[int] = None,
    num_warps: Optional[int] = None,
    gemma: bool = False,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Launch the kernel; returns ``(y, q, row_scales, residual_out)``, absent ones None.

    Inputs are validated by the ops that call this (contiguous, matching dtypes; with
    ``gemma`` the weight may be fp32). ``gemma`` computes Gemma's RMSNorm,
    ``(x * rstd * (1 + w))`` in fp32 rounded once, instead of Llama's (the norm rounded,
    then times ``w``). ``rows_per_program`` and ``num_warps`` override `norm_launch`'s choice.

    Example:
        >>> y, _, _, _ = rms_norm_quant(x, w, 1e-6)
        >>> _, q, _, r = rms_norm_quant(x, w, 1e-6, residual=r0, quant=QUANT_STATIC, scale=s)
        >>> y, _, _, _ = rms_norm_quant(x, w_f32, 1e-6, gemma=True)  # Gemma's (1 + w), fp32 weight
    """
    n_cols = x.shape[-1]
    rows = x.numel() // n_cols if n_cols else 0
    y = torch.empty_like(x) if quant == QUANT_NONE else None
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device) if quant != QUANT_NONE else None
    row_scales = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device) if quant == QUANT_DYNAMIC else None
    res_out = torch.empty_like(x) if residual is not None else None
    if rows == 0:
        return y, q, row_scales, res_out
    block, per_program, warps = norm_launch(rows, n_cols, rows_per_program, num_warps,
                                            residual=residual is not None, dynamic=quant == QUANT_DYNAMIC)
    dummy = x  # pointer for arguments a constexpr branch never reads
    _rms_norm_quant_kernel[(triton.cdiv(rows, per_program),)](
        x, residual if residual is not None else dummy, weight,
        scale if scale is not None else dummy, scale_ub if scale_ub is not None else dummy,
        y if y is not None else dummy, res_out if res_out is not None else dummy,
        q if q is not None else dummy, row_scales if row_scales is not None else dummy,
        rows, n_cols, float(eps),
        HAS_RESIDUAL=residual is not None, QUANT=quant, HAS_UB=scale_ub is not None,
        BLOCK=block, ROWS=per_program, EXACT_CASTS=exact_casts(), GEMMA=gemma, num_warps=warps,
    )
    return y, q, row_scales, res_out
