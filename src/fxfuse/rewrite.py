"""What a user writes: a `Rewrite` (pattern, replacement, example inputs, check)."""

from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .matcher import Match


class RewriteError(ValueError):
    """A rewrite that cannot be registered; the message names the rewrite and the cause."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """An example tensor input that costs nothing: it is only ever materialized as a fake tensor.

    Its shape only shapes the trace: sizes a pattern takes from the tensor match any size.
    ``optional=True``: the argument binds a tensor or ``None`` (an op's optional input, a
    bias); the pattern is traced both ways and the replacement receives what was bound.

    Example:
        >>> fxfuse.TensorSpec((8, 16), torch.bfloat16)
        TensorSpec(shape=(8, 16), dtype=torch.bfloat16, device=None, optional=False)
        >>> bias = fxfuse.TensorSpec((16,), torch.bfloat16, optional=True)
    """

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    device: str | torch.device | None = None
    optional: bool = dataclasses.field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"TensorSpec dtype must be a torch.dtype, got {self.dtype!r}")

    def materialize(self) -> torch.Tensor:
        """A tensor of this spec; call it under a fake mode so it allocates nothing."""
        return torch.empty(self.shape, dtype=self.dtype, device=self.device or "cpu")


class Rewrite(abc.ABC):
    """One fusion rule: ``pattern(*args)`` is replaced by ``replacement(*args)``.

    Each entry of :meth:`example_inputs` is one argument of both functions. Tensors (a
    :class:`TensorSpec` or a tensor) become tensor variables; a ``float``, ``int``,
    ``bool`` or ``str`` becomes a wildcard of that type, its value only a sample for
    tracing. A value that must match exactly is written as a constant in the body.

    Instance attributes are the rewrite's *parameters*: they are part of its identity
    and of the pass's cache key, so they must have a stable ``repr``.

    Example:
        >>> class MulAdd(fxfuse.Rewrite):
        ...     def pattern(self, x, y, z):
        ...         return x * y + z
        ...     def replacement(self, x, y, z):
        ...         return torch.addcmul(z, x, y)
        ...     def example_inputs(self):
        ...         return [fxfuse.TensorSpec((8, 16), torch.float32)] * 3
    """

    @abc.abstractmethod
    def pattern(self, *args: Any) -> Any:
        """The chain of ops to find, written as eager PyTorch."""

    @abc.abstractmethod
    def replacement(self, *args: Any) -> Any:
        """What computes the same outputs as :meth:`pattern`, faster."""

    @abc.abstractmethod
    def example_inputs(self) -> list[Any]:
        """One sample per argument: TensorSpec/tensor, or float/int/bool/str wildcards."""

    #: Also match where the operands of ``add``/``mul`` appear in the other order
    #: (``c + a * b`` for a pattern written ``x * y + z``). Each commutative node of the
    #: pattern doubles the number of search patterns (see docs/design-notes.md).
    commute: bool = False

    #: Tensor arguments whose dtype is free. By default, arguments whose example inputs
    #: share a dtype must bind tensors that share a dtype; list an argument here when the
    #: replacement accepts it in another dtype (say, an fp32 weight on a bf16 activation).
    free_dtypes: tuple[str, ...] = ()

    #: The op a chain of this rewrite is found from and counted at (an OpOverload of the
    #: pattern). Default: the pattern's most specific op (docs/design-notes.md, "Near misses").
    anchor: Any = None

    #: Whether the anchor sites this rewrite declines count as near misses
    #: (`fxfuse.miss_table`). False for rewrites whose ``check`` is a choice rather than
    #: a guard, so a declined site is a decision, not a fusion that failed.
    report_misses: bool = True

    def check(self, match: Match) -> bool:
        """An extra condition on a candidate match; ``match.kwargs`` holds the bound arguments."""
        return True

    def cache_state(self) -> object:
        """Everything outside the graph and the parameters that `check`/`replacement` read.

        Evaluated each time the pass's cache key is computed (Inductor asks at every
        compile), so a graph compiled under one state is never served under another.
        It must have a stable representation (primitives, dtypes, enums, tuples, dicts,
        dataclasses). Default ``None``: the rewrite reads nothing but the match.

        Example:
            >>> class OnlyIfEnabled(MulAddToFma):
            ...     def check(self, match):
            ...         return FEATURE_FLAGS["fma"]
            ...     def cache_state(self):
            ...         return FEATURE_FLAGS["fma"]
        """
        return None

    @property
    def name(self) -> str:
        """The class name; `FusionPass` names a second instance ``ClassName(param=value, ...)``."""
        return self.__dict__.get("_fxfuse_name", type(self).__name__)

    def parameters(self) -> dict[str, Any]:
        """The instance attributes that parametrize this rewrite, sorted by name."""
        return {k: v for k, v in sorted(vars(self).items()) if not k.startswith("_")}

    def __repr__(self) -> str:
        """``ClassName(param=value, ...)``: also the name of a second instance in one pass."""
        params = ", ".join(f"{k}={v!r}" for k, v in self.parameters().items())
        return f"{type(self).__name__}({params})"
