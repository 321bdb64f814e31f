"""``act_quant_fusion``: SiLU-and-mul, then static FP8, per-token-group FP8 or NVFP4 quant."""

from __future__ import annotations

import torch

from ..fusion_pass import FusionPass
from ..rewrite import Rewrite
from ._common import activation, is_fp32_scalar, same_model_dtype, scale, val

fx = torch.ops.fxfuse


class SiluMulStaticFp8Quant(Rewrite):
    """fp8(silu(x[:, :d]) * x[:, d:] / s)  ->  silu_and_mul_static_fp8_quant"""

    def pattern(self, x, s):
        return fx.static_scaled_fp8_quant(fx.silu_and_mul(x), s)

    def replacement(self, x, s):
        return fx.silu_and_mul_static_fp8_quant(x, s)

    def example_inputs(self):
        return [activation(width=128), scale()]

    def check(self, match):
        return same_model_dtype(val(match, "x")) and is_fp32_scalar(val(match, "s"))


class SiluMulNvfp4Quant(Rewrite):
    """nvfp4(silu(x[:, :d]) * x[:, d:])  ->  silu_and_mul_nvfp4_quant"""

    def pattern(self, x, global_scale):
        return fx.nvfp4_quant(fx.silu_and_mul(x), global_scale)

    def replacement(self, x, global_scale):
        return fx.silu_and_mul_nvfp4_quant(x, global_scale)

    def example_inputs(self):
        return [activation(width=128), scale()]

    def check(self, match):
        return same_model_dtype(val(match, "x")) and is_fp32_scalar(val(match, "global_scale"))


class SiluMulGroupFp8Quant(Rewrite):
    """per-token-group fp8(silu(x[:, :d]) * x[:, d:])  ->  silu_and_mul_group_fp8_quant"""

    def pattern(self, x, group_size, column_major_scales):
        return fx.group_fp8_quant(fx.silu_and_mul(x), group_size, column_major_scales)

    def replacement(self, x, group_size, column_major_scales):
        return fx.silu_and_mul_group_fp8_quant(x, group_size, column_major_scales)

    def example_inputs(self):
        # The sample group size (an int wildcard: one rewrite matches 64 and 128) divides
        # the SiLU-and-mul output width, 256.
        return [activation(width=512), 128, False]

    def check(self, match):
        return same_model_dtype(val(match, "x"))


def act_quant_fusion() -> FusionPass:
    """The ``act_quant_fusion`` pass.

    Example:
        >>> p = act_quant_fusion(); p(gm.graph)
    """
    return FusionPass("act_quant_fusion", [SiluMulStaticFp8Quant(), SiluMulNvfp4Quant(), SiluMulGroupFp8Quant()])
