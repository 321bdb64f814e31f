"""The forward context: what ``attention`` reads per call, set by the model runner.

It holds the batch's :class:`~.metadata.AttentionMetadata` and each layer's
:class:`~.kv_cache.KVCache`, so that neither enters the compiled graph.

Example::

    with set_forward_context(ForwardContext(meta, {"layers.0.attn": cache})):
        torch.ops.fxfuse.attention(q, k, v, out, "layers.0.attn")
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional

from ._common import _PREFIX, _quoted
from .kv_cache import KVCache
from .metadata import AttentionMetadata
from .registry import UnknownLayerError


class NoForwardContextError(RuntimeError):
    """``attention`` ran (or :func:`get_forward_context` was called) outside ``set_forward_context``."""


@dataclasses.dataclass(eq=False)
class ForwardContext:
    """What ``attention`` reads at run time: the batch's metadata and each layer's KV cache."""

    metadata: AttentionMetadata
    kv_caches: dict[str, KVCache] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.metadata, AttentionMetadata):
            raise TypeError(
                f"{_PREFIX}: ForwardContext `metadata` must be an AttentionMetadata, "
                f"got {type(self.metadata).__name__}"
            )
        for name, cache in self.kv_caches.items():
            if not isinstance(cache, KVCache):
                raise TypeError(
                    f"{_PREFIX}: ForwardContext `kv_caches[{name!r}]` must be a KVCache, "
                    f"got {type(cache).__name__}"
                )

    def kv_cache(self, layer_name: str) -> KVCache:
        """The KV cache of ``layer_name``; raises :class:`UnknownLayerError` if there is none."""
        cache = self.kv_caches.get(layer_name)
        if cache is None:
            raise UnknownLayerError(
                f"{_PREFIX}: the forward context has no KV cache for layer {layer_name!r} "
                f"(it has caches for: {_quoted(sorted(self.kv_caches))})"
            )
        return cache


_FORWARD_CONTEXT: Optional[ForwardContext] = None


@contextlib.contextmanager
def set_forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    """Make ``ctx`` the forward context inside the ``with`` block (nesting restores the outer one).

    Process-wide rather than thread-local, as in production engines: the model runner
    may set it on one thread and run the compiled model on another.
    """
    global _FORWARD_CONTEXT
    if not isinstance(ctx, ForwardContext):
        raise TypeError(f"{_PREFIX}: set_forward_context expects a ForwardContext, got {type(ctx).__name__}")
    previous = _FORWARD_CONTEXT
    _FORWARD_CONTEXT = ctx
    try:
        yield ctx
    finally:
        _FORWARD_CONTEXT = previous


def get_forward_context() -> ForwardContext:
    """The current forward context; raises :class:`NoForwardContextError` outside one."""
    ctx = _FORWARD_CONTEXT
    if ctx is None:
        raise NoForwardContextError(
            f"{_PREFIX}: no forward context is set; run the model inside "
            "`with fxfuse.attention.set_forward_context(ForwardContext(metadata, kv_caches)):`"
        )
    return ctx
