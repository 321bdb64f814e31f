"""The static, process-wide layer registry: layer name -> :class:`~.backend.AttentionLayer`.

Filled when the model is built, so that compile-time passes can ask a layer's backend
which fusions it supports, and read by the op at run time for head counts and backend.

>>> layer = register_layer(AttentionLayer("layers.0.attn", 8, 2, 64, NativeAttentionBackend()))
>>> get_layer("layers.0.attn") is layer
True
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

from ._common import _PREFIX, _quoted
from .backend import AttentionLayer


class UnknownLayerError(KeyError):
    """A layer name that the registry (or the forward context's KV caches) does not know."""

    def __str__(self) -> str:
        # KeyError's str() is the repr of its argument, which would quote the whole message.
        return str(self.args[0]) if self.args else ""


_LAYERS: dict[str, AttentionLayer] = {}
_LAYERS_LOCK = threading.Lock()


def register_layer(layer: AttentionLayer, *, replace: bool = False) -> AttentionLayer:
    """Add ``layer`` to the process-wide registry under ``layer.name``; returns it.

    Registering an equal layer again (same name, head counts and backend class) is a
    no-op, so building the same model twice is fine. A *different* layer under a
    taken name raises ``ValueError`` unless ``replace=True``.

    >>> layer = register_layer(AttentionLayer("layers.0.attn", 8, 2, 64, NativeAttentionBackend()))
    """
    if not isinstance(layer, AttentionLayer):
        raise TypeError(f"{_PREFIX}: register_layer expects an AttentionLayer, got {type(layer).__name__}")
    with _LAYERS_LOCK:
        old = _LAYERS.get(layer.name)
        if old is not None and old != layer and not replace:
            raise ValueError(
                f"{_PREFIX}: a different layer is already registered as {layer.name!r} "
                f"({old}); pass replace=True to replace it"
            )
        _LAYERS[layer.name] = layer
    return layer


def get_layer(name: str) -> AttentionLayer:
    """The registered layer called ``name``; raises :class:`UnknownLayerError` (a ``KeyError``)."""
    with _LAYERS_LOCK:
        layer = _LAYERS.get(name)
        if layer is None:
            known = sorted(_LAYERS)
    if layer is None:
        raise UnknownLayerError(
            f"{_PREFIX}: no attention layer named {name!r} is registered "
            f"(registered: {_quoted(known)}); register it with fxfuse.attention.register_layer"
        )
    return layer


def unregister_layer(name: str) -> AttentionLayer:
    """Remove and return the layer called ``name``; raises :class:`UnknownLayerError` if absent."""
    layer = get_layer(name)
    with _LAYERS_LOCK:
        _LAYERS.pop(name, None)
    return layer


def registered_layer_names() -> list[str]:
    """The names of all registered layers, sorted."""
    with _LAYERS_LOCK:
        return sorted(_LAYERS)


@contextlib.contextmanager
def temporary_layers(*layers: AttentionLayer) -> Iterator[tuple[AttentionLayer, ...]]:
    """Register ``layers`` (replacing same-named ones) for the ``with`` block, then restore
    the registry entries of those names as they were.

    >>> with temporary_layers(AttentionLayer("tmp", 4, 1, 64, NativeAttentionBackend())):
    ...     get_layer("tmp").num_heads
    4
    """
    with _LAYERS_LOCK:
        saved = {layer.name: _LAYERS.get(layer.name) for layer in layers}
    try:
        for layer in layers:
            register_layer(layer, replace=True)
        yield layers
    finally:
        with _LAYERS_LOCK:
            for name, old in saved.items():
                if old is None:
                    _LAYERS.pop(name, None)
                else:
                    _LAYERS[name] = old
