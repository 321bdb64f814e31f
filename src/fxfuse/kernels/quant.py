"""FP8 and NVFP4 quantization of a model-dtype tensor: static FP8, per-token FP8, NVFP4.

Static FP8 is elementwise over the flattened tensor. Per-token FP8 runs one program per
row: a row that fits one block stays in registers between the max and the quantize,
longer rows are read twice (the second read from L2). NVFP4 tiles rows x 16-element
blocks and writes its swizzled scale layout directly; bf16/fp16 input is read as int32
words, each the two elements of one output byte (`_nvfp4_words_kernel`), fp32 input as
elements (`_nvfp4_kernel`).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._nvfp4 import (
    check_word_config, quantize_rows, quantize_word_halves, split_words, swizzled_offset,
    store_word_tile, word_kind, word_tile, word_tiles,
)
from ._rounding import FP8_MAX, exact_casts, quantize_fp8

_MIN_DYNAMIC_SCALE = tl.constexpr(1.0 / (448.0 * 512.0))
_MAX_ROW_BLOCK = 8192
# Default NVFP4 word-kernel tile: up to _NVFP4_BLOCKS blocks of a row per program, rows
# added up to _NVFP4_TILE blocks. One row of up to 256 blocks (4096 elements) per program,
# 4 warps, was best at every swept shape (benchmarks/nvfp4_sweep.py, H100, RESULTS.md).
_NVFP4_TILE, _NVFP4_BLOCKS, _NVFP4_WARPS = 256, 256, 4


@triton.jit
def _static_fp8_kernel(x_ptr, scale_ptr, q_ptr, n, BLOCK: tl.constexpr, EXACT_CASTS: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    inv = tl.div_rn(1.0, tl.load(scale_ptr))
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(q_ptr + offs, quantize_fp8(x, inv, EXACT_CASTS), mask=mask)


@triton.jit
def _dynamic_fp8_kernel(
    x_ptr, ub_ptr, q_ptr, s_ptr, n_cols,
    HAS_UB: tl.constexpr, BLOCK: tl.constexpr, CHUNKS: tl.constexpr, EXACT_CASTS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * n_cols
    cols = tl.arange(0, BLOCK)
    if CHUNKS == 1:
        mask = cols < n_cols
        x = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for c in range(CHUNKS):
            m = c * BLOCK + cols < n_cols
            acc = tl.maximum(acc, tl.abs(tl.load(x_ptr + base + c * BLOCK + cols, mask=m, other=0.0).to(tl.float32)))
        amax = tl.max(acc, axis=0)
    if HAS_UB:
        amax = tl.minimum(amax, tl.load(ub_ptr))
    s = tl.maximum(tl.div_rn(amax, FP8_MAX), _MIN_DYNAMIC_SCALE)
    tl.store(s_ptr + row, s)
    inv = tl.div_rn(1.0, s)
    if CHUNKS == 1:
        tl.store(q_ptr + base + cols, quantize_fp8(x, inv, EXACT_CASTS), mask=mask)
    else:
        for c in range(CHUNKS):
            m = c * BLOCK + cols < n_cols
            xc = tl.load(x_ptr + base + c * BLOCK + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(q_ptr + base + c * BLOCK + cols, quantize_fp8(xc, inv, EXACT_CASTS), mask=m)


@triton.jit
def _nvfp4_kernel(
    x_ptr, gs_ptr, q_ptr, sf_ptr, n_rows, n_cols, kb_pad,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, EXACT_CASTS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    packed, sf8 = quantize_rows(x, tl.load(gs_ptr), BLOCK_R, BLOCK_K, EXACT_CASTS)
    pcols = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    pmask = (rows[:, None] < n_rows) & (pcols[None, :] < n_cols // 2)
    tl.store(q_ptr + rows64[:, None] * (n_cols // 2) + pcols[None, :], packed, mask=pmask)
    kcols = tl.program_id(1) * (BLOCK_K // 16) + tl.arange(0, BLOCK_K // 16)
    smask = (rows[:, None] < n_rows) & (kcols[None, :] < n_cols // 16)
    tl.store(sf_ptr + swizzled_offset(rows64[:, None], kcols[None, :], kb_pad), sf8, mask=smask)


@triton.jit
def _nvfp4_words_kernel(
    w_ptr, gs_ptr, q_ptr, sf_ptr, n_rows, n_blocks, kb_pad,
    KIND: tl.constexpr, ROWS: tl.constexpr, BLOCKS: tl.constexpr, EXACT_CASTS: tl.constexpr,
):
    # w: the input as int32 words [n_rows, 8 * n_blocks]; a word's packed byte has the
    # word's own offset in q, so one offset tile serves the loads and the stores.
    rows64, blocks, ok, offs = word_tile(n_rows, n_blocks, ROWS, BLOCKS)
    lo0, hi0 = split_words(tl.load(w_ptr + offs, mask=ok[:, :, None], other=0), KIND)
    lo1, hi1 = split_words(tl.load(w_ptr + offs + 4, mask=ok[:, :, None], other=0), KIND)
    b0, b1, sf8 = quantize_word_halves(lo0, hi0, lo1, hi1, tl.load(gs_ptr), EXACT_CASTS)
    store_word_tile(q_ptr, sf_ptr, offs, rows64, blocks, ok, b0, b1, sf8, kb_pad)


def static_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``static_scaled_fp8_quant`` on a contiguous ``x``.

    Example:
        >>> q = static_fp8(torch.randn(4, 64, device="cuda", dtype=torch.bfloat16), torch.tensor([0.01], device="cuda"))
    """
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    n = x.numel()
    if n:
        block = 4096 if n >= 4096 else triton.next_power_of_2(n)
        _static_fp8_kernel[(triton.cdiv(n, block),)](
            x, scale, q, n, BLOCK=block, EXACT_CASTS=exact_casts(), num_warps=8 if block >= 4096 else 4
        )
    return q


def row_block(n_cols: int, limit: int = _MAX_ROW_BLOCK) -> tuple[int, int, int]:
    """(block, chunks, warps) for one program per row of ``n_cols`` elements."""
    block = min(triton.next_power_of_2(max(n_cols, 1)), limit)
    return block, triton.cdiv(n_cols, block), min(max(block // 1024, 1), 16)  # as norm_quant.norm_launch


def dynamic_fp8(x: torch.Tensor, scale_ub: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``dynamic_per_token_fp8_quant`` on a contiguous ``x``; returns ``(q, scales [..., 1])``.

    Example:
        >>> q, s = dynamic_fp8(torch.randn(4, 64, device="cuda", dtype=torch.bfloat16))
    """
    n_cols = x.shape[-1]
    rows = x.numel() // n_cols
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    if rows:
        block, chunks, warps = row_block(n_cols)
        _dynamic_fp8_kernel[(rows,)](
            x, scale_ub if scale_ub is not None else x, q, s, n_cols,
            HAS_UB=scale_ub is not None, BLOCK=block, CHUNKS=chunks, EXACT_CASTS=exact_casts(), num_warps=warps,
        )
    return q, s


def zero_scale_padding(sf: torch.Tensor, m: int, kb: int) -> None:
    """Zero the padding of swizzled block scales ``sf`` for ``m`` rows of ``kb`` blocks,
    leaving the rest for a kernel: with padded block columns everything is zeroed, with
    padded rows only the last 128-row tile (contiguous in the swizzled layout)."""
    m_pad, kb_pad = sf.shape
    if kb_pad != kb:
        sf.view(torch.uint8).zero_()
    elif m_pad != m:
        sf.view(torch.uint8).view(-1)[(m_pad - 128) * kb_pad :].zero_()


def nvfp4_outputs(m: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty ``(q [m, k/2] uint8, block scales)`` with the scale padding zeroed."""
    kb = k // 16
    q = torch.empty((m, k // 2), dtype=torch.uint8, device=device)
    sf = torch.empty((triton.cdiv(m, 128) * 128, triton.cdiv(kb, 4) * 4), dtype=torch.float8_e4m3fn, device=device)
    zero_scale_padding(sf, m, kb)
    return q, sf


def nvfp4(
    x: torch.Tensor, global_scale: torch.Tensor, config: Optional[tuple[int, int, int]] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``nvfp4_quant`` on a contiguous ``x`` ``[..., K]``; returns ``(q, swizzled block scales)``.

    ``config`` ``(ROWS, BLOCKS, num_warps)`` overrides `nvfp4_tiles` for bf16/fp16 input
    (tuning; every config gives the same bits); fp32 input ignores it.

    Example:
        >>> q, sf = nvfp4(torch.randn(4, 64, device="cuda", dtype=torch.bfloat16), torch.tensor([100.0], device="cuda"))
    """
    k = x.shape[-1]
    m = x.numel() // k
    q, sf = nvfp4_outputs(m, k, x.device)
    kind = word_kind(x)
    if config is not None:
        config = check_word_config(config)
    if m and kind is not None:
        _launch_nvfp4_words(x, global_scale, q, sf, m, k, kind, config or nvfp4_tiles(m, k // 16))
    elif m:
        _launch_nvfp4_elements(x, global_scale, q, sf, m, k)
    return q, sf


def nvfp4_tiles(rows: int, n_blocks: int) -> tuple[int, int, int]:
    """Default ``(ROWS, BLOCKS, num_warps)`` of `_nvfp4_words_kernel` for ``rows`` rows of
    ``n_blocks`` 16-element blocks."""
    return word_tiles(rows, n_blocks, _NVFP4_TILE, _NVFP4_BLOCKS, _NVFP4_WARPS)


def _launch_nvfp4_words(x, global_scale, q, sf, m: int, k: int, kind: int, config: tuple[int, int, int]) -> None:
    rows, blocks, warps = config
    n_blocks = k // 16
    grid = (triton.cdiv(m, rows), triton.cdiv(n_blocks, blocks))
    _nvfp4_words_kernel[grid](
        x.view(torch.int32), global_scale, q, sf, m, n_blocks, sf.shape[1],
        KIND=kind, ROWS=rows, BLOCKS=blocks, EXACT_CASTS=exact_casts(), num_warps=warps,
    )


def _launch_nvfp4_elements(x, global_scale, q, sf, m: int, k: int) -> None:
    """The element-tile kernel (fp32 input, or 16-bit input not readable as words)."""
    block_r, block_k = 8, min(256, triton.next_power_of_2(k))
    grid = (triton.cdiv(m, block_r), triton.cdiv(k, block_k))
    _nvfp4_kernel[grid](
        x, global_scale, q, sf, m, k, sf.shape[1],
        BLOCK_R=block_r, BLOCK_K=block_k, EXACT_CASTS=exact_casts(), num_warps=4,
    )
