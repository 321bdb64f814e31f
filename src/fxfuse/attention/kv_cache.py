"""One layer's paged KV cache and the dtypes it may hold."""

from __future__ import annotations

import dataclasses
from typing import Union

import torch

from ._common import _PREFIX, _is_int

#: KV cache dtypes: the model dtypes (the cache holds K/V exactly as the op receives them).
KV_CACHE_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)


@dataclasses.dataclass(eq=False)
class KVCache:
    """One layer's paged KV cache: ``key_cache``/``value_cache`` ``[num_blocks, block_size, Hkv, D]``.

    >>> cache = KVCache.allocate(num_blocks=8, block_size=16, num_kv_heads=2, head_size=64,
    ...                          dtype=torch.bfloat16)
    >>> cache.key_cache.shape
    torch.Size([8, 16, 2, 64])
    """

    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_size: int

    def __post_init__(self) -> None:
        for fname in ("key_cache", "value_cache"):
            t = getattr(self, fname)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{_PREFIX}: KVCache `{fname}` must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(
                    f"{_PREFIX}: KVCache `{fname}` must be [num_blocks, block_size, num_kv_heads, "
                    f"head_size], got shape {tuple(t.shape)}"
                )
            if t.dtype not in KV_CACHE_DTYPES:
                raise ValueError(
                    f"{_PREFIX}: KVCache `{fname}` must have dtype in "
                    f"({', '.join(map(str, KV_CACHE_DTYPES))}), got {t.dtype}"
                )
            # The native backend writes through a flat [slots, Hkv, D] view.
            if not t.is_contiguous():
                raise ValueError(f"{_PREFIX}: KVCache `{fname}` must be contiguous")
        k, v = self.key_cache, self.value_cache
        if k.shape != v.shape or k.dtype != v.dtype or k.device != v.device:
            raise ValueError(
                f"{_PREFIX}: KVCache `value_cache` must match `key_cache` in shape, dtype and device, "
                f"got {tuple(v.shape)}/{v.dtype}/{v.device} vs {tuple(k.shape)}/{k.dtype}/{k.device}"
            )
        if not _is_int(self.block_size) or self.block_size != k.shape[1]:
            raise ValueError(
                f"{_PREFIX}: KVCache `block_size` ({self.block_size!r}) must equal dim 1 of the "
                f"caches, shape {tuple(k.shape)}"
            )

    @classmethod
    def allocate(
        cls,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        dtype: torch.dtype = torch.bfloat16,
        device: Union[torch.device, str, None] = None,
    ) -> "KVCache":
        """A zero-filled cache (zeros, so that unwritten slots read as finite values)."""
        for name, v in (("num_blocks", num_blocks), ("block_size", block_size),
                        ("num_kv_heads", num_kv_heads), ("head_size", head_size)):
            if not _is_int(v) or v <= 0:
                raise ValueError(f"{_PREFIX}: KVCache.allocate `{name}` must be a positive int, got {v!r}")
        shape = (num_blocks, block_size, num_kv_heads, head_size)
        return cls(
            key_cache=torch.zeros(shape, dtype=dtype, device=device),
            value_cache=torch.zeros(shape, dtype=dtype, device=device),
            block_size=block_size,
        )

    @property
    def num_blocks(self) -> int:
        return int(self.key_cache.shape[0])

    @property
    def num_kv_heads(self) -> int:
        return int(self.key_cache.shape[2])

    @property
    def head_size(self) -> int:
        return int(self.key_cache.shape[3])

    @property
    def dtype(self) -> torch.dtype:
        return self.key_cache.dtype

    @property
    def device(self) -> torch.device:
        return self.key_cache.device
