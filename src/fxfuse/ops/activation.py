"""Gated activation op: ``fxfuse::silu_and_mul`` (the SwiGLU gate of LLaMA-style MLPs)."""

import torch
import torch.nn.functional as F

from . import _validate as V
from ._dispatch import use_kernels
from ._register import define_op

# --------------------------------------------------------------------------- native math


def silu_and_mul_native(x: torch.Tensor) -> torch.Tensor:
    """Reference SiLU-and-multiply: ``(silu(x_f32[..., :d]) * x_f32[..., d:]).to(x.dtype)``, ``d = x.shape[-1] // 2``."""
    d = x.shape[-1] // 2
    xf = x.float()
    return (F.silu(xf[..., :d]) * xf[..., d:]).to(x.dtype)


# --------------------------------------------------------------------------- validators


def validate_silu_and_mul(x: torch.Tensor, op: str = "silu_and_mul") -> None:
    """Checks for a ``silu_and_mul`` input; ``op`` names the op in messages."""
    V.check_activation(op, "x", x)
    if x.shape[-1] % 2 != 0:
        raise ValueError(
            f"fxfuse.{op}: `x` must have an even last dim (gate and up halves), got shape {tuple(x.shape)}"
        )


def silu_and_mul_out_shape(x: torch.Tensor) -> tuple:
    """Output shape of ``silu_and_mul``: ``x.shape[:-1] + (x.shape[-1] // 2,)``."""
    return (*x.shape[:-1], x.shape[-1] // 2)


# --------------------------------------------------------------------------- ops


@define_op("silu_and_mul", fake=lambda x: x.new_empty(silu_and_mul_out_shape(x)), validate=validate_silu_and_mul)
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where ``gate, up = x.chunk(2, dim=-1)``, computed in fp32.

    ``x`` is ``[..., 2 * d]`` (bf16, fp16 or fp32, contiguous); the output is ``[..., d]``
    in ``x``'s dtype.

    >>> x = torch.randn(4, 2 * 128, dtype=torch.bfloat16)
    >>> y = torch.ops.fxfuse.silu_and_mul(x)
    >>> y.shape
    torch.Size([4, 128])
    """
    # On CUDA a Triton kernel; the native function is the reference everywhere else.
    if use_kernels(x):
        from ..kernels.activation import silu_and_mul as kernel

        return kernel(x)
    return silu_and_mul_native(x)
