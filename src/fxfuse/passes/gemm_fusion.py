"""``gemm_fusion``: fold what surrounds an FP8 linear at decode into the small-batch GEMM.

At decode a linear layer streams its weight, and the ops around it (the activation's
quant before, SiLU-and-mul or the residual add + RMSNorm + quant after) are separate
kernels of a few microseconds each that move a few KiB. This pass replaces such a
chain by one ``fp8_linear_fused`` / ``block_fp8_linear_fused`` call
(`fxfuse.ops.fused_linear`), which the small-batch GEMM runs as its prologue and
epilogue (`fxfuse.kernels.small_gemm`):

==========================================  ==========================================================
chain (after the other fusions)             where the reference model has it
==========================================  ==========================================================
static FP8 quant -> ``fp8_linear``          ``o_proj`` when attention does not write FP8 itself
dynamic per-token quant -> ``fp8_linear``   (models quantizing activations per token)
``fp8_linear`` -> SiLU-and-mul (+ FP8)      ``gate_up_proj`` -> ``down_proj``'s input
``fp8_linear`` -> add + RMSNorm (+ FP8)     ``o_proj``, ``down_proj`` -> the next norm (the final one too)
static quant -> ``fp8_linear`` -> add ...   ``o_proj`` of the two rows above
group quant -> ``block_fp8_linear``         ``o_proj`` of ``fp8-block`` (no attention writes group FP8)
``block_fp8_linear`` -> SiLU-and-mul + ..   ``gate_up_proj`` of ``fp8-block``
``block_fp8_linear`` -> add + RMSNorm ...   ``o_proj``, ``down_proj`` of ``fp8-block``
group quant -> ``block_fp8_linear`` -> ...  ``o_proj`` of ``fp8-block``
==========================================  ==========================================================

**A choice, made by measurement.** Whether the fused GEMM beats the unfused chain is a
property of the device, measured by ``benchmarks/gemm_fusion_sweep.py`` into the
small-GEMM dispatch table (``small_gemm_choices.json``, one entry per fused form,
`fxfuse.kernels.small_gemm_config.fused_key`). A rewrite matches only where the graph's
device has an entry for its form (with a static token count: at most the entry's
limit; ``$FXFUSE_SMALL_GEMM_MAX_TOKENS`` stands in for every CUDA device's limit, for
measuring before a table exists). Where there is none (the CPU, and every GPU until it is
measured) the check declines and the site is not a near miss (``report_misses = False``):
nothing fails to fuse, there is nothing to fuse yet. A symbolic token count (one graph for
every batch size) is fused wherever the table has an entry: the fused op runs the unfused
chain itself at token counts past the entry's limit, so prefill loses nothing.

Every rewrite anchors at the GEMM, so at one linear the longest chain wins (quant +
GEMM + norm over quant + GEMM); out dtypes bf16 and fp16 are one instance each (the
GEMM's ``out_dtype`` is a constant of the pattern).
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import torch

from ..fusion_pass import FusionPass
from ..kernels.small_gemm_config import MAX_TOKENS_ENV, fused_key, load_choices, token_limit
from ..rewrite import Rewrite, TensorSpec
from ._common import FP8, TOKENS, val
from .native_lowering import device_name, present_devices

fx = torch.ops.fxfuse

# Example sizes: every width distinct, so the traces hold no accidental size equalities.
_K, _N, _GROUP_K = 256, 384, 128
#: The GEMM output dtypes the rewrites are registered for (one instance each).
OUT_DTYPES = (torch.bfloat16, torch.float16)


def _act(width: int = _K, dtype: torch.dtype = torch.bfloat16) -> TensorSpec:
    return TensorSpec((TOKENS, width), dtype)


def _scale() -> TensorSpec:
    return TensorSpec((1,), torch.float32)


def _fp8_weight(n: int = _N) -> TensorSpec:
    return TensorSpec((n, _K), FP8)


def _block_scales(n: int = _N) -> TensorSpec:
    return TensorSpec((-(-n // 128), -(-_K // 128)), torch.float32)


class _GemmFusion(Rewrite):
    """A chain around one FP8 linear, replaced by its fused op where the device's table
    says the fused small GEMM wins. Subclasses set ``OP``, ``PROLOGUE``, ``EPILOGUE``
    (op names, `fused_key`'s), ``X`` (the activation's argument name) and the methods."""

    OP = "fp8_linear"
    PROLOGUE = ""
    EPILOGUE = ""
    X = "x"
    # Declining is the table's decision (the unfused chain is faster or unmeasured there),
    # not a fusion that failed.
    report_misses = False
    # The prologue quant takes any model dtype; the pattern is traced with bf16.
    free_dtypes: tuple[str, ...] = ()

    def __init__(self, dtype: torch.dtype = torch.bfloat16, table: Optional[dict[str, Any]] = None) -> None:
        self.dtype = dtype
        #: {device name: {fused key: entry}}: this form's slice of the dispatch table.
        self.table = table or {}

    @property
    def anchor(self):
        return getattr(fx, self.OP).default

    @property
    def name(self) -> str:
        """The class name for bf16, ``ClassName[float16]`` for another dtype (not the
        default ``ClassName(dtype=..., table=...)``, which would spell out the table)."""
        cls = type(self).__name__
        return cls if self.dtype == torch.bfloat16 else f"{cls}[{str(self.dtype).rsplit('.', 1)[-1]}]"

    @property
    def key(self) -> str:
        return fused_key(self.PROLOGUE, self.OP, self.EPILOGUE)

    def cache_state(self):
        """The devices present (``check`` looks the graph's device up by name) and the
        token-limit override ``check`` reads from the environment."""
        return present_devices(), os.environ.get(MAX_TOKENS_ENV, "").strip()

    def check(self, match) -> bool:
        x = val(match, self.X)
        w = val(match, "w")
        n, k = (int(d) for d in w.shape)
        if k % 16:  # the kernel reads weight rows 16 bytes at a time
            return False
        dev = device_name(x.device)
        if dev not in self.table and x.device.type != "cuda":
            return False  # the override is for CUDA devices; the CPU has no kernels
        limit = token_limit({"devices": self.table}, dev, self.key, n, k)
        if limit < 1:
            return False
        tokens = math.prod(x.shape[:-1])
        # A symbolic count serves every batch size: the fused op falls back past the limit.
        return not isinstance(tokens, int) or tokens <= limit


# --------------------------------------------------------------------------- per-tensor FP8 (fp8_linear)


class StaticQuantLinear(_GemmFusion):
    """fp8_linear(static_fp8_quant(x, s), w, s, ws)  ->  fp8_linear_fused(x, s, w, ws)"""

    PROLOGUE = "static_scaled_fp8_quant"
    free_dtypes = ("x",)

    def pattern(self, x, s, w, ws, bias):
        return fx.fp8_linear(fx.static_scaled_fp8_quant(x, s), w, s, ws, bias, self.dtype)

    def replacement(self, x, s, w, ws, bias):
        return fx.fp8_linear_fused(x, s, w, ws, bias, self.dtype)[0]

    def example_inputs(self):
        return [_act(), _scale(), _fp8_weight(), _scale(), TensorSpec((_N,), self.dtype, optional=True)]


class DynamicQuantLinear(_GemmFusion):
    """q, s = dynamic_per_token_fp8_quant(x, ub); fp8_linear(q, w, s, ws)  ->  fp8_linear_fused(x, None, w, ws)"""

    PROLOGUE = "dynamic_per_token_fp8_quant"
    free_dtypes = ("x",)

    def pattern(self, x, w, ws, bias, ub):
        q, s = fx.dynamic_per_token_fp8_quant(x, ub)
        return fx.fp8_linear(q, w, s, ws, bias, self.dtype)

    def replacement(self, x, w, ws, bias, ub):
        return fx.fp8_linear_fused(x, None, w, ws, bias, self.dtype, ub)[0]

    def example_inputs(self):
        return [_act(), _fp8_weight(), _scale(), TensorSpec((_N,), self.dtype, optional=True),
                TensorSpec((1,), torch.float32, optional=True)]


class LinearSiluMulStaticQuant(_GemmFusion):
    """silu_and_mul_static_fp8_quant(fp8_linear(x_q, w, ...), s)  ->  one fp8_linear_fused"""

    EPILOGUE = "silu_and_mul_static_fp8_quant"
    X = "x_q"

    def pattern(self, x_q, x_s, w, ws, s):
        return fx.silu_and_mul_static_fp8_quant(fx.fp8_linear(x_q, w, x_s, ws, None, self.dtype), s)

    def replacement(self, x_q, x_s, w, ws, s):
        return fx.fp8_linear_fused(x_q, x_s, w, ws, None, self.dtype, epilogue="silu_and_mul", out_scale=s)[0]

    def example_inputs(self):
        return [_act(dtype=FP8), _scale(), _fp8_weight(), _scale(), _scale()]


class LinearSiluMul(_GemmFusion):
    """silu_and_mul(fp8_linear(x_q, w, ...))  ->  one fp8_linear_fused"""

    EPILOGUE = "silu_and_mul"
    X = "x_q"

    def pattern(self, x_q, x_s, w, ws):
        return fx.silu_and_mul(fx.fp8_linear(x_q, w, x_s, ws, None, self.dtype))

    def replacement(self, x_q, x_s, w, ws):
        return fx.fp8_linear_fused(x_q, x_s, w, ws, None, self.dtype, epilogue="silu_and_mul")[0]

    def example_inputs(self):
        return [_act(dtype=FP8), _scale(), _fp8_weight(), _scale()]


class LinearAddRmsNormStaticQuant(_GemmFusion):
    """fused_add_rms_norm_static_fp8_quant(fp8_linear(x_q, w, ...), r, nw, s, eps)  ->  one fp8_linear_fused"""

    EPILOGUE = "fused_add_rms_norm_static_fp8_quant"
    X = "x_q"

    def pattern(self, x_q, x_s, w, ws, r, nw, s, eps):
        return fx.fused_add_rms_norm_static_fp8_quant(fx.fp8_linear(x_q, w, x_s, ws, None, self.dtype), r, nw, s, eps)

    def replacement(self, x_q, x_s, w, ws, r, nw, s, eps):
        q, r_out = fx.fp8_linear_fused(x_q, x_s, w, ws, None, self.dtype, epilogue="fused_add_rms_norm", residual=r,
                                       norm_weight=nw, eps=eps, out_scale=s)
        return q, r_out

    def example_inputs(self):
        return [_act(dtype=FP8), _scale(), _fp8_weight(), _scale(), _act(_N, self.dtype),
                TensorSpec((_N,), self.dtype), _scale(), 1e-6]


class LinearAddRmsNorm(_GemmFusion):
    """fused_add_rms_norm(fp8_linear(x_q, w, ...), r, nw, eps)  ->  one fp8_linear_fused"""

    EPILOGUE = "fused_add_rms_norm"
    X = "x_q"

    def pattern(self, x_q, x_s, w, ws, r, nw, eps):
        return fx.fused_add_rms_norm(fx.fp8_linear(x_q, w, x_s, ws, None, self.dtype), r, nw, eps)

    def replacement(self, x_q, x_s, w, ws, r, nw, eps):
        y, r_out = fx.fp8_linear_fused(x_q, x_s, w, ws, None, self.dtype, epilogue="fused_add_rms_norm", residual=r,
                                       norm_weight=nw, eps=eps)
        return y, r_out

    def example_inputs(self):
        return [_act(dtype=FP8), _scale(), _fp8_weight(), _scale(), _act(_N, self.dtype),
                TensorSpec((_N,), self.dtype), 1e-6]


class LinearAddRmsNormLast(LinearAddRmsNorm):
    """fused_add_rms_norm(fp8_linear(x_q, w, ...), r, nw, eps)[0], its residual sum unused
    (the final norm, before the LM head)  ->  one fp8_linear_fused"""

    def pattern(self, x_q, x_s, w, ws, r, nw, eps):
        return fx.fused_add_rms_norm(fx.fp8_linear(x_q, w, x_s, ws, None, self.dtype), r, nw, eps)[0]

    def replacement(self, x_q, x_s, w, ws, r, nw, eps):
        return fx.fp8_linear_fused(x_q, x_s, w, ws, None, self.dtype, epilogue="fused_add_rms_norm", residual=r,
                                   norm_weight=nw, eps=eps)[0]


class StaticQuantLinearAddRmsNormStaticQuant(_GemmFusion):
    """The static quant before and the residual norm + quant after one fp8_linear  ->  one fp8_linear_fused"""

    PROLOGUE = "static_scaled_fp8_quant"
    EPILOGUE = "fused_add_rms_norm_static_fp8_quant"
    free_dtypes = ("x",)

    def pattern(self, x, s_in, w, ws, r, nw, s, eps):
        out = fx.fp8_linear(fx.static_scaled_fp8_quant(x, s_in), w, s_in, ws, None, self.dtype)
        return fx.fused_add_rms_norm_static_fp8_quant(out, r, nw, s, eps)

    def replacement(self, x, s_in, w, ws, r, nw, s, eps):
        q, r_out = fx.fp8_linear_fused(x, s_in, w, ws, None, self.dtype, epilogue="fused_add_rms_norm", residual=r,
                                       norm_weight=nw, eps=eps, out_scale=s)
        return q, r_out

    def example_inputs(self):
        return [_act(), _scale(), _fp8_weight(), _scale(), _act(_N, self.dtype), TensorSpec((_N,), self.dtype),
                _scale(), 1e-6]


# --------------------------------------------------------------------------- block-scaled FP8 (block_fp8_linear)
#
# Int wildcards need distinct samples (each literal equal to a sample becomes that
# variable): the input groups are sampled at 128, the output groups at 64; both divide
# the example widths. Bool wildcards likewise: the input layout True, the output False.


class GroupQuantBlockLinear(_GemmFusion):
    """block_fp8_linear(*group_fp8_quant(x, g, cm), w, ws)  ->  block_fp8_linear_fused(x, None, w, ws, group_size=g)"""

    OP = "block_fp8_linear"
    PROLOGUE = "group_fp8_quant"
    free_dtypes = ("x",)

    def pattern(self, x, w, ws, bias, group_size, cm):
        q, s = fx.group_fp8_quant(x, group_size, cm)
        return fx.block_fp8_linear(q, s, w, ws, bias, self.dtype)

    def replacement(self, x, w, ws, bias, group_size, cm):
        # The scales' layout (cm) is the chain's own business: the fused op never writes them.
        return fx.block_fp8_linear_fused(x, None, w, ws, bias, self.dtype, group_size)[0]

    def example_inputs(self):
        return [_act(), _fp8_weight(), _block_scales(), TensorSpec((_N,), self.dtype, optional=True), _GROUP_K, True]


class BlockLinearSiluMulGroupQuant(_GemmFusion):
    """silu_and_mul_group_fp8_quant(block_fp8_linear(x_q, x_s, w, ws), g, cm)  ->  one block_fp8_linear_fused"""

    OP = "block_fp8_linear"
    EPILOGUE = "silu_and_mul_group_fp8_quant"
    X = "x_q"

    def pattern(self, x_q, x_s, w, ws, group_size, cm):
        return fx.silu_and_mul_group_fp8_quant(fx.block_fp8_linear(x_q, x_s, w, ws, None, self.dtype), group_size, cm)

    def replacement(self, x_q, x_s, w, ws, group_size, cm):
        q, s = fx.block_fp8_linear_fused(x_q, x_s, w, ws, None, self.dtype, epilogue="silu_and_mul",
                                         out_group_size=group_size, column_major_scales=cm)
        return q, s

    def example_inputs(self):
        return [_act(dtype=FP8), TensorSpec((TOKENS, _K // _GROUP_K), torch.float32), _fp8_weight(),
                _block_scales(), 64, False]


class BlockLinearAddRmsNormGroupQuant(_GemmFusion):
    """fused_add_rms_norm_group_fp8_quant(block_fp8_linear(x_q, x_s, w, ws), r, nw, eps, g, cm)  ->  one op"""

    OP = "block_fp8_linear"
    EPILOGUE = "fused_add_rms_norm_group_fp8_quant"
    X = "x_q"

    def pattern(self, x_q, x_s, w, ws, r, nw, eps, group_size, cm):
        out = fx.block_fp8_linear(x_q, x_s, w, ws, None, self.dtype)
        return fx.fused_add_rms_norm_group_fp8_quant(out, r, nw, eps, group_size, cm)

    def replacement(self, x_q, x_s, w, ws, r, nw, eps, group_size, cm):
        q, s, r_out = fx.block_fp8_linear_fused(x_q, x_s, w, ws, None, self.dtype, epilogue="fused_add_rms_norm",
                                                residual=r, norm_weight=nw, eps=eps, out_group_size=group_size,
                                                column_major_scales=cm)
        return q, s, r_out

    def example_inputs(self):
        return [_act(dtype=FP8), TensorSpec((TOKENS, _K // _GROUP_K), torch.float32), _fp8_weight(), _block_scales(),
                _act(_N, self.dtype), TensorSpec((_N,), self.dtype), 1e-6, 64, False]


class BlockLinearAddRmsNorm(_GemmFusion):
    """fused_add_rms_norm(block_fp8_linear(x_q, x_s, w, ws), r, nw, eps)  ->  one block_fp8_linear_fused"""

    OP = "block_fp8_linear"
    EPILOGUE = "fused_add_rms_norm"
    X = "x_q"

    def pattern(self, x_q, x_s, w, ws, r, nw, eps):
        return fx.fused_add_rms_norm(fx.block_fp8_linear(x_q, x_s, w, ws, None, self.dtype), r, nw, eps)

    def replacement(self, x_q, x_s, w, ws, r, nw, eps):
        y, r_out = fx.block_fp8_linear_fused(x_q, x_s, w, ws, None, self.dtype, epilogue="fused_add_rms_norm",
                                             residual=r, norm_weight=nw, eps=eps)
        return y, r_out

    def example_inputs(self):
        return [_act(dtype=FP8), TensorSpec((TOKENS, _K // _GROUP_K), torch.float32), _fp8_weight(), _block_scales(),
                _act(_N, self.dtype), TensorSpec((_N,), self.dtype), 1e-6]


class BlockLinearAddRmsNormLast(BlockLinearAddRmsNorm):
    """fused_add_rms_norm(block_fp8_linear(x_q, x_s, w, ws), r, nw, eps)[0], its residual
    sum unused (the final norm)  ->  one block_fp8_linear_fused"""

    def pattern(self, x_q, x_s, w, ws, r, nw, eps):
        return fx.fused_add_rms_norm(fx.block_fp8_linear(x_q, x_s, w, ws, None, self.dtype), r, nw, eps)[0]

    def replacement(self, x_q, x_s, w, ws, r, nw, eps):
        return fx.block_fp8_linear_fused(x_q, x_s, w, ws, None, self.dtype, epilogue="fused_add_rms_norm", residual=r,
                                         norm_weight=nw, eps=eps)[0]


class GroupQuantBlockLinearAddRmsNormGroupQuant(_GemmFusion):
    """The group quant before and the residual norm + group quant after one block_fp8_linear  ->  one op"""

    OP = "block_fp8_linear"
    PROLOGUE = "group_fp8_quant"
    EPILOGUE = "fused_add_rms_norm_group_fp8_quant"
    free_dtypes = ("x",)

    def pattern(self, x, w, ws, r, nw, eps, group_in, cm_in, group_out, cm_out):
        q, s = fx.group_fp8_quant(x, group_in, cm_in)
        out = fx.block_fp8_linear(q, s, w, ws, None, self.dtype)
        return fx.fused_add_rms_norm_group_fp8_quant(out, r, nw, eps, group_out, cm_out)

    def replacement(self, x, w, ws, r, nw, eps, group_in, cm_in, group_out, cm_out):
        q, s, r_out = fx.block_fp8_linear_fused(x, None, w, ws, None, self.dtype, group_in, "fused_add_rms_norm", r, nw,
                                                eps, group_out, cm_out)
        return q, s, r_out

    def example_inputs(self):
        return [_act(), _fp8_weight(), _block_scales(), _act(_N, self.dtype), TensorSpec((_N,), self.dtype), 1e-6,
                _GROUP_K, True, 64, False]


#: Every rewrite class of the pass, in registration order (ties of chain length go to the first).
REWRITES = (
    StaticQuantLinearAddRmsNormStaticQuant, StaticQuantLinear, DynamicQuantLinear, LinearSiluMulStaticQuant,
    LinearSiluMul, LinearAddRmsNormStaticQuant, LinearAddRmsNorm, LinearAddRmsNormLast,
    GroupQuantBlockLinearAddRmsNormGroupQuant, GroupQuantBlockLinear, BlockLinearSiluMulGroupQuant,
    BlockLinearAddRmsNormGroupQuant, BlockLinearAddRmsNorm, BlockLinearAddRmsNormLast,
)


def gemm_fusion(choices: Optional[dict[str, Any]] = None) -> FusionPass:
    """The ``gemm_fusion`` pass for a small-GEMM dispatch table (default: the one the ops
    read, `fxfuse.kernels.small_gemm_config.load_choices`); each rewrite holds its form's
    entries for the devices this process has, so a new measurement changes the key.

    Example:
        >>> p = gemm_fusion({"devices": {"cpu": {"fp8_linear>silu_and_mul_static_fp8_quant": {"max_tokens": 64}}}})
        >>> p.rewrites[0].name
        'StaticQuantLinearAddRmsNormStaticQuant'
    """
    choices = load_choices() if choices is None else choices
    present = set(present_devices())
    rewrites = []
    for cls in REWRITES:
        key = fused_key(cls.PROLOGUE, cls.OP, cls.EPILOGUE)
        table = {dev: {key: ops[key]} for dev, ops in sorted(choices["devices"].items())
                 if dev in present and key in ops}
        rewrites += [cls(dtype, table) for dtype in OUT_DTYPES]
    return FusionPass("gemm_fusion", rewrites)
