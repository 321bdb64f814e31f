"""Shared vocabulary of the built-in passes: example shapes and dtype checks."""

from __future__ import annotations

from typing import Any

import torch

from ..rewrite import TensorSpec

FP8 = torch.float8_e4m3fn
MODEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Example sizes only shape the traced pattern; any token count and width match.
TOKENS, HIDDEN = 5, 64


def activation(dtype: torch.dtype = torch.bfloat16, width: int = HIDDEN) -> TensorSpec:
    return TensorSpec((TOKENS, width), dtype)


def weight(dtype: torch.dtype = torch.bfloat16, width: int = HIDDEN) -> TensorSpec:
    return TensorSpec((width,), dtype)


def scale() -> TensorSpec:
    return TensorSpec((1,), torch.float32)


def val(match: Any, name: str) -> torch.Tensor:
    """The fake tensor a matched argument holds."""
    return match.kwargs[name].meta["val"]


def is_fp32_scalar(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.numel() == 1


def same_model_dtype(*ts: torch.Tensor) -> bool:
    """All the same dtype, one the fused kernels handle."""
    return ts[0].dtype in MODEL_DTYPES and all(t.dtype == ts[0].dtype for t in ts)
