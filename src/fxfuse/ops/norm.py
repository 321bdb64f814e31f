"""RMS normalization ops: ``fxfuse::rms_norm`` and ``fxfuse::fused_add_rms_norm``.

``rms_norm_native`` and ``fused_add_rms_norm_native`` are the numerical reference:
every kernel and every fused op that contains an RMS norm must reproduce them.
"""

import torch

from . import _validate as V
from ._dispatch import use_kernels
from ._register import define_op

# --------------------------------------------------------------------------- native math


def rms_norm_native(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference RMS norm.

    Normalizes in fp32, rounds to ``x.dtype``, then multiplies by ``weight`` in
    ``x.dtype``: ``(x_f32 * rsqrt(mean(x_f32**2, -1) + eps)).to(x.dtype) * weight``.
    """
    xf = x.float()
    variance = xf.pow(2).mean(dim=-1, keepdim=True)
    return (xf * torch.rsqrt(variance + eps)).to(x.dtype) * weight


def fused_add_rms_norm_native(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference residual add + RMS norm: returns ``(rms_norm(x + residual), x + residual)``.

    The add happens in ``x.dtype`` (rounded once), and the norm reads that rounded sum.
    """
    residual_out = x + residual
    return rms_norm_native(residual_out, weight, eps), residual_out


# --------------------------------------------------------------------------- validators


def validate_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, op: str = "rms_norm") -> None:
    """Checks for ``rms_norm``-shaped arguments; ``op`` names the op in messages."""
    V.check_activation(op, "x", x)
    V.check_norm_weight(op, weight, x)
    V.check_eps(op, eps)


def validate_fused_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    op: str = "fused_add_rms_norm",
) -> None:
    """Checks for ``fused_add_rms_norm``-shaped arguments; ``op`` names the op in messages."""
    V.check_activation(op, "x", x)
    V.check_like(op, "residual", residual, "x", x)
    V.check_norm_weight(op, weight, x)
    V.check_eps(op, eps)


# --------------------------------------------------------------------------- ops


@define_op("rms_norm", fake=lambda x, weight, eps: x.new_empty(x.shape), validate=validate_rms_norm)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm over the last dim of ``x`` (``[..., hidden]``), scaled by ``weight`` (``[hidden]``).

    ``x`` is bf16, fp16 or fp32 and contiguous; ``weight`` has ``x``'s dtype. The output
    has ``x``'s shape and dtype.

    >>> x = torch.randn(4, 64, dtype=torch.bfloat16)
    >>> w = torch.ones(64, dtype=torch.bfloat16)
    >>> y = torch.ops.fxfuse.rms_norm(x, w, 1e-6)
    """
    # On CUDA a Triton kernel; the native function is the reference everywhere else.
    if use_kernels(x):
        from ..kernels.norm_quant import rms_norm_quant

        return rms_norm_quant(x, weight, eps)[0]
    return rms_norm_native(x, weight, eps)


@define_op(
    "fused_add_rms_norm",
    fake=lambda x, residual, weight, eps: (x.new_empty(x.shape), x.new_empty(x.shape)),
    validate=validate_fused_add_rms_norm,
)
def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMS norm: returns ``(y, residual_out)``.

    ``residual_out = x + residual`` (in ``x.dtype``) and ``y = rms_norm(residual_out, weight, eps)``.
    ``residual`` must have ``x``'s shape and dtype. Nothing is updated in place.

    >>> x = torch.randn(4, 64, dtype=torch.bfloat16)
    >>> r = torch.randn(4, 64, dtype=torch.bfloat16)
    >>> w = torch.ones(64, dtype=torch.bfloat16)
    >>> y, r_out = torch.ops.fxfuse.fused_add_rms_norm(x, r, w, 1e-6)
    """
    # On CUDA a Triton kernel; the native function is the reference everywhere else.
    if use_kernels(x):
        from ..kernels.norm_quant import rms_norm_quant

        y, _, _, residual_out = rms_norm_quant(x, weight, eps, residual=residual)
        return y, residual_out
    return fused_add_rms_norm_native(x, residual, weight, eps)
