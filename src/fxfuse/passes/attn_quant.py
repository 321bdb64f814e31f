"""``attn_quant_fusion``: attention writing the model dtype, then FP8 or NVFP4 quant.

One rewrite per quant scheme, whatever the number of layers: ``layer_name`` is a string
wildcard, and ``check`` asks that layer's attention backend whether it can write the
quantized output itself. Layers on a backend without that support keep the unfused chain.
"""

from __future__ import annotations

import torch

from ..attention import get_layer, registered_layer_names
from ..fusion_pass import FusionPass
from ..rewrite import Rewrite, TensorSpec
from ._common import FP8, is_fp32_scalar, same_model_dtype, scale, val

fx = torch.ops.fxfuse
TOKENS, HEADS, KV_HEADS, HEAD = 5, 4, 2, 32


def _attention_inputs() -> list:
    q = TensorSpec((TOKENS, HEADS, HEAD), torch.bfloat16)
    kv = TensorSpec((TOKENS, KV_HEADS, HEAD), torch.bfloat16)
    return [q, kv, kv, q, scale(), "model.layers.0.self_attn"]


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1] * t.shape[2])


def _backend_supports(match, scheme: str) -> bool:
    try:
        layer = get_layer(match.kwargs["layer_name"])
    except KeyError:
        return False  # not a registered layer: nothing can promise the fused epilogue
    return layer.backend.supports_output_quant(scheme)


class _AttentionQuant(Rewrite):
    """What both attention rewrites share: ``check`` reads the layer registry, so its
    state is part of the cache key."""

    SCHEME: str  # the output quant scheme the fused attention writes

    def cache_state(self):
        """Each registered layer's backend and whether it fuses this rewrite's scheme.

        >>> AttentionStaticFp8Quant().cache_state()  # doctest: +SKIP
        {'model.layers.0.self_attn': ('native', True)}
        """
        state = {}
        for name in registered_layer_names():
            backend = get_layer(name).backend
            state[name] = (backend.name, backend.supports_output_quant(self.SCHEME))
        return state


class AttentionStaticFp8Quant(_AttentionQuant):
    """fp8(attention(q, k, v).reshape(T, H*D) / s)  ->  attention(..., output_scale=s)"""

    SCHEME = "fp8_static"

    def pattern(self, q, k, v, out, s, layer_name):
        fx.attention(q, k, v, out, layer_name)
        return fx.static_scaled_fp8_quant(_flat(out), s)

    def replacement(self, q, k, v, out, s, layer_name):
        # Sizes from q (alive anyway), so the model-dtype buffer `out` has no user left.
        out_fp8 = torch.empty(q.shape, dtype=FP8, device=q.device)
        fx.attention(q, k, v, out_fp8, layer_name, s)
        return _flat(out_fp8)

    def example_inputs(self):
        return _attention_inputs()

    def check(self, match):
        return (
            same_model_dtype(val(match, "q"), val(match, "out"))
            and is_fp32_scalar(val(match, "s"))
            and _backend_supports(match, self.SCHEME)
        )


class AttentionNvfp4Quant(_AttentionQuant):
    """nvfp4(attention(q, k, v).reshape(T, H*D))  ->  attention(..., output_block_scale=...)"""

    SCHEME = "nvfp4"

    def pattern(self, q, k, v, out, global_scale, layer_name):
        fx.attention(q, k, v, out, layer_name)
        return fx.nvfp4_quant(_flat(out), global_scale)

    def replacement(self, q, k, v, out, global_scale, layer_name):
        tokens, width = q.shape[0], q.shape[1] * q.shape[2]  # from q: `out` must become dead
        packed = torch.empty((tokens, width // 2), dtype=torch.uint8, device=q.device)
        block_scales = torch.empty(
            ((tokens + 127) // 128 * 128, (width // 16 + 3) // 4 * 4), dtype=FP8, device=q.device
        )
        fx.attention(q, k, v, packed, layer_name, global_scale, block_scales)
        return packed, block_scales

    def example_inputs(self):
        return _attention_inputs()

    def check(self, match):
        return (
            same_model_dtype(val(match, "q"), val(match, "out"))
            and is_fp32_scalar(val(match, "global_scale"))
            and _backend_supports(match, self.SCHEME)
        )


def attn_quant_fusion() -> FusionPass:
    """The ``attn_quant_fusion`` pass: one registration per scheme, for every layer.

    Example:
        >>> p = attn_quant_fusion(); p(gm.graph)
    """
    return FusionPass("attn_quant_fusion", [AttentionStaticFp8Quant(), AttentionNvfp4Quant()])
