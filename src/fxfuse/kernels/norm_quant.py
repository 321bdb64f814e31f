"""RMSNorm, with or without the residual add, with an optional FP8 epilogue: one pass.

One program per row: the row is read once (plus the residual), normalized in fp32,
rounded to the model dtype and multiplied by the weight in it (DESIGN §2), then written
as the model dtype, or quantized in registers and written as FP8 (static scale, or a
per-row dynamic scale computed from the rounded row). The unfused and fused forms run
the same code. Under Triton's interpreter that makes them agree bit for bit. Compiled,
the row sum's order follows the register layout the compiler picks per variant, so the
normalized row of the FP8 variants can differ from the model-dtype variant's by one
unit in the last place on rare elements, and a quantized element by one FP8 step (the
"at most one FP8 step on rare elements" of DESIGN §2).
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
def rms_norm_row(
    x_ptr, res_ptr, w_ptr, res_out_ptr, row, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, EXACT_CASTS: tl.constexpr,
):
    """One row of (fused-add) RMSNorm in the model dtype; returns ``(y, offs, mask)``.

    Every norm kernel (this module's and the group-quant ones) calls this, so fused and
    unfused forms round identically. Writes the residual sum when ``HAS_RESIDUAL``.
    """
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    offs = row * n_cols + cols
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
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
    var = tl.div_rn(tl.sum(xf * xf, axis=0), n_cols.to(tl.float32))
    rstd = 1.0 / tl.sqrt_rn(var + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = round_to(round_to(xf * rstd, dtype, EXACT_CASTS).to(tl.float32) * w, dtype, EXACT_CASTS)  # weight on the rounded norm
    return y, offs, mask


@triton.jit
def _rms_norm_quant_kernel(
    x_ptr, res_ptr, w_ptr, scale_ptr, ub_ptr,
    y_ptr, res_out_ptr, q_ptr, row_scale_ptr,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, QUANT: tl.constexpr, HAS_UB: tl.constexpr, BLOCK: tl.constexpr,
    EXACT_CASTS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y, offs, mask = rms_norm_row(x_ptr, res_ptr, w_ptr, res_out_ptr, row, n_cols, eps, HAS_RESIDUAL, BLOCK, EXACT_CASTS)
    if QUANT == 0:
        tl.store(y_ptr + offs, y, mask=mask)
    else:
        yf = y.to(tl.float32)
        if QUANT == 1:
            inv = tl.div_rn(1.0, tl.load(scale_ptr))
        else:
            amax = tl.max(tl.where(mask, tl.abs(yf), 0.0), axis=0)
            if HAS_UB:
                amax = tl.minimum(amax, tl.load(ub_ptr))
            s = tl.maximum(tl.div_rn(amax, FP8_MAX), _MIN_DYNAMIC_SCALE)  # exact division, as torch's
            tl.store(row_scale_ptr + row, s)
            inv = tl.div_rn(1.0, s)
        tl.store(q_ptr + offs, quantize_fp8(yf, inv, EXACT_CASTS), mask=mask)


def _block(n_cols: int) -> tuple[int, int]:
    block = triton.next_power_of_2(n_cols)
    # ~32 elements per thread: on the H100, 4 warps for 4096-wide rows ran at 94% of copy
    # bandwidth where 16 warps ran at 71% (benchmarks/norm_warps.py, RESULTS.md).
    return block, min(max(block // 1024, 1), 16)


def rms_norm_quant(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    residual: Optional[torch.Tensor] = None,
    quant: int = QUANT_NONE,
    scale: Optional[torch.Tensor] = None,
    scale_ub: Optional[torch.Tensor] = None,
    num_warps: Optional[int] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Launch the kernel; returns ``(y, q, row_scales, residual_out)``, absent ones None.

    Inputs are validated by the ops that call this (contiguous, matching dtypes).

    Example:
        >>> y, _, _, _ = rms_norm_quant(x, w, 1e-6)
        >>> _, q, _, r = rms_norm_quant(x, w, 1e-6, residual=r0, quant=QUANT_STATIC, scale=s)
    """
    n_cols = x.shape[-1]
    rows = x.numel() // n_cols if n_cols else 0
    y = torch.empty_like(x) if quant == QUANT_NONE else None
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device) if quant != QUANT_NONE else None
    row_scales = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device) if quant == QUANT_DYNAMIC else None
    res_out = torch.empty_like(x) if residual is not None else None
    if rows == 0:
        return y, q, row_scales, res_out
    block, warps = _block(n_cols)
    warps = num_warps or warps
    dummy = x  # pointer for arguments a constexpr branch never reads
    _rms_norm_quant_kernel[(rows,)](
        x, residual if residual is not None else dummy, weight,
        scale if scale is not None else dummy, scale_ub if scale_ub is not None else dummy,
        y if y is not None else dummy, res_out if res_out is not None else dummy,
        q if q is not None else dummy, row_scales if row_scales is not None else dummy,
        n_cols, float(eps),
        HAS_RESIDUAL=residual is not None, QUANT=quant, HAS_UB=scale_ub is not None,
        BLOCK=block, EXACT_CASTS=exact_casts(), num_warps=warps,
    )
    return y, q, row_scales, res_out
