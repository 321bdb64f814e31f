"""What a user writes: a `Rewrite` (pattern, replacement, example inputs, check)."""

from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch._inductor.pattern_matcher import Match


class RewriteError(ValueError):
    """A rewrite that cannot be registered; the message names the rewrite and the cause."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """An example tensor input that costs nothing: it is only ever materialized as a fake tensor.

    Example:
        >>> fxfuse.TensorSpec((8, 16), torch.bfloat16)
        TensorSpec(shape=(8, 16), dtype=torch.bfloat16, device=None)
    """

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    device: str | torch.device | None = None

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

    def check(self, match: Match) -> bool:
        """An extra condition on a candidate match; ``match.kwargs`` holds the bound arguments."""
        return True

    @property
    def name(self) -> str:
        return type(self).__name__

    def parameters(self) -> dict[str, Any]:
        """The instance attributes that parametrize this rewrite, sorted by name."""
        return {k: v for k, v in sorted(vars(self).items()) if not k.startswith("_")}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.parameters().items())
        return f"{self.name}({params})"
