"""``allreduce_rms_fusion``: the all-reduce of a row-parallel projection's partial sums, then
``fused_add_rms_norm`` (and the quant after it), becomes one ``allreduce_fused_add_rms_norm*`` op.

One rewrite per chain, whatever the number of layers: the process group's name is a
string wildcard (as ``layer_name`` is for attention), and ``check`` asks whether that
group has a fused implementation on the tensors' device and at its world size
(`fxfuse.ops._groups.fused_implementation`); `cache_state` reports that table, so a graph
fused for one set of groups is never served to another.

Each chain comes in the two forms tensor-parallel graphs have: partial sums in the model
dtype (what engines reduce), or fp32 partial sums whose sum is rounded to the model dtype
after the all-reduce (what the reference model reduces, `fxfuse.models.parallel`). A
dtype cannot be a wildcard, so the second form is one instance per model dtype
(``cast_to``), named ``ClassName(cast_to=torch.bfloat16)`` in the match table.

The pass runs before ``rms_quant_fusion``: its chains contain that pass's chains
(``fused_add_rms_norm`` then a quant), which it would otherwise fuse first.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..fusion_pass import FusionPass
from ..ops._groups import fused_implementation, implementation_state
from ..rewrite import Rewrite
from ._common import activation, is_fp32_scalar, same_model_dtype, scale, val, weight

fx = torch.ops.fxfuse
c10d = torch.ops._c10d_functional

#: The model dtypes whose fp32 partial sums are matched (the ``cast_to`` instances).
CAST_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)
# Group-quant examples, as in rms_quant: the int wildcard's sample divides the width and
# equals no other literal of the traced pattern.
_GROUP_SAMPLE, _GROUP_WIDTH = 128, 256


class _AllReduceRmsNorm(Rewrite):
    """What the rewrites share: the all-reduce that starts the chain, its dtype forms, the
    group check and the cache state.

    ``cast_to`` None: the partial sums ``x`` are in the model dtype. A dtype: ``x`` is fp32
    and its sum is rounded to ``cast_to`` before the residual add.
    """

    def __init__(self, cast_to: Optional[torch.dtype] = None) -> None:
        if cast_to is not None and cast_to not in CAST_DTYPES:
            raise ValueError(f"{type(self).__name__}: cast_to must be None or one of {CAST_DTYPES}, got {cast_to!r}")
        self.cast_to = cast_to

    def reduced(self, x: torch.Tensor, group_name: str) -> torch.Tensor:
        """The all-reduced partial sums as the graph holds them (the functional collective)."""
        total = c10d.wait_tensor(c10d.all_reduce(x, "sum", group_name))
        return total if self.cast_to is None else total.to(self.cast_to)

    def model_dtype(self) -> torch.dtype:
        return self.cast_to or torch.bfloat16

    def partials(self, width: int = 64):
        return activation(torch.float32 if self.cast_to is not None else self.model_dtype(), width)

    def chain_fits(self, match) -> bool:
        """Dtypes the fused op takes, and a group with a fused implementation for this device."""
        x, r, w = val(match, "x"), val(match, "r"), val(match, "w")
        partials_ok = x.dtype == (torch.float32 if self.cast_to is not None else r.dtype)
        impl = fused_implementation(match.kwargs["group_name"], x.device.type)
        return same_model_dtype(r, w) and partials_ok and impl is not None

    def check(self, match) -> bool:
        return self.chain_fits(match)

    def cache_state(self):
        """Every process group of this process: backends, world size, fused implementation
        per device type (what `check` reads).

        >>> AllReduceFusedAddRmsNorm().cache_state()  # doctest: +SKIP  (a 2-rank gloo world)
        {'0': ((('cpu', 'gloo'), ('cuda', 'gloo')), 2, (('cpu', 'native'), ('cuda', None)))}
        """
        return implementation_state()


class AllReduceFusedAddRmsNorm(_AllReduceRmsNorm):
    """fused_add_rms_norm(all_reduce(x), r)  ->  allreduce_fused_add_rms_norm"""

    def pattern(self, x, r, w, eps, group_name):
        return fx.fused_add_rms_norm(self.reduced(x, group_name), r, w, eps)

    def replacement(self, x, r, w, eps, group_name):
        return fx.allreduce_fused_add_rms_norm(x, r, w, eps, group_name)

    def example_inputs(self):
        dt = self.model_dtype()
        return [self.partials(), activation(dt), weight(dt), 1e-6, "tp"]


class AllReduceFusedAddRmsNormUnusedResidual(_AllReduceRmsNorm):
    """fused_add_rms_norm(all_reduce(x), r)[0], the new residual unread  ->  allreduce_fused_add_rms_norm(...)[0]

    A model's final norm: its residual output has no user, so the graph holds only the
    normalized output, which `AllReduceFusedAddRmsNorm`'s two-output pattern does not match.
    """

    def pattern(self, x, r, w, eps, group_name):
        return fx.fused_add_rms_norm(self.reduced(x, group_name), r, w, eps)[0]

    def replacement(self, x, r, w, eps, group_name):
        return fx.allreduce_fused_add_rms_norm(x, r, w, eps, group_name)[0]

    def example_inputs(self):
        dt = self.model_dtype()
        return [self.partials(), activation(dt), weight(dt), 1e-6, "tp"]


class AllReduceFusedAddRmsNormStaticFp8Quant(_AllReduceRmsNorm):
    """fp8(fused_add_rms_norm(all_reduce(x), r) / s)  ->  allreduce_fused_add_rms_norm_static_fp8_quant"""

    def pattern(self, x, r, w, s, eps, group_name):
        y, r_out = fx.fused_add_rms_norm(self.reduced(x, group_name), r, w, eps)
        return fx.static_scaled_fp8_quant(y, s), r_out

    def replacement(self, x, r, w, s, eps, group_name):
        return fx.allreduce_fused_add_rms_norm_static_fp8_quant(x, r, w, s, eps, group_name)

    def example_inputs(self):
        dt = self.model_dtype()
        return [self.partials(), activation(dt), weight(dt), scale(), 1e-6, "tp"]

    def check(self, match):
        return self.chain_fits(match) and is_fp32_scalar(val(match, "s"))


class AllReduceFusedAddRmsNormDynamicFp8Quant(_AllReduceRmsNorm):
    """per-token fp8(fused_add_rms_norm(all_reduce(x), r))  ->  ..._dynamic_per_token_fp8_quant"""

    def pattern(self, x, r, w, eps, group_name):
        y, r_out = fx.fused_add_rms_norm(self.reduced(x, group_name), r, w, eps)
        q, scales = fx.dynamic_per_token_fp8_quant(y)
        return q, scales, r_out

    def replacement(self, x, r, w, eps, group_name):
        return fx.allreduce_fused_add_rms_norm_dynamic_per_token_fp8_quant(x, r, w, eps, group_name)

    def example_inputs(self):
        dt = self.model_dtype()
        return [self.partials(), activation(dt), weight(dt), 1e-6, "tp"]


class AllReduceFusedAddRmsNormDynamicFp8QuantUb(_AllReduceRmsNorm):
    """the same, the amax capped at ``ub``  ->  ..._dynamic_per_token_fp8_quant(..., ub)"""

    def pattern(self, x, r, w, ub, eps, group_name):
        y, r_out = fx.fused_add_rms_norm(self.reduced(x, group_name), r, w, eps)
        q, scales = fx.dynamic_per_token_fp8_quant(y, ub)
        return q, scales, r_out

    def replacement(self, x, r, w, ub, eps, group_name):
        return fx.allreduce_fused_add_rms_norm_dynamic_per_token_fp8_quant(x, r, w, eps, group_name, ub)

    def example_inputs(self):
        dt = self.model_dtype()
        return [self.partials(), activation(dt), weight(dt), scale(), 1e-6, "tp"]

    def check(self, match):
        return self.chain_fits(match) and is_fp32_scalar(val(match, "ub"))


class AllReduceFusedAddRmsNormNvfp4Quant(_AllReduceRmsNorm):
    """nvfp4(fused_add_rms_norm(all_reduce(x), r))  ->  allreduce_fused_add_rms_norm_nvfp4_quant"""

    def pattern(self, x, r, w, global_scale, eps, group_name):
        y, r_out = fx.fused_add_rms_norm(self.reduced(x, group_name), r, w, eps)
        q, block_scales = fx.nvfp4_quant(y, global_scale)
        return q, block_scales, r_out

    def replacement(self, x, r, w, global_scale, eps, group_name):
        return fx.allreduce_fused_add_rms_norm_nvfp4_quant(x, r, w, global_scale, eps, group_name)

    def example_inputs(self):
        dt = self.model_dtype()
        return [self.partials(), activation(dt), weight(dt), scale(), 1e-6, "tp"]

    def check(self, match):
        return self.chain_fits(match) and is_fp32_scalar(val(match, "global_scale"))


class AllReduceFusedAddRmsNormGroupFp8Quant(_AllReduceRmsNorm):
    """per-token-group fp8(fused_add_rms_norm(all_reduce(x), r))  ->  ..._group_fp8_quant"""

    def pattern(self, x, r, w, eps, group_size, column_major_scales, group_name):
        y, r_out = fx.fused_add_rms_norm(self.reduced(x, group_name), r, w, eps)
        q, scales = fx.group_fp8_quant(y, group_size, column_major_scales)
        return q, scales, r_out

    def replacement(self, x, r, w, eps, group_size, column_major_scales, group_name):
        return fx.allreduce_fused_add_rms_norm_group_fp8_quant(
            x, r, w, eps, group_size, group_name, column_major_scales
        )

    def example_inputs(self):
        dt = self.model_dtype()
        act = activation(dt, _GROUP_WIDTH)
        return [self.partials(_GROUP_WIDTH), act, weight(dt, _GROUP_WIDTH), 1e-6, _GROUP_SAMPLE, False, "tp"]


REWRITES = (
    AllReduceFusedAddRmsNorm,
    AllReduceFusedAddRmsNormUnusedResidual,
    AllReduceFusedAddRmsNormStaticFp8Quant,
    AllReduceFusedAddRmsNormDynamicFp8Quant,
    AllReduceFusedAddRmsNormDynamicFp8QuantUb,
    AllReduceFusedAddRmsNormNvfp4Quant,
    AllReduceFusedAddRmsNormGroupFp8Quant,
)


def allreduce_rms_fusion() -> FusionPass:
    """The ``allreduce_rms_fusion`` pass: each chain with partial sums in the model dtype, and
    with fp32 partial sums for each of `CAST_DTYPES`.

    Example:
        >>> p = allreduce_rms_fusion(); p(gm.graph)
    """
    rewrites = [cls(cast_to) for cls in REWRITES for cast_to in (None, *CAST_DTYPES)]
    return FusionPass("allreduce_rms_fusion", rewrites)
