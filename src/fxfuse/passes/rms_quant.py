"""``rms_quant_fusion``: RMSNorm (with or without the residual add), then FP8 quant:
static, dynamic per token, or per token group (block-scaled FP8); and Gemma's ``(1 + w)``
RMSNorm (fp32 or model-dtype weight), then static or dynamic-per-token FP8 quant."""

from __future__ import annotations

import torch

from ..fusion_pass import FusionPass
from ..rewrite import Rewrite
from ._common import (
    activation,
    is_fp32_scalar,
    same_model_dtype,
    scale,
    val,
    weight,
)

fx = torch.ops.fxfuse


class RmsNormStaticFp8Quant(Rewrite):
    """fp8(rms_norm(x) / s)  ->  rms_norm_static_fp8_quant"""

    def pattern(self, x, w, s, eps):
        return fx.static_scaled_fp8_quant(fx.rms_norm(x, w, eps), s)

    def replacement(self, x, w, s, eps):
        return fx.rms_norm_static_fp8_quant(x, w, s, eps)

    def example_inputs(self):
        return [activation(), weight(), scale(), 1e-6]

    def check(self, match):
        return same_model_dtype(val(match, "x"), val(match, "w")) and is_fp32_scalar(val(match, "s"))


class FusedAddRmsNormStaticFp8Quant(Rewrite):
    """r' = x + r;  fp8(rms_norm(r') / s)  ->  fused_add_rms_norm_static_fp8_quant"""

    def pattern(self, x, r, w, s, eps):
        y, r_out = fx.fused_add_rms_norm(x, r, w, eps)
        return fx.static_scaled_fp8_quant(y, s), r_out

    def replacement(self, x, r, w, s, eps):
        return fx.fused_add_rms_norm_static_fp8_quant(x, r, w, s, eps)

    def example_inputs(self):
        return [activation(), activation(), weight(), scale(), 1e-6]

    def check(self, match):
        return same_model_dtype(val(match, "x"), val(match, "r"), val(match, "w")) and is_fp32_scalar(val(match, "s"))


class RmsNormDynamicFp8Quant(Rewrite):
    """per-token fp8(rms_norm(x))  ->  rms_norm_dynamic_per_token_fp8_quant"""

    def pattern(self, x, w, eps):
        return fx.dynamic_per_token_fp8_quant(fx.rms_norm(x, w, eps))

    def replacement(self, x, w, eps):
        return fx.rms_norm_dynamic_per_token_fp8_quant(x, w, eps)

    def example_inputs(self):
        return [activation(), weight(), 1e-6]

    def check(self, match):
        return same_model_dtype(val(match, "x"), val(match, "w"))


class RmsNormDynamicFp8QuantUb(Rewrite):
    """per-token fp8(rms_norm(x)), amax capped at ub  ->  rms_norm_dynamic_per_token_fp8_quant"""

    def pattern(self, x, w, ub, eps):
        return fx.dynamic_per_token_fp8_quant(fx.rms_norm(x, w, eps), ub)

    def replacement(self, x, w, ub, eps):
        return fx.rms_norm_dynamic_per_token_fp8_quant(x, w, eps, ub)

    def example_inputs(self):
        return [activation(), weight(), scale(), 1e-6]

    def check(self, match):
        return same_model_dtype(val(match, "x"), val(match, "w")) and is_fp32_scalar(val(match, "ub"))


class FusedAddRmsNormDynamicFp8Quant(Rewrite):
    """r' = x + r;  per-token fp8(rms_norm(r'))  ->  fused_add_rms_norm_dynamic_per_token_fp8_quant"""

    def pattern(self, x, r, w, eps):
        y, r_out = fx.fused_add_rms_norm(x, r, w, eps)
        q, scales = fx.dynamic_per_token_fp8_quant(y)
        return q, scales, r_out

    def replacement(self, x, r, w, eps):
        return fx.fused_add_rms_norm_dynamic_per_token_fp8_quant(x, r, w, eps)

    def example_inputs(self):
        return [activation(), activation(), weight(), 1e-6]

    def check(self, match):
        return same_model_dtype(val(match, "x"), val(match, "r"), val(match, "w"))


class FusedAddRmsNormDynamicFp8QuantUb(Rewrite):
    """r' = x + r;  per-token fp8(rms_norm(r')), amax capped at ub  ->  the fused op"""

    def pattern(self, x, r, w, ub, eps):
        y, r_out = fx.fused_add_rms_norm(x, r, w, eps)
        q, scales = fx.dynamic_per_token_fp8_quant(y, ub)
        return q, scales, r_out

    def replacement(self, x, r, w, ub, eps):
        return fx.fused_add_rms_norm_dynamic_per_token_fp8_quant(x, r, w, eps, ub)

    def example_inputs(self):
        return [activation(), activation(), weight(), scale(), 1e-6]

    def check(self, match):
        return same_model_dtype(val(match, "x"), val(match, "r"), val(match, "w")) and is_fp32_scalar(val(match, "ub"))


# Group-quant examples: the sample group size (an int wildcard: one rewrite matches 64 and
# 128) must divide the example width, and no other literal of the traced pattern may equal it.
_GROUP_SAMPLE, _GROUP_WIDTH = 128, 256


class RmsNormGroupFp8Quant(Rewrite):
    """per-token-group fp8(rms_norm(x))  ->  rms_norm_group_fp8_quant"""

    def pattern(self, x, w, eps, group_size, column_major_scales):
        return fx.group_fp8_quant(fx.rms_norm(x, w, eps), group_size, column_major_scales)

    def replacement(self, x, w, eps, group_size, column_major_scales):
        return fx.rms_norm_group_fp8_quant(x, w, eps, group_size, column_major_scales)

    def example_inputs(self):
        return [activation(width=_GROUP_WIDTH), weight(width=_GROUP_WIDTH), 1e-6, _GROUP_SAMPLE, False]

    def check(self, match):
        return same_model_dtype(val(match, "x"), val(match, "w"))


class FusedAddRmsNormGroupFp8Quant(Rewrite):
    """r' = x + r;  per-token-group fp8(rms_norm(r'))  ->  fused_add_rms_norm_group_fp8_quant"""

    def pattern(self, x, r, w, eps, group_size, column_major_scales):
        y, r_out = fx.fused_add_rms_norm(x, r, w, eps)
        q, scales = fx.group_fp8_quant(y, group_size, column_major_scales)
        return q, scales, r_out

    def replacement(self, x, r, w, eps, group_size, column_major_scales):
        return fx.fused_add_rms_norm_group_fp8_quant(x, r, w, eps, group_size, column_major_scales)

    def example_inputs(self):
        act = activation(width=_GROUP_WIDTH)
        return [act, act, weight(width=_GROUP_WIDTH), 1e-6, _GROUP_SAMPLE, False]

    def check(self, match):
        return same_model_dtype(val(match, "x"), val(match, "r"), val(match, "w"))


# --------------------------------------------------------------------------- Gemma's norm


class _GemmaNormQuant(Rewrite):
    """Gemma's norm takes its weight in fp32 (as Gemma checkpoints keep it) or in the
    model dtype: the weight's dtype is free, and ``check`` names the two it may be."""

    free_dtypes = ("w",)

    def example_inputs(self):
        return [*self.activations(), weight(torch.float32), *self.scales(), 1e-6]

    def activations(self) -> list:
        return [activation()]

    def scales(self) -> list:
        return []

    def check(self, match):
        acts = [val(match, n) for n in ("x", "r") if n in match.kwargs]
        w = val(match, "w")
        scales_ok = all(is_fp32_scalar(val(match, n)) for n in ("s", "ub") if n in match.kwargs)
        return same_model_dtype(*acts) and w.dtype in (torch.float32, acts[0].dtype) and scales_ok


class GemmaRmsNormStaticFp8Quant(_GemmaNormQuant):
    """fp8(gemma_rms_norm(x) / s)  ->  gemma_rms_norm_static_fp8_quant"""

    def pattern(self, x, w, s, eps):
        return fx.static_scaled_fp8_quant(fx.gemma_rms_norm(x, w, eps), s)

    def replacement(self, x, w, s, eps):
        return fx.gemma_rms_norm_static_fp8_quant(x, w, s, eps)

    def scales(self):
        return [scale()]


class FusedAddGemmaRmsNormStaticFp8Quant(_GemmaNormQuant):
    """r' = x + r;  fp8(gemma_rms_norm(r') / s)  ->  fused_add_gemma_rms_norm_static_fp8_quant"""

    def pattern(self, x, r, w, s, eps):
        y, r_out = fx.fused_add_gemma_rms_norm(x, r, w, eps)
        return fx.static_scaled_fp8_quant(y, s), r_out

    def replacement(self, x, r, w, s, eps):
        return fx.fused_add_gemma_rms_norm_static_fp8_quant(x, r, w, s, eps)

    def activations(self):
        return [activation(), activation()]

    def scales(self):
        return [scale()]


class GemmaRmsNormDynamicFp8Quant(_GemmaNormQuant):
    """per-token fp8(gemma_rms_norm(x))  ->  gemma_rms_norm_dynamic_per_token_fp8_quant"""

    def pattern(self, x, w, eps):
        return fx.dynamic_per_token_fp8_quant(fx.gemma_rms_norm(x, w, eps))

    def replacement(self, x, w, eps):
        return fx.gemma_rms_norm_dynamic_per_token_fp8_quant(x, w, eps)


class GemmaRmsNormDynamicFp8QuantUb(_GemmaNormQuant):
    """per-token fp8(gemma_rms_norm(x)), amax capped at ub  ->  gemma_rms_norm_dynamic_per_token_fp8_quant"""

    def pattern(self, x, w, ub, eps):
        return fx.dynamic_per_token_fp8_quant(fx.gemma_rms_norm(x, w, eps), ub)

    def replacement(self, x, w, ub, eps):
        return fx.gemma_rms_norm_dynamic_per_token_fp8_quant(x, w, eps, ub)

    def scales(self):
        return [scale()]


class FusedAddGemmaRmsNormDynamicFp8Quant(_GemmaNormQuant):
    """r' = x + r;  per-token fp8(gemma_rms_norm(r'))  ->  fused_add_gemma_rms_norm_dynamic_per_token_fp8_quant"""

    def pattern(self, x, r, w, eps):
        y, r_out = fx.fused_add_gemma_rms_norm(x, r, w, eps)
        q, scales = fx.dynamic_per_token_fp8_quant(y)
        return q, scales, r_out

    def replacement(self, x, r, w, eps):
        return fx.fused_add_gemma_rms_norm_dynamic_per_token_fp8_quant(x, r, w, eps)

    def activations(self):
        return [activation(), activation()]


class FusedAddGemmaRmsNormDynamicFp8QuantUb(_GemmaNormQuant):
    """r' = x + r;  per-token fp8(gemma_rms_norm(r')), amax capped at ub  ->  the fused op"""

    def pattern(self, x, r, w, ub, eps):
        y, r_out = fx.fused_add_gemma_rms_norm(x, r, w, eps)
        q, scales = fx.dynamic_per_token_fp8_quant(y, ub)
        return q, scales, r_out

    def replacement(self, x, r, w, ub, eps):
        return fx.fused_add_gemma_rms_norm_dynamic_per_token_fp8_quant(x, r, w, eps, ub)

    def activations(self):
        return [activation(), activation()]

    def scales(self):
        return [scale()]


REWRITES = (
    RmsNormStaticFp8Quant,
    FusedAddRmsNormStaticFp8Quant,
    RmsNormDynamicFp8Quant,
    RmsNormDynamicFp8QuantUb,
    FusedAddRmsNormDynamicFp8Quant,
    FusedAddRmsNormDynamicFp8QuantUb,
    RmsNormGroupFp8Quant,
    FusedAddRmsNormGroupFp8Quant,
    GemmaRmsNormStaticFp8Quant,
    FusedAddGemmaRmsNormStaticFp8Quant,
    GemmaRmsNormDynamicFp8Quant,
    GemmaRmsNormDynamicFp8QuantUb,
    FusedAddGemmaRmsNormDynamicFp8Quant,
    FusedAddGemmaRmsNormDynamicFp8QuantUb,
)


def rms_quant_fusion() -> FusionPass:
    """The ``rms_quant_fusion`` pass.

    Example:
        >>> p = rms_quant_fusion(); p(gm.graph)
    """
    return FusionPass("rms_quant_fusion", [cls() for cls in REWRITES])
