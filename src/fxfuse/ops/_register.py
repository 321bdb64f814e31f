"""One way to define a ``torch.ops.fxfuse`` operator: :func:`define_op`.

Every op needs the same four things: a schema, a real implementation (the Triton kernel
on CUDA, the native reference elsewhere), a fake implementation for tracing, and one
validator that both of them call first, so that bad input fails in eager mode and at
trace/compile time with the same message. Written out by hand that is a
``@torch.library.custom_op`` function that calls the validator, plus an
``@op.register_fake`` function that repeats the signature and calls it again;
``define_op`` keeps the first and derives the second.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Optional

import torch


def define_op(
    name: str,
    *,
    fake: Callable[..., Any],
    validate: Optional[Callable[..., None]] = None,
    mutates_args: Iterable[str] = (),
    namespace: str = "fxfuse",
) -> Callable[[Callable[..., Any]], Any]:
    """Decorator: define ``torch.ops.<namespace>.<name>`` (``fxfuse`` unless a test says
    otherwise) from its real implementation.

    The decorated function is the op's real implementation: its annotations give the
    schema (``torch.library.infer_schema``, evaluated in the decorated function's module,
    so string annotations resolve there) and its docstring is the op's documentation.
    ``validate(*args)`` runs before it and before ``fake(*args)``; ``fake`` returns
    empty outputs with the shapes, dtypes and strides the real implementation returns.
    Both receive every argument positionally, defaults filled in, whichever way the op
    was called (the dispatcher hands Python kernels only the arguments the caller gave).
    Returns the ``CustomOpDef``, as ``@torch.library.custom_op`` does, carrying the
    implementation's docstring.

    Example (``fxfuse.ops.norm``):
        >>> @define_op("rms_norm", fake=lambda x, weight, eps: x.new_empty(x.shape), validate=validate_rms_norm)
        ... def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        ...     '''RMS norm over the last dim of ``x``, scaled by ``weight``.'''
        ...     if use_kernels(x):
        ...         from ..kernels.norm_quant import rms_norm_quant
        ...         return rms_norm_quant(x, weight, eps)[0]
        ...     return rms_norm_native(x, weight, eps)
        >>> torch.ops.fxfuse.rms_norm(torch.ones(2, 4), torch.ones(3), 1e-6)  # validate_rms_norm raises
        Traceback (most recent call last):
        ...
        ValueError: fxfuse.rms_norm: `weight` must have shape [4] (the last dim of `x`), got (3,)
    """

    def wrap(impl: Callable[..., Any]) -> Any:
        schema = torch.library.infer_schema(impl, mutates_args=mutates_args)
        signature = inspect.signature(impl)
        n_params = len(signature.parameters)
        # Defaults of the trailing parameters, to complete a call that left them out.
        defaults = tuple(p.default for p in signature.parameters.values())

        def complete(args: tuple, kwargs: dict) -> tuple:
            if kwargs:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                return tuple(bound.args)
            if len(args) < n_params:
                return args + defaults[len(args):]
            return args

        def real(*args: Any, **kwargs: Any) -> Any:
            args = complete(args, kwargs)
            if validate is not None:
                validate(*args)
            return impl(*args)

        def fake_impl(*args: Any, **kwargs: Any) -> Any:
            args = complete(args, kwargs)
            if validate is not None:
                validate(*args)
            return fake(*args)

        real.__name__, real.__qualname__, real.__doc__ = impl.__name__, impl.__qualname__, impl.__doc__
        real.__module__ = impl.__module__
        op = torch.library.custom_op(f"{namespace}::{name}", real, mutates_args=mutates_args, schema=schema)
        op.register_fake(fake_impl)
        op.__doc__ = impl.__doc__  # CustomOpDef would show its class's docstring
        return op

    return wrap
