"""Per-token-group FP8 quantization ops (block-scaled FP8 activations) and their fusions.

DeepSeek-V3- and Qwen3-FP8-style checkpoints quantize activations per token in groups
of ``group_size`` (64 or 128) consecutive elements along the hidden dim, one fp32
dequant scale per group. Each group follows the rules of
``dynamic_per_token_fp8_quant`` (DESIGN §2): ``s = max(amax_f32 / 448, 1 / (448 * 512))``
with an exact division, ``q = fp8(clamp(x_f32 * (1 / s), -448, 448))`` rounding to
nearest even. With ``group_size == hidden`` the result is that op's, bit for bit.

Ops:

- ``group_fp8_quant(x, group_size, column_major_scales=False) -> (q, scales)``
- ``rms_norm_group_fp8_quant(x, weight, eps, group_size, column_major_scales=False) -> (q, scales)``
- ``fused_add_rms_norm_group_fp8_quant(x, residual, weight, eps, group_size, column_major_scales=False)
  -> (q, scales, residual_out)``
- ``silu_and_mul_group_fp8_quant(x, group_size, column_major_scales=False) -> (q, scales)``

``scales`` has shape ``x.shape[:-1] + (hidden // group_size,)`` (``hidden`` the width
that is quantized: ``d`` for SiLU-and-mul). With ``column_major_scales=True`` the group
dim is outermost in memory (strides ``(1, tokens)`` for 2-D input): the layout block-FP8
GEMMs (``torch._scaled_mm``'s 1x128 recipe, DeepGEMM) read, written directly so that no
transpose runs between the quant and the GEMM.

The fused ops are their unfused chains (the producer's output is rounded to the model
dtype, then quantized), and their native implementations literally compose the native
functions, so fused and unfused agree bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch

from . import _validate as V
from ._dispatch import use_kernels
from ._register import define_op
from .activation import silu_and_mul_native, silu_and_mul_out_shape, validate_silu_and_mul
from .norm import fused_add_rms_norm_native, rms_norm_native, validate_fused_add_rms_norm, validate_rms_norm
from .quant import FP8_DTYPE, FP8_MAX, MIN_DYNAMIC_SCALE, _quantize_with_inv_scale

#: Group sizes the ops (and their kernels) take: the two that block-FP8 checkpoints and
#: GEMM kernels use (128: DeepSeek-V3, Qwen3-FP8, torch._scaled_mm's 1x128; 64: some kernels).
GROUP_SIZES: tuple[int, ...] = (64, 128)

# --------------------------------------------------------------------------- layout helpers


def group_scales_empty(x: torch.Tensor, width: Any, group_size: int, column_major: bool) -> torch.Tensor:
    """An empty fp32 scale tensor ``x.shape[:-1] + (width // group_size,)`` in the row-major
    or column-major (group dim outermost in memory) layout.

    >>> group_scales_empty(torch.empty(3, 256), 256, 128, True).stride()
    (1, 3)
    """
    groups = width // group_size
    if column_major:
        return x.new_empty((groups, *x.shape[:-1]), dtype=torch.float32).movedim(0, -1)
    return x.new_empty((*x.shape[:-1], groups), dtype=torch.float32)


def is_column_major(scales: torch.Tensor) -> bool:
    """Whether ``scales`` (``[..., groups]``) has its group dim outermost and everything else dense.

    >>> is_column_major(torch.empty(4, 2).t().contiguous().t())
    True
    """
    return scales.movedim(-1, 0).is_contiguous()


# --------------------------------------------------------------------------- native math


def group_fp8_quant_native(
    x: torch.Tensor, group_size: int, column_major_scales: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference per-token-group FP8 quant; returns ``(q, scales)``.

    Per group of ``group_size`` elements along the last dim: ``amax = max|x_f32|``,
    ``s = max(amax / 448, 1 / (448 * 512))``, ``q = (x_f32 * (1 / s)).clamp(-448, 448)``
    cast to fp8.
    """
    xf = x.float().unflatten(-1, (-1, group_size))
    amax = xf.abs().amax(dim=-1)
    # A tensor divisor made on the device, as in dynamic_per_token_fp8_quant_native: CUDA
    # turns division by a Python float into a multiply by its rounded reciprocal.
    scales = torch.clamp(amax / torch.full((), FP8_MAX, device=amax.device), min=MIN_DYNAMIC_SCALE)
    q = _quantize_with_inv_scale(xf, (1.0 / scales).unsqueeze(-1)).flatten(-2)
    if column_major_scales:
        scales = group_scales_empty(x, x.shape[-1], group_size, True).copy_(scales)
    return q, scales


def rms_norm_group_fp8_quant_native(
    x: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int, column_major_scales: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: ``group_fp8_quant(rms_norm(x, weight, eps), group_size, column_major_scales)``."""
    return group_fp8_quant_native(rms_norm_native(x, weight, eps), group_size, column_major_scales)


def fused_add_rms_norm_group_fp8_quant_native(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    group_size: int,
    column_major_scales: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference: ``(q, scales, residual_out)``, the group quant of ``y`` where
    ``(y, residual_out) = fused_add_rms_norm(x, residual, weight, eps)``."""
    y, residual_out = fused_add_rms_norm_native(x, residual, weight, eps)
    q, scales = group_fp8_quant_native(y, group_size, column_major_scales)
    return q, scales, residual_out


def silu_and_mul_group_fp8_quant_native(
    x: torch.Tensor, group_size: int, column_major_scales: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: ``group_fp8_quant(silu_and_mul(x), group_size, column_major_scales)``."""
    return group_fp8_quant_native(silu_and_mul_native(x), group_size, column_major_scales)


# --------------------------------------------------------------------------- validators


def check_group_size(op: str, group_size: Any, width: Any, what: str) -> None:
    """``group_size`` must be one of `GROUP_SIZES` and divide ``width`` (``what`` says
    which width, e.g. "the last dim of `x`")."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"fxfuse.{op}: `group_size` must be an int, got {type(group_size).__name__}")
    if group_size not in GROUP_SIZES:
        raise ValueError(
            f"fxfuse.{op}: `group_size` must be one of {GROUP_SIZES} (the group sizes the kernels take), "
            f"got {group_size}"
        )
    if width % group_size != 0:
        raise ValueError(f"fxfuse.{op}: {what} ({width}) must be a multiple of `group_size` ({group_size})")


def check_column_major_scales(op: str, column_major_scales: Any) -> None:
    if not isinstance(column_major_scales, bool):
        raise TypeError(
            f"fxfuse.{op}: `column_major_scales` must be a bool, got {type(column_major_scales).__name__}"
        )


def validate_group_fp8_quant(
    x: torch.Tensor, group_size: int, column_major_scales: bool, op: str = "group_fp8_quant"
) -> None:
    """Checks for a group quant's input; ``op`` names the op in messages."""
    V.check_activation(op, "x", x)
    check_group_size(op, group_size, x.shape[-1], "the last dim of `x`")
    check_column_major_scales(op, column_major_scales)


def validate_rms_norm_group_fp8_quant(
    x: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int, column_major_scales: bool
) -> None:
    op = "rms_norm_group_fp8_quant"
    validate_rms_norm(x, weight, eps, op=op)
    check_group_size(op, group_size, x.shape[-1], "the last dim of `x`")
    check_column_major_scales(op, column_major_scales)


def validate_fused_add_rms_norm_group_fp8_quant(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    group_size: int,
    column_major_scales: bool,
) -> None:
    op = "fused_add_rms_norm_group_fp8_quant"
    validate_fused_add_rms_norm(x, residual, weight, eps, op=op)
    check_group_size(op, group_size, x.shape[-1], "the last dim of `x`")
    check_column_major_scales(op, column_major_scales)


def validate_silu_and_mul_group_fp8_quant(x: torch.Tensor, group_size: int, column_major_scales: bool) -> None:
    op = "silu_and_mul_group_fp8_quant"
    validate_silu_and_mul(x, op=op)
    check_group_size(op, group_size, x.shape[-1] // 2, "half the last dim of `x` (the SiLU-and-mul output width)")
    check_column_major_scales(op, column_major_scales)


def _group_outputs(
    x: torch.Tensor, width: Any, group_size: int, column_major: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty ``(q, scales)`` for quantizing ``width`` columns of ``x``'s rows (fake impls)."""
    q = x.new_empty((*x.shape[:-1], width), dtype=FP8_DTYPE)
    return q, group_scales_empty(x, width, group_size, column_major)


# --------------------------------------------------------------------------- ops


@define_op(
    "group_fp8_quant",
    fake=lambda x, group_size, column_major_scales: _group_outputs(x, x.shape[-1], group_size, column_major_scales),
    validate=validate_group_fp8_quant,
)
def group_fp8_quant(
    x: torch.Tensor, group_size: int, column_major_scales: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each group of ``group_size`` elements of each row of ``x`` to float8_e4m3fn
    with its own fp32 dequant scale; returns ``(q, scales)``.

    ``x`` is ``[..., hidden]`` (bf16, fp16 or fp32, contiguous), ``hidden`` a multiple of
    ``group_size`` (64 or 128); ``scales`` is ``[..., hidden // group_size]``, column-major
    if ``column_major_scales``.

    >>> x = torch.randn(4, 256, dtype=torch.bfloat16)
    >>> q, scales = torch.ops.fxfuse.group_fp8_quant(x, 128)
    >>> scales.shape
    torch.Size([4, 2])
    """
    # On CUDA a Triton kernel; the native function is the reference everywhere else.
    if use_kernels(x):
        from ..kernels.group_quant import group_fp8

        return group_fp8(x, group_size, column_major_scales)
    return group_fp8_quant_native(x, group_size, column_major_scales)


@define_op(
    "rms_norm_group_fp8_quant",
    fake=lambda x, weight, eps, group_size, column_major_scales: _group_outputs(
        x, x.shape[-1], group_size, column_major_scales
    ),
    validate=validate_rms_norm_group_fp8_quant,
)
def rms_norm_group_fp8_quant(
    x: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int, column_major_scales: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMS norm then per-token-group FP8 quant; returns ``(q, scales)``, equal to the
    two-op chain bit for bit.

    >>> q, scales = torch.ops.fxfuse.rms_norm_group_fp8_quant(x, w, 1e-6, 128)
    """
    # On CUDA a Triton kernel; the native function is the reference everywhere else.
    if use_kernels(x):
        from ..kernels.group_quant import rms_norm_group_fp8

        q, scales, _ = rms_norm_group_fp8(x, weight, eps, group_size, column_major_scales)
        return q, scales
    return rms_norm_group_fp8_quant_native(x, weight, eps, group_size, column_major_scales)


def _fused_add_rms_norm_group_fp8_quant_fake(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    group_size: int,
    column_major_scales: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, scales = _group_outputs(x, x.shape[-1], group_size, column_major_scales)
    return q, scales, x.new_empty(x.shape)


@define_op(
    "fused_add_rms_norm_group_fp8_quant",
    fake=_fused_add_rms_norm_group_fp8_quant_fake,
    validate=validate_fused_add_rms_norm_group_fp8_quant,
)
def fused_add_rms_norm_group_fp8_quant(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    group_size: int,
    column_major_scales: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual add, RMS norm, per-token-group FP8 quant; returns ``(q, scales, residual_out)``.

    >>> q, scales, r_out = torch.ops.fxfuse.fused_add_rms_norm_group_fp8_quant(x, r, w, 1e-6, 128)
    """
    # On CUDA a Triton kernel; the native function is the reference everywhere else.
    if use_kernels(x):
        from ..kernels.group_quant import rms_norm_group_fp8

        return rms_norm_group_fp8(x, weight, eps, group_size, column_major_scales, residual=residual)
    return fused_add_rms_norm_group_fp8_quant_native(x, residual, weight, eps, group_size, column_major_scales)


@define_op(
    "silu_and_mul_group_fp8_quant",
    fake=lambda x, group_size, column_major_scales: _group_outputs(
        x, silu_and_mul_out_shape(x)[-1], group_size, column_major_scales
    ),
    validate=validate_silu_and_mul_group_fp8_quant,
)
def silu_and_mul_group_fp8_quant(
    x: torch.Tensor, group_size: int, column_major_scales: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU-and-mul then per-token-group FP8 quant; ``x`` is ``[..., 2 * d]``, ``q`` is
    ``[..., d]`` fp8 and ``scales`` ``[..., d // group_size]``.

    >>> q, scales = torch.ops.fxfuse.silu_and_mul_group_fp8_quant(x, 128)
    """
    # On CUDA a Triton kernel; the native function is the reference everywhere else.
    if use_kernels(x):
        from ..kernels.group_quant import silu_and_mul_group_fp8

        return silu_and_mul_group_fp8(x, group_size, column_major_scales)
    return silu_and_mul_group_fp8_quant_native(x, group_size, column_major_scales)
