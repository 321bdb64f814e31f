"""The ``triton`` attention backend: fxfuse's paged attention kernel, on CUDA.

It fuses every output quant scheme into the kernel's epilogue, and the rotary embedding
into the KV-cache write: one kernel rotates the query and writes the rotated key and the
value into their cache slots (``kernels.rotary.rope_kv_cache``), so the rotated key never
makes a round trip through memory. Metadata is read on the host only through
``max_query_len``/``max_seq_len`` (plain ints), so a forward pass on this backend can be
captured in a CUDA graph once its metadata has been validated.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..kernels import cuda_capability
from .backend import AttentionBackend, AttentionLayer, Rotary
from .kv_cache import KVCache
from .metadata import AttentionMetadata
from .native import write_kv_cache_native
from .schemes import output_quant_scheme


class TritonAttentionBackend(AttentionBackend):
    """Paged causal GQA attention in Triton (prefill, decode, split-KV decode), with FP8
    and NVFP4 output epilogues and the rotary embedding fused into the KV-cache write.
    Needs CUDA tensors (or ``TRITON_INTERPRET=1`` on CPU) and a power-of-two head size of
    at least 16.

    >>> layer = AttentionLayer("layers.0.attn", 32, 8, 128, TritonAttentionBackend())
    """

    name = "triton"
    supported_output_quant = frozenset({"none", "fp8_static", "nvfp4"})
    fuses_rope = True

    def preferred_block_size(self, device: torch.device) -> Optional[int]:
        """64 on Hopper and newer GPUs: a 64-key tile then lies inside one page and is
        fetched with one TMA bulk copy (prefill at 76-82% of SDPA on the H100, against
        63-73% with 16-slot pages whose tiles are gathered row by row; RESULTS.md). The
        cost is fragmentation: a sequence's last page wastes up to 63 slots instead of
        15 (at Llama-3-8B shapes, 32 layers, up to 7.9 MiB of KV cache per sequence instead of 1.9 MiB).
        Any block size works; this is only the fast one.
        """
        if device.type == "cuda" and cuda_capability(device)[0] >= 9:
            return 64
        return None

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
        from .. import kernels

        d = layer.head_size
        if d < 16 or d & (d - 1):
            raise ValueError(
                f"fxfuse.attention: the triton backend needs a power-of-two head_size >= 16, "
                f"layer {layer.name!r} has {d}; use the native backend for it"
            )
        if not kernels.available(query.device.type):
            raise RuntimeError(
                f"fxfuse.attention: the triton backend cannot run on {query.device} tensors here "
                f"(it needs CUDA and Triton, or TRITON_INTERPRET=1 on CPU); use the native backend"
            )
        from ..kernels import attention as K

        if rotary is None:
            write_kv_cache_native(key, value, kv_cache, metadata.slot_mapping)
        else:
            from ..kernels.rotary import rope_kv_cache

            query = rope_kv_cache(rotary.positions, query, key, value, d, rotary.cos_sin_cache, rotary.is_neox,
                                  kv_cache.key_cache, kv_cache.value_cache, metadata.slot_mapping)
        scheme = output_quant_scheme(output_scale, output_block_scale)
        out = {"none": K.OUT_NONE, "fp8_static": K.OUT_FP8, "nvfp4": K.OUT_NVFP4}[scheme]
        K.paged_attention(
            query, kv_cache.key_cache, kv_cache.value_cache, metadata.block_table, metadata.seq_lens,
            metadata.query_start_loc, metadata.max_query_len, metadata.max_seq_len, layer.scale,
            output, out, output_scale, output_block_scale,
        )
