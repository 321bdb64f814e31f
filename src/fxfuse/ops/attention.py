"""Paged attention with an optional quantized output: ``fxfuse::attention``.

The op writes the new tokens' key/value into the layer's paged KV cache and computes
causal grouped-query attention for a batch of variable-length sequences (prefill and
decode mixed). Its tensors are arguments; everything else is looked up by
``layer_name`` (see :mod:`fxfuse.attention`): the layer's head counts and backend in
the static layer registry, the batch metadata and the KV cache in the forward context.

The output is written in place, in one of three schemes:

- ``"none"``: model dtype, ``output [T, Hq, D]``;
- ``"fp8_static"`` (``output_scale`` given): float8_e4m3fn ``output [T, Hq, D]``, equal to
  ``static_scaled_fp8_quant(out.reshape(T, Hq * D), output_scale)``;
- ``"nvfp4"`` (``output_scale`` = global scale and ``output_block_scale`` given): uint8
  ``output [T, Hq * D // 2]`` and swizzled E4M3 ``output_block_scale``, equal to
  ``nvfp4_quant(out.reshape(T, Hq * D), output_scale)``.

In both quantized schemes ``out`` is the attention result rounded to the model dtype,
so the fused op equals the unfused ``attention -> quant`` chain bit for bit.

**Rotary embedding.** Given ``positions`` and ``cos_sin_cache`` (and ``is_neox``, with
the meaning of ``fxfuse::rotary_embedding``'s arguments), ``query`` and ``key`` are the
*pre-rotary* heads: the op rotates them first, writes the rotated key into the cache and
attends with the rotated query, which is ``rotary_embedding`` followed by ``attention``
bit for bit. The layer's backend does it (``AttentionBackend.fuses_rope``; the triton
backend in the kernel that writes the cache); ``query``/``key`` may then be token-strided
``[T, H, D]`` views of a packed qkv projection. This is what ``rope_kv_cache_fusion``
makes of the unfused chain; a backend without the capability refuses the call.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..attention import (
    AttentionLayer,
    AttentionMetadata,
    KVCache,
    Rotary,
    get_forward_context,
    get_layer,
    output_quant_scheme,
)
from .. import compat
from . import _validate as V
from .nvfp4 import NVFP4_BLOCK_SIZE, nvfp4_block_scales_shape
from .rotary import validate_rotary_embedding

OP = "attention"

#: The registered schema. Written out (not inferred) so that the alias sets read as
#: documented, and a signature change shows up as a diff of this string.
ATTENTION_SCHEMA = (
    "(Tensor query, Tensor key, Tensor value, Tensor(a!) output, str layer_name, "
    "Tensor? output_scale=None, Tensor(b!)? output_block_scale=None, "
    "Tensor? positions=None, Tensor? cos_sin_cache=None, bool is_neox=True) -> ()"
)


def _err(msg: str) -> ValueError:
    return ValueError(f"fxfuse.{OP}: {msg}")


# --------------------------------------------------------------------------- validators


def _check_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        V.check_float_dtype(OP, name, t)
        if t.dim() != 3:
            raise _err(f"`{name}` must be 3-D [tokens, heads, head_size], got shape {tuple(t.shape)}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise _err(f"`{name}` must have dtype {query.dtype} (the dtype of `query`), got {t.dtype}")
        V.check_same_device(OP, name, t, "query", query)
    if value.shape != key.shape:
        raise _err(f"`value` must have shape {tuple(key.shape)} (the shape of `key`), got {tuple(value.shape)}")
    num_tokens, num_heads, head_size = query.shape
    if key.shape[0] != num_tokens:
        raise _err(
            f"`key` must have {num_tokens} tokens (dim 0 of `query`), got shape {tuple(key.shape)}"
        )
    if key.shape[2] != head_size:
        raise _err(
            f"`key` must have head_size {head_size} (dim 2 of `query`), got shape {tuple(key.shape)}"
        )
    if head_size == 0:
        raise _err(f"`query` must have a non-empty head_size, got shape {tuple(query.shape)}")
    num_kv_heads = key.shape[1]
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise _err(
            f"the number of query heads ({num_heads}) must be a positive multiple of the number "
            f"of key/value heads ({num_kv_heads})"
        )


def _check_shape(name: str, t: torch.Tensor, shape: tuple, what: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise _err(f"`{name}` must have shape {tuple(shape)}, i.e. {what}, got {tuple(t.shape)}")


def _check_output(
    query: torch.Tensor,
    output: torch.Tensor,
    output_scale: Optional[torch.Tensor],
    output_block_scale: Optional[torch.Tensor],
) -> str:
    scheme = output_quant_scheme(output_scale, output_block_scale)
    num_tokens, num_heads, head_size = query.shape
    if scheme == "none":
        V.check_like(OP, "output", output, "query", query)
        return scheme
    V.check_scalar_scale(OP, "output_scale", output_scale, "query", query)
    V.check_scale_value(OP, "output_scale", output_scale)
    V.check_tensor(OP, "output", output)
    if scheme == "fp8_static":
        V.check_fp8(OP, "output", output)
        _check_shape("output", output, tuple(query.shape), "the shape of `query`")
    else:
        hidden = num_heads * head_size
        if hidden % NVFP4_BLOCK_SIZE != 0:
            raise _err(
                f"NVFP4 output needs heads * head_size to be a multiple of {NVFP4_BLOCK_SIZE}, "
                f"got {num_heads} * {head_size} = {hidden}"
            )
        if output.dtype != torch.uint8:
            raise _err(f"`output` must have dtype torch.uint8 (packed NVFP4), got {output.dtype}")
        _check_shape("output", output, (num_tokens, hidden // 2), "[tokens, heads * head_size // 2]")
        V.check_fp8(OP, "output_block_scale", output_block_scale)
        _check_shape(
            "output_block_scale",
            output_block_scale,
            nvfp4_block_scales_shape(num_tokens, hidden),
            "[round_up(tokens, 128), round_up(heads * head_size // 16, 4)], swizzled",
        )
        V.check_contiguous(OP, "output_block_scale", output_block_scale)
        V.check_same_device(OP, "output_block_scale", output_block_scale, "query", query)
    V.check_contiguous(OP, "output", output)
    V.check_same_device(OP, "output", output, "query", query)
    return scheme


def _check_rotary(
    query: torch.Tensor,
    key: torch.Tensor,
    positions: Optional[torch.Tensor],
    cos_sin_cache: Optional[torch.Tensor],
    is_neox: bool,
) -> Optional[Rotary]:
    """The rotary embedding the call asks for (None: query and key are rotated already)."""
    if positions is None and cos_sin_cache is None:
        return None
    if positions is None or cos_sin_cache is None:
        missing = "positions" if positions is None else "cos_sin_cache"
        raise _err(f"`positions` and `cos_sin_cache` go together (the rotary embedding to apply); `{missing}` is None")
    # rotary_embedding's own checks, on [T, H, D] heads: dense features per head, any token stride.
    validate_rotary_embedding(positions, query, key, query.shape[2], cos_sin_cache, is_neox, op=OP)
    return Rotary(positions, cos_sin_cache, is_neox)


def validate_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    output: torch.Tensor,
    layer_name: str,
    output_scale: Optional[torch.Tensor] = None,
    output_block_scale: Optional[torch.Tensor] = None,
    positions: Optional[torch.Tensor] = None,
    cos_sin_cache: Optional[torch.Tensor] = None,
    is_neox: bool = True,
) -> tuple[str, Optional[Rotary]]:
    """Checks that need no layer registry or forward context (run by the fake impl too);
    returns the output quant scheme (``"none"``, ``"fp8_static"`` or ``"nvfp4"``) and the
    rotary embedding to apply (None for none)."""
    _check_qkv(query, key, value)
    if not isinstance(layer_name, str):
        raise TypeError(f"fxfuse.{OP}: `layer_name` must be a str, got {type(layer_name).__name__}")
    if not layer_name:
        raise _err("`layer_name` must be non-empty")
    scheme = _check_output(query, output, output_scale, output_block_scale)
    return scheme, _check_rotary(query, key, positions, cos_sin_cache, is_neox)


def resolve_attention(
    query: torch.Tensor, key: torch.Tensor, layer_name: str, scheme: str, rotary: Optional[Rotary] = None
) -> tuple[AttentionLayer, AttentionMetadata, KVCache]:
    """The checks against the layer registry and the forward context; returns what the
    backend needs. Raises before anything is written."""
    layer = get_layer(layer_name)
    num_tokens, num_heads, head_size = query.shape
    num_kv_heads = key.shape[1]
    if (num_heads, num_kv_heads, head_size) != (layer.num_heads, layer.num_kv_heads, layer.head_size):
        raise _err(
            f"`query`/`key` have {num_heads} query heads, {num_kv_heads} key/value heads and head_size "
            f"{head_size}, but layer {layer_name!r} has {layer.num_heads}, {layer.num_kv_heads} and "
            f"{layer.head_size}"
        )
    if not layer.supports_output_quant(scheme):
        raise _err(
            f"layer {layer_name!r} uses attention backend {layer.backend.name!r}, which does not "
            f"support output quant scheme {scheme!r} (it supports: "
            f"{', '.join(sorted(repr(s) for s in layer.backend.supported_output_quant))}); "
            f"quantize the model-dtype output with a separate op instead"
        )
    if rotary is not None and not layer.fuses_rope:
        raise _err(
            f"layer {layer_name!r} uses attention backend {layer.backend.name!r}, which does not apply the "
            f"rotary embedding itself (fuses_rope is False); rotate query and key with "
            f"fxfuse.rotary_embedding first and call attention without `positions`"
        )
    ctx = get_forward_context()
    cache = ctx.kv_cache(layer_name)
    if (cache.num_kv_heads, cache.head_size) != (num_kv_heads, head_size):
        raise _err(
            f"the KV cache of layer {layer_name!r} is [num_blocks, block_size, {cache.num_kv_heads}, "
            f"{cache.head_size}], which does not fit `key` of shape {tuple(key.shape)}"
        )
    if cache.dtype != query.dtype:
        raise _err(
            f"the KV cache of layer {layer_name!r} must have dtype {query.dtype} (the dtype of `query`), "
            f"got {cache.dtype}"
        )
    if cache.device != query.device:
        raise _err(
            f"the KV cache of layer {layer_name!r} must be on the device of `query` ({query.device}), "
            f"got {cache.device}"
        )
    metadata = ctx.metadata
    if metadata.slot_mapping.device != query.device:
        raise _err(
            f"the forward context's metadata must be on the device of `query` ({query.device}), "
            f"got {metadata.slot_mapping.device}"
        )
    metadata.validate_once(num_tokens, block_size=cache.block_size, num_blocks=cache.num_blocks)
    return layer, metadata, cache


# --------------------------------------------------------------------------- op


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    output: torch.Tensor,
    layer_name: str,
    output_scale: Optional[torch.Tensor] = None,
    output_block_scale: Optional[torch.Tensor] = None,
    positions: Optional[torch.Tensor] = None,
    cos_sin_cache: Optional[torch.Tensor] = None,
    is_neox: bool = True,
) -> None:
    """Paged causal GQA attention of layer ``layer_name``, written into ``output``.

    ``query`` is ``[T, Hq, D]``, ``key``/``value`` ``[T, Hkv, D]`` (bf16, fp16 or fp32; ``T``
    new tokens of all sequences, concatenated). Writes ``key``/``value`` into the layer's
    KV cache at the forward context's ``slot_mapping``, then attends each query to its
    sequence's positions up to its own (softmax scale ``1 / sqrt(D)``). ``output`` is the
    model dtype ``[T, Hq, D]``; FP8 ``[T, Hq, D]`` with ``output_scale``; packed NVFP4
    ``[T, Hq * D // 2]`` uint8 with ``output_scale`` (global scale) and
    ``output_block_scale``. With ``positions`` ``[T]`` and ``cos_sin_cache``
    ``[max_position, rotary_dim]``, ``query``/``key`` are rotated first (NeoX pairs when
    ``is_neox``, else GPT-J), as ``rotary_embedding`` would. Everything is validated
    before anything is written.

    >>> register_layer(AttentionLayer("attn0", 4, 1, 64, NativeAttentionBackend()))
    >>> with set_forward_context(ForwardContext(metadata, {"attn0": kv_cache})):
    ...     torch.ops.fxfuse.attention(q, k, v, out, "attn0")
    ...     torch.ops.fxfuse.attention(q_pre, k_pre, v, out, "attn0", None, None, positions, cache, True)
    """
    scheme, rotary = validate_attention(query, key, value, output, layer_name, output_scale, output_block_scale,
                                        positions, cos_sin_cache, is_neox)
    layer, metadata, kv_cache = resolve_attention(query, key, layer_name, scheme, rotary)
    extra = {} if rotary is None else {"rotary": rotary}  # backends without fuses_rope take no `rotary`
    layer.backend.forward(
        layer, query, key, value, output, output_scale, output_block_scale, metadata, kv_cache, **extra
    )


def _attention_fake(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    output: torch.Tensor,
    layer_name: str,
    output_scale: Optional[torch.Tensor] = None,
    output_block_scale: Optional[torch.Tensor] = None,
    positions: Optional[torch.Tensor] = None,
    cos_sin_cache: Optional[torch.Tensor] = None,
    is_neox: bool = True,
) -> None:
    # No registry or context lookup: patterns are traced with a sample `layer_name`
    # that names no real layer, and compilation happens outside any forward context.
    validate_attention(query, key, value, output, layer_name, output_scale, output_block_scale,
                       positions, cos_sin_cache, is_neox)


# Registered on a Library directly, not with @custom_op: see compat.define_mutating_op.
compat.define_mutating_op("fxfuse::attention", ATTENTION_SCHEMA, attention, _attention_fake)
