"""Graph normalizations applied identically to traced patterns and to graphs being matched.

A pattern written with ``view`` must match a graph that holds ``reshape``; a pattern
must not fail because the graph carries a permute that does nothing. Each
canonicalization is a plain function ``graph -> number of nodes changed``; its source
is part of every pass's cache key, because changing one changes what matches.
"""

from __future__ import annotations

import operator
import sys
from typing import Any, Callable

import torch
import torch.fx

aten = torch.ops.aten


def _known_true(cond: object) -> bool:
    """``statically_known_true``, imported when first needed (it imports sympy)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(cond))

Canonicalization = Callable[[torch.fx.Graph], int]

_VIEWS = (aten.view.default, aten._unsafe_view.default)


def view_to_reshape(graph: torch.fx.Graph) -> int:
    """``view``/``_unsafe_view`` -> ``reshape``: Inductor's post-grad graphs hold reshape."""
    changed = 0
    for target in _VIEWS:
        for node in graph.find_nodes(op="call_function", target=target):
            node.target = aten.reshape.default
            changed += 1
    return changed


def remove_noop_permute(graph: torch.fx.Graph) -> int:
    """``permute(x, [0, 1, ..., n-1])`` -> ``x``."""
    changed = 0
    for node in list(graph.find_nodes(op="call_function", target=aten.permute.default)):
        dims = list(node.args[1])
        if dims == list(range(len(dims))):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            changed += 1
    return changed


# --------------------------------------------------------------------------- split -> slice
#
# torch 2.15 functionalizes `split`/`chunk`/`unbind` into one `slice`/`select` per piece
# (pytorch #194037); earlier releases keep the multi-output op and its `getitem`s. A
# pattern traced on one release must match graphs from the other form (and an Inductor
# pass may produce either), so both are brought to the per-piece form:
#
# * each piece becomes one view of the input that depends on its own offsets only, so
#   the rewrite is local: it needs neither the sibling pieces (dead ones are gone from
#   the graph) nor the input's size along the split dimension, because the last piece
#   runs "to the end" (`end` = `_TO_END`, which `slice` clamps). With dynamic shapes
#   that size is symbolic and the piece still needs no arithmetic on it;
# * the reverse (slices -> split) would have to prove that a set of slices partitions a
#   dimension of possibly unknown size, which fails on exactly the dynamic graphs and
#   on any graph where a piece was dead-code eliminated.
#
# Slices are then normalized (non-negative dim, explicit start, `_TO_END` for an end at
# or past the size) so that `x[:, 8:]`, a split's last piece and 2.15's slice of it
# are one node.

_TO_END = sys.maxsize  # the `end` Python's `x[a:]` traces to
_SPLITS = (aten.split.Tensor, aten.split.sizes, aten.split.default, aten.split_with_sizes.default)


_SLICE_ARGS = (("dim", 0), ("start", None), ("end", None), ("step", 1))


def _args(node: torch.fx.Node, names: tuple[tuple[str, Any], ...]) -> list[Any]:
    """``node``'s arguments after the first, by schema position then keyword, else default."""
    args, kwargs = node.args, node.kwargs
    return [args[i + 1] if len(args) > i + 1 else kwargs.get(name, default) for i, (name, default) in enumerate(names)]


def _arg(node: torch.fx.Node, i: int, name: str, default: Any) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _rank(node: Any) -> int:
    """The rank of a tensor node, 0 when unknown (nothing to split or slice then)."""
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else 0


def _static_size(node: torch.fx.Node, dim: int) -> int | None:
    """The size of ``node`` along ``dim`` if it is a known integer, else None."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    size = val.shape[dim]
    return size if isinstance(size, int) else None


def _symbolic(graph: torch.fx.Graph, fn: Callable[[Any, Any], Any], a: Any, b: Any) -> Any:
    """``fn(a, b)`` (add or mul) on ints or SymInt nodes: folded where the result is known
    without the symbol (both ints, ``x + 0``, ``x * 1``, ``x * 0``), else a new node."""
    if not isinstance(a, torch.fx.Node) and not isinstance(b, torch.fx.Node):
        return fn(a, b)
    if fn is operator.mul and 0 in (a, b):
        return 0
    identity = 1 if fn is operator.mul else 0
    if b == identity or a == identity:
        return a if b == identity else b
    node = graph.call_function(fn, (a, b))
    val = lambda x: x.meta.get("val") if isinstance(x, torch.fx.Node) else x  # noqa: E731
    node.meta["val"] = fn(val(a), val(b))
    return node


def _piece_bounds(graph: torch.fx.Graph, split: torch.fx.Node, index: int, count: int) -> tuple[Any, Any]:
    """``(start, end)`` of piece ``index`` of ``count`` along the split dimension."""
    sizes = split.args[1] if len(split.args) > 1 else split.kwargs.get("split_size", split.kwargs.get("split_sizes"))
    last = index == count - 1
    if split.target is aten.split.Tensor:  # equal pieces of `sizes`, the last one shorter
        start = _symbolic(graph, operator.mul, sizes, index)
        return start, _TO_END if last else _symbolic(graph, operator.mul, sizes, index + 1)
    start = 0
    for s in sizes[:index]:
        start = _symbolic(graph, operator.add, start, s)
    return start, _TO_END if last else _symbolic(graph, operator.add, start, sizes[index])


def split_to_slice(graph: torch.fx.Graph) -> int:
    """``getitem(split(x, ...), i)`` -> ``slice(x, dim, start, end)``; ``unbind`` -> ``select``.

    Covers ``split``, ``split_with_sizes`` (``chunk`` traces to these) and ``unbind``.
    Uses of the multi-output node other than ``getitem`` (e.g. the whole list passed on)
    keep it; it is erased once nothing uses it.

    Example:
        >>> gm = make_fx(lambda x: torch.mul(*x.chunk(2, -1)))(torch.randn(4, 6))
        >>> split_to_slice(gm.graph)          # -> slice(x, 1, 0, 3), slice(x, 1, 3, _TO_END)
        2
    """
    changed = 0
    for target in (*_SPLITS, aten.unbind.int):
        for node in list(graph.find_nodes(op="call_function", target=target)):
            src, pieces, rank = node.args[0], node.meta.get("val"), _rank(node.args[0])
            if not rank or not isinstance(pieces, (list, tuple)):
                continue  # no metadata to place the pieces with: leave the node as it is
            dim = _arg(node, 2 if target in _SPLITS else 1, "dim", 0) % rank
            for user in list(node.users):
                if user.target is not operator.getitem or not isinstance(user.args[1], int):
                    continue
                index = user.args[1] % len(pieces)
                with graph.inserting_before(user):
                    if target is aten.unbind.int:
                        piece = graph.call_function(aten.select.int, (src, dim, index))
                    else:
                        start, end = _piece_bounds(graph, node, index, len(pieces))
                        piece = graph.call_function(aten.slice.Tensor, (src, dim, start, end))
                piece.meta.update(user.meta)  # the same view: same shape, strides and offset
                user.replace_all_uses_with(piece)
                graph.erase_node(user)
                changed += 1
            if not node.users:
                graph.erase_node(node)
    return changed


def _reaches_end(end: Any, size: Any) -> bool:
    """Whether ``end`` (an int or a SymInt node) is provably at or past ``size``."""
    if isinstance(end, torch.fx.Node):
        end = end.meta.get("val")
        if not isinstance(end, (int, torch.SymInt)):
            return False
    return bool(_known_true(end >= size))


def _same_args(new: tuple[Any, ...], old: tuple[Any, ...]) -> bool:
    # By identity, plain ints by value: `==` on a tuple holding SymInts asks sympy.
    return len(new) == len(old) and all(
        a is b or (type(a) is int and type(b) is int and a == b) for a, b in zip(new, old))


def normalize_slice(graph: torch.fx.Graph) -> int:
    """Write every ``slice``/``select`` one way: all arguments explicit, dims and indices
    non-negative, an ``end`` at or past a static size as `_TO_END`, a step of 1 omitted.

    Example:
        >>> gm = make_fx(lambda x: x[:, 2:6] + x.select(-1, -1)[:, None])(torch.randn(4, 6))
        >>> normalize_slice(gm.graph)         # -> slice(x, 1, 2, _TO_END), select(x, 1, 5)
        2
    """
    changed = 0
    for node in list(graph.find_nodes(op="call_function", target=aten.slice.Tensor)):
        src = node.args[0]
        rank = _rank(src)
        if not rank:
            continue
        dim, start, end, step = _args(node, _SLICE_ARGS)
        dim %= rank
        size = _static_size(src, dim)
        start = 0 if start is None else start
        if isinstance(start, int) and start < 0 and size is not None:
            start = max(start + size, 0)
        # (`_TO_END` itself first: the comparison with a symbolic size is a sympy query,
        # and every pass of a pipeline canonicalizes the graph again.)
        if end is None or (type(end) is int and end == _TO_END) or _reaches_end(end, src.meta["val"].shape[dim]):
            end = _TO_END
        elif isinstance(end, int) and end < 0 and size is not None:
            end = max(end + size, 0)
        args = (src, dim, start, end) if step == 1 else (src, dim, start, end, step)
        if not _same_args(args, node.args) or node.kwargs:
            node.args, node.kwargs = args, {}
            changed += 1
    for node in list(graph.find_nodes(op="call_function", target=aten.select.int)):
        src, dim, index = node.args[0], _arg(node, 1, "dim", 0), _arg(node, 2, "index", 0)
        rank = _rank(src)
        if not rank:
            continue
        dim %= rank
        size = _static_size(src, dim)
        if isinstance(index, int) and index < 0 and size is not None:
            index += size
        if not _same_args((src, dim, index), node.args) or node.kwargs:
            node.args, node.kwargs = (src, dim, index), {}
            changed += 1
    return changed


# Namespaces whose ops Inductor lowers itself; their nodes are left as traced.
_CORE_NAMESPACES = frozenset({"aten", "prims", "_c10d_functional", "c10d_functional"})
# Argument types whose schema default is the Python value a call would pass. Enum-like
# types (ScalarType, Layout, ...) report their defaults as integer codes: never written.
_PLAIN_TYPES = frozenset({"bool", "int", "float", "str", "SymInt", "SymFloat"})


def _custom_op_schema_tail(node: torch.fx.Node) -> list[Any] | None:
    """The positional schema arguments of a custom-op call past those it passes."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return None
    if target.namespace in _CORE_NAMESPACES:
        return None
    return [a for a in target._schema.arguments if not a.kwarg_only]


def _writable_default(arg: Any) -> bool:
    if not arg.has_default_value():
        return False
    return arg.default_value is None or str(arg.type) in _PLAIN_TYPES


def fill_custom_op_defaults(graph: torch.fx.Graph) -> int:
    """Write the defaulted positional arguments of custom-op calls explicitly.

    Tracing drops trailing arguments equal to their defaults, so ``op(x, 128, False)``
    and ``op(x, 128)`` are one call written two ways, and a ``bool``/``int`` wildcard
    whose sample equals the default would vanish from the pattern. With the defaults
    written out, a pattern and a graph hold the same arguments however they were called.
    `FusionPass` undoes this (`restore_custom_op_defaults`) once it has matched, because
    Inductor's lowering expects calls in the traced form.
    """
    changed = 0
    for node in graph.nodes:
        params = _custom_op_schema_tail(node)
        if params is None or len(node.args) >= len(params):
            continue
        missing = params[len(node.args):]
        if any(a.name in node.kwargs for a in missing):
            continue
        fill = []
        for a in missing:  # positional: only a contiguous run can be written
            if not _writable_default(a):
                break
            fill.append(a.default_value)
        if fill:
            node.args = (*node.args, *fill)
            changed += 1
    return changed


def restore_custom_op_defaults(graph: torch.fx.Graph) -> int:
    """Drop trailing custom-op arguments equal to their defaults: the form tracing gives,
    which Inductor's lowering of custom ops expects (it re-normalizes a call and
    requires the argument count to stay). The inverse of `fill_custom_op_defaults`."""
    changed = 0
    for node in graph.nodes:
        params = _custom_op_schema_tail(node)
        if params is None:
            continue
        args = list(node.args)
        while args and len(args) <= len(params):
            a, v = params[len(args) - 1], args[-1]
            if isinstance(v, torch.fx.Node) or not _writable_default(a):
                break
            if not (v is None and a.default_value is None) and not (type(v) is type(a.default_value) and v == a.default_value):
                break
            args.pop()
        if len(args) != len(node.args):
            node.args = tuple(args)
            changed += 1
    return changed


# Defaults need no canonicalization: the matcher compares every call in its full schema
# form (`fxfuse.schema`). `fill_custom_op_defaults` stays available for passes that ask.
DEFAULT_CANONICALIZATIONS: tuple[Canonicalization, ...] = (
    view_to_reshape,
    remove_noop_permute,
    split_to_slice,
    normalize_slice,
)


def canonicalize(graph: torch.fx.Graph, canonicalizations: tuple[Canonicalization, ...]) -> int:
    """Apply each canonicalization in order; returns the number of nodes changed."""
    return sum(c(graph) for c in canonicalizations)
