"""Paged attention: batch metadata, KV caches, layers, backends and the forward context.

``torch.ops.fxfuse.attention(query, key, value, output, layer_name, ...)`` (defined in
:mod:`fxfuse.ops.attention`) finds everything besides its tensors by ``layer_name``:

- the layer's head counts and :class:`AttentionBackend` in the static, process-wide
  layer registry (:func:`register_layer`, :func:`get_layer`), which compile-time passes
  also read to learn whether a layer's backend fuses an output quant scheme;
- the batch's :class:`AttentionMetadata` and the layer's :class:`KVCache` in the
  :class:`ForwardContext` that the model runner sets around each forward call
  (:func:`set_forward_context`).

Modules, each importing only those above it: ``schemes`` (output quant schemes),
``metadata`` (:class:`AttentionMetadata`), ``kv_cache`` (:class:`KVCache`), ``backend``
(:class:`AttentionBackend` and :class:`AttentionLayer`, which name each other),
``registry`` (the layer registry), ``forward_context``, and the backends ``native`` and
``triton_backend``. Nothing here imports :mod:`fxfuse.ops`: the op is built on this package.

Example::

    import torch, fxfuse
    from fxfuse.attention import (AttentionLayer, AttentionMetadata, ForwardContext, KVCache,
                                  NativeAttentionBackend, register_layer, set_forward_context)

    register_layer(AttentionLayer("attn0", num_heads=4, num_kv_heads=1, head_size=64,
                                  backend=NativeAttentionBackend()))
    cache = KVCache.allocate(16, 16, 1, 64, torch.bfloat16)
    meta = AttentionMetadata.from_lens(query_lens=[5], seq_lens=[5], block_table=[[0]], block_size=16)
    q = torch.randn(5, 4, 64, dtype=torch.bfloat16)
    k = v = torch.randn(5, 1, 64, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    with set_forward_context(ForwardContext(meta, {"attn0": cache})):
        torch.ops.fxfuse.attention(q, k, v, out, "attn0")
"""

from .backend import AttentionBackend, AttentionLayer, Rotary
from .forward_context import ForwardContext, NoForwardContextError, get_forward_context, set_forward_context
from .kv_cache import KVCache
from .metadata import AttentionMetadata
from .registry import (
    UnknownLayerError,
    get_layer,
    register_layer,
    registered_layer_names,
    temporary_layers,
    unregister_layer,
)
from .schemes import OUTPUT_QUANT_SCHEMES, output_quant_scheme
from .triton_backend import TritonAttentionBackend
from .native import (
    NativeAttentionBackend,
    NoQuantNativeBackend,
    paged_attention_native,
    rotate_native,
    write_kv_cache_native,
    write_output_native,
)

__all__ = [
    "OUTPUT_QUANT_SCHEMES", "AttentionBackend", "output_quant_scheme", "Rotary",
    "AttentionLayer", "AttentionMetadata", "ForwardContext", "KVCache",
    "NoForwardContextError", "UnknownLayerError",
    "get_forward_context", "get_layer", "register_layer", "registered_layer_names",
    "set_forward_context", "temporary_layers", "unregister_layer",
    "NativeAttentionBackend", "NoQuantNativeBackend", "TritonAttentionBackend",
    "paged_attention_native", "rotate_native", "write_kv_cache_native", "write_output_native",
]
