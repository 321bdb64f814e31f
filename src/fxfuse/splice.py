"""Splicing a replacement `Program` into a graph in place of a `Match`.

Two phases, so that everything that can fail happens before the graph is touched:
`prepare` runs the program on the matched nodes' fake values (the graph's own fake
mode: every new node gets the ``val`` Inductor lowers from) and compares its outputs'
shapes and dtypes with the matched ones; `apply` then inserts the calls, moves the users
of the matched outputs over and erases the chain.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.fx

from .matcher import Context, Match, bound_sizes, evaluate_condition, evaluate_size
from .pattern import Const, InputDevice, Program, Ref, Seq, Size, Var
from .schema import dim_text


class NeedsConcrete(Exception):
    """A program traced on symbolic sizes that does not apply as-is here (its trace assumed
    something these sizes contradict, or the sizes are symbolic): trace it at these sizes."""


@dataclasses.dataclass
class Prepared:
    """A program checked against one match, ready to `apply`."""

    program: Program
    values: list[Any]  # the fake value of each call
    sizes: dict[Any, Any]
    device: Optional[torch.device]


def _fake_mode(kwargs: dict[str, Any]) -> Any:
    from torch._guards import detect_fake_mode

    vals = [v.meta.get("val") for v in kwargs.values() if isinstance(v, torch.fx.Node)]
    return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])


def _device(kwargs: dict[str, Any]) -> Optional[torch.device]:
    for v in kwargs.values():
        val = v.meta.get("val") if isinstance(v, torch.fx.Node) else None
        if isinstance(val, torch.Tensor):
            return val.device
    return None


def prepare(program: Program, match: Match, ctx: Context, *, symbolic: bool) -> Prepared:
    """Run ``program`` on ``match``'s fake values; raise on any mismatch, touching nothing.

    ``symbolic``: the program was traced on symbolic sizes; its `Size` terms are evaluated
    here, and NeedsConcrete is raised where it does not apply as-is.
    """
    import sympy

    kwargs = match.kwargs
    sizes = bound_sizes(kwargs, ctx.dims)
    if symbolic:
        for g in program.guards:
            if evaluate_condition(g, sizes, ctx.size_memo, ctx.shape_env) is not True:
                raise NeedsConcrete(f"the replacement's trace assumed {g}")
    device = _device(kwargs)
    values: list[Any] = []

    def value(t: Any) -> Any:
        if isinstance(t, Var):
            v = kwargs[t.name]
            return v.meta["val"] if isinstance(v, torch.fx.Node) else v
        if isinstance(t, Ref):
            return values[t.index]
        if isinstance(t, Const):
            return t.value
        if isinstance(t, Size):
            v = evaluate_size(t.expr, sizes, ctx.size_memo)
            if v is None:
                raise NeedsConcrete(f"size {t.expr}")
            if isinstance(v, sympy.Integer):
                return int(v)
            # A symbolic size the graph takes as an input (Dynamo passes each dynamic size
            # in as a SymInt): `apply` reads it from there. Any other expression would need
            # nodes computing it: the replacement is traced at these sizes instead.
            placeholder = ctx.symbol_inputs().get(v)
            if placeholder is None:
                raise NeedsConcrete(f"size {t.expr} = {v}, not an input of the graph")
            return placeholder.meta["val"]
        if isinstance(t, InputDevice):
            return device
        if isinstance(t, Seq):
            return [value(x) for x in t.items]
        raise TypeError(f"not a term: {t!r}")

    mode = _fake_mode(kwargs)
    key = _signature(program, kwargs)
    known = ctx.outputs_memo.get(key) if key is not None else None
    for i, c in enumerate(program.calls):
        if c.op == "get_attr":
            values.append(mode.from_tensor(c.target) if mode is not None else c.target)
            continue
        if known is not None and known[i] is not None:
            # The same call on inputs of the same sizes (another layer): its outputs'
            # metadata is known, only the fake tensors are new.
            values.append(_fresh(known[i], mode))
            continue
        args = [value(a) for a in c.args]
        kw = {k: value(v) for k, v in c.kwargs}
        with mode if mode is not None else _nullcontext():
            values.append(c.target(*args, **kw))
    if key is not None and known is None:
        ctx.outputs_memo[key] = [_spec(c, v) for c, v in zip(program.calls, values)]
    got = [value(o) for o in program.outputs]
    want = [n.meta.get("val") for n in match.outputs]
    # Compared by size expressions (printing them, as the message does, costs more than the rest).
    if [_shape_key(v) for v in got] != [_shape_key(v) for v in want]:
        raise ValueError(f"replacement outputs {_fmt([_meta(v) for v in got])} differ from the matched outputs "
                         f"{_fmt([_meta(v) for v in want])}")
    return Prepared(program, values, sizes, device)


def _dims(sizes: Any) -> tuple[Any, ...]:
    # A symbolic size by its expression: the memo is one graph's (`Context`), whose sizes
    # share one ShapeEnv, where equal expressions are equal sizes. A SymInt whose expression
    # is a number is that number (it must compare equal to a static size of the same value).
    return tuple(_dim(s) for s in sizes)


def _dim(s: Any) -> Any:
    if not isinstance(s, torch.SymInt):
        return s
    expr = s.node.expr
    return int(expr) if expr.is_Integer else ("sym", expr)


def _signature(program: Program, kwargs: dict[str, Any]) -> Any:
    """What a program's outputs depend on: the program and its inputs' metadata, symbolic
    sizes by expression (valid within the graph the memo belongs to)."""
    sig: list[Any] = [id(program)]
    for name in sorted(kwargs):
        v = kwargs[name]
        val = v.meta.get("val") if isinstance(v, torch.fx.Node) else v
        if isinstance(val, torch.Tensor):
            sig.append((name, _dims(val.shape), _dims(val.stride()), val.dtype, val.device))
        elif isinstance(val, (str, float)):
            # A str/float wildcard's value is no part of a replacement's structure: the
            # program was traced with a sentinel in its place (a layer name, an epsilon).
            sig.append((name, type(val)))
        else:
            sig.append((name, type(val), val if isinstance(val, (int, bool, type(None))) else id(val)))
    return tuple(sig)


def _functional(c: Any) -> bool:
    """A call whose outputs alias none of its inputs: its fake outputs can be made anew.
    (A view's must stay a view: Inductor decides from storages what may be written in place.)"""
    from . import compat

    if c.target in tuple(compat.auto_functionalized_ops().values()):
        return True
    schema = getattr(c.target, "_schema", None)
    return schema is not None and all(r.alias_info is None for r in schema.returns) and not schema.is_mutable


def _spec(c: Any, value: Any) -> Any:
    """The metadata to make ``value`` again, or None (to run the call again). Symbolic
    sizes are kept as the SymInts themselves (the memo is one graph's); an output with a
    data-dependent (unbacked) size is made by running the call again, each call's own."""
    if c.op != "call_function" or not _functional(c):
        return None
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    if free_unbacked_symbols(value):
        return None

    def one(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return ("tensor", tuple(v.shape), tuple(v.stride()), v.dtype, v.device)
        if isinstance(v, (tuple, list)):
            parts = [one(x) for x in v]
            return None if any(p is None for p in parts) else ("seq", type(v), parts)
        return ("value", v) if v is None or isinstance(v, (int, float, bool)) else None

    return one(value)


def _fresh(spec: Any, mode: Any) -> Any:
    kind = spec[0]
    if kind == "tensor":
        _, shape, stride, dtype, device = spec
        if mode is None:
            return torch.empty_strided(shape, stride, dtype=dtype, device=device)
        from . import compat

        return compat.new_fake_tensor(mode, shape, stride, dtype, device)
    if kind == "seq":
        return spec[1](_fresh(p, mode) for p in spec[2])
    return spec[1]


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _shape_key(v: Any) -> Any:
    return (_dims(v.shape), v.dtype) if isinstance(v, torch.Tensor) else None


def _meta(v: Any) -> Any:
    if not isinstance(v, torch.Tensor):
        return None
    return tuple(dim_text(s) for s in v.shape), v.dtype


def _fmt(metas: list[Any]) -> str:
    parts = []
    for m in metas:
        parts.append("not a tensor" if m is None else f"{str(m[1]).replace('torch.', '')}{list(m[0])}")
    return "[" + ", ".join(parts) + "]"


def apply(prepared: Prepared, match: Match, ctx: Context) -> list[torch.fx.Node]:
    """Insert ``prepared``'s calls, move the matched outputs' users to them, erase the chain.

    Returns the new nodes. Sets ``ctx.needs_sort`` when an input of the replacement comes
    after a user of the chain's outputs (the caller sorts the graph once at the end).
    """
    graph, pos = ctx.graph, ctx.position
    program, kwargs = prepared.program, match.kwargs
    chain = set(match.nodes)
    outside = [u for o in match.outputs for u in o.users if u not in chain]
    point = min(outside, key=lambda u: pos.get(u, 0.0)) if outside else max(match.nodes, key=lambda n: pos.get(n, 0.0)).next
    inputs = [v for v in kwargs.values() if isinstance(v, torch.fx.Node)]
    last_input = max(inputs, key=lambda n: pos.get(n, 0.0), default=None)
    if last_input is not None and pos.get(last_input, 0.0) >= pos.get(point, float("inf")):
        point = last_input.next
        ctx.needs_sort = True
    new: list[torch.fx.Node] = []

    def arg(t: Any) -> Any:
        if isinstance(t, Var):
            return kwargs[t.name]
        if isinstance(t, Ref):
            return new[t.index]
        if isinstance(t, Const):
            return t.value
        if isinstance(t, Size):
            v = evaluate_size(t.expr, prepared.sizes, ctx.size_memo)
            return int(v) if v.is_Integer else ctx.symbol_inputs()[v]  # `prepare` checked it is one
        if isinstance(t, InputDevice):
            return prepared.device
        if isinstance(t, Seq):
            return [arg(x) for x in t.items]
        raise TypeError(f"not a term: {t!r}")

    stack_trace = match.anchor.meta.get("stack_trace")
    symbols = ctx.symbol_inputs()
    with graph.inserting_before(point):
        for c, val in zip(program.calls, prepared.values):
            if c.op == "get_attr":
                node = graph.get_attr(_constant(graph.owning_module, c.target))
            elif c.target is torch.ops.aten.sym_size.int and _symbol(val) in symbols:
                # A size the graph takes as an input (Dynamo passes each dynamic size in as a
                # SymInt): read from there, not off a tensor of the graph, which would make
                # that tensor's chain look used by this replacement.
                new.append(symbols[_symbol(val)])
                continue
            else:
                node = graph.call_function(c.target, tuple(arg(a) for a in c.args), {k: arg(v) for k, v in c.kwargs})
            node.meta["val"] = val
            if stack_trace is not None:
                node.meta["stack_trace"] = stack_trace
            new.append(node)
    ctx.placed([n for n in new if n.op != "placeholder"], point)
    replaced = [arg(o) for o in program.outputs]
    touched: set[torch.fx.Node] = set()
    for old, repl in zip(match.outputs, replaced):
        if old is repl:
            continue
        if not isinstance(repl, torch.fx.Node):
            raise ValueError(f"the replacement returns the constant {repl!r} where the pattern returns {old.name}")
        touched.update(old.users)
        old.replace_all_uses_with(repl)
    ctx.changed(touched)
    for node in sorted(match.nodes, key=lambda n: -pos.get(n, 0.0)):
        if not node.users:
            graph.erase_node(node)
            pos.pop(node, None)
    return new


def _symbol(val: Any) -> Any:
    return val.node.expr if isinstance(val, torch.SymInt) and val.node.expr.is_Symbol else None


def _constant(gm: torch.fx.GraphModule, tensor: torch.Tensor) -> str:
    i = 0
    while hasattr(gm, f"_fxfuse_constant{i}"):
        i += 1
    name = f"_fxfuse_constant{i}"
    gm.register_buffer(name, tensor) if isinstance(gm, torch.nn.Module) else setattr(gm, name, tensor)
    return name
