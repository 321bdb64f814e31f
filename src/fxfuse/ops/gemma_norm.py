"""Gemma's RMSNorm: ``fxfuse::gemma_rms_norm``, its residual-add form and the FP8 fusions.

Gemma (1, 2, 3) normalizes like Llama but weights differently, and the difference is not
a detail: HF ``Gemma3RMSNorm`` computes, for ``x`` in the model dtype and a weight ``w``
stored as zeros-initialized offsets (usually fp32, or the model dtype when the whole
checkpoint was cast)::

    y = to(x.dtype)(x_f32 * rsqrt(mean(x_f32^2) + eps) * (1 + w_f32))

in fp32 throughout, rounded once at the end, where Llama's RMSNorm (``rms_norm``)
rounds the normalized row to the model dtype first and multiplies by ``w`` in the
model dtype. Running a Gemma weight through a Llama-style norm (or a bf16 kernel on an
fp32 weight) gives plausible-looking garbage; these ops take the weight in fp32 or in
the model dtype and always compute in fp32.

Ops (names follow DESIGN §2's scheme):

- ``gemma_rms_norm(x, weight, eps) -> y``
- ``fused_add_gemma_rms_norm(x, residual, weight, eps) -> (y, residual_out)``:
  ``residual_out = x + residual`` rounded to ``x.dtype`` (as ``fused_add_rms_norm``),
  ``y = gemma_rms_norm(residual_out)``
- ``gemma_rms_norm_static_fp8_quant(x, weight, scale, eps) -> q``
- ``fused_add_gemma_rms_norm_static_fp8_quant(x, residual, weight, scale, eps) -> (q, residual_out)``
- ``gemma_rms_norm_dynamic_per_token_fp8_quant(x, weight, eps, scale_ub=None) -> (q, scales)``
- ``fused_add_gemma_rms_norm_dynamic_per_token_fp8_quant(x, residual, weight, eps, scale_ub=None)
  -> (q, scales, residual_out)``

The quant forms quantize the norm's output *after* it is rounded to the model dtype,
and their native implementations compose the native functions, so fused and unfused
agree bit for bit (DESIGN §2).
"""

from typing import Any, Optional

import torch

from . import _validate as V
from ._dispatch import use_kernels
from ._register import define_op
from .quant import (
    dynamic_per_token_fp8_quant_native,
    fp8_empty_like,
    per_token_scales_empty,
    static_scaled_fp8_quant_native,
)

# --------------------------------------------------------------------------- native math


def gemma_rms_norm_native(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference Gemma RMS norm: ``(x_f32 * rsqrt(mean(x_f32**2, -1) + eps) * (1 + w_f32)).to(x.dtype)``.

    The operation order of HF ``Gemma3RMSNorm.forward``: normalize in fp32, multiply by
    ``1.0 + weight.float()`` in fp32, cast once.

    >>> x = torch.randn(3, 8, dtype=torch.bfloat16)
    >>> gemma_rms_norm_native(x, torch.zeros(8), 1e-6).dtype  # zeros: the plain RMS norm
    torch.bfloat16
    """
    xf = x.float()
    variance = xf.pow(2).mean(dim=-1, keepdim=True)
    return (xf * torch.rsqrt(variance + eps) * (1.0 + weight.float())).to(x.dtype)


def fused_add_gemma_rms_norm_native(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: ``(gemma_rms_norm(x + residual), x + residual)``, the add in ``x.dtype``."""
    residual_out = x + residual
    return gemma_rms_norm_native(residual_out, weight, eps), residual_out


def gemma_rms_norm_static_fp8_quant_native(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, eps: float
) -> torch.Tensor:
    """Reference: ``static_scaled_fp8_quant(gemma_rms_norm(x, weight, eps), scale)``."""
    return static_scaled_fp8_quant_native(gemma_rms_norm_native(x, weight, eps), scale)


def fused_add_gemma_rms_norm_static_fp8_quant_native(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: ``(static_scaled_fp8_quant(y, scale), residual_out)`` of ``fused_add_gemma_rms_norm``."""
    y, residual_out = fused_add_gemma_rms_norm_native(x, residual, weight, eps)
    return static_scaled_fp8_quant_native(y, scale), residual_out


def gemma_rms_norm_dynamic_per_token_fp8_quant_native(
    x: torch.Tensor, weight: torch.Tensor, eps: float, scale_ub: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: ``dynamic_per_token_fp8_quant(gemma_rms_norm(x, weight, eps), scale_ub)``."""
    return dynamic_per_token_fp8_quant_native(gemma_rms_norm_native(x, weight, eps), scale_ub)


def fused_add_gemma_rms_norm_dynamic_per_token_fp8_quant_native(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    scale_ub: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference: ``(q, scales, residual_out)``, the dynamic quant of ``fused_add_gemma_rms_norm``'s ``y``."""
    y, residual_out = fused_add_gemma_rms_norm_native(x, residual, weight, eps)
    q, scales = dynamic_per_token_fp8_quant_native(y, scale_ub)
    return q, scales, residual_out


# --------------------------------------------------------------------------- validators


def check_gemma_weight(op: str, weight: Any, x: torch.Tensor, x_name: str = "x") -> None:
    """A Gemma norm weight: ``[hidden]``, fp32 or ``x``'s dtype, contiguous, on ``x``'s device.

    Any other dtype is refused rather than converted: a weight in a third dtype means the
    caller's model and this op disagree about the numerics.
    """
    V.check_tensor(op, "weight", weight)
    if weight.dtype not in (torch.float32, x.dtype):
        raise ValueError(
            f"fxfuse.{op}: `weight` must have dtype torch.float32 or {x.dtype} (the dtype of `{x_name}`), "
            f"got {weight.dtype}"
        )
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"fxfuse.{op}: `weight` must have shape [{x.shape[-1]}] (the last dim of `{x_name}`), "
            f"got {tuple(weight.shape)}"
        )
    V.check_contiguous(op, "weight", weight)
    V.check_same_device(op, "weight", weight, x_name, x)


def validate_gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, op: str = "gemma_rms_norm") -> None:
    """Checks for ``gemma_rms_norm``-shaped arguments; ``op`` names the op in messages."""
    V.check_activation(op, "x", x)
    check_gemma_weight(op, weight, x)
    V.check_eps(op, eps)


def validate_fused_add_gemma_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, op: str = "fused_add_gemma_rms_norm"
) -> None:
    """Checks for ``fused_add_gemma_rms_norm``-shaped arguments; ``op`` names the op in messages."""
    V.check_activation(op, "x", x)
    V.check_like(op, "residual", residual, "x", x)
    check_gemma_weight(op, weight, x)
    V.check_eps(op, eps)


def _check_static(op: str, scale: torch.Tensor, x: torch.Tensor) -> None:
    V.check_scalar_scale(op, "scale", scale, "x", x)
    V.check_scale_value(op, "scale", scale)


def _check_ub(op: str, scale_ub: Optional[torch.Tensor], x: torch.Tensor) -> None:
    V.check_optional_scalar_scale(op, "scale_ub", scale_ub, "x", x)
    V.check_scale_value(op, "scale_ub", scale_ub)


def validate_gemma_rms_norm_static_fp8_quant(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, eps: float
) -> None:
    op = "gemma_rms_norm_static_fp8_quant"
    validate_gemma_rms_norm(x, weight, eps, op=op)
    _check_static(op, scale, x)


def validate_fused_add_gemma_rms_norm_static_fp8_quant(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, eps: float
) -> None:
    op = "fused_add_gemma_rms_norm_static_fp8_quant"
    validate_fused_add_gemma_rms_norm(x, residual, weight, eps, op=op)
    _check_static(op, scale, x)


def validate_gemma_rms_norm_dynamic_per_token_fp8_quant(
    x: torch.Tensor, weight: torch.Tensor, eps: float, scale_ub: Optional[torch.Tensor]
) -> None:
    op = "gemma_rms_norm_dynamic_per_token_fp8_quant"
    validate_gemma_rms_norm(x, weight, eps, op=op)
    _check_ub(op, scale_ub, x)


def validate_fused_add_gemma_rms_norm_dynamic_per_token_fp8_quant(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, scale_ub: Optional[torch.Tensor]
) -> None:
    op = "fused_add_gemma_rms_norm_dynamic_per_token_fp8_quant"
    validate_fused_add_gemma_rms_norm(x, residual, weight, eps, op=op)
    _check_ub(op, scale_ub, x)


# --------------------------------------------------------------------------- ops
# On CUDA each op runs the RMSNorm kernel of kernels/norm_quant.py with its Gemma weight
# step; the native functions are the reference everywhere else.


@define_op("gemma_rms_norm", fake=lambda x, weight, eps: x.new_empty(x.shape), validate=validate_gemma_rms_norm)
def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMS norm over the last dim of ``x``: ``to(x.dtype)(x_f32 * rstd * (1 + w_f32))``.

    ``x`` is ``[..., hidden]`` (bf16, fp16 or fp32, contiguous); ``weight`` is ``[hidden]``
    in fp32 or ``x``'s dtype. The output has ``x``'s shape and dtype.

    >>> x = torch.randn(4, 64, dtype=torch.bfloat16)
    >>> w = 0.1 * torch.randn(64)  # fp32, as Gemma checkpoints keep it
    >>> y = torch.ops.fxfuse.gemma_rms_norm(x, w, 1e-6)
    """
    if use_kernels(x):
        from ..kernels.norm_quant import rms_norm_quant

        return rms_norm_quant(x, weight, eps, gemma=True)[0]
    return gemma_rms_norm_native(x, weight, eps)


@define_op(
    "fused_add_gemma_rms_norm",
    fake=lambda x, residual, weight, eps: (x.new_empty(x.shape), x.new_empty(x.shape)),
    validate=validate_fused_add_gemma_rms_norm,
)
def fused_add_gemma_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then Gemma RMS norm: returns ``(y, residual_out)``, nothing in place.

    >>> y, r_out = torch.ops.fxfuse.fused_add_gemma_rms_norm(x, r, w, 1e-6)
    """
    if use_kernels(x):
        from ..kernels.norm_quant import rms_norm_quant

        y, _, _, residual_out = rms_norm_quant(x, weight, eps, residual=residual, gemma=True)
        return y, residual_out
    return fused_add_gemma_rms_norm_native(x, residual, weight, eps)


@define_op(
    "gemma_rms_norm_static_fp8_quant",
    fake=lambda x, weight, scale, eps: fp8_empty_like(x),
    validate=validate_gemma_rms_norm_static_fp8_quant,
)
def gemma_rms_norm_static_fp8_quant(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, eps: float
) -> torch.Tensor:
    """Gemma RMS norm then static FP8 quant; equal to the two-op chain bit for bit.

    >>> q = torch.ops.fxfuse.gemma_rms_norm_static_fp8_quant(x, w, scale, 1e-6)
    """
    if use_kernels(x):
        from ..kernels.norm_quant import QUANT_STATIC, rms_norm_quant

        return rms_norm_quant(x, weight, eps, quant=QUANT_STATIC, scale=scale, gemma=True)[1]
    return gemma_rms_norm_static_fp8_quant_native(x, weight, scale, eps)


@define_op(
    "fused_add_gemma_rms_norm_static_fp8_quant",
    fake=lambda x, residual, weight, scale, eps: (fp8_empty_like(x), x.new_empty(x.shape)),
    validate=validate_fused_add_gemma_rms_norm_static_fp8_quant,
)
def fused_add_gemma_rms_norm_static_fp8_quant(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add, Gemma RMS norm, static FP8 quant; returns ``(q, residual_out)``.

    >>> q, r_out = torch.ops.fxfuse.fused_add_gemma_rms_norm_static_fp8_quant(x, r, w, scale, 1e-6)
    """
    if use_kernels(x):
        from ..kernels.norm_quant import QUANT_STATIC, rms_norm_quant

        _, q, _, residual_out = rms_norm_quant(
            x, weight, eps, residual=residual, quant=QUANT_STATIC, scale=scale, gemma=True
        )
        return q, residual_out
    return fused_add_gemma_rms_norm_static_fp8_quant_native(x, residual, weight, scale, eps)


@define_op(
    "gemma_rms_norm_dynamic_per_token_fp8_quant",
    fake=lambda x, weight, eps, scale_ub: (fp8_empty_like(x), per_token_scales_empty(x)),
    validate=validate_gemma_rms_norm_dynamic_per_token_fp8_quant,
)
def gemma_rms_norm_dynamic_per_token_fp8_quant(
    x: torch.Tensor, weight: torch.Tensor, eps: float, scale_ub: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gemma RMS norm then dynamic per-token FP8 quant; returns ``(q, scales)``.

    >>> q, scales = torch.ops.fxfuse.gemma_rms_norm_dynamic_per_token_fp8_quant(x, w, 1e-6)
    """
    if use_kernels(x):
        from ..kernels.norm_quant import QUANT_DYNAMIC, rms_norm_quant

        _, q, scales, _ = rms_norm_quant(x, weight, eps, quant=QUANT_DYNAMIC, scale_ub=scale_ub, gemma=True)
        return q, scales
    return gemma_rms_norm_dynamic_per_token_fp8_quant_native(x, weight, eps, scale_ub)


@define_op(
    "fused_add_gemma_rms_norm_dynamic_per_token_fp8_quant",
    fake=lambda x, residual, weight, eps, scale_ub: (
        fp8_empty_like(x), per_token_scales_empty(x), x.new_empty(x.shape)
    ),
    validate=validate_fused_add_gemma_rms_norm_dynamic_per_token_fp8_quant,
)
def fused_add_gemma_rms_norm_dynamic_per_token_fp8_quant(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    scale_ub: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual add, Gemma RMS norm, dynamic per-token FP8 quant; returns ``(q, scales, residual_out)``.

    >>> q, scales, r_out = torch.ops.fxfuse.fused_add_gemma_rms_norm_dynamic_per_token_fp8_quant(x, r, w, 1e-6)
    """
    if use_kernels(x):
        from ..kernels.norm_quant import QUANT_DYNAMIC, rms_norm_quant

        _, q, scales, residual_out = rms_norm_quant(
            x, weight, eps, residual=residual, quant=QUANT_DYNAMIC, scale_ub=scale_ub, gemma=True
        )
        return q, scales, residual_out
    return fused_add_gemma_rms_norm_dynamic_per_token_fp8_quant_native(x, residual, weight, eps, scale_ub)
