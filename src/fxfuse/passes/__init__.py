"""The built-in passes, in the order DESIGN §3 gives them, switched by `FusionConfig`."""

from __future__ import annotations

import dataclasses
from typing import Callable

from ..fusion_pass import FusionPass
from .act_quant import act_quant_fusion
from .allreduce_rms import allreduce_rms_fusion
from .attn_quant import attn_quant_fusion
from .gemm_fusion import gemm_fusion
from .native_lowering import native_lowering
from .noop_elimination import NoopElimination
from .qk_norm_rope import qk_norm_rope_fusion
from .rms_quant import rms_quant_fusion
from .rope_kv_cache import rope_kv_cache_fusion


@dataclasses.dataclass(frozen=True)
class FusionConfig:
    """Which built-in passes `default_passes` returns.

    Example:
        >>> fxfuse.default_passes(fxfuse.FusionConfig(act_quant=False))
    """

    noop_elimination: bool = True
    allreduce_rms: bool = True
    rms_quant: bool = True
    act_quant: bool = True
    attn_quant: bool = True
    native_lowering: bool = True
    # Added with the model families and then the GEMM fusions; last, so a config built
    # positionally keeps its meaning (the pipeline's order is _PIPELINE's, not the fields').
    qk_norm_rope: bool = True
    rope_kv_cache: bool = True
    gemm_fusion: bool = True


# Pipeline order matters: noop elimination exposes producer/consumer pairs to the
# fusions; qk_norm_rope_fusion takes the per-head q/k norms before rms_quant_fusion looks
# at norms (a norm that feeds no quant is that pass's near miss), and the rotation before
# rope_kv_cache_fusion would fold it into attention (fusing the norms saves more);
# allreduce_rms_fusion runs before rms_quant_fusion, because its chains (all-reduce,
# fused_add_rms_norm, quant) contain that pass's (fused_add_rms_norm, quant), which would
# otherwise be fused first and leave the all-reduce on its own; rope_kv_cache_fusion runs
# after attn_quant_fusion, whose pattern is attention without a rotation (it has a rewrite
# for each attention output scheme that one makes); gemm_fusion after the norm,
# activation and attention fusions, whose fused ops are the chains it folds into the
# GEMMs (and before native lowering, which would hand those ops to Inductor); native
# lowering comes last, so it sees the fused ops the fusions made.
_PIPELINE: tuple[tuple[str, Callable[[], FusionPass]], ...] = (
    ("noop_elimination", NoopElimination),
    ("qk_norm_rope", qk_norm_rope_fusion),
    ("allreduce_rms", allreduce_rms_fusion),
    ("rms_quant", rms_quant_fusion),
    ("act_quant", act_quant_fusion),
    ("attn_quant", attn_quant_fusion),
    ("rope_kv_cache", rope_kv_cache_fusion),
    ("gemm_fusion", gemm_fusion),
    ("native_lowering", native_lowering),
)


def default_passes(config: FusionConfig | None = None) -> list[FusionPass]:
    """The built-in passes enabled by ``config`` (all by default), in pipeline order.

    Example:
        >>> [p.name for p in fxfuse.default_passes()]
        ['noop_elimination', 'qk_norm_rope_fusion', 'allreduce_rms_fusion', 'rms_quant_fusion', 'act_quant_fusion',
         'attn_quant_fusion', 'rope_kv_cache_fusion', 'gemm_fusion', 'native_lowering']
    """
    config = config or FusionConfig()
    if not isinstance(config, FusionConfig):
        raise TypeError(f"default_passes takes a FusionConfig, got {type(config).__name__}")
    return [build() for flag, build in _PIPELINE if getattr(config, flag)]


__all__ = [
    "FusionConfig", "default_passes", "NoopElimination", "qk_norm_rope_fusion", "allreduce_rms_fusion",
    "rms_quant_fusion", "act_quant_fusion", "attn_quant_fusion", "rope_kv_cache_fusion", "gemm_fusion",
    "native_lowering",
]
