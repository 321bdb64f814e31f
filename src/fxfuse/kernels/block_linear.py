"""Block-scaled FP8 GEMM: ``out = (x_q * x_scales) @ (w_q * w_scales).T (+ bias)``.

For GPUs and torch builds where ``torch._scaled_mm`` has no blockwise recipe (and for
group size 64, which it does not take). The K loop steps one activation group
(``GROUP_K`` = 64 or 128 columns) at a time: the FP8 tile product is accumulated in fp32
by the tensor cores, then scaled by that group's per-row activation scales and the
per-column scales of the 128x128 weight blocks it falls in, and added to the
accumulator (the scheme of DeepSeek-V3's and vLLM's block-FP8 kernels). Scales are read
through strides, so row- and column-major activation scales cost the same.

**The scaling step.** The tensor cores must finish each group's product before the
CUDA cores scale it, so this step is the kernel's overhead over a per-tensor FP8 GEMM
(which scales once, at the end). Where a weight tile lies inside one 128-row weight
block (``BLOCK_N`` divides 128, tiles aligned: ``ONE_W_BLOCK``), the weight scale is one
number per step: the two scales are multiplied per row first and the tile takes one
fused multiply-add per element instead of two multiplies and an add (a different
rounding of the same product: within the fp32 bound the tests allow). Two programs per
multiprocessor (64-row tiles, one warpgroup, 96 KiB of stages) let one program's MMAs run
while the other scales. ``TMA``: the tiles come through tensor descriptors (Hopper's
bulk copies, fewer address registers); the sweep (``benchmarks/block_gemm_sweep.py``)
decides, per device, which launch is the default (``block_gemm_choices.json``).

Under Triton's interpreter the FP8 tiles are widened to fp32 before the product (exact:
every E4M3 value is an fp32), which NumPy multiplies correctly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from typing import Any, Optional

import torch
import triton
import triton.language as tl

from ._rounding import exact_casts, round_to

_W_BLOCK = tl.constexpr(128)
#: The measured launch per device (written by ``benchmarks/block_gemm_sweep.py --write``).
CHOICES_PATH = pathlib.Path(__file__).with_name("block_gemm_choices.json")
#: Environment variable: another table (a path) instead of the shipped one.
CHOICES_ENV = "FXFUSE_BLOCK_GEMM_CHOICES"


@triton.jit
def _tile_order(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUPER_M: tl.constexpr):
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
    return pid_m, pid_n


@triton.jit
def _scale_group(acc, part, g, as_ptrs, as_group_stride, bs_ptrs, bs_tile_ptr, row_ok, col_ok,
                 GROUP_K: tl.constexpr, ONE_W_BLOCK: tl.constexpr):
    """``acc + part * activation scales * weight scales`` of group ``g``."""
    a_s = tl.load(as_ptrs + g * as_group_stride, mask=row_ok, other=0.0)
    if ONE_W_BLOCK:
        b_s = tl.load(bs_tile_ptr + (g * GROUP_K) // _W_BLOCK)
        return acc + part * (a_s * b_s)[:, None]
    b_s = tl.load(bs_ptrs + (g * GROUP_K) // _W_BLOCK, mask=col_ok, other=0.0)
    return acc + part * a_s[:, None] * b_s[None, :]


@triton.jit
def _store_tile(acc, bias_ptr, c_ptr, rows, cols, row_ok, col_ok, N, HAS_BIAS: tl.constexpr,
                EXACT_CASTS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = round_to(acc, c_ptr.dtype.element_ty, EXACT_CASTS)
    tl.store(c_ptr + rows[:, None] * N + cols[None, :], out, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _block_fp8_matmul_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, bias_ptr, c_ptr,
    M, N, K, as_row_stride, as_group_stride, bs_row_stride,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_K: tl.constexpr,
    SUPER_M: tl.constexpr, EXACT_CASTS: tl.constexpr, ONE_W_BLOCK: tl.constexpr,
):
    pid_m, pid_n = _tile_order(M, N, BLOCK_M, BLOCK_N, SUPER_M)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    ks = tl.arange(0, GROUP_K)
    row_ok = rows < M
    col_ok = cols < N
    a_ptrs = a_ptr + rows[:, None] * K + ks[None, :]
    b_ptrs = b_ptr + cols[None, :] * K + ks[:, None]  # [GROUP_K, BLOCK_N]: w_q read transposed
    as_ptrs = as_ptr + rows * as_row_stride
    bs_ptrs = bs_ptr + (cols // _W_BLOCK) * bs_row_stride
    bs_tile_ptr = bs_ptr + ((pid_n * BLOCK_N) // _W_BLOCK) * bs_row_stride

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, K // GROUP_K):
        a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
        if EXACT_CASTS:
            part = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            part = tl.dot(a, b)  # FP8 tensor cores, fp32 accumulation
        acc = _scale_group(acc, part, g, as_ptrs, as_group_stride, bs_ptrs, bs_tile_ptr, row_ok, col_ok, GROUP_K,
                           ONE_W_BLOCK)
        a_ptrs += GROUP_K
        b_ptrs += GROUP_K
    _store_tile(acc, bias_ptr, c_ptr, rows, cols, row_ok, col_ok, N, HAS_BIAS, EXACT_CASTS)


@triton.jit
def _block_fp8_matmul_tma_kernel(
    a_desc, as_ptr, b_desc, bs_ptr, bias_ptr, c_ptr,
    M, N, K, as_row_stride, as_group_stride, bs_row_stride,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_K: tl.constexpr,
    SUPER_M: tl.constexpr, EXACT_CASTS: tl.constexpr, ONE_W_BLOCK: tl.constexpr,
):
    # The same loop with the tiles loaded through tensor descriptors: rows past M and N
    # arrive zero-filled, so the loads need no masks.
    pid_m, pid_n = _tile_order(M, N, BLOCK_M, BLOCK_N, SUPER_M)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < M
    col_ok = cols < N
    as_ptrs = as_ptr + rows * as_row_stride
    bs_ptrs = bs_ptr + (cols // _W_BLOCK) * bs_row_stride
    bs_tile_ptr = bs_ptr + ((pid_n * BLOCK_N) // _W_BLOCK) * bs_row_stride
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, K // GROUP_K):
        a = a_desc.load([pid_m * BLOCK_M, g * GROUP_K])  # [BLOCK_M, GROUP_K]
        b = b_desc.load([pid_n * BLOCK_N, g * GROUP_K])  # [BLOCK_N, GROUP_K]: K-major, as FP8 MMAs want it
        if EXACT_CASTS:
            part = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
        else:
            part = tl.dot(a, tl.trans(b))
        acc = _scale_group(acc, part, g, as_ptrs, as_group_stride, bs_ptrs, bs_tile_ptr, row_ok, col_ok, GROUP_K,
                           ONE_W_BLOCK)
    _store_tile(acc, bias_ptr, c_ptr, rows, cols, row_ok, col_ok, N, HAS_BIAS, EXACT_CASTS)


@dataclasses.dataclass(frozen=True)
class BlockGemmConfig:
    """A launch of the block-scaled GEMM: tile rows and columns, warps, pipeline stages,
    and whether the tiles are loaded through tensor descriptors (TMA).

    Example:
        >>> BlockGemmConfig(64, 128, 4, 4).label()
        'm64 n128 w4 st4'
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False

    def label(self) -> str:
        return f"m{self.block_m} n{self.block_n} w{self.num_warps} st{self.num_stages}" + (" tma" if self.tma else "")


#: Launches for more than 64 tokens that `block_gemm_sweep.py` compares: 128-row tiles on
#: two warpgroups (one program a multiprocessor) at 3 and 4 stages, 64-row tiles on one
#: (two programs), each with pointer loads and with tensor descriptors.
LARGE_CANDIDATES = tuple(
    BlockGemmConfig(bm, bn, w, st, tma) for tma in (False, True)
    for bm, bn, w, st in ((128, 128, 8, 3), (128, 128, 8, 4), (64, 128, 4, 4), (64, 128, 4, 3), (128, 64, 4, 4))
)


def tma_available() -> bool:
    """Whether this Triton has host-side tensor descriptors (``triton.tools.tensor_descriptor``)."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=4)
def _choices(path: str) -> dict[str, Any]:
    p = pathlib.Path(path)
    if not p.exists():
        if p == CHOICES_PATH:
            return {}
        raise FileNotFoundError(f"block-GEMM choices table {path} does not exist (set by ${CHOICES_ENV}?)")
    table = json.loads(p.read_text())
    devices = table.get("devices") if isinstance(table, dict) else None
    if not isinstance(devices, dict):
        raise ValueError(f"{path}: a block-GEMM choices table needs a 'devices' mapping")
    out = {}
    for dev, entry in devices.items():
        try:
            out[dev] = BlockGemmConfig(**entry["large"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: devices[{dev!r}] needs 'large': {{block_m, block_n, num_warps, num_stages, tma}}"
                             f" ({e})") from None
    return out


def measured_config(device_name: str) -> Optional[BlockGemmConfig]:
    """The launch measured best for more than 64 tokens on ``device_name``, or None.

    >>> measured_config("a GPU nobody measured") is None
    True
    """
    return _choices(os.environ.get(CHOICES_ENV) or str(CHOICES_PATH)).get(device_name)


def default_config(m: int, device_name: Optional[str] = None) -> BlockGemmConfig:
    """The launch for ``m`` tokens: decode-sized M wastes least with 16-row tiles (the
    smallest an FP8 MMA takes), 17-64 tokens 64x128 tiles; above, the device's measured
    launch, else 128x128 tiles on two warpgroups, three stages (the launch of the H100
    measurements in benchmarks/RESULTS.md).

    >>> default_config(4096)
    BlockGemmConfig(block_m=128, block_n=128, num_warps=8, num_stages=3, tma=False)
    """
    if m <= 16:
        return BlockGemmConfig(16, 64, 4, 4)
    if m <= 64:
        return BlockGemmConfig(64, 128, 4, 4)
    measured = measured_config(device_name) if device_name else None
    if measured is not None and (not measured.tma or tma_available()):
        return measured
    return BlockGemmConfig(128, 128, 8, 3)


def block_fp8_matmul(
    x_q: torch.Tensor,
    x_scales: torch.Tensor,
    w_q: torch.Tensor,
    w_scales: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
    config: Optional[BlockGemmConfig] = None,
) -> torch.Tensor:
    """``block_fp8_linear`` on validated inputs: ``x_q [..., K]`` with scales
    ``[..., K // group]`` (row- or column-major), ``w_q [N, K]`` with scales
    ``[ceil(N / 128), ceil(K / 128)]`` (rows may be padded). ``config``: the launch
    (default: `default_config` for this token count and device).

    Example:
        >>> out = block_fp8_matmul(x_q, x_scales, w_q, w_scales, None, torch.bfloat16)
        >>> out = block_fp8_matmul(x_q, x_scales, w_q, w_scales, None, torch.bfloat16,
        ...                        BlockGemmConfig(64, 128, 4, 4, tma=True))
    """
    n, k = w_q.shape
    m = x_q.numel() // k if k else 0
    groups = x_scales.shape[-1]
    out = torch.empty((*x_q.shape[:-1], n), dtype=out_dtype, device=x_q.device)
    if m == 0 or n == 0:
        return out
    if config is None:
        name = torch.cuda.get_device_name(x_q.device) if x_q.device.type == "cuda" else None
        config = default_config(m, name)
    if config.block_n & (config.block_n - 1) or config.block_m & (config.block_m - 1):
        raise ValueError(f"block FP8 GEMM: block_m and block_n must be powers of two, got {config.label()}")
    group_k = k // groups
    # [M, groups] views; a column-major [..., groups] flattens to strides (1, M).
    scales = x_scales.reshape(m, groups)
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)
    common = dict(HAS_BIAS=bias is not None, BLOCK_M=config.block_m, BLOCK_N=config.block_n, GROUP_K=group_k,
                  SUPER_M=8, EXACT_CASTS=exact_casts(), ONE_W_BLOCK=128 % config.block_n == 0,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    args = (m, n, k, scales.stride(0), scales.stride(1), w_scales.stride(0))
    bias_arg = bias if bias is not None else out
    if config.tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        x2 = x_q.reshape(m, k)
        a_desc = TensorDescriptor.from_tensor(x2, [config.block_m, group_k])
        b_desc = TensorDescriptor.from_tensor(w_q, [config.block_n, group_k])
        _block_fp8_matmul_tma_kernel[grid](a_desc, scales, b_desc, w_scales, bias_arg, out, *args, **common)
    else:
        _block_fp8_matmul_kernel[grid](x_q, scales, w_q, w_scales, bias_arg, out, *args, **common)
    return out
