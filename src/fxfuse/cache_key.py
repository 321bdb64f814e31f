"""The cache key: changes whenever a pass could produce a different graph, and only then.

Inductor reuses a compiled graph while the custom pass's ``uuid()`` is unchanged and
then never runs the pass. So the key covers everything that decides the rewritten
graph (DESIGN §4) and nothing that differs between two processes building the same
passes: keys are built from source text and stable ``repr``s, never ids or addresses.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import inspect
import pathlib
import sys
from typing import Any, Iterable

import torch

from .rewrite import Rewrite, RewriteError, TensorSpec

# The framework modules whose code decides how patterns are traced and applied.
_FRAMEWORK = ("rewrite", "tracing", "canonicalize", "fusion_pass", "pass_manager", "cache_key", "compat")


def digest(parts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


@functools.cache
def framework_digest() -> str:
    """fxfuse's version, torch's version and the source of the framework modules."""
    from . import __version__

    here = pathlib.Path(__file__).parent
    return digest([__version__, torch.__version__, *((here / f"{m}.py").read_text() for m in _FRAMEWORK)])


def stable_repr(value: Any, where: str) -> str:
    """A representation that is equal across processes for equal values."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return repr(value)
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, enum.Enum):
        return f"{type(value).__qualname__}.{value.name}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(stable_repr(v, where) for v in value)
        return f"{type(value).__name__}({inner})"
    if isinstance(value, dict):
        items = sorted((stable_repr(k, where), stable_repr(v, where)) for k, v in value.items())
        return "{" + ", ".join(f"{k}: {v}" for k, v in items) + "}"
    if isinstance(value, (set, frozenset)):
        return "set(" + ", ".join(sorted(stable_repr(v, where) for v in value)) + ")"
    if isinstance(value, torch.Tensor):
        data = bytes(value.detach().cpu().contiguous().view(torch.uint8).flatten().tolist())
        return f"tensor({value.dtype}, {list(value.shape)}, {hashlib.sha256(data).hexdigest()})"
    if isinstance(value, TensorSpec) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return f"{type(value).__qualname__}{stable_repr(fields, where)}"
    if inspect.isfunction(value) or inspect.isclass(value):
        return f"{value.__module__}.{value.__qualname__}:{_source(value, where)}"
    if isinstance(value, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return str(value)
    raise RewriteError(
        f"{where} is a {type(value).__name__}, which has no stable representation for the cache key; "
        "use a bool, int, float, str, dtype, enum, tuple, dict, dataclass or tensor"
    )


def _source(obj: Any, where: str) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError) as e:
        raise RewriteError(f"{where}: the source of {obj!r} is not available for the cache key ({e})") from e


def _module_source(cls: type, where: str) -> str:
    module = sys.modules.get(cls.__module__)
    path = getattr(module, "__file__", None)
    if not path:
        raise RewriteError(f"{where}: module {cls.__module__} has no source file for the cache key")
    return pathlib.Path(path).read_text()


def rewrite_key(rewrite: Rewrite) -> str:
    """Class, class source, defining module's source, and parameters of one rewrite."""
    cls = type(rewrite)
    where = f"rewrite {rewrite.name}"
    params = {k: stable_repr(v, f"parameter {k!r} of {where}") for k, v in rewrite.parameters().items()}
    return digest([cls.__module__, cls.__qualname__, rewrite.name, _source(cls, where), _module_source(cls, where), repr(sorted(params.items()))])


def class_key(cls: type) -> str:
    """A class's name, source and defining module's source (for subclassed passes)."""
    where = f"class {cls.__qualname__}"
    return digest([cls.__module__, cls.__qualname__, _source(cls, where), _module_source(cls, where)])


def canonicalization_key(fns: Iterable[Any]) -> str:
    return digest(f"{f.__module__}.{f.__qualname__}:{_source(f, 'canonicalization')}" for f in fns)
