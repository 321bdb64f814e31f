"""FP8 (float8_e4m3fn) quantization ops.

``fxfuse::static_scaled_fp8_quant`` quantizes with a given per-tensor scale;
``fxfuse::dynamic_per_token_fp8_quant`` computes one scale per row (token).

Scales are *dequantization* scales: ``x ~= q.float() * scale``. Quantization
multiplies by the fp32 reciprocal ``1.0 / scale``, clamps to +-448 and casts, which
rounds to nearest even.
"""

from typing import Optional

import torch

from . import _validate as V
from ._dispatch import use_kernels
from ._register import define_op

FP8_DTYPE = torch.float8_e4m3fn
#: Largest finite float8_e4m3fn value.
FP8_MAX = 448.0
#: Floor of the dynamic per-token scale, so an all-zero (or tiny) row never divides by zero.
MIN_DYNAMIC_SCALE = 1.0 / (FP8_MAX * 512.0)

# --------------------------------------------------------------------------- native math


def _quantize_with_inv_scale(xf: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    return (xf * inv_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def static_scaled_fp8_quant_native(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Reference static quant: ``(x_f32 * (1.0 / scale)).clamp(-448, 448).to(float8_e4m3fn)``.

    ``scale`` is an fp32 one-element tensor (shape ``[]`` or ``[1]``); the output has
    ``x``'s shape.
    """
    inv_scale = 1.0 / scale.float().reshape(())
    return _quantize_with_inv_scale(x.float(), inv_scale)


def dynamic_per_token_fp8_quant_native(
    x: torch.Tensor, scale_ub: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference dynamic per-token quant; returns ``(q, scales)``.

    Per row: ``amax = max|x_f32|`` over the last dim (capped at ``scale_ub`` if given),
    ``s = max(amax / 448, 1 / (448 * 512))``, ``q = (x_f32 * (1 / s)).clamp(-448, 448)``
    cast to fp8. ``scales`` is fp32 of shape ``x.shape[:-1] + (1,)``.
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    if scale_ub is not None:
        amax = torch.minimum(amax, scale_ub.float().reshape(()))
    # A tensor divisor, not a Python float: CUDA turns division by a scalar into a
    # multiply by its rounded reciprocal, which is not the exact division DESIGN §2 asks.
    # (made on the device, so the function stays capturable in a CUDA graph).
    scales = torch.clamp(amax / torch.full((), FP8_MAX, device=amax.device), min=MIN_DYNAMIC_SCALE)
    return _quantize_with_inv_scale(xf, 1.0 / scales), scales


# --------------------------------------------------------------------------- validators


def validate_static_scaled_fp8_quant(
    x: torch.Tensor, scale: torch.Tensor, op: str = "static_scaled_fp8_quant", x_name: str = "x"
) -> None:
    """Checks for a static quant's input and scale; ``op`` names the op in messages."""
    V.check_activation(op, x_name, x)
    V.check_scalar_scale(op, "scale", scale, x_name, x)
    V.check_scale_value(op, "scale", scale)


def validate_dynamic_per_token_fp8_quant(
    x: torch.Tensor,
    scale_ub: Optional[torch.Tensor],
    op: str = "dynamic_per_token_fp8_quant",
    x_name: str = "x",
) -> None:
    """Checks for a dynamic per-token quant's input and cap; ``op`` names the op in messages."""
    V.check_activation(op, x_name, x)
    if x.shape[-1] == 0:
        raise ValueError(f"fxfuse.{op}: `{x_name}` must have a non-empty last dim, got shape {tuple(x.shape)}")
    V.check_optional_scalar_scale(op, "scale_ub", scale_ub, x_name, x)
    V.check_scale_value(op, "scale_ub", scale_ub)


def fp8_empty_like(x: torch.Tensor) -> torch.Tensor:
    """A contiguous fp8 tensor with ``x``'s shape and device (used by fake impls)."""
    return x.new_empty(x.shape, dtype=FP8_DTYPE)


def per_token_scales_empty(x: torch.Tensor) -> torch.Tensor:
    """An fp32 tensor of shape ``x.shape[:-1] + (1,)`` (used by fake impls)."""
    return x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


# --------------------------------------------------------------------------- ops


@define_op(
    "static_scaled_fp8_quant", fake=lambda x, scale: fp8_empty_like(x), validate=validate_static_scaled_fp8_quant
)
def static_scaled_fp8_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quantize ``x`` to float8_e4m3fn with a per-tensor dequant ``scale`` (``x ~= q * scale``).

    ``x`` is bf16, fp16 or fp32 and contiguous; ``scale`` is fp32 with one element,
    positive and finite (checked: see ``docs/kernels.md``, "Values").

    >>> x = torch.randn(4, 64, dtype=torch.bfloat16)
    >>> scale = torch.tensor([0.01])
    >>> q = torch.ops.fxfuse.static_scaled_fp8_quant(x, scale)
    """
    # On CUDA a Triton kernel; the native function is the reference everywhere else.
    if use_kernels(x):
        from ..kernels.quant import static_fp8

        return static_fp8(x, scale)
    return static_scaled_fp8_quant_native(x, scale)


@define_op(
    "dynamic_per_token_fp8_quant",
    fake=lambda x, scale_ub: (fp8_empty_like(x), per_token_scales_empty(x)),
    validate=validate_dynamic_per_token_fp8_quant,
)
def dynamic_per_token_fp8_quant(
    x: torch.Tensor, scale_ub: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of ``x`` to float8_e4m3fn with its own scale; returns ``(q, scales)``.

    ``scales`` is fp32 of shape ``x.shape[:-1] + (1,)``; ``q * scales ~= x``. ``scale_ub``
    (fp32, one element, positive and finite) caps each row's absolute maximum before the
    scale is derived.

    >>> x = torch.randn(4, 64, dtype=torch.bfloat16)
    >>> q, scales = torch.ops.fxfuse.dynamic_per_token_fp8_quant(x)
    >>> scales.shape
    torch.Size([4, 1])
    """
    # On CUDA a Triton kernel; the native function is the reference everywhere else.
    if use_kernels(x):
        from ..kernels.quant import dynamic_fp8

        return dynamic_fp8(x, scale_ub)
    return dynamic_per_token_fp8_quant_native(x, scale_ub)
