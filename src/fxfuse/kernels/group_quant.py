"""Per-token-group FP8 quantization, alone and as the epilogue of RMSNorm and SiLU-and-mul.

Every kernel ends the same way (`_group_codes`) on a ``[rows, groups, group_size]``
tile: each group's absolute maximum gives its scale by the per-token quant's rules
(exact division, floor ``1 / (448 * 512)``), and the tile is quantized in registers.
Scales are written through two strides, so the row-major and the column-major layouts
cost the same.

- `group_fp8`: tiles of ``BLOCK_R`` rows x one group, over a 2-D grid.
- `rms_norm_group_fp8`: ``ROWS`` rows per program, as ``norm_quant``'s kernel (its
  `norm_launch` heuristic and its `rms_norm_rows`): the rows (plus the residual) are
  loaded directly as ``[ROWS, groups, group_size]`` tiles, so no reshape sits between the
  norm and the group max; read once, normalized, rounded to the model dtype, multiplied
  by the weight and rounded again, then quantized group by group.
- `silu_and_mul_group_fp8`: tiles of rows x one group of the output; gate and up are
  read once, ``silu(g) * u`` is rounded to the model dtype, then quantized.

The producer arithmetic is that of the unfused kernels (``norm_quant``, ``activation``),
so on one device a fused op equals its unfused chain, with DESIGN §2's one FP8 step on
rare elements where a compiled row sum's order differs.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._rounding import FP8_MAX, exact_casts, quantize_fp8, round_to
from .norm_quant import norm_launch, rms_norm_rows

_MIN_DYNAMIC_SCALE = tl.constexpr(1.0 / (448.0 * 512.0))
# Elements per program of the tiled kernels: enough work per program to stream at the
# memory limit, few enough registers that a tile never spills.
_TILE = 4096


@triton.jit
def _group_codes(y3, s_ptr, s_offs, s_mask, EXACT_CASTS: tl.constexpr):
    """FP8 codes of fp32 ``y3`` ``[R, G, GROUP]``, quantized group by group; one scale per
    (row, group) goes to ``s_offs`` ``[R, G]``. Masked-out elements of ``y3`` must be 0,
    so they never raise a group's maximum."""
    amax = tl.max(tl.abs(y3), axis=2)
    s = tl.maximum(tl.div_rn(amax, FP8_MAX), _MIN_DYNAMIC_SCALE)  # exact division, as torch's
    tl.store(s_ptr + s_offs, s, mask=s_mask)
    return quantize_fp8(y3, tl.div_rn(1.0, s)[:, :, None], EXACT_CASTS)


@triton.jit
def _quantize_groups(y, q_ptr, q_offs, q_mask, s_ptr, s_offs, s_mask,
                     BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, GROUP: tl.constexpr, EXACT_CASTS: tl.constexpr):
    """Quantize fp32 ``y`` ``[BLOCK_R, BLOCK_G * GROUP]`` group by group (`_group_codes`
    of its ``[BLOCK_R, BLOCK_G, GROUP]`` view): ``q`` goes to ``q_offs``, one scale per
    (row, group) to ``s_offs`` ``[BLOCK_R, BLOCK_G]``."""
    q = _group_codes(tl.reshape(y, (BLOCK_R, BLOCK_G, GROUP)), s_ptr, s_offs, s_mask, EXACT_CASTS)
    tl.store(q_ptr + q_offs, tl.reshape(q, (BLOCK_R, BLOCK_G * GROUP)), mask=q_mask)


@triton.jit
def _group_fp8_kernel(
    x_ptr, q_ptr, s_ptr, n_rows, n_cols, s_row_stride, s_group_stride,
    BLOCK_R: tl.constexpr, GROUP: tl.constexpr, EXACT_CASTS: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    group = tl.program_id(1)
    cols = group * GROUP + tl.arange(0, GROUP)
    mask = (rows < n_rows)[:, None]
    offs = rows[:, None] * n_cols + cols[None, :]
    y = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s_offs = rows[:, None] * s_row_stride + group * s_group_stride
    _quantize_groups(y, q_ptr, offs, mask, s_ptr, s_offs, mask, BLOCK_R, 1, GROUP, EXACT_CASTS)


@triton.jit
def _rms_norm_group_fp8_kernel(
    x_ptr, res_ptr, w_ptr, res_out_ptr, q_ptr, s_ptr,
    n_rows, n_cols, eps, s_row_stride, s_group_stride,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr,
    EXACT_CASTS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    # The tile comes as [ROWS, groups, GROUP]: each group's max is a reduction over axis 2.
    y, offs, mask = rms_norm_rows(x_ptr, res_ptr, w_ptr, res_out_ptr, rows, n_rows, n_cols, eps,
                                  HAS_RESIDUAL, BLOCK, GROUP, EXACT_CASTS)
    # n_cols is a multiple of GROUP, so a group is either wholly inside the row or wholly
    # padding (zeros from the masked loads; its scale is not stored), as are rows past n_rows.
    groups = tl.arange(0, BLOCK // GROUP)
    s_offs = rows[:, None] * s_row_stride + groups[None, :] * s_group_stride
    s_mask = (rows < n_rows)[:, None] & (groups * GROUP < n_cols)[None, :]
    tl.store(q_ptr + offs, _group_codes(y.to(tl.float32), s_ptr, s_offs, s_mask, EXACT_CASTS), mask=mask)


@triton.jit
def _silu_and_mul_group_fp8_kernel(
    x_ptr, q_ptr, s_ptr, n_rows, d, s_row_stride, s_group_stride,
    BLOCK_R: tl.constexpr, GROUP: tl.constexpr, EXACT_CASTS: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    group = tl.program_id(1)
    cols = group * GROUP + tl.arange(0, GROUP)
    mask = (rows < n_rows)[:, None]
    in_offs = rows[:, None] * (2 * d) + cols[None, :]
    g = tl.load(x_ptr + in_offs, mask=mask, other=0.0)
    u = tl.load(x_ptr + in_offs + d, mask=mask, other=0.0).to(tl.float32)
    gf = g.to(tl.float32)
    # activation._silu_and_mul_kernel's expression, so fused and unfused round identically.
    y = round_to(tl.div_rn(gf, 1.0 + tl.exp(-gf)) * u, g.dtype, EXACT_CASTS)
    s_offs = rows[:, None] * s_row_stride + group * s_group_stride
    _quantize_groups(y.to(tl.float32), q_ptr, rows[:, None] * d + cols[None, :], mask,
                     s_ptr, s_offs, mask, BLOCK_R, 1, GROUP, EXACT_CASTS)


def _outputs(x: torch.Tensor, width: int, group_size: int, column_major: bool):
    """``(q, scales, rows, s_row_stride, s_group_stride)`` for quantizing ``width`` columns of ``x``'s rows."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    groups = width // group_size
    q = torch.empty((*x.shape[:-1], width), dtype=torch.float8_e4m3fn, device=x.device)
    if column_major:
        s = torch.empty((groups, *x.shape[:-1]), dtype=torch.float32, device=x.device).movedim(0, -1)
        return q, s, rows, 1, max(rows, 1)
    s = torch.empty((*x.shape[:-1], groups), dtype=torch.float32, device=x.device)
    return q, s, rows, groups, 1


def _block_rows(rows: int, group_size: int) -> int:
    return max(1, min(_TILE // group_size, triton.next_power_of_2(max(rows, 1))))


def group_fp8(x: torch.Tensor, group_size: int, column_major: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``group_fp8_quant`` on a contiguous ``x`` ``[..., hidden]``; returns ``(q, scales)``.

    Example:
        >>> q, s = group_fp8(torch.randn(4, 256, device="cuda", dtype=torch.bfloat16), 128)
    """
    hidden = x.shape[-1]
    q, s, rows, s_row, s_group = _outputs(x, hidden, group_size, column_major)
    if rows and hidden:
        block_r = _block_rows(rows, group_size)
        _group_fp8_kernel[(triton.cdiv(rows, block_r), hidden // group_size)](
            x, q, s, rows, hidden, s_row, s_group,
            BLOCK_R=block_r, GROUP=group_size, EXACT_CASTS=exact_casts(), num_warps=4,
        )
    return q, s


def rms_norm_group_fp8(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    group_size: int,
    column_major: bool = False,
    *,
    residual: Optional[torch.Tensor] = None,
    rows_per_program: Optional[int] = None,
    num_warps: Optional[int] = None,
):
    """RMSNorm (after the residual add if ``residual`` is given), then the group quant.

    Returns ``(q, scales, residual_out)`` (``residual_out`` None without ``residual``).
    ``rows_per_program`` and ``num_warps`` override `norm_quant.norm_launch`'s choice.

    Example:
        >>> q, s, _ = rms_norm_group_fp8(x, w, 1e-6, 128)
        >>> q, s, r_out = rms_norm_group_fp8(x, w, 1e-6, 128, True, residual=r)
    """
    n_cols = x.shape[-1]
    q, s, rows, s_row, s_group = _outputs(x, n_cols, group_size, column_major)
    res_out = torch.empty_like(x) if residual is not None else None
    if rows and n_cols:
        block, per_program, warps = norm_launch(rows, n_cols, rows_per_program, num_warps,
                                                residual=residual is not None)
        _rms_norm_group_fp8_kernel[(triton.cdiv(rows, per_program),)](
            x, residual if residual is not None else x, weight, res_out if res_out is not None else x, q, s,
            rows, n_cols, float(eps), s_row, s_group,
            HAS_RESIDUAL=residual is not None, BLOCK=block, GROUP=group_size, ROWS=per_program,
            EXACT_CASTS=exact_casts(), num_warps=warps,
        )
    return q, s, res_out


def silu_and_mul_group_fp8(
    x: torch.Tensor, group_size: int, column_major: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``silu_and_mul_group_fp8_quant`` on a contiguous ``x`` ``[..., 2d]``; returns ``(q [..., d], scales)``.

    Example:
        >>> q, s = silu_and_mul_group_fp8(torch.randn(4, 512, device="cuda", dtype=torch.bfloat16), 128)
    """
    d = x.shape[-1] // 2
    q, s, rows, s_row, s_group = _outputs(x, d, group_size, column_major)
    if rows and d:
        block_r = _block_rows(rows, group_size)
        _silu_and_mul_group_fp8_kernel[(triton.cdiv(rows, block_r), d // group_size)](
            x, q, s, rows, d, s_row, s_group,
            BLOCK_R=block_r, GROUP=group_size, EXACT_CASTS=exact_casts(), num_warps=4,
        )
    return q, s
