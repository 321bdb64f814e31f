"""FP8 linears fused with what comes before and after them at decode:
``fxfuse::fp8_linear_fused`` and ``fxfuse::block_fp8_linear_fused``.

Each is an FP8 linear (``fp8_linear`` / ``block_fp8_linear``) with, optionally,

- the activation's quant in front of it (a *prologue*): ``x`` is given in the model
  dtype and quantized as ``static_scaled_fp8_quant`` (a one-element ``x_scale``),
  ``dynamic_per_token_fp8_quant`` (no ``x_scale``; ``scale_ub`` caps) or
  ``group_fp8_quant`` (block op, groups of ``group_size``) would; an FP8 ``x`` comes with
  its scales as for the plain linear (the block op then reads the group size from them
  and ignores ``group_size``);
- the consumer of its output behind it (an *epilogue*, ``epilogue``):
  ``"silu_and_mul"`` (the output is a gate/up pair, ``[..., 2d]`` -> ``[..., d]``) or
  ``"fused_add_rms_norm"`` (``residual``, ``norm_weight``, ``eps``), optionally quantized:
  static FP8 with ``out_scale`` (per-tensor op) or per token group of ``out_group_size``
  (block op; scales column-major if ``column_major_scales``).

They return a list, the outputs of the last op of the chain they stand for: ``[out]``;
``[y]``, ``[q]`` or ``[q, scales]`` after SiLU-and-mul; ``[y, residual_out]``,
``[q, residual_out]`` or ``[q, scales, residual_out]`` after the norm. Their native
implementations compose the native functions of that chain, so a fused op equals its
chain bit for bit. On CUDA the small-batch FP8 GEMM runs the whole chain (the prologue
in registers, the epilogue in its epilogue or its second kernel,
`fxfuse.kernels.small_gemm`) at the token counts where the device's measured table names
the fused form (`fxfuse.kernels.small_gemm_config.fused_key`); everywhere else the op runs
the chain of fxfuse ops it replaces, so a graph compiled for every batch size loses
nothing at prefill. The ``gemm_fusion`` pass (`fxfuse.passes.gemm_fusion`) makes them.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _validate as V
from ._register import define_op
from .activation import silu_and_mul_native
from .block_linear import block_fp8_linear_native, validate_block_fp8_weight
from .group_quant import GROUP_SIZES, group_fp8_quant_native, group_scales_empty
from .linear import fp8_linear_native, small_gemm_config, validate_fp8_linear, validate_fp8_weight
from .norm import fused_add_rms_norm_native
from .quant import (
    FP8_DTYPE,
    dynamic_per_token_fp8_quant_native,
    static_scaled_fp8_quant_native,
    validate_dynamic_per_token_fp8_quant,
    validate_static_scaled_fp8_quant,
)

#: The ``epilogue`` values both ops take.
EPILOGUES = ("none", "silu_and_mul", "fused_add_rms_norm")
_fx = torch.ops.fxfuse

# --------------------------------------------------------------------------- what a call stands for


def fp8_variant(x: torch.Tensor, x_scale: Optional[torch.Tensor], epilogue: str,
                out_scale: Optional[torch.Tensor]) -> tuple[str, str]:
    """``(prologue, epilogue)`` op names of the chain an ``fp8_linear_fused`` call stands
    for (``""``: none), as `fxfuse.kernels.small_gemm_config.fused_key` takes them.

    >>> fp8_variant(x_bf16, scale, "silu_and_mul", None)
    ('static_scaled_fp8_quant', 'silu_and_mul')
    """
    prologue = "" if x.dtype == FP8_DTYPE else (
        "static_scaled_fp8_quant" if x_scale is not None else "dynamic_per_token_fp8_quant")
    tail = "" if epilogue == "none" else epilogue + ("_static_fp8_quant" if out_scale is not None else "")
    return prologue, tail


def block_variant(x: torch.Tensor, epilogue: str, out_group_size: int) -> tuple[str, str]:
    """``(prologue, epilogue)`` op names of the chain a ``block_fp8_linear_fused`` call
    stands for (``""``: none).

    >>> block_variant(x_bf16, "fused_add_rms_norm", 128)
    ('group_fp8_quant', 'fused_add_rms_norm_group_fp8_quant')
    """
    prologue = "" if x.dtype == FP8_DTYPE else "group_fp8_quant"
    tail = "" if epilogue == "none" else epilogue + ("_group_fp8_quant" if out_group_size else "")
    return prologue, tail


# --------------------------------------------------------------------------- native math


def _epilogue_native(out, epilogue, residual, norm_weight, eps, quant):
    """The native epilogue chain on ``out``; ``quant(y)`` returns the quantized outputs
    of ``y`` as a list (or None: not quantized)."""
    if epilogue == "none":
        return [out]
    if epilogue == "silu_and_mul":
        y = silu_and_mul_native(out)
        q = quant(y)
        return [y] if q is None else q
    y, residual_out = fused_add_rms_norm_native(out, residual, norm_weight, eps)
    q = quant(y)
    return ([y] if q is None else q) + [residual_out]


def fp8_linear_fused_native(
    x: torch.Tensor,
    x_scale: Optional[torch.Tensor],
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
    scale_ub: Optional[torch.Tensor] = None,
    epilogue: str = "none",
    residual: Optional[torch.Tensor] = None,
    norm_weight: Optional[torch.Tensor] = None,
    eps: float = 0.0,
    out_scale: Optional[torch.Tensor] = None,
) -> list[torch.Tensor]:
    """Reference: the chain ``fp8_linear_fused`` stands for, of native functions."""
    if x.dtype == FP8_DTYPE:
        x_q, xs = x, x_scale
    elif x_scale is not None:
        x_q, xs = static_scaled_fp8_quant_native(x, x_scale), x_scale
    else:
        x_q, xs = dynamic_per_token_fp8_quant_native(x, scale_ub)
    out = fp8_linear_native(x_q, w_q, xs, w_scale, bias, out_dtype)
    quant = (lambda y: None) if out_scale is None else (lambda y: [static_scaled_fp8_quant_native(y, out_scale)])
    return _epilogue_native(out, epilogue, residual, norm_weight, eps, quant)


def block_fp8_linear_fused_native(
    x: torch.Tensor,
    x_scales: Optional[torch.Tensor],
    w_q: torch.Tensor,
    w_scales: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
    group_size: int = 128,
    epilogue: str = "none",
    residual: Optional[torch.Tensor] = None,
    norm_weight: Optional[torch.Tensor] = None,
    eps: float = 0.0,
    out_group_size: int = 0,
    column_major_scales: bool = False,
) -> list[torch.Tensor]:
    """Reference: the chain ``block_fp8_linear_fused`` stands for, of native functions."""
    if x.dtype == FP8_DTYPE:
        x_q, xs = x, x_scales
    else:
        x_q, xs = group_fp8_quant_native(x, group_size, True)
    out = block_fp8_linear_native(x_q, xs, w_q, w_scales, bias, out_dtype)
    quant = (lambda y: None) if not out_group_size else (
        lambda y: list(group_fp8_quant_native(y, out_group_size, column_major_scales)))
    return _epilogue_native(out, epilogue, residual, norm_weight, eps, quant)


# --------------------------------------------------------------------------- validators


def _validate_epilogue(op, x, n, out_dtype, bias, epilogue, residual, norm_weight, eps, quantized):
    """Checks of the epilogue arguments; ``n`` is the linear's output width."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"fxfuse.{op}: `epilogue` must be one of {list(EPILOGUES)}, got {epilogue!r}")
    if epilogue == "none":
        if residual is not None or norm_weight is not None or quantized:
            raise ValueError(f"fxfuse.{op}: `residual`, `norm_weight` and an output quant need an epilogue "
                             f"(epilogue='none')")
        return
    if bias is not None:
        raise ValueError(f"fxfuse.{op}: `bias` is not taken with an epilogue ({epilogue!r}); add it before")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"fxfuse.{op}: an epilogue needs a model-dtype `out_dtype` (bf16, fp16, fp32), "
                         f"got {out_dtype}")
    if epilogue == "silu_and_mul":
        if residual is not None or norm_weight is not None:
            raise ValueError(f"fxfuse.{op}: `residual` and `norm_weight` belong to epilogue='fused_add_rms_norm', "
                             f"not {epilogue!r}")
        if n % 2:
            raise ValueError(f"fxfuse.{op}: epilogue='silu_and_mul' needs an even output width (gate and up "
                             f"halves), got {n}")
        return
    out_shape = (*x.shape[:-1], n)
    V.check_tensor(op, "residual", residual)
    if tuple(residual.shape) != out_shape or residual.dtype != out_dtype:
        raise ValueError(f"fxfuse.{op}: `residual` must have the output's shape {list(out_shape)} and dtype "
                         f"{out_dtype}, got {tuple(residual.shape)} {residual.dtype}")
    V.check_contiguous(op, "residual", residual)
    V.check_same_device(op, "residual", residual, "x", x)
    V.check_tensor(op, "norm_weight", norm_weight)
    if tuple(norm_weight.shape) != (n,) or norm_weight.dtype != out_dtype:
        raise ValueError(f"fxfuse.{op}: `norm_weight` must have shape [{n}] and dtype {out_dtype}, got "
                         f"{tuple(norm_weight.shape)} {norm_weight.dtype}")
    V.check_contiguous(op, "norm_weight", norm_weight)
    V.check_same_device(op, "norm_weight", norm_weight, "x", x)
    V.check_eps(op, eps)


def validate_fp8_linear_fused(x, x_scale, w_q, w_scale, bias, out_dtype, scale_ub, epilogue, residual,
                              norm_weight, eps, out_scale) -> None:
    """Checks for ``fp8_linear_fused`` arguments."""
    op = "fp8_linear_fused"
    if x.dtype == FP8_DTYPE:
        if x_scale is None:
            raise ValueError(f"fxfuse.{op}: an FP8 `x` needs its `x_scale` (per tensor or per token)")
        if scale_ub is not None:
            raise ValueError(f"fxfuse.{op}: `scale_ub` caps the dynamic quant of a model-dtype `x`; this `x` is FP8")
        validate_fp8_linear(x, w_q, x_scale, w_scale, bias, out_dtype, op=op)
    else:
        if x_scale is not None:
            if scale_ub is not None:
                raise ValueError(f"fxfuse.{op}: `scale_ub` caps the dynamic quant (no `x_scale`); `x_scale` was "
                                 "given, a static quant")
            validate_static_scaled_fp8_quant(x, x_scale, op=op)
        else:
            validate_dynamic_per_token_fp8_quant(x, scale_ub, op=op)
        V.check_contiguous(op, "x", x)
        validate_fp8_weight(x, w_q, w_scale, bias, out_dtype, op=op)
    if out_scale is not None:
        V.check_scalar_scale(op, "out_scale", out_scale, "x", x)
        V.check_scale_value(op, "out_scale", out_scale)
    _validate_epilogue(op, x, w_q.shape[0], out_dtype, bias, epilogue, residual, norm_weight, eps,
                       out_scale is not None)


def validate_block_fp8_linear_fused(x, x_scales, w_q, w_scales, bias, out_dtype, group_size, epilogue, residual,
                                    norm_weight, eps, out_group_size, column_major_scales) -> None:
    """Checks for ``block_fp8_linear_fused`` arguments."""
    from .block_linear import validate_block_fp8_linear

    op = "block_fp8_linear_fused"
    k = x.shape[-1]
    if x.dtype == FP8_DTYPE:
        if x_scales is None:
            raise ValueError(f"fxfuse.{op}: an FP8 `x` needs its group scales `x_scales`")
        validate_block_fp8_linear(x, x_scales, w_q, w_scales, bias, out_dtype, op=op)
    else:
        if x_scales is not None:
            raise ValueError(f"fxfuse.{op}: a model-dtype `x` is quantized here (groups of `group_size`); "
                             "`x_scales` must be None")
        V.check_activation(op, "x", x)
        if group_size not in GROUP_SIZES or k % group_size:
            raise ValueError(f"fxfuse.{op}: `group_size` must be one of {list(GROUP_SIZES)} and divide the last dim "
                             f"of `x` ({k}), got {group_size}")
        validate_block_fp8_weight(x, w_q, w_scales, bias, out_dtype, op=op)
    n = w_q.shape[0]
    if out_group_size:
        width = n // 2 if epilogue == "silu_and_mul" else n
        if out_group_size not in GROUP_SIZES or width % out_group_size:
            raise ValueError(f"fxfuse.{op}: `out_group_size` must be 0 or one of {list(GROUP_SIZES)} dividing the "
                             f"epilogue's width ({width}), got {out_group_size}")
    _validate_epilogue(op, x, n, out_dtype, bias, epilogue, residual, norm_weight, eps, bool(out_group_size))


# --------------------------------------------------------------------------- fakes


def _fake_outputs(x, n, out_dtype, epilogue, residual, quantized, scales):
    lead = tuple(x.shape[:-1])
    if epilogue == "none":
        return [x.new_empty((*lead, n), dtype=out_dtype)]
    width = n // 2 if epilogue == "silu_and_mul" else n
    first = [x.new_empty((*lead, width), dtype=FP8_DTYPE if quantized else out_dtype)]
    if scales is not None:
        first.append(scales(width))
    return first + ([residual.new_empty(residual.shape)] if epilogue == "fused_add_rms_norm" else [])


def _fp8_fake(x, x_scale, w_q, w_scale, bias, out_dtype, scale_ub, epilogue, residual, norm_weight, eps, out_scale):
    return _fake_outputs(x, w_q.shape[0], out_dtype, epilogue, residual, out_scale is not None, None)


def _block_fake(x, x_scales, w_q, w_scales, bias, out_dtype, group_size, epilogue, residual, norm_weight, eps,
                out_group_size, column_major_scales):
    scales = (lambda width: group_scales_empty(x, width, out_group_size, column_major_scales)) \
        if out_group_size else None
    return _fake_outputs(x, w_q.shape[0], out_dtype, epilogue, residual, bool(out_group_size), scales)


# --------------------------------------------------------------------------- ops


@define_op("fp8_linear_fused", fake=_fp8_fake, validate=validate_fp8_linear_fused)
def fp8_linear_fused(
    x: torch.Tensor,
    x_scale: Optional[torch.Tensor],
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
    scale_ub: Optional[torch.Tensor] = None,
    epilogue: str = "none",
    residual: Optional[torch.Tensor] = None,
    norm_weight: Optional[torch.Tensor] = None,
    eps: float = 0.0,
    out_scale: Optional[torch.Tensor] = None,
) -> list[torch.Tensor]:
    """``fp8_linear`` with the activation's quant before it and its consumer after it, in
    one op (module docstring): returns the outputs of the chain's last op as a list.

    >>> out, = torch.ops.fxfuse.fp8_linear_fused(x_bf16, s, w_q, w_s)            # static quant -> linear
    >>> q, = torch.ops.fxfuse.fp8_linear_fused(x_q, s, w_gu, w_s, epilogue="silu_and_mul", out_scale=s2)
    >>> q, r_out = torch.ops.fxfuse.fp8_linear_fused(a_q, s, w_o, w_s, epilogue="fused_add_rms_norm",
    ...                                              residual=r, norm_weight=nw, eps=1e-5, out_scale=s3)
    """
    from ..kernels.small_gemm_config import default_config, default_fused_config, fused_key

    prologue, tail = fp8_variant(x, x_scale, epilogue, out_scale)
    key = fused_key(prologue, "fp8_linear", tail) if prologue or tail else "fp8_linear"
    n, k = w_q.shape
    m = x.numel() // k if k else 0
    kind = {"none": None, "silu_and_mul": "silu", "fused_add_rms_norm": "rows"}[epilogue]

    def default():
        from ..kernels import num_sms

        sms = num_sms(x.device)
        return default_config(m, n, k, None, sms) if kind is None else default_fused_config(kind, m, n, k, None, None,
                                                                                              sms)

    config = small_gemm_config(key, x, w_q, default=default)
    if config is not None:
        from ..kernels.small_gemm import small_fp8_linear_fused

        return small_fp8_linear_fused(x, x_scale, w_q, w_scale, bias, out_dtype, scale_ub=scale_ub, epilogue=epilogue,
                                      residual=residual, norm_weight=norm_weight, eps=eps, out_scale=out_scale,
                                      config=config)
    # The chain it stands for, each op dispatching as it does: kernels and cuBLAS on CUDA,
    # native functions elsewhere (the reference, bit for bit).
    if x.dtype == FP8_DTYPE:
        x_q, xs = x, x_scale
    elif x_scale is not None:
        x_q, xs = _fx.static_scaled_fp8_quant(x, x_scale), x_scale
    else:
        x_q, xs = _fx.dynamic_per_token_fp8_quant(x, scale_ub)
    out = _fx.fp8_linear(x_q, w_q, xs, w_scale, bias, out_dtype)
    if epilogue == "none":
        return [out]
    if epilogue == "silu_and_mul":
        return [_fx.silu_and_mul(out) if out_scale is None else _fx.silu_and_mul_static_fp8_quant(out, out_scale)]
    if out_scale is None:
        return list(_fx.fused_add_rms_norm(out, residual, norm_weight, eps))
    return list(_fx.fused_add_rms_norm_static_fp8_quant(out, residual, norm_weight, out_scale, eps))


@define_op("block_fp8_linear_fused", fake=_block_fake, validate=validate_block_fp8_linear_fused)
def block_fp8_linear_fused(
    x: torch.Tensor,
    x_scales: Optional[torch.Tensor],
    w_q: torch.Tensor,
    w_scales: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
    group_size: int = 128,
    epilogue: str = "none",
    residual: Optional[torch.Tensor] = None,
    norm_weight: Optional[torch.Tensor] = None,
    eps: float = 0.0,
    out_group_size: int = 0,
    column_major_scales: bool = False,
) -> list[torch.Tensor]:
    """``block_fp8_linear`` with the activation's group quant before it and its consumer
    after it, in one op (module docstring): returns the outputs of the chain's last op.

    >>> out, = torch.ops.fxfuse.block_fp8_linear_fused(attn, None, w_q, w_s, group_size=128)
    >>> q, s, r_out = torch.ops.fxfuse.block_fp8_linear_fused(
    ...     x_q, x_s, w_q, w_s, epilogue="fused_add_rms_norm", residual=r, norm_weight=nw, eps=1e-5,
    ...     out_group_size=128, column_major_scales=True)
    """
    from ..kernels.small_gemm_config import default_config, default_fused_config, fused_key

    prologue, tail = block_variant(x, epilogue, out_group_size)
    key = fused_key(prologue, "block_fp8_linear", tail) if prologue or tail else "block_fp8_linear"
    n, k = w_q.shape
    m = x.numel() // k if k else 0
    if x.dtype == FP8_DTYPE:
        group_size = k // x_scales.shape[-1]
    kind = {"none": None, "silu_and_mul": "silu", "fused_add_rms_norm": "rows"}[epilogue]

    def default():
        from ..kernels import num_sms

        sms = num_sms(x.device)
        if kind is None:
            return default_config(m, n, k, group_size, sms)
        return default_fused_config(kind, m, n, k, group_size, out_group_size or None, sms)

    config = small_gemm_config(key, x, w_q, group_k=group_size, default=default)
    if config is not None:
        from ..kernels.small_gemm import small_block_fp8_linear_fused

        return small_block_fp8_linear_fused(
            x, x_scales, w_q, w_scales, bias, out_dtype, group_size=group_size, epilogue=epilogue, residual=residual,
            norm_weight=norm_weight, eps=eps, out_group_size=out_group_size, column_major_scales=column_major_scales,
            config=config)
    if x.dtype == FP8_DTYPE:
        x_q, xs = x, x_scales
    else:
        x_q, xs = _fx.group_fp8_quant(x, group_size, True)  # the layout the block GEMMs read
    out = _fx.block_fp8_linear(x_q, xs, w_q, w_scales, bias, out_dtype)
    if epilogue == "none":
        return [out]
    if epilogue == "silu_and_mul":
        if not out_group_size:
            return [_fx.silu_and_mul(out)]
        return list(_fx.silu_and_mul_group_fp8_quant(out, out_group_size, column_major_scales))
    if not out_group_size:
        return list(_fx.fused_add_rms_norm(out, residual, norm_weight, eps))
    return list(_fx.fused_add_rms_norm_group_fp8_quant(out, residual, norm_weight, eps, out_group_size,
                                                       column_major_scales))
