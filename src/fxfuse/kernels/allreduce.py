"""All-reduce over symmetric memory fused with the residual add, RMSNorm and a quant epilogue.

One kernel replaces NCCL's all-reduce and the fused norm-quant kernel after it. Every
rank's buffer is mapped into every peer's address space (PyTorch symmetric memory), so
a program loads the peers' partial sums (model dtype or fp32) with plain loads, sums them
in fp32 in rank order (the same order on every rank, so every rank gets the same bits),
rounds the sum to the model dtype once and runs the epilogue of the unfused
kernels on it: `norm_quant.rms_norm_row`, then the static / per-token FP8
(`quantize_fp8`), NVFP4 (`_nvfp4.quantize_rows`) or per-token-group FP8
(`group_quant._quantize_groups`) code.

Two algorithms, the same epilogue:

- **one-shot** (small messages): each rank copies its partial sums into its buffer, then
  reduces *every* row by reading all ``W`` buffers and runs the epilogue on it. One
  synchronization, ``W`` reads per element: latency-bound sizes.
- **two-shot** (larger messages): the rows are split in ``W`` slices; each rank reduces
  its slice (reading ``1/W`` of every peer's buffer), adds the residual and writes the
  new residual to a second region of its buffer; after a second synchronization every
  rank copies the other slices' residuals from their owners and runs the norm and quant
  of every row. Each rank reads ``2 (W - 1) / W`` of the message from peers instead of
  ``W - 1`` times it.

Synchronization is per program (`_barrier`): program ``b`` of each rank signals program
``b`` of every peer through their signal pads and waits for theirs; each program copies
exactly the rows that the peers' program ``b`` will read, so no global barrier is needed.
The flags are reset by the waiter, so the pads are all zero between launches (CUDA-graph
safe), and a last barrier keeps a rank from returning, and overwriting its buffer in the
next call, while a peer still reads it. Programs wait on each other across GPUs, so the
grid must fit on the GPU at once: the launcher caps it at the SM count. NVLink multicast
(``multimem`` instructions) is not used.

The kernels also run under Triton's interpreter on CPU tensors whose pointer tables
point at shared memory of several processes (``tests/test_allreduce_kernel.py``).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._nvfp4 import quantize_rows, swizzled_offset
from ._rounding import FP8_MAX, exact_casts, quantize_fp8, round_to
from .group_quant import _quantize_groups
from .norm_quant import rms_norm_row
from .quant import nvfp4_outputs

#: The epilogue after the residual add and RMSNorm.
EPILOGUE_NONE, EPILOGUE_STATIC_FP8, EPILOGUE_DYNAMIC_FP8, EPILOGUE_NVFP4, EPILOGUE_GROUP_FP8 = 0, 1, 2, 3, 4

_MIN_DYNAMIC_SCALE = tl.constexpr(1.0 / (448.0 * 512.0))


@triton.jit
def _barrier(signal_pad_ptrs, slot, rank, WORLD: tl.constexpr):
    """Program ``slot`` of this rank meets program ``slot`` of every peer.

    Writes made by this program before the call are visible to the peers' programs after
    theirs (release on send, acquire on wait, at system scope; `tl.debug_barrier` orders
    the other threads' accesses around the one that signals).
    """
    pads = signal_pad_ptrs.to(tl.pointer_type(tl.uint64))
    local = tl.load(pads + rank).to(tl.pointer_type(tl.int32))
    tl.debug_barrier()
    for peer in tl.static_range(WORLD):
        remote = tl.load(pads + peer).to(tl.pointer_type(tl.int32))
        # The flag is 0 once the peer has consumed our previous signal.
        while tl.atomic_cas(remote + slot * WORLD + rank, 0, 1, sem="release", scope="sys") != 0:
            pass
    for peer in tl.static_range(WORLD):
        while tl.atomic_cas(local + slot * WORLD + peer, 1, 0, sem="acquire", scope="sys") != 1:
            pass
    tl.debug_barrier()


@triton.jit
def _norm_quant_row(
    x_ptr, res_ptr, w_ptr, res_out_ptr, scale_ptr, ub_ptr, out_ptr, s_ptr,
    row, n_cols, eps, s_row_stride, s_group_stride, kb_pad,
    HAS_RESIDUAL: tl.constexpr, EPILOGUE: tl.constexpr, HAS_UB: tl.constexpr, GROUP: tl.constexpr,
    BLOCK: tl.constexpr, EXACT_CASTS: tl.constexpr,
):
    """(Residual add,) RMSNorm and the epilogue of one row, as the unfused kernels compute them.

    ``out_ptr`` is ``y`` (no quant) or ``q``; ``s_ptr`` the scales of the quantizing epilogues.
    """
    y, offs, mask = rms_norm_row(x_ptr, res_ptr, w_ptr, res_out_ptr, row, n_cols, eps, HAS_RESIDUAL, BLOCK, EXACT_CASTS)
    if EPILOGUE == 0:
        tl.store(out_ptr + offs, y, mask=mask)
    elif EPILOGUE == 1:
        inv = tl.div_rn(1.0, tl.load(scale_ptr))
        tl.store(out_ptr + offs, quantize_fp8(y.to(tl.float32), inv, EXACT_CASTS), mask=mask)
    elif EPILOGUE == 2:
        yf = y.to(tl.float32)
        amax = tl.max(tl.where(mask, tl.abs(yf), 0.0), axis=0)
        if HAS_UB:
            amax = tl.minimum(amax, tl.load(ub_ptr))
        s = tl.maximum(tl.div_rn(amax, FP8_MAX), _MIN_DYNAMIC_SCALE)  # exact division, as torch's
        tl.store(s_ptr + row, s)
        tl.store(out_ptr + offs, quantize_fp8(yf, tl.div_rn(1.0, s), EXACT_CASTS), mask=mask)
    elif EPILOGUE == 3:
        # Masked columns hold 0 (zero loads, zero weight), so they never raise a block's max.
        packed, sf8 = quantize_rows(y.to(tl.float32)[None, :], tl.load(scale_ptr), 1, BLOCK, EXACT_CASTS)
        pcols = tl.arange(0, BLOCK // 2)
        tl.store(out_ptr + row * (n_cols // 2) + pcols[None, :], packed, mask=(pcols < n_cols // 2)[None, :])
        kcols = tl.arange(0, BLOCK // 16)
        tl.store(s_ptr + swizzled_offset(row, kcols[None, :], kb_pad), sf8, mask=(kcols < n_cols // 16)[None, :])
    else:
        groups = tl.arange(0, BLOCK // GROUP)
        s_offs = row * s_row_stride + groups * s_group_stride
        s_mask = (groups * GROUP < n_cols)[None, :]
        _quantize_groups(y.to(tl.float32)[None, :], out_ptr, offs[None, :], mask[None, :],
                         s_ptr, s_offs[None, :], s_mask, 1, BLOCK // GROUP, GROUP, EXACT_CASTS)


@triton.jit
def _allreduce_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, scale_ptr, ub_ptr,
    out_ptr, s_ptr, res_out_ptr,
    buffer_ptrs, signal_pad_ptrs, rank, n_rows, n_cols, eps, gather_offset,
    s_row_stride, s_group_stride, kb_pad,
    WORLD: tl.constexpr, TWO_SHOT: tl.constexpr, SLICES: tl.constexpr, EPILOGUE: tl.constexpr,
    HAS_UB: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr, EXACT_CASTS: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    bufs = buffer_ptrs.to(tl.pointer_type(tl.uint64))
    mine = tl.load(bufs + rank).to(x_ptr.dtype)
    # Two-shot splits the rows in SLICES == WORLD slices, one per rank; one-shot has one slice.
    chunk = tl.cdiv(n_rows, SLICES)

    # 1. Publish this rank's partial sums of exactly the rows that the peers' program
    #    `pid` reads in step 2 (row i of every slice for two-shot).
    for i in range(pid, chunk, nprog):
        for owner in tl.static_range(SLICES):
            row = (owner * chunk + i).to(tl.int64)
            if row < n_rows:
                offs = row * n_cols + cols
                tl.store(mine + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)
    _barrier(signal_pad_ptrs, pid, rank, WORLD)

    # 2. Reduce this rank's rows, in rank order, in fp32; round once to the model dtype.
    first = 0
    if TWO_SHOT:
        first = rank * chunk
    for i in range(pid, chunk, nprog):
        row = (first + i).to(tl.int64)
        if row < n_rows:
            offs = row * n_cols + cols
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for peer in tl.static_range(WORLD):
                peer_buf = tl.load(bufs + peer).to(x_ptr.dtype)
                acc += tl.load(peer_buf + offs, mask=mask, other=0.0).to(tl.float32)
            # The reduced row goes where `rms_norm_row` reads its `x` (res_out), so the add
            # and the norm are the unfused kernel's own code.
            tl.store(res_out_ptr + offs, round_to(acc, res_out_ptr.dtype.element_ty, EXACT_CASTS), mask=mask)
            tl.debug_barrier()
            if TWO_SHOT:
                # Residual add only; the new residual goes to this rank's gather region.
                gather = tl.load(bufs + rank).to(res_out_ptr.dtype) + gather_offset
                rms_norm_row(res_out_ptr, res_ptr, w_ptr, gather, row, n_cols, eps, True, BLOCK, EXACT_CASTS)
            else:
                _norm_quant_row(res_out_ptr, res_ptr, w_ptr, res_out_ptr, scale_ptr, ub_ptr, out_ptr, s_ptr,
                                row, n_cols, eps, s_row_stride, s_group_stride, kb_pad,
                                True, EPILOGUE, HAS_UB, GROUP, BLOCK, EXACT_CASTS)

    if TWO_SHOT:
        # 3. Gather every slice's new residual from its owner; norm and quant every row here.
        _barrier(signal_pad_ptrs, pid, rank, WORLD)
        for i in range(pid, chunk, nprog):
            for owner in tl.static_range(WORLD):
                row = (owner * chunk + i).to(tl.int64)
                if row < n_rows:
                    offs = row * n_cols + cols
                    src = tl.load(bufs + owner).to(res_out_ptr.dtype) + gather_offset
                    tl.store(res_out_ptr + offs, tl.load(src + offs, mask=mask), mask=mask)
                    tl.debug_barrier()
                    _norm_quant_row(res_out_ptr, res_ptr, w_ptr, res_out_ptr, scale_ptr, ub_ptr, out_ptr, s_ptr,
                                    row, n_cols, eps, s_row_stride, s_group_stride, kb_pad,
                                    False, EPILOGUE, HAS_UB, GROUP, BLOCK, EXACT_CASTS)

    # 4. No rank leaves (and overwrites its buffer in its next call) while a peer reads it.
    _barrier(signal_pad_ptrs, pid, rank, WORLD)


def _outputs(x: torch.Tensor, epilogue: int, group_size: Optional[int], column_major: bool):
    """``(outputs in the op's order, out, scales, s_row_stride, s_group_stride, kb_pad)``;
    ``x`` is the residual (model dtype)."""
    n_cols = x.shape[-1]
    rows = x.numel() // n_cols
    res_out = torch.empty_like(x)
    if epilogue == EPILOGUE_NONE:
        y = torch.empty_like(x)
        return (y, res_out), y, None, 0, 0, 0
    if epilogue in (EPILOGUE_STATIC_FP8, EPILOGUE_DYNAMIC_FP8):
        q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
        if epilogue == EPILOGUE_STATIC_FP8:
            return (q, res_out), q, None, 0, 0, 0
        s = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
        return (q, s, res_out), q, s, 0, 0, 0
    if epilogue == EPILOGUE_NVFP4:
        q, sf = nvfp4_outputs(rows, n_cols, x.device)
        return (q, sf, res_out), q, sf, 0, 0, sf.shape[1]
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    groups = n_cols // group_size
    if column_major:
        s = torch.empty((groups, *x.shape[:-1]), dtype=torch.float32, device=x.device).movedim(0, -1)
        return (q, s, res_out), q, s, 1, max(rows, 1), 0
    s = torch.empty((*x.shape[:-1], groups), dtype=torch.float32, device=x.device)
    return (q, s, res_out), q, s, groups, 1, 0


def fused_allreduce_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    buffer_ptrs: int,
    signal_pad_ptrs: int,
    rank: int,
    world_size: int,
    gather_offset_bytes: int,
    max_programs: int,
    two_shot: bool,
    epilogue: int = EPILOGUE_NONE,
    scale: Optional[torch.Tensor] = None,
    scale_ub: Optional[torch.Tensor] = None,
    group_size: Optional[int] = None,
    column_major_scales: bool = False,
) -> tuple[torch.Tensor, ...]:
    """All-reduce ``x`` (this rank's partial sums, ``[..., hidden]`` contiguous, in
    ``residual``'s dtype or fp32) over the ranks whose symmetric buffers ``buffer_ptrs``
    points at, round the sum to ``residual``'s dtype, then the residual add, RMSNorm and
    ``epilogue``. A collective: every rank of the group launches it with the same shapes.

    ``buffer_ptrs`` / ``signal_pad_ptrs`` are device addresses of ``world_size`` 64-bit
    pointers (a rendezvous handle's ``buffer_ptrs_dev`` / ``signal_pad_ptrs_dev``); every
    buffer holds at least ``x.nbytes`` bytes, two-shot also from ``gather_offset_bytes``
    on, and every signal pad at least ``max_programs * world_size`` zeroed int32 flags.
    ``scale`` is the static FP8 scale or the NVFP4 global scale. Returns the outputs of the
    matching ``allreduce_fused_add_rms_norm*`` op, in its order.

    Example:
        >>> y, r_out = fused_allreduce_rms_norm(x, r, w, 1e-6, buffer_ptrs=h.buffer_ptrs_dev,
        ...     signal_pad_ptrs=h.signal_pad_ptrs_dev, rank=h.rank, world_size=h.world_size,
        ...     gather_offset_bytes=1 << 21, max_programs=132, two_shot=False)  # doctest: +SKIP
    """
    outputs, out, s, s_row, s_group, kb_pad = _outputs(residual, epilogue, group_size, column_major_scales)
    n_cols = x.shape[-1]
    n_rows = x.numel() // n_cols if n_cols else 0
    if n_rows == 0:
        return outputs
    if gather_offset_bytes % residual.element_size():
        raise ValueError(f"gather_offset_bytes ({gather_offset_bytes}) must be a multiple of the element size")
    chunk = triton.cdiv(n_rows, world_size) if two_shot else n_rows
    block = triton.next_power_of_2(n_cols)
    dummy = x  # pointer for arguments a constexpr branch never reads
    _allreduce_rms_norm_kernel[(max(1, min(chunk, max_programs)),)](
        x, residual, weight, scale if scale is not None else dummy, scale_ub if scale_ub is not None else dummy,
        out, s if s is not None else dummy, outputs[-1],
        buffer_ptrs, signal_pad_ptrs, rank, n_rows, n_cols, float(eps), gather_offset_bytes // residual.element_size(),
        s_row, s_group, kb_pad,
        WORLD=world_size, TWO_SHOT=two_shot, SLICES=world_size if two_shot else 1, EPILOGUE=epilogue,
        HAS_UB=scale_ub is not None,
        GROUP=group_size or 1, BLOCK=block, EXACT_CASTS=exact_casts(),
        num_warps=min(max(block // 1024, 1), 16),  # ~32 elements per thread, as norm_quant
    )
    return outputs
