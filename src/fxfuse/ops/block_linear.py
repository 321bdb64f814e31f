"""Block-scaled FP8 linear: ``fxfuse::block_fp8_linear``.

The GEMM of DeepSeek-V3- and Qwen3-FP8-style checkpoints: activations quantized per
token in groups of ``group_size`` (64 or 128) along K (``group_fp8_quant``), weights
quantized in 128x128 blocks, one fp32 dequant scale per group and per block::

    out = (x_q * x_scales per group) @ (w_q * w_scales per 128x128 block).T (+ bias)

in fp32, rounded to ``out_dtype``. ``w_scales`` is ``[ceil(N / 128), ceil(K / 128)]``
(a partial last block has its own scale, as in the checkpoints); the group size is
``K // x_scales.shape[-1]``.

Where it runs: fxfuse's small-batch FP8 GEMM (`fxfuse.kernels.small_gemm`) at the token
counts where the device's measured table says it wins (`fxfuse.ops.linear.small_gemm_config`);
otherwise ``torch._scaled_mm``'s blockwise recipe (1x128 activations, 128x128
weights) on CUDA where the installed torch and GPU support it
(`fxfuse.compat.blockwise_fp8_scaled_mm_supported`) and the problem fits it (group size
128, K and N multiples of 128, bf16 output); otherwise fxfuse's Triton kernel on CUDA;
the native reference below everywhere else.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import compat
from . import _validate as V
from ._dispatch import use_kernels
from .group_quant import GROUP_SIZES, is_column_major
from .linear import small_gemm_config
from .quant import FP8_DTYPE, FP8_MAX, MIN_DYNAMIC_SCALE, _quantize_with_inv_scale

OP = "block_fp8_linear"
#: Weights are quantized in blocks of this many rows and columns.
WEIGHT_BLOCK = 128
# torch._scaled_mm's 128x128 recipe reads weight-scale rows padded to this many columns.
_SCALE_ROW_ALIGN = 4


def _cdiv(a, b: int):
    return (a + b - 1) // b


def weight_scales_shape(n, k) -> tuple:
    """Shape of the 128x128 block scales of an ``[n, k]`` weight: ``(ceil(n / 128), ceil(k / 128))``.

    >>> weight_scales_shape(300, 256)
    (3, 2)
    """
    return (_cdiv(n, WEIGHT_BLOCK), _cdiv(k, WEIGHT_BLOCK))


def weight_scales_empty(n: int, k: int, device: torch.device) -> torch.Tensor:
    """An empty fp32 ``[ceil(n / 128), ceil(k / 128)]`` with rows padded to a multiple of 4
    columns: the layout `torch._scaled_mm`'s 128x128 recipe reads, so the GEMM needs no copy.

    >>> weight_scales_empty(256, 384, torch.device("cpu")).stride()
    (4, 1)
    """
    nb, kb = weight_scales_shape(n, k)
    padded = torch.zeros(nb, _cdiv(kb, _SCALE_ROW_ALIGN) * _SCALE_ROW_ALIGN, dtype=torch.float32, device=device)
    return padded[:, :kb]


def expand_weight_scales(w_scales: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Block scales repeated to one per weight element, ``[n, k]`` fp32."""
    return w_scales.float().repeat_interleave(WEIGHT_BLOCK, 0)[:n].repeat_interleave(WEIGHT_BLOCK, 1)[:, :k]


def quantize_weight_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight ``[n, k]`` to FP8 in 128x128 blocks; returns ``(w_q, w_scales)``.

    Per block, the per-token quant's rules: ``s = max(amax / 448, 1 / (448 * 512))``,
    ``w_q = fp8(clamp(w_f32 * (1 / s), -448, 448))``. ``w_scales`` comes in the layout of
    `weight_scales_empty`.

    >>> w_q, w_scales = quantize_weight_blocks(torch.randn(300, 256))
    >>> w_q.dtype, tuple(w_scales.shape)
    (torch.float8_e4m3fn, (3, 2))
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_weight_blocks: `w` must be 2-D [out, in], got shape {tuple(w.shape)}")
    n, k = w.shape
    nb, kb = weight_scales_shape(n, k)
    # Pad with zeros to whole blocks: zeros never raise a block's amax.
    padded = w.float().new_zeros(nb * WEIGHT_BLOCK, kb * WEIGHT_BLOCK)
    padded[:n, :k] = w.float()
    blocks = padded.view(nb, WEIGHT_BLOCK, kb, WEIGHT_BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))
    scales = torch.clamp(amax / torch.full((), FP8_MAX, device=amax.device), min=MIN_DYNAMIC_SCALE)
    inv = (1.0 / scales)[:, None, :, None]
    w_q = _quantize_with_inv_scale(blocks, inv).view(nb * WEIGHT_BLOCK, kb * WEIGHT_BLOCK)[:n, :k].contiguous()
    w_scales = weight_scales_empty(n, k, w.device)
    w_scales.copy_(scales)
    return w_q, w_scales


def dequantize_weight_blocks(w_q: torch.Tensor, w_scales: torch.Tensor) -> torch.Tensor:
    """The fp32 weight a block-scaled FP8 weight stands for: ``w_q * w_scales`` per block.

    >>> w = torch.randn(200, 128)
    >>> ((dequantize_weight_blocks(*quantize_weight_blocks(w)) - w).norm() / w.norm()) < 0.05
    tensor(True)
    """
    n, k = w_q.shape
    return w_q.float() * expand_weight_scales(w_scales, n, k)


# --------------------------------------------------------------------------- native math


def block_fp8_linear_native(
    x_q: torch.Tensor,
    x_scales: torch.Tensor,
    w_q: torch.Tensor,
    w_scales: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Reference block-scaled FP8 linear: dequantize both operands to fp32, one fp32
    matmul, add the bias in fp32, round to ``out_dtype``."""
    group_size = x_q.shape[-1] // x_scales.shape[-1]
    x = x_q.float() * x_scales.float().repeat_interleave(group_size, dim=-1)
    out = torch.matmul(x, dequantize_weight_blocks(w_q, w_scales).t())
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


# --------------------------------------------------------------------------- validators


def validate_block_fp8_linear(
    x_q: torch.Tensor,
    x_scales: torch.Tensor,
    w_q: torch.Tensor,
    w_scales: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
    op: str = OP,
) -> None:
    """Checks for ``block_fp8_linear`` arguments; ``op`` names the op in messages."""
    V.check_fp8(op, "x_q", x_q)
    V.check_min_dim(op, "x_q", x_q, 1)
    V.check_contiguous(op, "x_q", x_q)
    k = x_q.shape[-1]

    validate_block_fp8_weight(x_q, w_q, w_scales, bias, out_dtype, op, x_name="x_q")

    V.check_tensor(op, "x_scales", x_scales)
    if x_scales.dtype != torch.float32:
        raise ValueError(f"fxfuse.{op}: `x_scales` must have dtype torch.float32, got {x_scales.dtype}")
    groups = x_scales.shape[-1] if x_scales.dim() == x_q.dim() else None
    if groups is None or tuple(x_scales.shape[:-1]) != tuple(x_q.shape[:-1]) or groups == 0 or k % groups != 0 \
            or k // groups not in GROUP_SIZES:
        raise ValueError(
            f"fxfuse.{op}: `x_scales` must have shape {[*x_q.shape[:-1], 'K // group_size']} with group_size in "
            f"{GROUP_SIZES} (K = {k}, the last dim of `x_q`), got {tuple(x_scales.shape)}"
        )
    if not (x_scales.is_contiguous() or is_column_major(x_scales)):
        raise ValueError(
            f"fxfuse.{op}: `x_scales` must be row-major or column-major (group dim outermost), got shape "
            f"{tuple(x_scales.shape)} with strides {tuple(x_scales.stride())}"
        )
    V.check_same_device(op, "x_scales", x_scales, "x_q", x_q)


def validate_block_fp8_weight(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scales: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
    op: str = OP,
    x_name: str = "x",
) -> None:
    """The weight side of ``block_fp8_linear``'s checks (``w_q``, ``w_scales``, ``bias``,
    ``out_dtype``, and ``w_q``'s inner dim against the last dim of ``x``, whatever its
    dtype), for ops that take the activation in another form; ``op`` names the op."""
    k = x.shape[-1]
    V.check_fp8(op, "w_q", w_q)
    if w_q.dim() != 2:
        raise ValueError(f"fxfuse.{op}: `w_q` must be 2-D [out, in], got shape {tuple(w_q.shape)}")
    V.check_contiguous(op, "w_q", w_q)
    V.check_same_device(op, "w_q", w_q, x_name, x)
    if w_q.shape[1] != k:
        raise ValueError(
            f"fxfuse.{op}: inner dims disagree: `{x_name}` has shape {tuple(x.shape)} and `w_q` "
            f"has shape {tuple(w_q.shape)}; w_q.shape[1] must equal {x_name}.shape[-1]"
        )
    n = w_q.shape[0]

    V.check_tensor(op, "w_scales", w_scales)
    if w_scales.dtype != torch.float32:
        raise ValueError(f"fxfuse.{op}: `w_scales` must have dtype torch.float32, got {w_scales.dtype}")
    want = weight_scales_shape(n, k)
    if tuple(w_scales.shape) != want:
        raise ValueError(
            f"fxfuse.{op}: `w_scales` must have shape {list(want)} (one scale per 128x128 block of `w_q` "
            f"{tuple(w_q.shape)}), got {tuple(w_scales.shape)}"
        )
    if w_scales.stride(1) != 1 or w_scales.stride(0) < w_scales.shape[1]:
        raise ValueError(
            f"fxfuse.{op}: `w_scales` must be row-major (rows may be padded), got strides {tuple(w_scales.stride())}"
        )
    V.check_same_device(op, "w_scales", w_scales, x_name, x)
    V.check_scale_value(op, "w_scales", w_scales)  # static, like fp8_linear's: every block's

    V.check_out_dtype(op, "out_dtype", out_dtype)
    if bias is not None:
        V.check_tensor(op, "bias", bias)
        if bias.dtype != out_dtype:
            raise ValueError(f"fxfuse.{op}: `bias` must have dtype {out_dtype} (the `out_dtype`), got {bias.dtype}")
        if bias.dim() != 1 or bias.shape[0] != n:
            raise ValueError(f"fxfuse.{op}: `bias` must have shape [{n}] (w_q.shape[0]), got {tuple(bias.shape)}")
        V.check_contiguous(op, "bias", bias)
        V.check_same_device(op, "bias", bias, x_name, x)


def block_fp8_linear_out_shape(x_q: torch.Tensor, w_q: torch.Tensor) -> tuple:
    """Output shape of ``block_fp8_linear``: ``x_q.shape[:-1] + (w_q.shape[0],)``."""
    return (*x_q.shape[:-1], w_q.shape[0])


# --------------------------------------------------------------------------- torch._scaled_mm path


def _scaled_mm_applies(x_q: torch.Tensor, x_scales: torch.Tensor, w_q: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether torch's blockwise ``_scaled_mm`` takes this problem: the 1x128 recipe (group
    size 128), whole blocks, bf16 output (what the cuBLAS blockwise kernels produce), and
    a torch/GPU where the probe in `compat` succeeded."""
    n, k = w_q.shape
    return (
        x_q.device.type == "cuda"
        and x_q.numel() > 0
        and k // x_scales.shape[-1] == 128
        and k % WEIGHT_BLOCK == 0
        and n % WEIGHT_BLOCK == 0
        and out_dtype == torch.bfloat16
        and compat.blockwise_fp8_scaled_mm_supported(x_q.device)
    )


def _block_fp8_linear_scaled_mm(
    x_q: torch.Tensor,
    x_scales: torch.Tensor,
    w_q: torch.Tensor,
    w_scales: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    n, k = w_q.shape
    x2 = x_q.reshape(-1, k)
    m, groups = x2.shape[0], x_scales.shape[-1]
    # The exact layouts the recipes read (see compat.blockwise_fp8_scaled_mm); copies of
    # a few hundred bytes where the caller's scales are laid out otherwise.
    scale_a = x_scales.reshape(m, groups)
    if scale_a.stride() != (1, m):
        scale_a = scale_a.new_empty((groups, m)).t().copy_(scale_a)
    scale_b = w_scales
    if scale_b.stride() != (_cdiv(w_scales.shape[1], _SCALE_ROW_ALIGN) * _SCALE_ROW_ALIGN, 1):
        scale_b = weight_scales_empty(n, k, w_scales.device).copy_(w_scales)
    out = compat.blockwise_fp8_scaled_mm(x2, w_q.t(), scale_a, scale_b.t(), out_dtype)
    if bias is not None:
        out = out + bias
    return out.reshape(block_fp8_linear_out_shape(x_q, w_q))


def block_fp8_linear_path(
    x_q: torch.Tensor, x_scales: torch.Tensor, w_q: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> str:
    """Which implementation ``block_fp8_linear`` runs for these (valid) arguments here:
    ``"small_gemm"`` (fxfuse's small-batch kernel), ``"scaled_mm"`` (torch's blockwise
    recipe), ``"triton"`` (fxfuse's general block GEMM) or ``"native"``.

    >>> block_fp8_linear_path(x_q, x_scales, w_q)  # on CPU
    'native'
    """
    if _small_gemm_config(x_q, x_scales, w_q) is not None:
        return "small_gemm"
    return _large_batch_path(x_q, x_scales, w_q, out_dtype)


def _large_batch_path(x_q: torch.Tensor, x_scales: torch.Tensor, w_q: torch.Tensor, out_dtype: torch.dtype) -> str:
    if _scaled_mm_applies(x_q, x_scales, w_q, out_dtype):
        return "scaled_mm"
    return "triton" if use_kernels(x_q) else "native"


def _small_gemm_config(x_q: torch.Tensor, x_scales: torch.Tensor, w_q: torch.Tensor):
    k = w_q.shape[1]
    groups = x_scales.shape[-1]
    return small_gemm_config(OP, x_q, w_q, group_k=k // groups if groups else None)


# --------------------------------------------------------------------------- op


@torch.library.custom_op("fxfuse::block_fp8_linear", mutates_args=())
def block_fp8_linear(
    x_q: torch.Tensor,
    x_scales: torch.Tensor,
    w_q: torch.Tensor,
    w_scales: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Block-scaled FP8 linear layer: ``(x_q * x_scales) @ (w_q * w_scales).T + bias`` in ``out_dtype``.

    ``x_q`` (``[..., K]``) and ``w_q`` (``[N, K]``) are float8_e4m3fn and contiguous;
    ``x_scales`` is fp32 ``[..., K // group_size]`` (group size 64 or 128; row- or
    column-major); ``w_scales`` is fp32 ``[ceil(N / 128), ceil(K / 128)]``; ``bias``
    (optional) is ``[N]`` in ``out_dtype``.

    >>> x_q, x_scales = torch.ops.fxfuse.group_fp8_quant(x, 128, True)
    >>> w_q, w_scales = quantize_weight_blocks(w)
    >>> y = torch.ops.fxfuse.block_fp8_linear(x_q, x_scales, w_q, w_scales, None, torch.bfloat16)
    """
    validate_block_fp8_linear(x_q, x_scales, w_q, w_scales, bias, out_dtype)
    config = _small_gemm_config(x_q, x_scales, w_q)
    if config is not None:
        from ..kernels.small_gemm import small_block_fp8_linear

        return small_block_fp8_linear(x_q, x_scales, w_q, w_scales, bias, out_dtype, config)
    path = _large_batch_path(x_q, x_scales, w_q, out_dtype)
    if path == "scaled_mm":
        return _block_fp8_linear_scaled_mm(x_q, x_scales, w_q, w_scales, bias, out_dtype)
    # Elsewhere on CUDA a Triton kernel; the native function is the reference everywhere else.
    if path == "triton":
        from ..kernels.block_linear import block_fp8_matmul

        return block_fp8_matmul(x_q, x_scales, w_q, w_scales, bias, out_dtype)
    return block_fp8_linear_native(x_q, x_scales, w_q, w_scales, bias, out_dtype)


@block_fp8_linear.register_fake
def _(
    x_q: torch.Tensor,
    x_scales: torch.Tensor,
    w_q: torch.Tensor,
    w_scales: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    validate_block_fp8_linear(x_q, x_scales, w_q, w_scales, bias, out_dtype)
    return x_q.new_empty(block_fp8_linear_out_shape(x_q, w_q), dtype=out_dtype)
