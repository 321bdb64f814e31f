"""Small-batch FP8 GEMM for decode: ``out = (x_q * x_scale) @ (w_q * w_scale).T (+ bias)``
at 1-64 tokens, where the product is a stream of the weight and should run at memory
bandwidth.

One kernel serves both FP8 linear ops:

- ``fp8_linear``: a per-tensor weight scale and a per-tensor or per-token (``[M, 1]``)
  activation scale, applied once to the fp32 accumulator in the epilogue;
- ``block_fp8_linear``: activations scaled per token and group of 64 or 128 K columns,
  weights per 128x128 block; each group's FP8 product is scaled before it is added
  (the scheme of `block_linear.py`), ``BLOCK_K`` covering one or more groups.

Grid ``(ceil(N / BLOCK_N), SPLIT_K, ceil(M / BLOCK_M))``: every program streams a
``BLOCK_N x K / SPLIT_K`` slab of the weight (rows contiguous in K, as ``nn.Linear``
stores them) against the token tile, zero-padded to ``BLOCK_M`` = 16, 32 or 64 rows (FP8
MMAs are at least 16 rows). At one token a Llama-3-8B ``o_proj`` has only 64 slabs of 64
rows, half a program per multiprocessor; splitting K makes enough programs to keep
every multiprocessor's loads in flight. Split programs write fp32 partial tiles and a
second kernel adds them in split order and applies the epilogue: results do not depend
on which program finishes first (no atomics), at the cost of one more small launch.

``SWAP_AB`` computes ``w_tile @ x_tile.T``: the weight tile is the MMA's M side, which
Hopper's wgmma wants 64 rows of; without it the token tile is, and Triton uses the
Ampere-style MMA. Both are swept (``benchmarks/small_gemm_sweep.py``).

Under Triton's interpreter the FP8 tiles are widened to fp32 before the product (exact:
every E4M3 value and every product of two is an fp32), which NumPy multiplies correctly.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._rounding import exact_casts, round_to
from .small_gemm_config import SmallGemmConfig, block_m_for, default_config

_W_BLOCK = tl.constexpr(128)
# SCALES: how the operands are scaled.
PER_TENSOR, PER_TOKEN, BLOCKWISE = 0, 1, 2
# Small reduction programs: a decode-sized output (4096 values) still spreads over 16.
_REDUCE_BLOCK = 256


@triton.jit
def _finish(acc, rows, cols, xs_ptr, ws_ptr, bias_ptr, xs_row_stride,
            SCALES: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The epilogue on fp32 ``acc``: per-tensor/per-token scales (block scales were applied
    in the K loop), bias. ``rows``/``cols`` broadcast against ``acc`` and are in range."""
    if SCALES == 0:
        acc = acc * tl.load(xs_ptr) * tl.load(ws_ptr)
    elif SCALES == 1:
        acc = acc * tl.load(xs_ptr + rows * xs_row_stride) * tl.load(ws_ptr)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + cols).to(tl.float32)
    return acc


# Token counts, steps and split counts change from call to call: one compile serves them
# all (Triton would otherwise specialize values of 1 and multiples of 16; a split count
# as a constexpr would compile once per count). N and K stay specialized: K's multiple
# of 16 is what lets weight rows be read 16 bytes at a time.
@triton.jit(do_not_specialize=["M", "steps_per_split", "xs_row_stride", "xs_group_stride", "ws_row_stride"])
def _small_fp8_gemm_kernel(
    x_ptr, w_ptr, xs_ptr, ws_ptr, bias_ptr, out_ptr, part_ptr,
    M, N, K, steps_per_split, xs_row_stride, xs_group_stride, ws_row_stride,
    SCALES: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_K: tl.constexpr,
    SPLIT: tl.constexpr, SWAP_AB: tl.constexpr, EVEN_K: tl.constexpr, EXACT_CASTS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Weight rows past N re-read row N-1 instead of being masked: the weight stream stays
    # unpredicated, and what they compute is never stored. Token rows past M are masked
    # (zero-filled, no memory traffic): at one token 15 of 16 rows would otherwise re-read
    # the token, a quarter of the weight's bytes again from L2.
    row_ok = rows < M
    rows_ld = tl.minimum(rows, M - 1)
    cols_ld = tl.minimum(cols, N - 1)
    ks = tl.arange(0, GROUP_K)
    first = pid_k * steps_per_split
    steps = tl.minimum(steps_per_split, tl.cdiv(K, BLOCK_K) - first)
    k0 = first * BLOCK_K
    x_row = rows_ld.to(tl.int64) * K
    w_row = cols_ld.to(tl.int64) * K
    if SWAP_AB:
        w_ptrs = w_ptr + w_row[:, None] + (k0 + ks)[None, :]  # [BLOCK_N, GROUP_K]
        x_ptrs = x_ptr + x_row[None, :] + (k0 + ks)[:, None]  # [GROUP_K, BLOCK_M]: x read transposed
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        w_ptrs = w_ptr + w_row[None, :] + (k0 + ks)[:, None]  # [GROUP_K, BLOCK_N]: w read transposed
        x_ptrs = x_ptr + x_row[:, None] + (k0 + ks)[None, :]  # [BLOCK_M, GROUP_K]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SCALES == 2:
        groups = K // GROUP_K
        xs_ptrs = xs_ptr + rows_ld * xs_row_stride
        ws_ptrs = ws_ptr + (cols_ld // _W_BLOCK) * ws_row_stride
    for t in range(0, steps):
        for s in tl.static_range(BLOCK_K // GROUP_K):
            off = t * BLOCK_K + s * GROUP_K
            if EVEN_K:
                w = tl.load(w_ptrs + off)
                if SWAP_AB:
                    x = tl.load(x_ptrs + off, mask=row_ok[None, :], other=0.0)
                else:
                    x = tl.load(x_ptrs + off, mask=row_ok[:, None], other=0.0)
            else:
                # Past K both operands must be zero: a stray FP8 NaN times zero is NaN.
                k_ok = k0 + off + ks < K
                if SWAP_AB:
                    w = tl.load(w_ptrs + off, mask=k_ok[None, :], other=0.0)
                    x = tl.load(x_ptrs + off, mask=k_ok[:, None] & row_ok[None, :], other=0.0)
                else:
                    w = tl.load(w_ptrs + off, mask=k_ok[:, None], other=0.0)
                    x = tl.load(x_ptrs + off, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if SWAP_AB:
                a, b = w, x
            else:
                a, b = x, w
            if EXACT_CASTS:
                part = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(a, b)  # FP8 tensor cores, fp32 accumulation
            if SCALES == 2:
                # A group past K (a partial last step) multiplies a zero product; clamp its index.
                g = tl.minimum((k0 + off) // GROUP_K, groups - 1)
                a_s = tl.load(xs_ptrs + g * xs_group_stride)
                b_s = tl.load(ws_ptrs + (g * GROUP_K) // _W_BLOCK)
                if SWAP_AB:
                    part = part * a_s[None, :] * b_s[:, None]
                else:
                    part = part * a_s[:, None] * b_s[None, :]
            acc += part
    if SWAP_AB:
        acc = tl.trans(acc)
    out_mask = row_ok[:, None] & (cols < N)[None, :]
    if not SPLIT:
        acc = _finish(acc, rows_ld[:, None], cols_ld[None, :], xs_ptr, ws_ptr, bias_ptr, xs_row_stride,
                      SCALES, HAS_BIAS)
        out = round_to(acc, out_ptr.dtype.element_ty, EXACT_CASTS)
        tl.store(out_ptr + rows[:, None] * N + cols[None, :], out, mask=out_mask)
    else:
        tl.store(part_ptr + (pid_k * M + rows)[:, None] * N + cols[None, :], acc, mask=out_mask)


@triton.jit(do_not_specialize=["M", "xs_row_stride", "split_k"])
def _split_k_reduce_kernel(
    part_ptr, xs_ptr, ws_ptr, bias_ptr, out_ptr, M, N, xs_row_stride, split_k,
    SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, EXACT_CASTS: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    total = M * N
    ok = offs < total
    # Split order, whatever order the programs ran in: the result is reproducible.
    acc = tl.load(part_ptr + offs, mask=ok, other=0.0)
    for s in range(1, split_k):
        acc += tl.load(part_ptr + s * total + offs, mask=ok, other=0.0)
    rows = tl.minimum(offs // N, M - 1)
    cols = offs % N
    acc = _finish(acc, rows, cols, xs_ptr, ws_ptr, bias_ptr, xs_row_stride, SCALES, HAS_BIAS)
    tl.store(out_ptr + offs, round_to(acc, out_ptr.dtype.element_ty, EXACT_CASTS), mask=ok)


def _check_config(config: SmallGemmConfig, group_k: Optional[int]) -> None:
    pow2 = lambda v: v > 0 and v & (v - 1) == 0  # noqa: E731
    if not (pow2(config.block_n) and config.block_n >= 16):
        raise ValueError(f"small FP8 GEMM: block_n must be a power of two >= 16, got {config.block_n}")
    if not (pow2(config.block_k) and config.block_k >= 32):
        raise ValueError(f"small FP8 GEMM: block_k must be a power of two >= 32 (an FP8 MMA's K), "
                         f"got {config.block_k}")
    if group_k is not None and config.block_k % group_k:
        raise ValueError(f"small FP8 GEMM: block_k ({config.block_k}) must be a multiple of the activation "
                         f"group size ({group_k})")
    if config.split_k < 1:
        raise ValueError(f"small FP8 GEMM: split_k must be >= 1, got {config.split_k}")
    if config.swap_ab and config.num_warps % 4:
        raise ValueError(f"small FP8 GEMM: swap_ab needs a multiple of 4 warps, got {config.num_warps}")


def _launch(x_q, w_q, xs, ws, bias, out_dtype, scales, xs_strides, ws_row_stride, group_k, config):
    n, k = w_q.shape
    m = x_q.shape[:-1].numel()
    out = torch.empty((*x_q.shape[:-1], n), dtype=out_dtype, device=x_q.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand_as(out))
    if config is None:
        from . import num_sms

        config = default_config(m, n, k, group_k, num_sms(x_q.device))
    _check_config(config, group_k)
    block_m = block_m_for(m)
    k_steps = triton.cdiv(k, config.block_k)
    per_split = triton.cdiv(k_steps, config.split_k)
    split = triton.cdiv(k_steps, per_split)  # no split without K steps
    part = torch.empty((split, m, n), dtype=torch.float32, device=x_q.device) if split > 1 else out
    dummy = out if bias is None else bias
    grid = (triton.cdiv(n, config.block_n), split, triton.cdiv(m, block_m))
    _small_fp8_gemm_kernel[grid](
        x_q, w_q, xs, ws, dummy, out, part,
        m, n, k, per_split, xs_strides[0], xs_strides[1], ws_row_stride,
        SCALES=scales, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, GROUP_K=group_k or config.block_k, SPLIT=split > 1, SWAP_AB=config.swap_ab,
        EVEN_K=(k % config.block_k == 0), EXACT_CASTS=exact_casts(),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if split > 1:
        _split_k_reduce_kernel[(triton.cdiv(m * n, _REDUCE_BLOCK),)](
            part, xs, ws, dummy, out, m, n, xs_strides[0], split,
            SCALES=scales, HAS_BIAS=bias is not None, BLOCK=_REDUCE_BLOCK,
            EXACT_CASTS=exact_casts(), num_warps=2,
        )
    return out


def small_fp8_linear(
    x_q: torch.Tensor,
    w_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
    config: Optional[SmallGemmConfig] = None,
) -> torch.Tensor:
    """``fp8_linear`` on validated inputs, for few tokens: ``x_q [..., K]`` and ``w_q [N, K]``
    (float8_e4m3fn, contiguous), ``x_scale`` one element or per token (``[..., 1]``),
    ``w_scale`` one element, ``bias [N]`` in ``out_dtype`` or None. ``config``: launch
    parameters (default: `default_config` for this shape and device).

    Example:
        >>> out = small_fp8_linear(x_q, w_q, x_scale, w_scale, None, torch.bfloat16,
        ...                        SmallGemmConfig(block_n=64, block_k=256, split_k=4))
    """
    # fp8_linear's rule: one element in at most one dim is per-tensor, [..., 1] per-token.
    per_token = not (x_scale.dim() <= 1 and x_scale.numel() == 1)
    xs = x_scale.reshape(-1) if per_token else x_scale
    return _launch(x_q, w_q, xs, w_scale, bias, out_dtype, PER_TOKEN if per_token else PER_TENSOR,
                   (xs.stride(0) if per_token else 0, 0), 0, None, config)


def small_block_fp8_linear(
    x_q: torch.Tensor,
    x_scales: torch.Tensor,
    w_q: torch.Tensor,
    w_scales: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
    config: Optional[SmallGemmConfig] = None,
) -> torch.Tensor:
    """``block_fp8_linear`` on validated inputs, for few tokens: ``x_q [..., K]`` with
    scales ``[..., K // group]`` (row- or column-major, group 64 or 128), ``w_q [N, K]``
    with scales ``[ceil(N / 128), ceil(K / 128)]`` (rows may be padded). ``config``: launch
    parameters (default: `default_config`; its ``block_k`` must be a multiple of the group).

    Example:
        >>> out = small_block_fp8_linear(x_q, x_scales, w_q, w_scales, None, torch.bfloat16)
    """
    k = w_q.shape[1]
    m = x_q.shape[:-1].numel()
    groups = x_scales.shape[-1]
    group_k = k // groups
    # [M, groups] views; a column-major [..., groups] flattens to strides (1, M).
    scales = x_scales.reshape(m, groups)
    return _launch(x_q, w_q, scales, w_scales, bias, out_dtype, BLOCKWISE, tuple(scales.stride()),
                   w_scales.stride(0), group_k, config)
