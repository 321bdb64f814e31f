"""The attention backend interface, and the layer description that names a backend.

A backend computes ``torch.ops.fxfuse.attention`` for the layers that use it. Besides
the computation it states which *output quant schemes* (:mod:`.schemes`) it can fuse
into its epilogue, and whether it applies the *rotary embedding* to the query and key
itself (:attr:`AttentionBackend.fuses_rope`); the ``attn_quant_fusion`` and
``rope_kv_cache_fusion`` passes ask this at compile time (via the layer registry) and
leave the unfused chains alone for layers whose backend says no.

:class:`AttentionBackend` and :class:`AttentionLayer` live together because each names
the other: a layer holds its backend, and a backend's ``forward`` is handed the layer.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import ClassVar, Optional

import torch

from ._common import _PREFIX, _is_int
from .kv_cache import KVCache
from .metadata import AttentionMetadata
from .schemes import OUTPUT_QUANT_SCHEMES, check_scheme


@dataclasses.dataclass(frozen=True, eq=False)
class Rotary:
    """The rotary embedding an ``attention`` call asks its backend to apply to ``query``
    and ``key`` before anything else (the op's ``positions``, ``cos_sin_cache`` and
    ``is_neox``, with the meaning of ``fxfuse::rotary_embedding``'s arguments).

    The backend then writes the *rotated* key into the KV cache and attends with the
    rotated query: exactly what ``rotary_embedding`` followed by ``attention`` computes.

    >>> Rotary(torch.arange(3), torch.ones(16, 8), True).rotary_dim  # a [max_position, rotary_dim] cache
    8
    """

    positions: torch.Tensor
    cos_sin_cache: torch.Tensor
    is_neox: bool

    @property
    def rotary_dim(self) -> int:
        return int(self.cos_sin_cache.shape[1])


class AttentionBackend(abc.ABC):
    """How a layer computes ``torch.ops.fxfuse.attention``.

    Subclasses set the class attributes ``name`` and ``supported_output_quant`` (a
    subset of :data:`OUTPUT_QUANT_SCHEMES`, always containing ``"none"``) and implement
    :meth:`forward`. A backend that sets ``fuses_rope = True`` takes one more keyword
    argument, ``rotary`` (a :class:`Rotary` or None), and applies it to ``query`` and
    ``key`` before it writes the cache. Backends are stateless: two instances of the same
    class are equal, so a layer can be re-registered with a fresh backend object.

    >>> class MyBackend(AttentionBackend):
    ...     name = "mine"
    ...     supported_output_quant = frozenset({"none"})
    ...     def forward(self, layer, query, key, value, output, output_scale,
    ...                 output_block_scale, metadata, kv_cache):
    ...         ...
    >>> MyBackend().supports_output_quant("fp8_static")
    False
    """

    name: ClassVar[str]
    supported_output_quant: ClassVar[frozenset[str]]
    #: Whether :meth:`forward` takes ``rotary=`` and rotates query and key itself (then
    #: the ``rope_kv_cache_fusion`` pass hands it the pre-rotary query and key).
    fuses_rope: ClassVar[bool] = False

    def check(self) -> None:
        """Raise ``TypeError`` if the class attributes are missing or name unknown schemes.

        Run when a layer is built with this backend, so that a typo in a scheme name
        fails loudly there instead of making the fusion pass silently never fire.
        """
        cls = type(self)
        if not isinstance(getattr(cls, "name", None), str) or not cls.name:
            raise TypeError(f"{cls.__qualname__}: an AttentionBackend must set a non-empty `name`")
        schemes = getattr(cls, "supported_output_quant", None)
        if not isinstance(schemes, frozenset) or "none" not in schemes:
            raise TypeError(
                f"{cls.__qualname__}: `supported_output_quant` must be a frozenset containing 'none', "
                f"got {schemes!r}"
            )
        if not isinstance(getattr(cls, "fuses_rope", None), bool):
            raise TypeError(f"{cls.__qualname__}: `fuses_rope` must be a bool, got {getattr(cls, 'fuses_rope', None)!r}")
        unknown = sorted(s for s in schemes if s not in OUTPUT_QUANT_SCHEMES)
        if unknown:
            raise TypeError(
                f"{cls.__qualname__}: `supported_output_quant` names unknown scheme(s) {unknown}; "
                f"known: {list(OUTPUT_QUANT_SCHEMES)}"
            )

    def supports_output_quant(self, scheme: str) -> bool:
        """Whether this backend can write ``scheme`` (see :data:`OUTPUT_QUANT_SCHEMES`) itself."""
        check_scheme(scheme)
        return scheme in self.supported_output_quant

    def preferred_block_size(self, device: torch.device) -> Optional[int]:
        """The KV-cache block size (slots per page) this backend runs fastest with on
        ``device``, or None for no preference. A runner that is not told a block size
        takes the largest preference of its layers' backends (see ``ModelRunner``).

        >>> TritonAttentionBackend().preferred_block_size(torch.device("cuda"))  # on an H100
        64
        """
        return None

    @abc.abstractmethod
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
    ) -> None:
        """Write ``key``/``value`` into ``kv_cache`` at ``metadata.slot_mapping``, then write
        the causal attention of ``query`` into ``output`` (and ``output_block_scale``).

        Called by the op only after every argument has been validated, so
        implementations may assume consistent shapes, dtypes, devices and metadata.
        A backend with ``fuses_rope`` is also passed ``rotary=`` (None when the call
        asks for no rotation); ``query``/``key`` may then be token-strided
        ``[T, H, D]`` views (each head's features contiguous), as ``rotary_embedding``
        takes them.
        """

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


@dataclasses.dataclass(frozen=True)
class AttentionLayer:
    """The static description of one attention layer: its head counts and backend.

    ``num_heads`` query heads share ``num_kv_heads`` key/value heads (grouped-query
    attention): query head ``h`` uses kv head ``h // (num_heads // num_kv_heads)``.

    >>> from fxfuse.attention import NativeAttentionBackend
    >>> layer = AttentionLayer("layers.0.attn", num_heads=8, num_kv_heads=2, head_size=64,
    ...                        backend=NativeAttentionBackend())
    >>> layer.supports_output_quant("fp8_static")
    True
    """

    name: str
    num_heads: int
    num_kv_heads: int
    head_size: int
    backend: AttentionBackend

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"{_PREFIX}: AttentionLayer `name` must be a non-empty str, got {self.name!r}")
        for fname in ("num_heads", "num_kv_heads", "head_size"):
            v = getattr(self, fname)
            if not _is_int(v) or v <= 0:
                raise ValueError(
                    f"{_PREFIX}: layer {self.name!r}: `{fname}` must be a positive int, got {v!r}"
                )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{_PREFIX}: layer {self.name!r}: `num_heads` ({self.num_heads}) must be a multiple "
                f"of `num_kv_heads` ({self.num_kv_heads})"
            )
        if not isinstance(self.backend, AttentionBackend):
            raise TypeError(
                f"{_PREFIX}: layer {self.name!r}: `backend` must be an AttentionBackend instance, "
                f"got {type(self.backend).__name__}"
            )
        self.backend.check()

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def scale(self) -> float:
        """The softmax scale, ``1 / sqrt(head_size)``."""
        return 1.0 / math.sqrt(self.head_size)

    def supports_output_quant(self, scheme: str) -> bool:
        """Whether this layer's backend fuses output quant ``scheme`` (one of
        ``"none"``, ``"fp8_static"``, ``"nvfp4"``)."""
        return self.backend.supports_output_quant(scheme)

    @property
    def fuses_rope(self) -> bool:
        """Whether this layer's backend applies the rotary embedding itself (``rotary=``)."""
        return self.backend.fuses_rope
