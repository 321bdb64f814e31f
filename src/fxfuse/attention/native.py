"""The native attention backend: the numerical reference, in plain PyTorch, on any device.

Per sequence it gathers the K/V of positions ``0..seq_len-1`` from the paged cache
through the block table, computes scores, the causal mask and the softmax in fp32,
rounds the result to the model dtype, and only then applies the output quant epilogue,
so that the fused op equals the unfused ``attention -> quant`` chain bit for bit.

The building blocks (:func:`write_kv_cache_native`, :func:`paged_attention_native`,
:func:`write_output_native`) are public so that other backends can reuse the parts
they do not implement themselves.
"""

from __future__ import annotations

from typing import Optional

import torch

from .backend import AttentionBackend, AttentionLayer, Rotary
from .kv_cache import KVCache
from .metadata import AttentionMetadata
from .schemes import output_quant_scheme

# Upper bound on fp32 score elements materialized at once (per query chunk), so a long
# prefill on a GPU does not allocate [heads, tokens, seq_len] in one go.
_MAX_SCORE_ELEMENTS = 1 << 26


def write_kv_cache_native(
    key: torch.Tensor, value: torch.Tensor, kv_cache: KVCache, slot_mapping: torch.Tensor
) -> None:
    """Store ``key``/``value`` ``[T, Hkv, D]`` at flat slots ``slot_mapping`` ``[T]`` of the cache."""
    num_slots = kv_cache.num_blocks * kv_cache.block_size
    shape = (num_slots, kv_cache.num_kv_heads, kv_cache.head_size)
    kv_cache.key_cache.view(shape).index_copy_(0, slot_mapping, key)
    kv_cache.value_cache.view(shape).index_copy_(0, slot_mapping, value)


def paged_attention_native(
    query: torch.Tensor, kv_cache: KVCache, metadata: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Causal GQA attention of ``query`` ``[T, Hq, D]`` over the paged cache, rounded to ``query.dtype``.

    The new tokens' K/V must already be in the cache. Query ``j`` of sequence ``i``
    (``n`` new tokens, ``L = seq_lens[i]``) sits at position ``L - n + j`` and attends to
    positions ``0..L - n + j``.
    """
    num_tokens, num_heads, head_size = query.shape
    num_kv_heads = kv_cache.num_kv_heads
    group = num_heads // num_kv_heads
    block_size = kv_cache.block_size
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    # Host copies once: the loop below is over sequences, not a kernel launch per element.
    starts = metadata.query_start_loc.tolist()
    seq_lens = metadata.seq_lens.tolist()
    for i, seq_len in enumerate(seq_lens):
        start, end = starts[i], starts[i + 1]
        n_new = end - start
        if n_new == 0:
            continue
        n_blocks = -(-seq_len // block_size)
        blocks = metadata.block_table[i, :n_blocks].long()
        # [L, Hkv, D] -> [Hkv, L, D]: every key of this sequence, in position order.
        k = kv_cache.key_cache[blocks].reshape(n_blocks * block_size, num_kv_heads, head_size)[:seq_len]
        v = kv_cache.value_cache[blocks].reshape(n_blocks * block_size, num_kv_heads, head_size)[:seq_len]
        k = k.float().transpose(0, 1)
        v = v.float().transpose(0, 1)
        key_pos = torch.arange(seq_len, device=query.device)
        chunk = max(1, _MAX_SCORE_ELEMENTS // max(1, num_heads * seq_len))
        for c0 in range(0, n_new, chunk):
            c1 = min(n_new, c0 + chunk)
            # [n, Hq, D] -> [Hkv, G, n, D]: query head h = kv_head * G + g.
            q = query[start + c0 : start + c1].float().reshape(c1 - c0, num_kv_heads, group, head_size)
            q = q.permute(1, 2, 0, 3)
            scores = torch.matmul(q, k.unsqueeze(1).transpose(-1, -2)) * scale  # [Hkv, G, n, L]
            query_pos = torch.arange(seq_len - n_new + c0, seq_len - n_new + c1, device=query.device)
            future = key_pos.unsqueeze(0) > query_pos.unsqueeze(1)  # [n, L]
            scores = scores.masked_fill(future, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            o = torch.matmul(probs, v.unsqueeze(1))  # [Hkv, G, n, D]
            out[start + c0 : start + c1] = o.permute(2, 0, 1, 3).reshape(c1 - c0, num_heads, head_size).to(
                query.dtype
            )
    return out


def rotate_native(layer: AttentionLayer, query: torch.Tensor, key: torch.Tensor, rotary: Rotary
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``query``/``key`` rotated by ``rotary``, as new contiguous ``[T, H, D]`` tensors.

    Through the very op the unfused graph calls (``fxfuse::rotary_embedding``, by the
    dispatcher: the op is built on this package), so a backend that rotates this way
    equals the unfused ``rotary_embedding -> attention`` chain bit for bit on every device.
    """
    return torch.ops.fxfuse.rotary_embedding(
        rotary.positions, query, key, layer.head_size, rotary.cos_sin_cache, rotary.is_neox
    )


def write_output_native(
    out: torch.Tensor,
    output: torch.Tensor,
    output_scale: Optional[torch.Tensor],
    output_block_scale: Optional[torch.Tensor],
) -> None:
    """The output epilogue: write ``out`` (``[T, Hq, D]``, already in the model dtype) into
    ``output`` as is, as static FP8, or as NVFP4 (plus ``output_block_scale``).

    The quant steps call the very ops the unfused graph calls
    (``fxfuse::static_scaled_fp8_quant``, ``fxfuse::nvfp4_quant``) on the
    ``[T, Hq * D]`` view, so fused and unfused agree bit for bit on every device,
    whichever kernel those ops dispatch to.
    """
    # Through the dispatcher, not by importing fxfuse.ops: the ops are built on this
    # package, and the op registry is what both sides agree on. They are registered by
    # then: importing any fxfuse module first runs fxfuse/__init__, which imports fxfuse.ops.
    scheme = output_quant_scheme(output_scale, output_block_scale)
    num_tokens, num_heads, head_size = out.shape
    flat = out.reshape(num_tokens, num_heads * head_size)
    if scheme == "none":
        output.copy_(out)
    elif scheme == "fp8_static":
        output.copy_(torch.ops.fxfuse.static_scaled_fp8_quant(flat, output_scale).view(output.shape))
    else:
        q, block_scales = torch.ops.fxfuse.nvfp4_quant(flat, output_scale)
        output.copy_(q)
        output_block_scale.copy_(block_scales)


class NativeAttentionBackend(AttentionBackend):
    """Reference attention in plain PyTorch; fuses every output quant scheme and the rotary
    embedding (which it applies with ``rotary_embedding`` before writing the cache).

    >>> layer = AttentionLayer("layers.0.attn", 8, 2, 64, NativeAttentionBackend())
    """

    name = "native"
    supported_output_quant = frozenset({"none", "fp8_static", "nvfp4"})
    fuses_rope = True

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        output: torch.Tensor,
        output_scale: Optional[torch.Tensor],
        output_block_scale: Optional[torch.Tensor],
        metadata: AttentionMetadata,
        kv_cache: KVCache,
        rotary: Optional[Rotary] = None,
    ) -> None:
        if rotary is not None:
            query, key = rotate_native(layer, query, key, rotary)
        # Write first, then read everything (new tokens included) back from the cache:
        # the same data path a paged kernel takes, so the cache write is tested too.
        write_kv_cache_native(key, value, kv_cache, metadata.slot_mapping)
        out = paged_attention_native(query, kv_cache, metadata, layer.scale)
        write_output_native(out, output, output_scale, output_block_scale)


class NoQuantNativeBackend(NativeAttentionBackend):
    """The native computation, but declaring no fused output quant.

    Layers on this backend keep the unfused ``attention -> quant`` chain: the fusion
    pass sees ``supports_output_quant(...) == False`` and the op refuses a quantized
    output for them.
    """

    name = "native-noquant"
    supported_output_quant = frozenset({"none"})
