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

**Fused forms** (the ops of `fxfuse.ops.fused_linear`, made by the ``gemm_fusion`` pass):

- a *prologue* quantizes a model-dtype ``x`` in registers as it is loaded (``XQ``):
  static per-tensor FP8, per-token dynamic FP8 (each program first reads its token rows
  once for their maxima: a few KiB from L2 at decode) or per-token-group FP8 (each
  group's scale from the tile in registers, used as the group's activation scale);
- an *epilogue* (``EPI``): SiLU-and-mul of a gate/up weight (a program streams the gate
  rows ``[n, n + BLOCK_N)`` and the matching up rows ``[N/2 + n, ...)``, two accumulators,
  so the weight needs no interleaving), optionally quantized (static or per-group FP8);
  or the residual add + RMSNorm (+ static or per-group FP8) that consumes the output,
  which needs whole rows: the GEMM then always writes fp32 partials and one program per
  token row adds them, scales, rounds, adds the residual and normalizes
  (`norm_quant.rms_norm_tile`). That second kernel replaces the split-K reduction, so
  the fused chain launches one kernel less than GEMM + reduction + norm.

Every step rounds where the unfused chain rounds (the GEMM output to the model dtype,
the SiLU-and-mul and norm outputs before a quant) with the unfused kernels' expressions,
so for one config a fused result equals the unfused kernels' chain bit for bit (compiled,
a norm's row sum may be reduced in another order: DESIGN §2's one FP8 step).

Under Triton's interpreter the FP8 tiles are widened to fp32 before the product (exact:
every E4M3 value and every product of two is an fp32), which NumPy multiplies correctly.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._rounding import FP8_MAX, exact_casts, quantize_fp8, round_to
from .group_quant import _group_codes
from .norm_quant import norm_tile_offsets, rms_norm_tile
from .small_gemm_config import SmallGemmConfig, block_m_for, default_config, default_fused_config

_W_BLOCK = tl.constexpr(128)
_MIN_DYNAMIC_SCALE = tl.constexpr(1.0 / (448.0 * 512.0))
# SCALES: how the operands are scaled.
PER_TENSOR, PER_TOKEN, BLOCKWISE = 0, 1, 2
# XQ: the activation as it arrives: FP8 already, or the model dtype quantized in the
# prologue (static per-tensor, dynamic per token, per token group).
X_FP8, X_STATIC, X_DYNAMIC, X_GROUP = 0, 1, 2, 3
# EPI: what follows the product: nothing, SiLU-and-mul of the gate/up halves, or a row
# epilogue (residual add + RMSNorm) in a second kernel over fp32 partials.
EPI_NONE, EPI_SILU, EPI_ROWS = 0, 1, 2
# OUTQ: how an epilogue's result is written: model dtype, static FP8, per-group FP8.
OUT_PLAIN, OUT_STATIC, OUT_GROUP = 0, 1, 2
#: Epilogue names of the fused launchers (and of the fused ops' ``epilogue`` argument).
EPILOGUES = {"none": EPI_NONE, "silu_and_mul": EPI_SILU, "fused_add_rms_norm": EPI_ROWS}
# Small reduction programs: a decode-sized output (4096 values) still spreads over 16.
_REDUCE_BLOCK = 256
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _scaled(acc, xs, ws_ptr, bias_ptr, cols, SCALES: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The epilogue on fp32 ``acc``: times the activation scale ``xs`` (a scalar or per-row
    values broadcastable against ``acc``) and the per-tensor weight scale (block scales
    were applied in the K loop), plus the bias at ``cols`` (in range)."""
    if SCALES != 2:
        acc = acc * xs * tl.load(ws_ptr)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + cols).to(tl.float32)
    return acc


@triton.jit
def _silu_mul(g, u, MID_DTYPE: tl.constexpr, EXACT_CASTS: tl.constexpr):
    """SiLU-and-mul of fp32 GEMM outputs as the unfused chain computes it: each rounded to
    the model dtype (the GEMM's output), then `activation._silu_and_mul_kernel`'s
    expression, rounded again."""
    gf = round_to(g, MID_DTYPE, EXACT_CASTS).to(tl.float32)
    uf = round_to(u, MID_DTYPE, EXACT_CASTS).to(tl.float32)
    return round_to(tl.div_rn(gf, 1.0 + tl.exp(-gf)) * uf, MID_DTYPE, EXACT_CASTS)


@triton.jit
def _store_out(y, out_ptr, offs, mask, qscale_ptr, qs_ptr, s_offs, s_mask,
               OUTQ: tl.constexpr, OUT_GROUP: tl.constexpr, EXACT_CASTS: tl.constexpr):
    """Write a ``[R, C]`` model-dtype tile ``y`` as it is, as static FP8 (the quant op's
    ``1 / scale``), or as FP8 per group of ``OUT_GROUP`` columns (``C`` a multiple; one
    scale per (row, group) to ``s_offs`` ``[R, C // OUT_GROUP]``)."""
    if OUTQ == 0:
        tl.store(out_ptr + offs, y, mask=mask)
    elif OUTQ == 1:
        inv = tl.div_rn(1.0, tl.load(qscale_ptr))
        tl.store(out_ptr + offs, quantize_fp8(y.to(tl.float32), inv, EXACT_CASTS), mask=mask)
    else:
        y3 = tl.reshape(y.to(tl.float32), (y.shape[0], y.shape[1] // OUT_GROUP, OUT_GROUP))
        q = _group_codes(y3, qs_ptr, s_offs, s_mask, EXACT_CASTS)
        tl.store(out_ptr + offs, tl.reshape(q, (y.shape[0], y.shape[1])), mask=mask)


# Token counts, steps and split counts change from call to call: one compile serves them
# all (Triton would otherwise specialize values of 1 and multiples of 16; a split count
# as a constexpr would compile once per count). N and K stay specialized: K's multiple
# of 16 is what lets weight rows be read 16 bytes at a time.
@triton.jit(do_not_specialize=["M", "steps_per_split", "xs_row_stride", "xs_group_stride", "ws_row_stride",
                               "qs_row_stride", "qs_group_stride"])
def _small_fp8_gemm_kernel(
    x_ptr, w_ptr, xs_ptr, ws_ptr, bias_ptr, out_ptr, part_ptr, ub_ptr, xs_out_ptr, qscale_ptr, qs_ptr,
    res_ptr, nw_ptr, res_out_ptr, ticket_ptr,
    M, N, K, steps_per_split, xs_row_stride, xs_group_stride, ws_row_stride, qs_row_stride, qs_group_stride, eps,
    SCALES: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_K: tl.constexpr,
    SPLIT: tl.constexpr, SWAP_AB: tl.constexpr, EVEN_K: tl.constexpr, EXACT_CASTS: tl.constexpr,
    XQ: tl.constexpr, HAS_UB: tl.constexpr, EPI: tl.constexpr, OUTQ: tl.constexpr, OUT_GROUP: tl.constexpr,
    MID_DTYPE: tl.constexpr, ROW_TAIL: tl.constexpr, ROW_BLOCK: tl.constexpr, TILE_GROUP: tl.constexpr,
    TAIL_SCALES: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    # Output columns: the gate rows of a gate/up weight, whose up rows start at NC.
    if EPI == 1:
        NC = N // 2
    else:
        NC = N
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Weight rows past N re-read row N-1 instead of being masked: the weight stream stays
    # unpredicated, and what they compute is never stored. Token rows past M are masked
    # (zero-filled, no memory traffic): at one token 15 of 16 rows would otherwise re-read
    # the token, a quarter of the weight's bytes again from L2.
    row_ok = rows < M
    rows_ld = tl.minimum(rows, M - 1)
    cols_ld = tl.minimum(cols, NC - 1)
    ks = tl.arange(0, GROUP_K)
    first = pid_k * steps_per_split
    steps = tl.minimum(steps_per_split, tl.cdiv(K, BLOCK_K) - first)
    k0 = first * BLOCK_K
    x_row = rows_ld.to(tl.int64) * K
    w_row = cols_ld.to(tl.int64) * K
    if EPI == 1:
        w_up = (cols_ld + NC).to(tl.int64) * K
    else:
        w_up = w_row
    if XQ == 2:
        # The per-token scale needs the whole row's maximum before the first product: the
        # program reads its token rows once more (from L2; KiBs at decode), as the quant
        # kernel does, and quantizes each tile with the same reciprocal.
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c in range(0, tl.cdiv(K, GROUP_K)):
            kk = c * GROUP_K + ks
            xv = tl.load(x_ptr + x_row[:, None] + kk[None, :], mask=row_ok[:, None] & (kk < K)[None, :], other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(xv.to(tl.float32)), axis=1))
        if HAS_UB:
            amax = tl.minimum(amax, tl.load(ub_ptr))
        x_s = tl.maximum(tl.div_rn(amax, FP8_MAX), _MIN_DYNAMIC_SCALE)  # exact division, as torch's
        x_inv = tl.div_rn(1.0, x_s)
        # The reduction kernels read the scales; one program column writes them.
        tl.store(xs_out_ptr + rows, x_s, mask=row_ok & ((rows * 0 + pid_n + pid_k) == 0))
    elif XQ == 1:
        x_inv = tl.div_rn(1.0, tl.load(xs_ptr))
    if SWAP_AB:
        w_ptrs = w_ptr + w_row[:, None] + (k0 + ks)[None, :]  # [BLOCK_N, GROUP_K]
        wu_ptrs = w_ptr + w_up[:, None] + (k0 + ks)[None, :]
        x_ptrs = x_ptr + x_row[None, :] + (k0 + ks)[:, None]  # [GROUP_K, BLOCK_M]: x read transposed
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        w_ptrs = w_ptr + w_row[None, :] + (k0 + ks)[:, None]  # [GROUP_K, BLOCK_N]: w read transposed
        wu_ptrs = w_ptr + w_up[None, :] + (k0 + ks)[:, None]
        x_ptrs = x_ptr + x_row[:, None] + (k0 + ks)[None, :]  # [BLOCK_M, GROUP_K]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SCALES == 2:
        groups = K // GROUP_K
        xs_ptrs = xs_ptr + rows_ld * xs_row_stride
        ws_ptrs = ws_ptr + (cols_ld // _W_BLOCK) * ws_row_stride
        wsu_ptrs = ws_ptr + ((cols_ld + NC) // _W_BLOCK) * ws_row_stride
    for t in range(0, steps):
        for s in tl.static_range(BLOCK_K // GROUP_K):
            off = t * BLOCK_K + s * GROUP_K
            if EVEN_K:
                w = tl.load(w_ptrs + off)
                if EPI == 1:
                    wu = tl.load(wu_ptrs + off)
                if SWAP_AB:
                    x = tl.load(x_ptrs + off, mask=row_ok[None, :], other=0.0)
                else:
                    x = tl.load(x_ptrs + off, mask=row_ok[:, None], other=0.0)
            else:
                # Past K both operands must be zero: a stray FP8 NaN times zero is NaN.
                k_ok = k0 + off + ks < K
                if SWAP_AB:
                    w = tl.load(w_ptrs + off, mask=k_ok[None, :], other=0.0)
                    if EPI == 1:
                        wu = tl.load(wu_ptrs + off, mask=k_ok[None, :], other=0.0)
                    x = tl.load(x_ptrs + off, mask=k_ok[:, None] & row_ok[None, :], other=0.0)
                else:
                    w = tl.load(w_ptrs + off, mask=k_ok[:, None], other=0.0)
                    if EPI == 1:
                        wu = tl.load(wu_ptrs + off, mask=k_ok[:, None], other=0.0)
                    x = tl.load(x_ptrs + off, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            # The prologue: the quant op's arithmetic on the tile, in registers.
            if XQ == 1:
                x = quantize_fp8(x.to(tl.float32), x_inv, EXACT_CASTS)
            elif XQ == 2:
                if SWAP_AB:
                    x = quantize_fp8(x.to(tl.float32), x_inv[None, :], EXACT_CASTS)
                else:
                    x = quantize_fp8(x.to(tl.float32), x_inv[:, None], EXACT_CASTS)
            elif XQ == 3:
                xf = x.to(tl.float32)
                if SWAP_AB:
                    g_s = tl.maximum(tl.div_rn(tl.max(tl.abs(xf), axis=0), FP8_MAX), _MIN_DYNAMIC_SCALE)
                    x = quantize_fp8(xf, tl.div_rn(1.0, g_s)[None, :], EXACT_CASTS)
                else:
                    g_s = tl.maximum(tl.div_rn(tl.max(tl.abs(xf), axis=1), FP8_MAX), _MIN_DYNAMIC_SCALE)
                    x = quantize_fp8(xf, tl.div_rn(1.0, g_s)[:, None], EXACT_CASTS)
            if SWAP_AB:
                a, b = w, x
            else:
                a, b = x, w
            if EXACT_CASTS:
                part = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(a, b)  # FP8 tensor cores, fp32 accumulation
            if EPI == 1:
                if SWAP_AB:
                    au, bu = wu, x
                else:
                    au, bu = x, wu
                if EXACT_CASTS:
                    part_u = tl.dot(au.to(tl.float32), bu.to(tl.float32), input_precision="ieee")
                else:
                    part_u = tl.dot(au, bu)
            if SCALES == 2:
                # A group past K (a partial last step) multiplies a zero product; clamp its index.
                g = tl.minimum((k0 + off) // GROUP_K, groups - 1)
                if XQ == 3:
                    a_s = g_s
                else:
                    a_s = tl.load(xs_ptrs + g * xs_group_stride)
                b_s = tl.load(ws_ptrs + (g * GROUP_K) // _W_BLOCK)
                if SWAP_AB:
                    part = part * a_s[None, :] * b_s[:, None]
                else:
                    part = part * a_s[:, None] * b_s[None, :]
                if EPI == 1:
                    bu_s = tl.load(wsu_ptrs + (g * GROUP_K) // _W_BLOCK)
                    if SWAP_AB:
                        part_u = part_u * a_s[None, :] * bu_s[:, None]
                    else:
                        part_u = part_u * a_s[:, None] * bu_s[None, :]
            acc += part
            if EPI == 1:
                acc_u += part_u
    if SWAP_AB:
        acc = tl.trans(acc)
        if EPI == 1:
            acc_u = tl.trans(acc_u)
    out_mask = row_ok[:, None] & (cols < NC)[None, :]
    if SPLIT:
        tl.store(part_ptr + (pid_k * M + rows)[:, None] * N + cols[None, :], acc, mask=out_mask)
        if EPI == 1:
            tl.store(part_ptr + (pid_k * M + rows)[:, None] * N + NC + cols[None, :], acc_u, mask=out_mask)
        if ROW_TAIL:
            # The last program to finish normalizes every row. Its ticket's release (after
            # a barrier: every thread's partials are out) and acquire order the partials of
            # all programs before its reads (the pattern of Inductor's cooperative
            # reductions); it resets the ticket for the next launch (graph replays too).
            tl.debug_barrier()
            programs = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
            ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
            if ticket == programs - 1:
                tl.debug_barrier()
                if XQ == 2:
                    t_xs, t_stride = xs_out_ptr, 1
                else:
                    t_xs, t_stride = xs_ptr, xs_row_stride
                for r in range(0, M):
                    _row_epilogue(r, part_ptr, t_xs, ws_ptr, bias_ptr, res_ptr, nw_ptr, res_out_ptr, out_ptr,
                                  qscale_ptr, qs_ptr, M, N, t_stride, tl.num_programs(1), qs_row_stride,
                                  qs_group_stride, eps, TAIL_SCALES, HAS_BIAS, ROW_BLOCK, TILE_GROUP, OUTQ,
                                  MID_DTYPE, EXACT_CASTS)
                tl.atomic_xchg(ticket_ptr, 0)
    else:
        if XQ == 2:
            xs = x_s[:, None]
        elif SCALES == 1:
            xs = tl.load(xs_ptr + rows_ld[:, None] * xs_row_stride)
        elif SCALES == 0:
            xs = tl.load(xs_ptr)
        else:
            xs = 1.0
        if EPI == 0:
            acc = _scaled(acc, xs, ws_ptr, bias_ptr, cols_ld[None, :], SCALES, HAS_BIAS)
            out = round_to(acc, out_ptr.dtype.element_ty, EXACT_CASTS)
            tl.store(out_ptr + rows[:, None] * N + cols[None, :], out, mask=out_mask)
        else:
            y = _silu_mul(_scaled(acc, xs, ws_ptr, bias_ptr, cols_ld[None, :], SCALES, False),
                          _scaled(acc_u, xs, ws_ptr, bias_ptr, cols_ld[None, :], SCALES, False), MID_DTYPE, EXACT_CASTS)
            groups_out = pid_n * (BLOCK_N // OUT_GROUP) + tl.arange(0, BLOCK_N // OUT_GROUP)
            s_offs = rows[:, None] * qs_row_stride + groups_out[None, :] * qs_group_stride
            s_mask = row_ok[:, None] & (groups_out * OUT_GROUP < NC)[None, :]
            _store_out(y, out_ptr, rows[:, None] * NC + cols[None, :], out_mask, qscale_ptr, qs_ptr, s_offs, s_mask,
                       OUTQ, OUT_GROUP, EXACT_CASTS)


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
    if SCALES == 1:
        xs = tl.load(xs_ptr + rows * xs_row_stride)
    elif SCALES == 0:
        xs = tl.load(xs_ptr)
    else:
        xs = 1.0
    acc = _scaled(acc, xs, ws_ptr, bias_ptr, cols, SCALES, HAS_BIAS)
    tl.store(out_ptr + offs, round_to(acc, out_ptr.dtype.element_ty, EXACT_CASTS), mask=ok)


@triton.jit(do_not_specialize=["M", "xs_row_stride", "split_k", "qs_row_stride", "qs_group_stride"])
def _silu_reduce_kernel(
    part_ptr, xs_ptr, ws_ptr, out_ptr, qscale_ptr, qs_ptr, M, N, xs_row_stride, split_k, qs_row_stride,
    qs_group_stride,
    SCALES: tl.constexpr, BLOCK: tl.constexpr, OUTQ: tl.constexpr, OUT_GROUP: tl.constexpr,
    MID_DTYPE: tl.constexpr, EXACT_CASTS: tl.constexpr,
):
    # One token row x BLOCK gate columns: the split-K reduction of the gate and up halves,
    # then the SiLU-and-mul epilogue the unsplit GEMM runs in registers.
    row = tl.program_id(0).to(tl.int64)
    rows = row + tl.arange(0, 1)
    D = N // 2
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = (rows < M)[:, None] & (cols < D)[None, :]
    offs = rows[:, None] * N + cols[None, :]
    total = M * N
    g = tl.load(part_ptr + offs, mask=ok, other=0.0)
    u = tl.load(part_ptr + offs + D, mask=ok, other=0.0)
    for s in range(1, split_k):  # split order, as `_split_k_reduce_kernel`
        g += tl.load(part_ptr + s * total + offs, mask=ok, other=0.0)
        u += tl.load(part_ptr + s * total + offs + D, mask=ok, other=0.0)
    if SCALES == 1:
        xs = tl.load(xs_ptr + row * xs_row_stride)
    elif SCALES == 0:
        xs = tl.load(xs_ptr)
    else:
        xs = 1.0
    y = _silu_mul(_scaled(g, xs, ws_ptr, ws_ptr, cols, SCALES, False),
                  _scaled(u, xs, ws_ptr, ws_ptr, cols, SCALES, False), MID_DTYPE, EXACT_CASTS)
    groups_out = tl.program_id(1) * (BLOCK // OUT_GROUP) + tl.arange(0, BLOCK // OUT_GROUP)
    s_offs = rows[:, None] * qs_row_stride + groups_out[None, :] * qs_group_stride
    s_mask = (rows < M)[:, None] & (groups_out * OUT_GROUP < D)[None, :]
    _store_out(y, out_ptr, rows[:, None] * D + cols[None, :], ok, qscale_ptr, qs_ptr, s_offs, s_mask,
               OUTQ, OUT_GROUP, EXACT_CASTS)


@triton.jit
def _row_epilogue(
    row, part_ptr, xs_ptr, ws_ptr, bias_ptr, res_ptr, nw_ptr, res_out_ptr, out_ptr, qscale_ptr, qs_ptr,
    M, N, xs_row_stride, split_k, qs_row_stride, qs_group_stride, eps,
    SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, TILE_GROUP: tl.constexpr,
    OUTQ: tl.constexpr, MID_DTYPE: tl.constexpr, EXACT_CASTS: tl.constexpr,
):
    """Token row ``row``: the split-K reduction (split order), the GEMM's epilogue and
    rounding, then the fused residual add + RMSNorm (+ quant) on the row in registers,
    laid out as the norm kernels lay it out (in groups for a group quant). The partials
    are read past L1 (``.cg``): in the GEMM's last program they were written by other
    multiprocessors, whose lines an earlier launch may have left in this one's L1."""
    rows = row + tl.arange(0, 1)
    offs, mask, cols, col_mask = norm_tile_offsets(rows, M, N, BLOCK, TILE_GROUP)
    total = M * N
    acc = tl.load(part_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
    for s in range(1, split_k):
        acc += tl.load(part_ptr + s * total + offs, mask=mask, other=0.0, cache_modifier=".cg")
    if SCALES == 1:
        xs = tl.load(xs_ptr + row * xs_row_stride, cache_modifier=".cg")
    elif SCALES == 0:
        xs = tl.load(xs_ptr)
    else:
        xs = 1.0
    acc = _scaled(acc, xs, ws_ptr, bias_ptr, tl.minimum(cols, N - 1), SCALES, HAS_BIAS)
    x = tl.where(mask, round_to(acc, MID_DTYPE, EXACT_CASTS), 0.0).to(MID_DTYPE)
    y = rms_norm_tile(x, res_ptr, nw_ptr, res_out_ptr, offs, mask, cols, col_mask, N, eps, True, TILE_GROUP,
                      EXACT_CASTS)
    if OUTQ == 0:
        tl.store(out_ptr + offs, y, mask=mask)
    elif OUTQ == 1:
        inv = tl.div_rn(1.0, tl.load(qscale_ptr))
        tl.store(out_ptr + offs, quantize_fp8(y.to(tl.float32), inv, EXACT_CASTS), mask=mask)
    else:
        # As the group-quant norm kernel: a group is wholly inside the row or wholly padding.
        groups = tl.arange(0, BLOCK // TILE_GROUP)
        s_offs = rows[:, None] * qs_row_stride + groups[None, :] * qs_group_stride
        s_mask = (rows < M)[:, None] & (groups * TILE_GROUP < N)[None, :]
        tl.store(out_ptr + offs, _group_codes(y.to(tl.float32), qs_ptr, s_offs, s_mask, EXACT_CASTS), mask=mask)


@triton.jit(do_not_specialize=["M", "xs_row_stride", "split_k", "qs_row_stride", "qs_group_stride"])
def _rows_kernel(
    part_ptr, xs_ptr, ws_ptr, bias_ptr, res_ptr, nw_ptr, res_out_ptr, out_ptr, qscale_ptr, qs_ptr,
    M, N, xs_row_stride, split_k, qs_row_stride, qs_group_stride, eps,
    SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, TILE_GROUP: tl.constexpr,
    OUTQ: tl.constexpr, MID_DTYPE: tl.constexpr, EXACT_CASTS: tl.constexpr,
):
    _row_epilogue(tl.program_id(0).to(tl.int64), part_ptr, xs_ptr, ws_ptr, bias_ptr, res_ptr, nw_ptr, res_out_ptr,
                  out_ptr, qscale_ptr, qs_ptr, M, N, xs_row_stride, split_k, qs_row_stride, qs_group_stride, eps,
                  SCALES, HAS_BIAS, BLOCK, TILE_GROUP, OUTQ, MID_DTYPE, EXACT_CASTS)


def _check_config(config: SmallGemmConfig, group_k: Optional[int], epi: int = EPI_NONE,
                  out_group: Optional[int] = None) -> None:
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
    if epi == EPI_SILU and out_group and config.block_n % out_group:
        raise ValueError(f"small FP8 GEMM: a SiLU-and-mul epilogue quantized in groups of {out_group} needs "
                         f"block_n a multiple of the group, got {config.block_n}")


def _dummy(t: torch.Tensor, *others: Optional[torch.Tensor]) -> torch.Tensor:
    """The first of ``others`` that is a tensor, else ``t``: a pointer argument a constexpr
    branch never reads."""
    return next((o for o in others if o is not None), t)


def _launch(x, w_q, xs, ws, bias, out_dtype, scales, xs_strides, ws_row_stride, group_k, config, *,
            xq=X_FP8, scale_ub=None, epi=EPI_NONE, outq=OUT_PLAIN, out_scale=None, out_group=None,
            column_major=False, residual=None, norm_weight=None, eps=0.0):
    """Launch the GEMM (and its second kernel, if any); returns the output list of the
    fused launchers (`small_fp8_linear_fused`): ``[out]``, ``[y | q (, scales)]`` or
    ``[y | q (, scales), residual_out]``."""
    n, k = w_q.shape
    lead = x.shape[:-1]
    m = lead.numel()
    nc = n // 2 if epi == EPI_SILU else n
    fp8 = torch.float8_e4m3fn
    out = torch.empty((*lead, nc), dtype=fp8 if outq != OUT_PLAIN else out_dtype, device=x.device)
    qs = None
    if outq == OUT_GROUP:
        groups = nc // out_group
        if column_major:
            qs = torch.empty((groups, *lead), dtype=torch.float32, device=x.device).movedim(0, -1)
        else:
            qs = torch.empty((*lead, groups), dtype=torch.float32, device=x.device)
    qs_strides = (1, max(m, 1)) if column_major else (nc // out_group if out_group else 0, 1)
    res_out = torch.empty_like(residual) if epi == EPI_ROWS else None
    outs = [out] + ([qs] if qs is not None else []) + ([res_out] if res_out is not None else [])
    if m == 0 or n == 0:
        return outs
    if k == 0:
        if epi != EPI_NONE or xq != X_FP8:
            raise ValueError("small FP8 GEMM: a fused form needs K > 0")
        out.zero_() if bias is None else out.copy_(bias.expand_as(out))
        return outs
    if config is None:
        from . import num_sms

        if epi == EPI_NONE:
            config = default_config(m, n, k, group_k, num_sms(x.device))
        else:
            config = default_fused_config("silu" if epi == EPI_SILU else "rows", m, n, k, group_k, out_group,
                                          num_sms(x.device))
    _check_config(config, group_k, epi, out_group if outq == OUT_GROUP else None)
    block_m = block_m_for(m)
    k_steps = triton.cdiv(k, config.block_k)
    per_split = triton.cdiv(k_steps, config.split_k)
    split = triton.cdiv(k_steps, per_split)  # no split without K steps
    # The row epilogue needs whole rows, which no GEMM program has: partials always.
    partials = split > 1 or epi == EPI_ROWS
    part = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if partials else out
    xs_out = torch.empty(m, dtype=torch.float32, device=x.device) if xq == X_DYNAMIC else None
    dummy = out
    mid = _TL_DTYPES[out_dtype]
    # The row epilogue reads the scales the GEMM used: the dynamic prologue's from xs_out.
    if xq == X_DYNAMIC:
        r_scales, r_xs, r_stride = PER_TOKEN, xs_out, 1
    else:
        r_scales, r_xs, r_stride = scales, _dummy(dummy, xs), xs_strides[0]
    tail = epi == EPI_ROWS and config.row_tail
    row_block = triton.next_power_of_2(n)
    tile_group = out_group if outq == OUT_GROUP else 0
    grid = (triton.cdiv(nc, config.block_n), split, triton.cdiv(m, block_m))
    _small_fp8_gemm_kernel[grid](
        x, w_q, _dummy(dummy, xs), ws, _dummy(dummy, bias), out, part, _dummy(dummy, scale_ub),
        _dummy(dummy, xs_out), _dummy(dummy, out_scale), _dummy(dummy, qs),
        _dummy(dummy, residual), _dummy(dummy, norm_weight), _dummy(dummy, res_out),
        _ticket(x.device) if tail else dummy,
        m, n, k, per_split, xs_strides[0], xs_strides[1], ws_row_stride, qs_strides[0], qs_strides[1], float(eps),
        SCALES=scales, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, GROUP_K=group_k or config.block_k, SPLIT=partials, SWAP_AB=config.swap_ab,
        EVEN_K=(k % config.block_k == 0), EXACT_CASTS=exact_casts(),
        XQ=xq, HAS_UB=scale_ub is not None, EPI=epi, OUTQ=outq, OUT_GROUP=out_group or 1, MID_DTYPE=mid,
        ROW_TAIL=tail, ROW_BLOCK=row_block if tail else 1, TILE_GROUP=tile_group, TAIL_SCALES=r_scales,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if not partials or tail:
        return outs
    if epi == EPI_NONE:
        _split_k_reduce_kernel[(triton.cdiv(m * n, _REDUCE_BLOCK),)](
            part, r_xs, ws, _dummy(dummy, bias), out, m, n, r_stride, split,
            SCALES=r_scales, HAS_BIAS=bias is not None, BLOCK=_REDUCE_BLOCK,
            EXACT_CASTS=exact_casts(), num_warps=2,
        )
    elif epi == EPI_SILU:
        block = max(_REDUCE_BLOCK, out_group or 0)
        _silu_reduce_kernel[(m, triton.cdiv(nc, block))](
            part, r_xs, ws, out, _dummy(dummy, out_scale), _dummy(dummy, qs), m, n, r_stride, split,
            qs_strides[0], qs_strides[1],
            SCALES=r_scales, BLOCK=block, OUTQ=outq, OUT_GROUP=out_group or 1, MID_DTYPE=mid,
            EXACT_CASTS=exact_casts(), num_warps=2,
        )
    else:
        _rows_kernel[(m,)](
            part, r_xs, ws, _dummy(dummy, bias), residual, norm_weight, res_out, out, _dummy(dummy, out_scale),
            _dummy(dummy, qs), m, n, r_stride, split, qs_strides[0], qs_strides[1], float(eps),
            SCALES=r_scales, HAS_BIAS=bias is not None, BLOCK=row_block, TILE_GROUP=tile_group, OUTQ=outq,
            MID_DTYPE=mid, EXACT_CASTS=exact_casts(),
            num_warps=min(max(row_block // 512, 1), 16),  # as norm_launch with a residual
        )
    return outs


# Tickets of the row tail: a ring per device, each launch taking the next one, so
# launches on other streams do not share one while in flight; a ticket is 0 again when
# its kernel ends (the last program resets it). Made once per device, before any capture
# (the first launch is an eager warm-up), so graphs hold their addresses.
_TICKETS: dict[torch.device, list] = {}
_TICKET_RING = 1024


def _ticket(device: torch.device) -> torch.Tensor:
    ring = _TICKETS.get(device)
    if ring is None:
        ring = _TICKETS[device] = [torch.zeros(_TICKET_RING, dtype=torch.int32, device=device), 0]
    ring[1] = (ring[1] + 1) % _TICKET_RING
    return ring[0][ring[1]:]


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
                   (xs.stride(0) if per_token else 0, 0), 0, None, config)[0]


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
                   w_scales.stride(0), group_k, config)[0]


def _epilogue_args(epilogue: str) -> int:
    if epilogue not in EPILOGUES:
        raise ValueError(f"small FP8 GEMM: unknown epilogue {epilogue!r}; known: {sorted(EPILOGUES)}")
    return EPILOGUES[epilogue]


def small_fp8_linear_fused(
    x: torch.Tensor,
    x_scale: Optional[torch.Tensor],
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
    *,
    scale_ub: Optional[torch.Tensor] = None,
    epilogue: str = "none",
    residual: Optional[torch.Tensor] = None,
    norm_weight: Optional[torch.Tensor] = None,
    eps: float = 0.0,
    out_scale: Optional[torch.Tensor] = None,
    config: Optional[SmallGemmConfig] = None,
) -> list[torch.Tensor]:
    """``fxfuse::fp8_linear_fused`` on validated inputs (see the op for the semantics):
    ``x`` FP8 with ``x_scale`` (per tensor or per token), or in the model dtype, quantized
    in the prologue (static with a one-element ``x_scale``, dynamic per token without);
    ``epilogue`` ``"none"``, ``"silu_and_mul"`` or ``"fused_add_rms_norm"`` (with
    ``residual`` and ``norm_weight``), its result static-FP8 quantized with ``out_scale``
    if given. Returns the op's output list. ``config``: launch parameters (default:
    `default_fused_config`).

    Example:
        >>> q, r_out = small_fp8_linear_fused(attn, None, w_q, w_s, None, torch.bfloat16,
        ...                                   epilogue="fused_add_rms_norm", residual=r, norm_weight=nw,
        ...                                   eps=1e-5, out_scale=s)
    """
    epi = _epilogue_args(epilogue)
    fp8_in = x.dtype == torch.float8_e4m3fn
    if fp8_in:
        per_token = not (x_scale.dim() <= 1 and x_scale.numel() == 1)
        xq = X_FP8
    else:
        per_token = x_scale is None
        xq = X_DYNAMIC if per_token else X_STATIC
    if xq == X_DYNAMIC:
        xs, strides = None, (0, 0)
    elif per_token:
        xs = x_scale.reshape(-1)
        strides = (xs.stride(0), 0)
    else:
        xs, strides = x_scale, (0, 0)
    return _launch(x, w_q, xs, w_scale, bias, out_dtype, PER_TOKEN if per_token else PER_TENSOR, strides, 0, None,
                   config, xq=xq, scale_ub=scale_ub, epi=epi, outq=OUT_STATIC if out_scale is not None else OUT_PLAIN,
                   out_scale=out_scale, residual=residual, norm_weight=norm_weight, eps=eps)


def small_block_fp8_linear_fused(
    x: torch.Tensor,
    x_scales: Optional[torch.Tensor],
    w_q: torch.Tensor,
    w_scales: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
    *,
    group_size: int,
    epilogue: str = "none",
    residual: Optional[torch.Tensor] = None,
    norm_weight: Optional[torch.Tensor] = None,
    eps: float = 0.0,
    out_group_size: int = 0,
    column_major_scales: bool = False,
    config: Optional[SmallGemmConfig] = None,
) -> list[torch.Tensor]:
    """``fxfuse::block_fp8_linear_fused`` on validated inputs (see the op): ``x`` FP8 with
    its group scales ``x_scales``, or in the model dtype, quantized per group of
    ``group_size`` in the prologue; ``epilogue`` as `small_fp8_linear_fused`'s, its result
    quantized per group of ``out_group_size`` (0: not quantized; scales column-major if
    ``column_major_scales``). Returns the op's output list.

    Example:
        >>> q, s = small_block_fp8_linear_fused(x_q, x_s, w_q, w_s, None, torch.bfloat16, group_size=128,
        ...                                     epilogue="silu_and_mul", out_group_size=128)
    """
    epi = _epilogue_args(epilogue)
    k = w_q.shape[1]
    m = x.shape[:-1].numel()
    if x.dtype == torch.float8_e4m3fn:
        groups = x_scales.shape[-1]
        group_size = k // groups
        scales = x_scales.reshape(m, groups)
        xs, strides, xq = scales, tuple(scales.stride()), X_FP8
    else:
        xs, strides, xq = None, (0, 0), X_GROUP
    return _launch(x, w_q, xs, w_scales, bias, out_dtype, BLOCKWISE, strides, w_scales.stride(0), group_size,
                   config, xq=xq, epi=epi, outq=OUT_GROUP if out_group_size else OUT_PLAIN,
                   out_group=out_group_size or None, column_major=column_major_scales, residual=residual,
                   norm_weight=norm_weight, eps=eps)
