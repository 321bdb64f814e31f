"""One normalized form for every call in a graph: the op's full schema, defaults written out.

Tracing drops arguments equal to their defaults and lets a caller pass any argument by
keyword, so ``addmm(i, a, b)`` and ``addmm(i, a, b, beta=1)`` are one call written two
ways, and ``addmm(i, a, b, beta=0.5)`` a different one. A pattern node and a graph node
are compared in this form only: every schema argument in schema order, each either as
written or as its default. An argument a pattern leaves at its default then matches only
that default (or an equal explicit value), never "anything".

Example:
    >>> call = normalize(node)            # node: aten.addmm.default(i, a, b, beta=0.5)
    >>> call.names, call.values[3:]
    (('self', 'mat1', 'mat2', 'beta', 'alpha'), (0.5, 1))
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from typing import Any, Optional

import torch
import torch.fx

class _Missing:
    def __repr__(self) -> str:
        return "<missing>"

    def __reduce__(self) -> str:
        return "MISSING"  # pickles as a reference to the one instance


#: Marks a schema argument a call neither passes nor has a default for (a malformed call).
MISSING = _Missing()


@dataclasses.dataclass(frozen=True)
class ArgInfo:
    """One schema argument: its name, what kind of value it takes, and its default."""

    name: str
    kind: str  # "tensor" (Tensor-typed; may hold a wrapped Python number), "number" (Scalar), "other"
    kwarg_only: bool
    default: Any  # MISSING when the argument has none


@dataclasses.dataclass(frozen=True)
class Call:
    """A call in normalized form: every argument by name, in schema order.

    ``explicit[i]`` says whether the call wrote argument ``i`` (False: its default was filled in).
    """

    names: tuple[str, ...]
    values: tuple[Any, ...]
    explicit: tuple[bool, ...]
    kinds: tuple[str, ...]


def _kind(arg_type: Any) -> str:
    text = str(arg_type)
    if text.startswith(("Tensor", "Optional[Tensor]", "List[Tensor]", "List[Optional[Tensor]]")):
        return "tensor"
    if text in ("number", "Optional[number]"):
        return "number"
    return "other"


@functools.cache
def schema_args(op: torch._ops.OpOverload) -> tuple[ArgInfo, ...]:
    """The arguments of ``op``'s schema, once per op.

    >>> [a.name for a in schema_args(torch.ops.aten.addmm.default)]
    ['self', 'mat1', 'mat2', 'beta', 'alpha']
    """
    out = []
    for a in op._schema.arguments:
        default = a.default_value if a.has_default_value() else MISSING
        out.append(ArgInfo(a.name, _kind(a.type), a.kwarg_only, default))
    return tuple(out)


@functools.cache
def _hops() -> tuple[Any, ...]:
    from . import compat

    return tuple(compat.auto_functionalized_ops().values())


def normalize(node: torch.fx.Node) -> Call:
    """``node``'s call in normalized form (see the module docstring).

    An OpOverload call is written in its schema's order with defaults filled in; an
    ``auto_functionalized(_v2)`` call is its wrapped op plus that op's arguments by name
    (defaults filled in) and the wrapper's own ``_``-prefixed entries; any other call
    (``getitem``, Python arithmetic on sizes) keeps its positional arguments, then its
    keyword arguments by name.
    """
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return _normalize_op(target, node.args, node.kwargs)
    if target in _hops():
        return _normalize_hop(node)
    names = tuple(str(i) for i in range(len(node.args))) + tuple(sorted(node.kwargs))
    values = tuple(node.args) + tuple(node.kwargs[k] for k in sorted(node.kwargs))
    return Call(names, values, (True,) * len(values), ("other",) * len(values))


def _normalize_op(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> Call:
    infos = schema_args(op)
    values, explicit = [], []
    for i, a in enumerate(infos):
        if not a.kwarg_only and i < len(args):
            values.append(args[i])
            explicit.append(True)
        elif a.name in kwargs:
            values.append(kwargs[a.name])
            explicit.append(True)
        else:
            values.append(a.default)
            explicit.append(False)
    return Call(tuple(a.name for a in infos), tuple(values), tuple(explicit), tuple(a.kind for a in infos))


def _normalize_hop(node: torch.fx.Node) -> Call:
    wrapped = node.args[0]
    kwargs = dict(node.kwargs)
    names, values, explicit, kinds = ["_op"], [wrapped], [True], ["other"]
    if isinstance(wrapped, torch._ops.OpOverload):
        for a in schema_args(wrapped):
            if a.name in kwargs:
                names.append(a.name), values.append(kwargs.pop(a.name)), explicit.append(True)
            else:
                names.append(a.name), values.append(a.default), explicit.append(False)
            kinds.append(a.kind)
    for k in sorted(kwargs):  # the wrapper's own bookkeeping (_x_base_index, _all_bases, ...)
        names.append(k), values.append(kwargs[k]), explicit.append(True), kinds.append("other")
    return Call(tuple(names), tuple(values), tuple(explicit), tuple(kinds))


def same_value(p: Any, g: Any, kind: str = "other") -> bool:
    """Whether a pattern literal ``p`` and a graph literal ``g`` are the same argument.

    Types count: ``2`` and ``2.0`` promote an integer tensor differently, and ``True`` is
    not ``1``. Only a Scalar-typed schema argument (``alpha``, ``beta``) compares numbers by
    value, where the schema itself writes its default as an ``int`` and a caller may pass
    a ``float``. Floats are equal bit for bit in sign (``-0.0`` is not ``0.0``); NaN equals NaN.

    >>> same_value(2, 2.0), same_value(1, 1.0, "number"), same_value(True, 1)
    (False, True, False)
    """
    if isinstance(p, (list, tuple)) and isinstance(g, (list, tuple)):
        return len(p) == len(g) and all(same_value(a, b) for a, b in zip(p, g))
    if kind == "number" and _plain_number(p) and _plain_number(g):
        return _same_float(float(p), float(g)) if isinstance(p, float) or isinstance(g, float) else p == g
    if type(p) is not type(g):
        return False
    if isinstance(p, float):
        return _same_float(p, g)
    try:
        return bool(p == g)
    except Exception:  # noqa: BLE001 - values that do not compare (tensors) are not the same argument
        return p is g


def _plain_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _same_float(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


def op_name(target: Any) -> str:
    """A readable name for a call target: ``aten.mm.default``, ``operator.getitem``."""
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    if target is operator.getitem:
        return "operator.getitem"
    module = getattr(target, "__module__", None)
    name = getattr(target, "__name__", None) or type(target).__name__
    return f"{module}.{name}" if module in ("operator", "math", "builtins") else str(name)


def node_op_name(node: torch.fx.Node) -> str:
    """The op a node runs; for a functional wrapper, the wrapped op too."""
    if node.op != "call_function":
        return node.op
    if node.target in _hops() and node.args:
        return f"{op_name(node.target)}({op_name(node.args[0])})"
    return op_name(node.target)


def tensor_value(v: Any) -> Optional[torch.Tensor]:
    """The tensor a graph value holds (a node's fake value), or None."""
    val = v.meta.get("val") if isinstance(v, torch.fx.Node) else v
    return val if isinstance(val, torch.Tensor) else None


def dim_text(size: Any) -> Any:
    """A dimension as an int when it is one (a SymInt whose value is known too), else its
    symbolic text: what output shapes are compared by."""
    if isinstance(size, torch.SymInt):
        expr = size.node.expr
        return int(expr) if getattr(expr, "is_Integer", False) else str(expr)
    return int(size)
