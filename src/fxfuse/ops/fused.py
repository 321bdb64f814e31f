"""Fused producer + FP8 quantization ops.

Each fused op is defined as the chain of unfused ops it replaces, and its native
implementation literally composes their native functions, so fused and unfused agree
bit for bit: the producer's output (RMS norm, SiLU-and-mul) is rounded to the model
dtype before it is quantized, exactly as in the unfused graph.
"""

from typing import Optional

import torch

from . import _validate as V
from ._dispatch import use_kernels
from ._register import define_op
from .activation import silu_and_mul_native, silu_and_mul_out_shape, validate_silu_and_mul
from .norm import (
    fused_add_rms_norm_native,
    rms_norm_native,
    validate_fused_add_rms_norm,
    validate_rms_norm,
)
from .quant import (
    dynamic_per_token_fp8_quant_native,
    fp8_empty_like,
    per_token_scales_empty,
    static_scaled_fp8_quant_native,
)

# --------------------------------------------------------------------------- native math


def rms_norm_static_fp8_quant_native(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, eps: float
) -> torch.Tensor:
    """Reference: ``static_scaled_fp8_quant(rms_norm(x, weight, eps), scale)``."""
    return static_scaled_fp8_quant_native(rms_norm_native(x, weight, eps), scale)


def fused_add_rms_norm_static_fp8_quant_native(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: ``(static_scaled_fp8_quant(y, scale), residual_out)`` with
    ``(y, residual_out) = fused_add_rms_norm(x, residual, weight, eps)``."""
    y, residual_out = fused_add_rms_norm_native(x, residual, weight, eps)
    return static_scaled_fp8_quant_native(y, scale), residual_out


def rms_norm_dynamic_per_token_fp8_quant_native(
    x: torch.Tensor, weight: torch.Tensor, eps: float, scale_ub: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: ``dynamic_per_token_fp8_quant(rms_norm(x, weight, eps), scale_ub)`` -> ``(q, scales)``."""
    return dynamic_per_token_fp8_quant_native(rms_norm_native(x, weight, eps), scale_ub)


def fused_add_rms_norm_dynamic_per_token_fp8_quant_native(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    scale_ub: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference: ``(q, scales, residual_out)`` with ``(q, scales)`` the dynamic per-token
    quant of ``y`` and ``(y, residual_out) = fused_add_rms_norm(x, residual, weight, eps)``."""
    y, residual_out = fused_add_rms_norm_native(x, residual, weight, eps)
    q, scales = dynamic_per_token_fp8_quant_native(y, scale_ub)
    return q, scales, residual_out


def silu_and_mul_static_fp8_quant_native(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Reference: ``static_scaled_fp8_quant(silu_and_mul(x), scale)``."""
    return static_scaled_fp8_quant_native(silu_and_mul_native(x), scale)


# --------------------------------------------------------------------------- validators


def validate_rms_norm_static_fp8_quant(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, eps: float
) -> None:
    op = "rms_norm_static_fp8_quant"
    validate_rms_norm(x, weight, eps, op=op)
    V.check_scalar_scale(op, "scale", scale, "x", x)
    V.check_scale_value(op, "scale", scale)


def validate_fused_add_rms_norm_static_fp8_quant(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, eps: float
) -> None:
    op = "fused_add_rms_norm_static_fp8_quant"
    validate_fused_add_rms_norm(x, residual, weight, eps, op=op)
    V.check_scalar_scale(op, "scale", scale, "x", x)
    V.check_scale_value(op, "scale", scale)


def validate_rms_norm_dynamic_per_token_fp8_quant(
    x: torch.Tensor, weight: torch.Tensor, eps: float, scale_ub: Optional[torch.Tensor]
) -> None:
    op = "rms_norm_dynamic_per_token_fp8_quant"
    validate_rms_norm(x, weight, eps, op=op)
    V.check_optional_scalar_scale(op, "scale_ub", scale_ub, "x", x)
    V.check_scale_value(op, "scale_ub", scale_ub)


def validate_fused_add_rms_norm_dynamic_per_token_fp8_quant(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    scale_ub: Optional[torch.Tensor],
) -> None:
    op = "fused_add_rms_norm_dynamic_per_token_fp8_quant"
    validate_fused_add_rms_norm(x, residual, weight, eps, op=op)
    V.check_optional_scalar_scale(op, "scale_ub", scale_ub, "x", x)
    V.check_scale_value(op, "scale_ub", scale_ub)


def validate_silu_and_mul_static_fp8_quant(x: torch.Tensor, scale: torch.Tensor) -> None:
    op = "silu_and_mul_static_fp8_quant"
    validate_silu_and_mul(x, op=op)
    V.check_scalar_scale(op, "scale", scale, "x", x)
    V.check_scale_value(op, "scale", scale)


# --------------------------------------------------------------------------- ops


@define_op(
    "rms_norm_static_fp8_quant",
    fake=lambda x, weight, scale, eps: fp8_empty_like(x),
    validate=validate_rms_norm_static_fp8_quant,
)
def rms_norm_static_fp8_quant(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, eps: float
) -> torch.Tensor:
    """RMS norm then static FP8 quant, in one op; equal to the two-op chain bit for bit.

    >>> q = torch.ops.fxfuse.rms_norm_static_fp8_quant(x, w, scale, 1e-6)
    """
    # On CUDA a Triton kernel; the native function is the reference everywhere else.
    if use_kernels(x):
        from ..kernels.norm_quant import QUANT_STATIC, rms_norm_quant

        return rms_norm_quant(x, weight, eps, quant=QUANT_STATIC, scale=scale)[1]
    return rms_norm_static_fp8_quant_native(x, weight, scale, eps)


@define_op(
    "fused_add_rms_norm_static_fp8_quant",
    fake=lambda x, residual, weight, scale, eps: (fp8_empty_like(x), x.new_empty(x.shape)),
    validate=validate_fused_add_rms_norm_static_fp8_quant,
)
def fused_add_rms_norm_static_fp8_quant(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add, RMS norm, static FP8 quant; returns ``(q, residual_out)``.

    >>> q, r_out = torch.ops.fxfuse.fused_add_rms_norm_static_fp8_quant(x, r, w, scale, 1e-6)
    """
    # On CUDA a Triton kernel; the native function is the reference everywhere else.
    if use_kernels(x):
        from ..kernels.norm_quant import QUANT_STATIC, rms_norm_quant

        _, q, _, residual_out = rms_norm_quant(x, weight, eps, residual=residual, quant=QUANT_STATIC, scale=scale)
        return q, residual_out
    return fused_add_rms_norm_static_fp8_quant_native(x, residual, weight, scale, eps)


@define_op(
    "rms_norm_dynamic_per_token_fp8_quant",
    fake=lambda x, weight, eps, scale_ub: (fp8_empty_like(x), per_token_scales_empty(x)),
    validate=validate_rms_norm_dynamic_per_token_fp8_quant,
)
def rms_norm_dynamic_per_token_fp8_quant(
    x: torch.Tensor, weight: torch.Tensor, eps: float, scale_ub: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMS norm then dynamic per-token FP8 quant; returns ``(q, scales)``.

    >>> q, scales = torch.ops.fxfuse.rms_norm_dynamic_per_token_fp8_quant(x, w, 1e-6)
    """
    # On CUDA a Triton kernel; the native function is the reference everywhere else.
    if use_kernels(x):
        from ..kernels.norm_quant import QUANT_DYNAMIC, rms_norm_quant

        _, q, scales, _ = rms_norm_quant(x, weight, eps, quant=QUANT_DYNAMIC, scale_ub=scale_ub)
        return q, scales
    return rms_norm_dynamic_per_token_fp8_quant_native(x, weight, eps, scale_ub)


@define_op(
    "fused_add_rms_norm_dynamic_per_token_fp8_quant",
    fake=lambda x, residual, weight, eps, scale_ub: (
        fp8_empty_like(x), per_token_scales_empty(x), x.new_empty(x.shape)
    ),
    validate=validate_fused_add_rms_norm_dynamic_per_token_fp8_quant,
)
def fused_add_rms_norm_dynamic_per_token_fp8_quant(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    scale_ub: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual add, RMS norm, dynamic per-token FP8 quant; returns ``(q, scales, residual_out)``.

    >>> q, scales, r_out = torch.ops.fxfuse.fused_add_rms_norm_dynamic_per_token_fp8_quant(x, r, w, 1e-6)
    """
    # On CUDA a Triton kernel; the native function is the reference everywhere else.
    if use_kernels(x):
        from ..kernels.norm_quant import QUANT_DYNAMIC, rms_norm_quant

        _, q, scales, residual_out = rms_norm_quant(
            x, weight, eps, residual=residual, quant=QUANT_DYNAMIC, scale_ub=scale_ub
        )
        return q, scales, residual_out
    return fused_add_rms_norm_dynamic_per_token_fp8_quant_native(x, residual, weight, eps, scale_ub)


@define_op(
    "silu_and_mul_static_fp8_quant",
    fake=lambda x, scale: x.new_empty(silu_and_mul_out_shape(x), dtype=torch.float8_e4m3fn),
    validate=validate_silu_and_mul_static_fp8_quant,
)
def silu_and_mul_static_fp8_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """SiLU-and-mul then static FP8 quant; ``x`` is ``[..., 2 * d]``, the output ``[..., d]`` fp8.

    >>> q = torch.ops.fxfuse.silu_and_mul_static_fp8_quant(x, scale)
    """
    # On CUDA a Triton kernel; the native function is the reference everywhere else.
    if use_kernels(x):
        from ..kernels.activation import OUT_FP8, silu_and_mul

        return silu_and_mul(x, OUT_FP8, scale)
    return silu_and_mul_static_fp8_quant_native(x, scale)
