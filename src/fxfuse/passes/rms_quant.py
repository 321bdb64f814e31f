"""``rms_quant_fusion``: RMSNorm (with or without the residual add), then FP8 quant:
static, dynamic per token, or per token group (block-scaled FP8)."""

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


REWRITES = (
    RmsNormStaticFp8Quant,
    FusedAddRmsNormStaticFp8Quant,
    RmsNormDynamicFp8Quant,
    RmsNormDynamicFp8QuantUb,
    FusedAddRmsNormDynamicFp8Quant,
    FusedAddRmsNormDynamicFp8QuantUb,
    RmsNormGroupFp8Quant,
    FusedAddRmsNormGroupFp8Quant,
)


def rms_quant_fusion() -> FusionPass:
    """The ``rms_quant_fusion`` pass.

    Example:
        >>> p = rms_quant_fusion(); p(gm.graph)
    """
    return FusionPass("rms_quant_fusion", [cls() for cls in REWRITES])
