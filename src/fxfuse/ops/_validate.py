"""Argument checks shared by every ``torch.ops.fxfuse`` operator.

Each op builds one validator out of these checks and calls it from both its real
implementation and its fake (meta) implementation, so that bad input is rejected at
trace/compile time as well as in eager mode. Every message starts with the op's
qualified name and names the offending argument, e.g.::

    fxfuse.rms_norm: `weight` must have dtype torch.bfloat16 (the dtype of `x`), got torch.float32

Type errors (an argument that is not a tensor, a dtype argument that is not a dtype)
raise ``TypeError``; everything else raises ``ValueError``.

The checks read metadata (dtype, shape, strides, device), never data, so they are
safe to run on fake tensors. The one exception, :func:`check_scale_value`, reads a
scale's value and skips itself where there is no value to read (fake tensors, tracing)
or where reading it would sync a GPU (see its docstring).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch

from .. import compat
from ._dispatch import should_check_values

#: dtypes accepted where the contract says "model dtype" (bf16, fp16) plus fp32.
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)

#: The only FP8 format fxfuse produces and consumes.
FP8_DTYPE = torch.float8_e4m3fn


def _prefix(op: str) -> str:
    return f"fxfuse.{op}"


def _dtypes_str(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d) for d in dtypes)


def check_tensor(op: str, name: str, t: Any) -> None:
    """``t`` must be a ``torch.Tensor``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{_prefix(op)}: `{name}` must be a torch.Tensor, got {type(t).__name__}")


def check_float_dtype(op: str, name: str, t: torch.Tensor) -> None:
    """``t`` must be bf16, fp16 or fp32."""
    check_tensor(op, name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{_prefix(op)}: `{name}` must have dtype in ({_dtypes_str(FLOAT_DTYPES)}), got {t.dtype}"
        )


def check_fp8(op: str, name: str, t: torch.Tensor) -> None:
    """``t`` must be a float8_e4m3fn tensor."""
    check_tensor(op, name, t)
    if t.dtype != FP8_DTYPE:
        raise ValueError(f"{_prefix(op)}: `{name}` must have dtype {FP8_DTYPE}, got {t.dtype}")


def check_min_dim(op: str, name: str, t: torch.Tensor, ndim: int) -> None:
    """``t`` must have at least ``ndim`` dimensions."""
    if t.dim() < ndim:
        raise ValueError(
            f"{_prefix(op)}: `{name}` must have at least {ndim} dimension(s), got shape {tuple(t.shape)}"
        )


def check_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    """``t`` must be contiguous (row-major, no gaps)."""
    if not t.is_contiguous():
        raise ValueError(
            f"{_prefix(op)}: `{name}` must be contiguous, got shape {tuple(t.shape)} "
            f"with strides {tuple(t.stride())} (call .contiguous() first)"
        )


def check_same_device(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``t`` must live on the same device as ``ref``."""
    if t.device != ref.device:
        raise ValueError(
            f"{_prefix(op)}: `{name}` must be on the device of `{ref_name}` ({ref.device}), got {t.device}"
        )


def check_eps(op: str, eps: Any) -> None:
    """``eps`` must be a non-negative Python number."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{_prefix(op)}: `eps` must be a float, got {type(eps).__name__}")
    if not eps >= 0.0:  # also rejects NaN
        raise ValueError(f"{_prefix(op)}: `eps` must be >= 0, got {eps}")


def check_activation(op: str, name: str, x: torch.Tensor) -> None:
    """An activation input ``[..., hidden]``: bf16/fp16/fp32, at least 1-D, contiguous."""
    check_float_dtype(op, name, x)
    check_min_dim(op, name, x, 1)
    check_contiguous(op, name, x)


def check_norm_weight(op: str, weight: Any, x: torch.Tensor, x_name: str = "x") -> None:
    """``weight`` must be ``[hidden]`` with ``x``'s dtype and device, and contiguous."""
    check_tensor(op, "weight", weight)
    if weight.dtype != x.dtype:
        raise ValueError(
            f"{_prefix(op)}: `weight` must have dtype {x.dtype} (the dtype of `{x_name}`), got {weight.dtype}"
        )
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"{_prefix(op)}: `weight` must have shape [{x.shape[-1]}] (the last dim of `{x_name}`), "
            f"got {tuple(weight.shape)}"
        )
    check_contiguous(op, "weight", weight)
    check_same_device(op, "weight", weight, x_name, x)


def check_like(op: str, name: str, t: Any, ref_name: str, ref: torch.Tensor) -> None:
    """``t`` must have exactly ``ref``'s shape, dtype and device, and be contiguous."""
    check_tensor(op, name, t)
    if t.dtype != ref.dtype:
        raise ValueError(
            f"{_prefix(op)}: `{name}` must have dtype {ref.dtype} (the dtype of `{ref_name}`), got {t.dtype}"
        )
    if t.shape != ref.shape:
        raise ValueError(
            f"{_prefix(op)}: `{name}` must have shape {tuple(ref.shape)} (the shape of `{ref_name}`), "
            f"got {tuple(t.shape)}"
        )
    check_contiguous(op, name, t)
    check_same_device(op, name, t, ref_name, ref)


def check_scalar_scale(op: str, name: str, scale: Any, ref_name: str, ref: torch.Tensor) -> None:
    """A per-tensor scale: fp32, exactly one element, shape ``[]`` or ``[1]``, on ``ref``'s device."""
    check_tensor(op, name, scale)
    if scale.dtype != torch.float32:
        raise ValueError(f"{_prefix(op)}: `{name}` must have dtype torch.float32, got {scale.dtype}")
    if scale.dim() > 1 or scale.numel() != 1:
        raise ValueError(
            f"{_prefix(op)}: `{name}` must have exactly one element (shape [] or [1]), "
            f"got shape {tuple(scale.shape)}"
        )
    check_same_device(op, name, scale, ref_name, ref)


def check_optional_scalar_scale(
    op: str, name: str, scale: Optional[torch.Tensor], ref_name: str, ref: torch.Tensor
) -> None:
    """Like :func:`check_scalar_scale`, but ``None`` is allowed."""
    if scale is not None:
        check_scalar_scale(op, name, scale, ref_name, ref)


def check_scale_value(op: str, name: str, scale: Optional[torch.Tensor]) -> None:
    """A static scale's *value* must be a positive, finite number; ``None`` passes.

    Call it after the metadata checks of ``scale``. A scale that is 0, negative, NaN or
    infinite is otherwise accepted and silently turns the op's output into NaN, zeros,
    saturated values or their negation, whether the op divides by it or multiplies.
    Every element is checked (one for the per-tensor scales of today's ops).

    The check reads data, so it only runs where that is possible and cheap:

    - not on fake or meta tensors, nor while ``torch.compile`` traces
      (:func:`fxfuse.compat.has_readable_data`): fake impls call the same validators,
      and the op's real implementation checks the value when the compiled graph runs;
    - on CUDA only with ``FXFUSE_CHECK_SCALES=1`` and never during CUDA graph capture
      (:func:`fxfuse.ops._dispatch.should_check_values`): reading a value syncs the device.

    >>> check_scale_value("static_scaled_fp8_quant", "scale", torch.tensor([-0.5]))
    Traceback (most recent call last):
    ...
    ValueError: fxfuse.static_scaled_fp8_quant: `scale` must be a positive finite number, got -0.5
    """
    if scale is None or not compat.has_readable_data(scale) or not should_check_values(scale.device):
        return
    if scale.numel() == 1:  # every per-tensor scale: one host read, no extra kernels
        value, where = scale.item(), ""
    else:
        flat = scale.detach().reshape(-1)
        bad = ~(torch.isfinite(flat) & (flat > 0))
        if not bad.any():
            return
        index = int(bad.nonzero()[0])
        value, where = flat[index].item(), f" (element {index} of {flat.numel()})"
    if not (math.isfinite(value) and value > 0):  # also rejects NaN and -0.0
        raise ValueError(f"{_prefix(op)}: `{name}` must be a positive finite number, got {value}{where}")


def check_out_dtype(op: str, name: str, dtype: Any) -> None:
    """An output dtype argument: bf16, fp16 or fp32."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{_prefix(op)}: `{name}` must be a torch.dtype, got {type(dtype).__name__}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{_prefix(op)}: `{name}` must be one of ({_dtypes_str(FLOAT_DTYPES)}), got {dtype}")
