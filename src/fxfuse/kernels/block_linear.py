"""Block-scaled FP8 GEMM: ``out = (x_q * x_scales) @ (w_q * w_scales).T (+ bias)``.

For GPUs and torch builds where ``torch._scaled_mm`` has no blockwise recipe (and for
group size 64, which it does not take). The K loop steps one activation group
(``GROUP_K`` = 64 or 128 columns) at a time: the FP8 tile product is accumulated in fp32
by the tensor cores, then scaled by that group's per-row activation scales and the
per-column scales of the 128x128 weight blocks it falls in, and added to the
accumulator (the scheme of DeepSeek-V3's and vLLM's block-FP8 kernels). Scales are read
through strides, so row- and column-major activation scales cost the same.

Under Triton's interpreter the FP8 tiles are widened to fp32 before the product (exact:
every E4M3 value is an fp32), which NumPy multiplies correctly.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._rounding import exact_casts, round_to

_W_BLOCK = tl.constexpr(128)


@triton.jit
def _block_fp8_matmul_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, bias_ptr, c_ptr,
    M, N, K, as_row_stride, as_group_stride, bs_row_stride,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_K: tl.constexpr,
    SUPER_M: tl.constexpr, EXACT_CASTS: tl.constexpr,
):
    # Programs that share weight columns run close together (grouped ordering), so a
    # weight tile is read from L2 by SUPER_M row tiles.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_super = SUPER_M * tiles_n
    first_m = (pid // per_super) * SUPER_M
    super_m = tl.minimum(tiles_m - first_m, SUPER_M)
    pid_m = first_m + (pid % per_super) % super_m
    pid_n = (pid % per_super) // super_m

    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    ks = tl.arange(0, GROUP_K)
    row_ok = rows < M
    col_ok = cols < N
    a_ptrs = a_ptr + rows[:, None] * K + ks[None, :]
    b_ptrs = b_ptr + cols[None, :] * K + ks[:, None]  # [GROUP_K, BLOCK_N]: w_q read transposed
    as_ptrs = as_ptr + rows * as_row_stride
    bs_ptrs = bs_ptr + (cols // _W_BLOCK) * bs_row_stride

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, K // GROUP_K):
        a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
        if EXACT_CASTS:
            part = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            part = tl.dot(a, b)  # FP8 tensor cores, fp32 accumulation
        a_s = tl.load(as_ptrs + g * as_group_stride, mask=row_ok, other=0.0)
        b_s = tl.load(bs_ptrs + (g * GROUP_K) // _W_BLOCK, mask=col_ok, other=0.0)
        acc += part * a_s[:, None] * b_s[None, :]
        a_ptrs += GROUP_K
        b_ptrs += GROUP_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = round_to(acc, c_ptr.dtype.element_ty, EXACT_CASTS)
    tl.store(c_ptr + rows[:, None] * N + cols[None, :], out, mask=row_ok[:, None] & col_ok[None, :])


def _config(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, warps, stages) by token count: decode-sized M wastes least with
    16-row tiles (the smallest an FP8 MMA takes); large M wants big square tiles."""
    if m <= 16:
        return 16, 64, 4, 4
    if m <= 64:
        return 64, 128, 4, 4
    return 128, 128, 8, 3


def block_fp8_matmul(
    x_q: torch.Tensor,
    x_scales: torch.Tensor,
    w_q: torch.Tensor,
    w_scales: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``block_fp8_linear`` on validated inputs: ``x_q [..., K]`` with scales
    ``[..., K // group]`` (row- or column-major), ``w_q [N, K]`` with scales
    ``[ceil(N / 128), ceil(K / 128)]`` (rows may be padded).

    Example:
        >>> out = block_fp8_matmul(x_q, x_scales, w_q, w_scales, None, torch.bfloat16)
    """
    n, k = w_q.shape
    m = x_q.numel() // k if k else 0
    groups = x_scales.shape[-1]
    out = torch.empty((*x_q.shape[:-1], n), dtype=out_dtype, device=x_q.device)
    if m == 0 or n == 0:
        return out
    # [M, groups] views; a column-major [..., groups] flattens to strides (1, M).
    scales = x_scales.reshape(m, groups)
    block_m, block_n, warps, stages = _config(m)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _block_fp8_matmul_kernel[grid](
        x_q, scales, w_q, w_scales, bias if bias is not None else out, out,
        m, n, k, scales.stride(0), scales.stride(1), w_scales.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, GROUP_K=k // groups, SUPER_M=8,
        EXACT_CASTS=exact_casts(), num_warps=warps, num_stages=stages,
    )
    return out
