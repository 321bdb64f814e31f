"""Shared vocabulary of the built-in passes: example shapes, dtype checks, canonicalizations."""

from __future__ import annotations

from typing import Any

import torch

from ..canonicalize import DEFAULT_CANONICALIZATIONS, Canonicalization
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


def explicit_group_quant_flags(graph: torch.fx.Graph) -> int:
    """Write ``group_fp8_quant``'s ``column_major_scales`` into every call that leaves it
    at its default.

    Tracing drops an argument equal to its default, so a graph holds
    ``group_fp8_quant(y, 128)`` where the model wrote ``column_major_scales=False`` and
    ``group_fp8_quant(y, 128, True)`` where it wrote True. The group-quant rewrites take the
    flag as a bool wildcard (one rewrite for both layouts), which needs it present in the
    pattern and in the graph alike; canonicalizations run on both.
    """
    op = torch.ops.fxfuse.group_fp8_quant.default
    changed = 0
    for node in graph.find_nodes(op="call_function", target=op):
        if len(node.args) == 2 and "column_major_scales" not in node.kwargs:
            node.args = (*node.args, False)
            changed += 1
    return changed


#: Canonicalizations of the passes that hold group-quant rewrites.
GROUP_QUANT_CANONICALIZATIONS: tuple[Canonicalization, ...] = (*DEFAULT_CANONICALIZATIONS, explicit_group_quant_flags)
