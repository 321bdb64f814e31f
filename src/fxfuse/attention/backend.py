"""The attention backend interface and the output quant schemes a backend may fuse.

A backend computes ``torch.ops.fxfuse.attention`` for the layers that use it. Besides
the computation it states which *output quant schemes* it can fuse into its epilogue;
the ``attn_quant_fusion`` pass asks this at compile time (via the layer registry) and
leaves the unfused ``attention -> quant`` chain alone for layers whose backend says no.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, ClassVar, Optional

import torch

if TYPE_CHECKING:  # only for annotations: context.py imports this module
    from .context import AttentionLayer, AttentionMetadata, KVCache

#: Output quant schemes, in the order the op documents them:
#: ``"none"`` writes the model dtype, ``"fp8_static"`` writes float8_e4m3fn with a
#: per-tensor scale (``output_scale``), ``"nvfp4"`` writes packed NVFP4 plus swizzled
#: E4M3 block scales (``output_scale`` is the global scale, ``output_block_scale`` given).
OUTPUT_QUANT_SCHEMES: tuple[str, ...] = ("none", "fp8_static", "nvfp4")


def output_quant_scheme(
    output_scale: Optional[torch.Tensor], output_block_scale: Optional[torch.Tensor]
) -> str:
    """The output quant scheme an ``attention`` call asks for, from its optional arguments.

    >>> output_quant_scheme(None, None)
    'none'
    >>> output_quant_scheme(torch.tensor([0.5]), None)
    'fp8_static'

    Raises ``ValueError`` for ``output_block_scale`` without ``output_scale`` (NVFP4
    needs its global scale).
    """
    if output_block_scale is not None:
        if output_scale is None:
            raise ValueError(
                "fxfuse.attention: `output_scale` must be given (the NVFP4 global scale) "
                "when `output_block_scale` is given"
            )
        return "nvfp4"
    return "none" if output_scale is None else "fp8_static"


def check_scheme(scheme: str) -> None:
    """``scheme`` must be one of :data:`OUTPUT_QUANT_SCHEMES`."""
    if scheme not in OUTPUT_QUANT_SCHEMES:
        raise ValueError(
            f"fxfuse.attention: unknown output quant scheme {scheme!r}; "
            f"expected one of {', '.join(repr(s) for s in OUTPUT_QUANT_SCHEMES)}"
        )


class AttentionBackend(abc.ABC):
    """How a layer computes ``torch.ops.fxfuse.attention``.

    Subclasses set the class attributes ``name`` and ``supported_output_quant`` (a
    subset of :data:`OUTPUT_QUANT_SCHEMES`, always containing ``"none"``) and implement
    :meth:`forward`. Backends are stateless: two instances of the same class are equal,
    so a layer can be re-registered with a fresh backend object.

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
        layer: "AttentionLayer",
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        output: torch.Tensor,
        output_scale: Optional[torch.Tensor],
        output_block_scale: Optional[torch.Tensor],
        metadata: "AttentionMetadata",
        kv_cache: "KVCache",
    ) -> None:
        """Write ``key``/``value`` into ``kv_cache`` at ``metadata.slot_mapping``, then write
        the causal attention of ``query`` into ``output`` (and ``output_block_scale``).

        Called by the op only after every argument has been validated, so
        implementations may assume consistent shapes, dtypes, devices and metadata.
        """

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
