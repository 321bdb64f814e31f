"""Scaled FP8 matrix multiply: ``fxfuse::fp8_linear``.

``out = (x_q.float() * x_scale) @ (w_q.float() * w_scale).T (+ bias)``, cast to
``out_dtype``. On CUDA devices of compute capability 8.9 or newer the product runs
through fxfuse's small-batch FP8 GEMM (`fxfuse.kernels.small_gemm`) where the device's
measured table says it beats cuBLAS at this token count (see `small_gemm_config`), else
``torch._scaled_mm`` (FP8 tensor cores, fp32 accumulation) whenever its shape rules
allow; everywhere else, and for shapes it rejects, the float reference below runs.
"""

import functools
from typing import Optional

import torch

from ..kernels import cuda_capability
from . import _validate as V
from ._dispatch import use_kernels

OP = "fp8_linear"

# --------------------------------------------------------------------------- native math


def fp8_linear_native(
    x_q: torch.Tensor,
    w_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Reference FP8 linear, dequantizing both operands to fp32.

    ``x_q`` is ``[..., in]``, ``w_q`` is ``[out, in]`` (like ``nn.Linear.weight``);
    ``x_scale`` is one element or ``x_q.shape[:-1] + (1,)``; ``w_scale`` is one element.
    The output is ``x_q.shape[:-1] + (out,)`` in ``out_dtype``.
    """
    x = x_q.float() * x_scale.float()
    w = w_q.float() * w_scale.float().reshape(())
    out = torch.matmul(x, w.t())
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


# --------------------------------------------------------------------------- validators


def _is_per_tensor(x_scale: torch.Tensor) -> bool:
    # Only static shapes are read here: a per-token scale has x_q.dim() dims, a
    # per-tensor one at most 1, so the symbolic token count is never compared with 1.
    return x_scale.dim() <= 1 and x_scale.numel() == 1


def validate_fp8_linear(
    x_q: torch.Tensor,
    w_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
    op: str = OP,
) -> None:
    """Checks for ``fp8_linear`` arguments; ``op`` names the op in messages."""
    V.check_fp8(op, "x_q", x_q)
    V.check_min_dim(op, "x_q", x_q, 1)
    V.check_contiguous(op, "x_q", x_q)
    validate_fp8_weight(x_q, w_q, w_scale, bias, out_dtype, op, x_name="x_q")

    V.check_tensor(op, "x_scale", x_scale)
    if x_scale.dtype != torch.float32:
        raise ValueError(f"fxfuse.{op}: `x_scale` must have dtype torch.float32, got {x_scale.dtype}")
    per_token_shape = (*x_q.shape[:-1], 1)
    if not _is_per_tensor(x_scale) and tuple(x_scale.shape) != per_token_shape:
        raise ValueError(
            f"fxfuse.{op}: `x_scale` must have one element (shape [] or [1], per-tensor) or shape "
            f"{list(per_token_shape)} (per-token), got {tuple(x_scale.shape)}"
        )
    V.check_same_device(op, "x_scale", x_scale, "x_q", x_q)
    # The per-tensor scales are static multipliers the caller supplies: 0, a negative,
    # NaN or inf would zero, negate or poison the whole output without a word. A
    # per-token `x_scale` is not checked: the dynamic quant derives it from the
    # activation (never below its positive floor), so a non-finite entry is that row's
    # own inf/NaN propagating, as through every other op, and checking it would cost a
    # reduction over the tokens per call.
    if _is_per_tensor(x_scale):
        V.check_scale_value(op, "x_scale", x_scale)


def validate_fp8_weight(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
    op: str = OP,
    x_name: str = "x",
) -> None:
    """The weight side of ``fp8_linear``'s checks (``w_q``, ``w_scale``, ``bias``,
    ``out_dtype``, and ``w_q``'s inner dim against the last dim of ``x``, whatever its
    dtype), for ops that take the activation in another form; ``op`` names the op."""
    V.check_fp8(op, "w_q", w_q)
    if w_q.dim() != 2:
        raise ValueError(f"fxfuse.{op}: `w_q` must be 2-D [out, in], got shape {tuple(w_q.shape)}")
    V.check_contiguous(op, "w_q", w_q)
    V.check_same_device(op, "w_q", w_q, x_name, x)
    if w_q.shape[1] != x.shape[-1]:
        raise ValueError(
            f"fxfuse.{op}: inner dims disagree: `{x_name}` has shape {tuple(x.shape)} and `w_q` "
            f"has shape {tuple(w_q.shape)}; w_q.shape[1] must equal {x_name}.shape[-1]"
        )
    V.check_scalar_scale(op, "w_scale", w_scale, x_name, x)
    V.check_scale_value(op, "w_scale", w_scale)
    V.check_out_dtype(op, "out_dtype", out_dtype)

    if bias is not None:
        V.check_tensor(op, "bias", bias)
        if bias.dtype != out_dtype:
            raise ValueError(
                f"fxfuse.{op}: `bias` must have dtype {out_dtype} (the `out_dtype`), got {bias.dtype}"
            )
        if bias.dim() != 1 or bias.shape[0] != w_q.shape[0]:
            raise ValueError(
                f"fxfuse.{op}: `bias` must have shape [{w_q.shape[0]}] (w_q.shape[0]), got {tuple(bias.shape)}"
            )
        V.check_contiguous(op, "bias", bias)
        V.check_same_device(op, "bias", bias, x_name, x)


def fp8_linear_out_shape(x_q: torch.Tensor, w_q: torch.Tensor) -> tuple:
    """Output shape of ``fp8_linear``: ``x_q.shape[:-1] + (w_q.shape[0],)``."""
    return (*x_q.shape[:-1], w_q.shape[0])


# --------------------------------------------------------------------------- small-batch kernel


@functools.cache
def _cuda_device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def small_gemm_config(op: str, x_q: torch.Tensor, w_q: torch.Tensor, group_k: Optional[int] = None,
                      default=None):
    """The launch config of the small-batch FP8 GEMM where ``op`` (``"fp8_linear"``,
    ``"block_fp8_linear"`` or a fused form's `fused_key`) should run it for these (valid)
    arguments, else None. ``default`` makes the config where the table measured none
    (`small_gemm_config.choose`).

    It runs on CUDA with kernels on (`fxfuse.ops._dispatch.use_kernels`), FP8 tensor cores
    (sm89+), ``K`` a multiple of 16 (aligned weight rows), and at most the token count the
    device's measured table (`fxfuse.kernels.small_gemm_config.choose`) gives for this
    weight shape. A device without an entry never runs it: on CPU the native reference
    runs, on CUDA the op's other paths, as before the kernel existed.

    >>> small_gemm_config("fp8_linear", x_q, w_q) is None  # on CPU
    True
    """
    if not use_kernels(x_q) or cuda_capability(x_q.device) < (8, 9):
        return None
    from ..kernels import num_sms
    from ..kernels.small_gemm_config import MAX_TOKENS, choose, load_choices

    n, k = w_q.shape
    m = x_q.numel() // k if k else 0
    if not 1 <= m <= MAX_TOKENS or k % 16 or n == 0:
        return None
    index = x_q.device.index if x_q.device.index is not None else torch.cuda.current_device()
    return choose(load_choices(), _cuda_device_name(index), op, m, n, k, group_k, num_sms(x_q.device), default)


# --------------------------------------------------------------------------- torch._scaled_mm path


def _scaled_mm_applies(x_q: torch.Tensor, w_q: torch.Tensor, x_scale: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether ``torch._scaled_mm`` takes this problem: FP8 tensor cores (sm89+), in/out
    dims divisible by 16, and for per-token scales bf16 output unless on sm90+ (seen
    working for bf16, fp16 and fp32 outputs on an H100 with torch 2.11)."""
    if x_q.device.type != "cuda":
        return False
    capability = cuda_capability(x_q.device)
    if capability < (8, 9):
        return False
    n, k = w_q.shape
    if k % 16 != 0 or n % 16 != 0 or x_q.numel() == 0:
        return False
    return _is_per_tensor(x_scale) or out_dtype == torch.bfloat16 or capability >= (9, 0)


def _fp8_linear_scaled_mm(
    x_q: torch.Tensor,
    w_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    n, k = w_q.shape
    x2 = x_q.reshape(-1, k)
    if _is_per_tensor(x_scale):
        scale_a = x_scale.reshape(())
        scale_b = w_scale.reshape(())
    else:
        scale_a = x_scale.reshape(-1, 1).contiguous()
        scale_b = w_scale.reshape(1, 1).expand(1, n).contiguous()
    # _scaled_mm refuses a bias with an fp32 output; add it afterwards in that case.
    fused_bias = bias if out_dtype != torch.float32 else None
    out = torch._scaled_mm(
        x2, w_q.t(), scale_a=scale_a, scale_b=scale_b, bias=fused_bias, out_dtype=out_dtype
    )
    if bias is not None and fused_bias is None:
        out = out + bias
    return out.reshape(fp8_linear_out_shape(x_q, w_q))


def fp8_linear_path(
    x_q: torch.Tensor, w_q: torch.Tensor, x_scale: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> str:
    """Which implementation ``fp8_linear`` runs for these (valid) arguments here:
    ``"small_gemm"`` (fxfuse's small-batch kernel), ``"scaled_mm"`` or ``"native"``.

    >>> fp8_linear_path(x_q, w_q, x_scale)  # on CPU
    'native'
    """
    if small_gemm_config(OP, x_q, w_q) is not None:
        return "small_gemm"
    if _scaled_mm_applies(x_q, w_q, x_scale, out_dtype):
        return "scaled_mm"
    return "native"


# --------------------------------------------------------------------------- op


@torch.library.custom_op("fxfuse::fp8_linear", mutates_args=())
def fp8_linear(
    x_q: torch.Tensor,
    w_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """FP8 linear layer: ``(x_q * x_scale) @ (w_q * w_scale).T + bias`` in ``out_dtype``.

    ``x_q`` (``[..., in]``) and ``w_q`` (``[out, in]``) are float8_e4m3fn and contiguous;
    ``x_scale`` is fp32, per-tensor (one element) or per-token (``x_q.shape[:-1] + (1,)``);
    ``w_scale`` is fp32 with one element; per-tensor scales must be positive and finite
    (checked, see ``docs/kernels.md``, "Values"); ``bias`` (optional) is ``[out]`` in
    ``out_dtype``.

    >>> x_q, x_scale = torch.ops.fxfuse.dynamic_per_token_fp8_quant(x)
    >>> y = torch.ops.fxfuse.fp8_linear(x_q, w_q, x_scale, w_scale, None, torch.bfloat16)
    """
    validate_fp8_linear(x_q, w_q, x_scale, w_scale, bias, out_dtype)
    # Device kernels dispatch here; the native function is the reference everywhere else.
    config = small_gemm_config(OP, x_q, w_q)
    if config is not None:
        from ..kernels.small_gemm import small_fp8_linear

        return small_fp8_linear(x_q, w_q, x_scale, w_scale, bias, out_dtype, config)
    if _scaled_mm_applies(x_q, w_q, x_scale, out_dtype):
        return _fp8_linear_scaled_mm(x_q, w_q, x_scale, w_scale, bias, out_dtype)
    return fp8_linear_native(x_q, w_q, x_scale, w_scale, bias, out_dtype)


@fp8_linear.register_fake
def _(
    x_q: torch.Tensor,
    w_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    validate_fp8_linear(x_q, w_q, x_scale, w_scale, bias, out_dtype)
    return x_q.new_empty(fp8_linear_out_shape(x_q, w_q), dtype=out_dtype)
