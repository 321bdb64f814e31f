"""All-reduce fused with the residual add, RMSNorm and an optional quant.

In a tensor-parallel decoder every row-parallel projection (``o_proj``, ``down_proj``)
leaves each rank with a partial sum, all-reduced and then fed straight into the next
``fused_add_rms_norm`` (and, in a quantized model, the quant after it). These ops are
that chain as one op, so that one kernel can read the peers' partial sums and write the
normalized, quantized activations (``fxfuse.kernels.allreduce``):

- ``allreduce_fused_add_rms_norm(x, residual, weight, eps, group_name) -> (y, residual_out)``
- ``allreduce_fused_add_rms_norm_static_fp8_quant(x, residual, weight, scale, eps, group_name)
  -> (q, residual_out)``
- ``allreduce_fused_add_rms_norm_dynamic_per_token_fp8_quant(x, residual, weight, eps, group_name,
  scale_ub=None) -> (q, scales, residual_out)``
- ``allreduce_fused_add_rms_norm_nvfp4_quant(x, residual, weight, global_scale, eps, group_name)
  -> (q, block_scales, residual_out)``
- ``allreduce_fused_add_rms_norm_group_fp8_quant(x, residual, weight, eps, group_size, group_name,
  column_major_scales=False) -> (q, scales, residual_out)``

Each is its unfused chain: ``all_reduce(x, "sum", group_name)`` (the functional
collective, ``torch.ops._c10d_functional``), rounded to ``residual``'s dtype, then the op
it names without the ``allreduce_`` prefix (``fused_add_rms_norm_nvfp4_quant`` is
``fused_add_rms_norm`` then ``nvfp4_quant``). ``group_name`` (``ProcessGroup.group_name``)
follows the chain's arguments that have no default.

``x`` is this rank's partial sum, in ``residual``'s dtype (what engines reduce) or in fp32
(what the reference model reduces under tensor parallelism: the sum is then rounded once,
see `fxfuse.models.parallel.TensorParallel.partial_sum_dtype`); ``residual``, the weight
and the scales are the same on every rank, and so are all outputs.

Where each op runs (`fxfuse.ops._groups.fused_implementation`):

- a gloo group on the CPU: the functional all-reduce, then the existing ops; the
  ``*_native`` functions below are that chain with the native functions, the reference;
- an NCCL group on CUDA: the symmetric-memory Triton kernels for messages up to
  ``fxfuse.ops._symm_mem.TWO_SHOT_MAX_BYTES`` where torch has symmetric memory, NCCL
  and the existing fused kernels otherwise.

Every rank first checks that all ranks pass the same shape and dtype (on CUDA only with
``FXFUSE_CHECK_COLLECTIVES=1``), so a mismatch is a ValueError on each rank rather than a
hang or an abort inside the collective. A ``group_name`` that names no group of this
process is a ValueError too. Fake impls check only the local arguments (the pattern
tracer passes a placeholder name).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from . import _groups as G
from . import _symm_mem
from . import _validate as V
from .fused import (
    fused_add_rms_norm_dynamic_per_token_fp8_quant_native,
    fused_add_rms_norm_static_fp8_quant_native,
)
from .group_quant import (
    check_column_major_scales,
    check_group_size,
    fused_add_rms_norm_group_fp8_quant_native,
    group_scales_empty,
)
from .norm import fused_add_rms_norm_native
from .nvfp4 import nvfp4_empty, nvfp4_quant_native, validate_nvfp4_quant
from .quant import FP8_DTYPE, fp8_empty_like, per_token_scales_empty

fx = torch.ops.fxfuse

# --------------------------------------------------------------------------- native math


def all_reduce_native(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """The sum of ``x`` over the ranks of ``group_name``: the functional all-reduce that an
    unfused tensor-parallel graph holds (a new tensor; ``x`` is not changed).

    >>> all_reduce_native(torch.ones(2, 3), dist.group.WORLD.group_name)  # doctest: +SKIP
    """
    return torch.ops._c10d_functional.wait_tensor(torch.ops._c10d_functional.all_reduce(x, "sum", group_name))


def _sum(x: torch.Tensor, residual: torch.Tensor, group_name: str) -> torch.Tensor:
    """The all-reduced partial sums, rounded to ``residual``'s dtype (once, from fp32 partials)."""
    return all_reduce_native(x, group_name).to(residual.dtype)


def allreduce_fused_add_rms_norm_native(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, group_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: ``fused_add_rms_norm(all_reduce(x), residual, weight, eps)``."""
    return fused_add_rms_norm_native(_sum(x, residual, group_name), residual, weight, eps)


def allreduce_fused_add_rms_norm_static_fp8_quant_native(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, eps: float, group_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: ``fused_add_rms_norm_static_fp8_quant(all_reduce(x), ...)`` -> ``(q, residual_out)``."""
    return fused_add_rms_norm_static_fp8_quant_native(_sum(x, residual, group_name), residual, weight, scale, eps)


def allreduce_fused_add_rms_norm_dynamic_per_token_fp8_quant_native(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    group_name: str,
    scale_ub: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference: ``fused_add_rms_norm_dynamic_per_token_fp8_quant(all_reduce(x), ...)``
    -> ``(q, scales, residual_out)``."""
    return fused_add_rms_norm_dynamic_per_token_fp8_quant_native(
        _sum(x, residual, group_name), residual, weight, eps, scale_ub
    )


def allreduce_fused_add_rms_norm_nvfp4_quant_native(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    global_scale: torch.Tensor,
    eps: float,
    group_name: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference: ``nvfp4_quant(y)`` with ``(y, residual_out) = fused_add_rms_norm(all_reduce(x), ...)``
    -> ``(q, block_scales, residual_out)``."""
    y, residual_out = fused_add_rms_norm_native(_sum(x, residual, group_name), residual, weight, eps)
    q, block_scales = nvfp4_quant_native(y, global_scale)
    return q, block_scales, residual_out


def allreduce_fused_add_rms_norm_group_fp8_quant_native(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    group_size: int,
    group_name: str,
    column_major_scales: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference: ``fused_add_rms_norm_group_fp8_quant(all_reduce(x), ...)`` -> ``(q, scales, residual_out)``."""
    return fused_add_rms_norm_group_fp8_quant_native(
        _sum(x, residual, group_name), residual, weight, eps, group_size, column_major_scales
    )


# --------------------------------------------------------------------------- validators


def validate_partials_and_residual(
    op: str, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, group_name: str
) -> None:
    """What every op checks: ``x`` has ``residual``'s shape and its dtype or fp32, the norm
    weight fits ``residual``, ``eps``, and ``group_name`` is a non-empty str."""
    V.check_activation(op, "residual", residual)
    V.check_activation(op, "x", x)
    if x.dtype not in (residual.dtype, torch.float32):
        raise ValueError(
            f"fxfuse.{op}: `x` (the partial sums) must have the dtype of `residual` ({residual.dtype}) "
            f"or torch.float32, got {x.dtype}"
        )
    if x.shape != residual.shape:
        raise ValueError(
            f"fxfuse.{op}: `residual` must have shape {tuple(x.shape)} (the shape of `x`), got {tuple(residual.shape)}"
        )
    V.check_same_device(op, "residual", residual, "x", x)
    V.check_norm_weight(op, weight, residual, x_name="residual")
    V.check_eps(op, eps)
    G.check_group_name(op, group_name)


def validate_allreduce_fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, group_name: str
) -> None:
    validate_partials_and_residual("allreduce_fused_add_rms_norm", x, residual, weight, eps, group_name)


def validate_allreduce_fused_add_rms_norm_static_fp8_quant(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, eps: float, group_name: str
) -> None:
    op = "allreduce_fused_add_rms_norm_static_fp8_quant"
    validate_partials_and_residual(op, x, residual, weight, eps, group_name)
    V.check_scalar_scale(op, "scale", scale, "x", x)
    V.check_scale_value(op, "scale", scale)


def validate_allreduce_fused_add_rms_norm_dynamic_per_token_fp8_quant(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    group_name: str,
    scale_ub: Optional[torch.Tensor],
) -> None:
    op = "allreduce_fused_add_rms_norm_dynamic_per_token_fp8_quant"
    validate_partials_and_residual(op, x, residual, weight, eps, group_name)
    V.check_optional_scalar_scale(op, "scale_ub", scale_ub, "x", x)
    V.check_scale_value(op, "scale_ub", scale_ub)


def validate_allreduce_fused_add_rms_norm_nvfp4_quant(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    global_scale: torch.Tensor,
    eps: float,
    group_name: str,
) -> None:
    op = "allreduce_fused_add_rms_norm_nvfp4_quant"
    validate_partials_and_residual(op, x, residual, weight, eps, group_name)
    validate_nvfp4_quant(x, global_scale, op=op)


def validate_allreduce_fused_add_rms_norm_group_fp8_quant(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    group_size: int,
    group_name: str,
    column_major_scales: bool,
) -> None:
    op = "allreduce_fused_add_rms_norm_group_fp8_quant"
    validate_partials_and_residual(op, x, residual, weight, eps, group_name)
    check_group_size(op, group_size, x.shape[-1], "the last dim of `x`")
    check_column_major_scales(op, column_major_scales)


# --------------------------------------------------------------------------- dispatch


def _reduced(
    op: str, x: torch.Tensor, residual: torch.Tensor, group_name: str, epilogue: Callable[[torch.Tensor], Any],
    **kernel_args: Any,
):
    """Run ``op``: the symmetric-memory kernel with ``kernel_args`` where it applies, else
    the functional all-reduce, rounded to ``residual``'s dtype, followed by ``epilogue``
    (the existing ops)."""
    group = G.resolve(op, group_name)
    G.check_same_across_ranks(op, group_name, group, x)
    out = _symm_mem.run_fused(x, group_name, residual=residual, **kernel_args)
    if out is not None:
        return out
    return epilogue(_sum(x, residual, group_name))


# --------------------------------------------------------------------------- ops


@torch.library.custom_op("fxfuse::allreduce_fused_add_rms_norm", mutates_args=())
def allreduce_fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, group_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-reduce (sum) ``x`` over ``group_name``, add ``residual``, RMS-normalize:
    returns ``(y, residual_out)`` as ``fused_add_rms_norm`` does.

    >>> y, r_out = torch.ops.fxfuse.allreduce_fused_add_rms_norm(x, r, w, 1e-6, group.group_name)  # doctest: +SKIP
    """
    validate_allreduce_fused_add_rms_norm(x, residual, weight, eps, group_name)
    return _reduced(
        "allreduce_fused_add_rms_norm", x, residual, group_name,
        lambda s: fx.fused_add_rms_norm(s, residual, weight, eps),
        weight=weight, eps=eps,
    )


@allreduce_fused_add_rms_norm.register_fake
def _(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, group_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    validate_allreduce_fused_add_rms_norm(x, residual, weight, eps, group_name)
    return residual.new_empty(x.shape), residual.new_empty(x.shape)


@torch.library.custom_op("fxfuse::allreduce_fused_add_rms_norm_static_fp8_quant", mutates_args=())
def allreduce_fused_add_rms_norm_static_fp8_quant(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, eps: float, group_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-reduce, residual add, RMS norm, static FP8 quant: returns ``(q, residual_out)``.

    >>> q, r_out = torch.ops.fxfuse.allreduce_fused_add_rms_norm_static_fp8_quant(
    ...     x, r, w, scale, 1e-6, group.group_name)  # doctest: +SKIP
    """
    validate_allreduce_fused_add_rms_norm_static_fp8_quant(x, residual, weight, scale, eps, group_name)
    return _reduced(
        "allreduce_fused_add_rms_norm_static_fp8_quant", x, residual, group_name,
        lambda s: fx.fused_add_rms_norm_static_fp8_quant(s, residual, weight, scale, eps),
        weight=weight, eps=eps, scale=scale,
    )


@allreduce_fused_add_rms_norm_static_fp8_quant.register_fake
def _(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, eps: float, group_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    validate_allreduce_fused_add_rms_norm_static_fp8_quant(x, residual, weight, scale, eps, group_name)
    return fp8_empty_like(x), residual.new_empty(x.shape)


@torch.library.custom_op("fxfuse::allreduce_fused_add_rms_norm_dynamic_per_token_fp8_quant", mutates_args=())
def allreduce_fused_add_rms_norm_dynamic_per_token_fp8_quant(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    group_name: str,
    scale_ub: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All-reduce, residual add, RMS norm, dynamic per-token FP8 quant: returns
    ``(q, scales, residual_out)``.

    >>> q, scales, r_out = torch.ops.fxfuse.allreduce_fused_add_rms_norm_dynamic_per_token_fp8_quant(
    ...     x, r, w, 1e-6, group.group_name)  # doctest: +SKIP
    """
    validate_allreduce_fused_add_rms_norm_dynamic_per_token_fp8_quant(x, residual, weight, eps, group_name, scale_ub)
    return _reduced(
        "allreduce_fused_add_rms_norm_dynamic_per_token_fp8_quant", x, residual, group_name,
        lambda s: fx.fused_add_rms_norm_dynamic_per_token_fp8_quant(s, residual, weight, eps, scale_ub),
        weight=weight, eps=eps, dynamic=True, scale_ub=scale_ub,
    )


@allreduce_fused_add_rms_norm_dynamic_per_token_fp8_quant.register_fake
def _(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    group_name: str,
    scale_ub: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    validate_allreduce_fused_add_rms_norm_dynamic_per_token_fp8_quant(x, residual, weight, eps, group_name, scale_ub)
    return fp8_empty_like(x), per_token_scales_empty(x), residual.new_empty(x.shape)


@torch.library.custom_op("fxfuse::allreduce_fused_add_rms_norm_nvfp4_quant", mutates_args=())
def allreduce_fused_add_rms_norm_nvfp4_quant(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    global_scale: torch.Tensor,
    eps: float,
    group_name: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All-reduce, residual add, RMS norm, NVFP4 quant: returns ``(q, block_scales, residual_out)``
    (``q`` and ``block_scales`` as ``nvfp4_quant`` writes them).

    >>> q, sf, r_out = torch.ops.fxfuse.allreduce_fused_add_rms_norm_nvfp4_quant(
    ...     x, r, w, global_scale, 1e-6, group.group_name)  # doctest: +SKIP
    """
    validate_allreduce_fused_add_rms_norm_nvfp4_quant(x, residual, weight, global_scale, eps, group_name)

    def epilogue(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y, residual_out = fx.fused_add_rms_norm(s, residual, weight, eps)
        q, block_scales = fx.nvfp4_quant(y, global_scale)
        return q, block_scales, residual_out

    return _reduced(
        "allreduce_fused_add_rms_norm_nvfp4_quant", x, residual, group_name, epilogue,
        weight=weight, eps=eps, global_scale=global_scale,
    )


@allreduce_fused_add_rms_norm_nvfp4_quant.register_fake
def _(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    global_scale: torch.Tensor,
    eps: float,
    group_name: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    validate_allreduce_fused_add_rms_norm_nvfp4_quant(x, residual, weight, global_scale, eps, group_name)
    q, block_scales = nvfp4_empty(x, x.shape[-1])
    return q, block_scales, residual.new_empty(x.shape)


@torch.library.custom_op("fxfuse::allreduce_fused_add_rms_norm_group_fp8_quant", mutates_args=())
def allreduce_fused_add_rms_norm_group_fp8_quant(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    group_size: int,
    group_name: str,
    column_major_scales: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All-reduce, residual add, RMS norm, per-token-group FP8 quant: returns
    ``(q, scales, residual_out)`` (``scales`` as ``group_fp8_quant`` lays them out).

    >>> q, scales, r_out = torch.ops.fxfuse.allreduce_fused_add_rms_norm_group_fp8_quant(
    ...     x, r, w, 1e-6, 128, group.group_name, True)  # doctest: +SKIP
    """
    validate_allreduce_fused_add_rms_norm_group_fp8_quant(
        x, residual, weight, eps, group_size, group_name, column_major_scales
    )
    return _reduced(
        "allreduce_fused_add_rms_norm_group_fp8_quant", x, residual, group_name,
        lambda s: fx.fused_add_rms_norm_group_fp8_quant(s, residual, weight, eps, group_size, column_major_scales),
        weight=weight, eps=eps, group_size=group_size, column_major_scales=column_major_scales,
    )


@allreduce_fused_add_rms_norm_group_fp8_quant.register_fake
def _(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    group_size: int,
    group_name: str,
    column_major_scales: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    validate_allreduce_fused_add_rms_norm_group_fp8_quant(
        x, residual, weight, eps, group_size, group_name, column_major_scales
    )
    q = x.new_empty(x.shape, dtype=FP8_DTYPE)
    return q, group_scales_empty(x, x.shape[-1], group_size, column_major_scales), residual.new_empty(x.shape)
