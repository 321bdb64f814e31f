"""Patterns and replacement programs as plain data.

A traced pattern graph becomes a `Pattern`: a list of `PNode` (one per op call), each
holding its call in normalized schema form (`fxfuse.schema`) as *terms*:

* `Ref` — the output of another pattern node (an edge of the chain);
* `Var` — an argument of the rewrite: a tensor variable, or a float/int/bool/str wildcard;
* `Const` — a literal written in the pattern (or left at its default);
* `Size` — a size the pattern computes from its inputs' sizes (``x.shape[0] * 2``), as a
  symbolic expression over the inputs' dimensions: any size matches that equals it;
* `InputDevice` — the device of the inputs (a pattern traced on CPU matches CUDA graphs);
* `Seq` — a list of terms.

A replacement becomes a `Program`: the traced replacement's calls, in the form they were
traced (Inductor lowers that form), with the same terms. Both are data: they pickle
(`fxfuse.trace_cache`), print as Python (`Pattern.source`) and digest for the cache key.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.fx

from .cache_key import digest
from .schema import MISSING, normalize, op_name

aten = torch.ops.aten

# Calls a trace adds that are not part of what a pattern computes.
_IGNORED = frozenset({
    aten._assert_scalar.default, aten.sym_constrain_range_for_size.default, aten._assert_tensor_metadata.default,
})
SIZE_QUERIES = frozenset({aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default, aten.sym_storage_offset.default})
#: Ops that only reshape a view of their input: never a chain's anchor.
VIEW_OPS = frozenset({
    aten.reshape.default, aten.view.default, aten._unsafe_view.default, aten.expand.default, aten.slice.Tensor,
    aten.select.int, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default,
    aten.permute.default, aten.t.default, aten.transpose.int, aten.alias.default,
})


# --------------------------------------------------------------------------- terms


@dataclasses.dataclass(frozen=True)
class Ref:
    """The output of pattern node ``index`` (program node, in a `Program`)."""

    index: int


@dataclasses.dataclass(frozen=True)
class Var:
    """The rewrite's argument ``name``."""

    name: str


@dataclasses.dataclass(frozen=True)
class Const:
    """A literal; ``default`` when the traced call left it at the schema default."""

    value: Any
    default: bool = False


@dataclasses.dataclass(frozen=True)
class Size:
    """A size computed from the inputs' sizes: a sympy expression over symbols named
    ``arg.dim`` (``x.0`` is ``x.shape[0]``)."""

    expr: Any


@dataclasses.dataclass(frozen=True)
class InputDevice:
    """The device of the rewrite's tensor inputs."""


@dataclasses.dataclass(frozen=True)
class Seq:
    """A list argument, term by term."""

    items: tuple


Term = Any  # Ref | Var | Const | Size | InputDevice | Seq


def terms(t: Term) -> Iterator[Term]:
    """``t`` and every term inside it."""
    yield t
    if isinstance(t, Seq):
        for item in t.items:
            yield from terms(item)


def refs_at(t: Term, path: tuple = ()) -> Iterator[tuple[tuple, Term]]:
    """``(path, term)`` for every `Ref` and `Var` inside ``t``; a path indexes into `Seq`s."""
    if isinstance(t, (Ref, Var)):
        yield path, t
    elif isinstance(t, Seq):
        for i, item in enumerate(t.items):
            yield from refs_at(item, (*path, i))


def at_path(value: Any, path: tuple) -> Any:
    """The element of a (nested) list argument at ``path``; MISSING if there is none."""
    for i in path:
        if not isinstance(value, (list, tuple)) or i >= len(value):
            return MISSING
        value = value[i]
    return value


# --------------------------------------------------------------------------- patterns


@dataclasses.dataclass(frozen=True)
class PNode:
    """One op call of a pattern, normalized (`fxfuse.schema.normalize`)."""

    target: Any
    wrapped: Any  # the op inside auto_functionalized(_v2), else None
    names: tuple[str, ...]
    args: tuple[Term, ...]
    kinds: tuple[str, ...]
    name: str  # the traced node's name, for messages
    users: int  # uses by other nodes of the pattern
    output: bool  # a value the pattern returns (it may have users outside the chain)

    @property
    def op(self) -> str:
        return op_name(self.target) if self.wrapped is None else f"{op_name(self.target)}({op_name(self.wrapped)})"


@dataclasses.dataclass(frozen=True)
class Step:
    """How the matcher reaches pattern node ``index`` from nodes it has already matched.

    ``via`` is ``"input"`` (the node is argument ``arg``/``path`` of matched node ``source``),
    ``"user"`` (matched node ``source`` is its argument ``arg``/``path``) or ``"var"``
    (the tensor bound to the rewrite's argument ``source`` is its argument ``arg``/``path``).
    """

    index: int
    via: str
    source: Any  # node index, or a Var name for "var"
    arg: int
    path: tuple


@dataclasses.dataclass
class Pattern:
    """A traced pattern as data: its nodes, outputs, anchor, and the size assumptions of its trace."""

    nodes: tuple[PNode, ...]
    outputs: tuple[int, ...]
    anchor: int
    guards: tuple[Any, ...] = ()  # sympy conditions over `Size` symbols the trace assumed
    static_sizes: bool = False  # traced with the example sizes (symbolic tracing failed)
    steps: tuple[Step, ...] = ()

    def __post_init__(self) -> None:
        if not self.steps:
            self.steps = tuple(plan(self.nodes, self.anchor))

    @property
    def anchor_node(self) -> PNode:
        return self.nodes[self.anchor]

    def anchor_key(self) -> tuple[Any, Any]:
        a = self.anchor_node
        return a.target, a.wrapped

    def with_anchor(self, index: int) -> Pattern:
        return Pattern(self.nodes, self.outputs, index, self.guards, self.static_sizes)

    def swapped(self, names: frozenset[str]) -> Pattern:
        """This pattern with the first two operands of the nodes named ``names`` swapped."""
        nodes = []
        for n in self.nodes:
            if n.name in names:
                args = (n.args[1], n.args[0], *n.args[2:])
                n = dataclasses.replace(n, args=args)
            nodes.append(n)
        return Pattern(tuple(nodes), self.outputs, self.anchor, self.guards, self.static_sizes)

    def text(self) -> str:
        """A canonical rendering: what the cache key digests (no names, no addresses)."""
        lines = [f"anchor {self.anchor} outputs {self.outputs} static {self.static_sizes}"]
        for i, n in enumerate(self.nodes):
            args = ", ".join(f"{k}={_term_text(t)}" for k, t in zip(n.names, n.args))
            lines.append(f"%{i} = {n.op}({args}) users={n.users} output={n.output}")
        lines += [f"assume {g}" for g in self.guards]
        return "\n".join(lines)

    def digest(self) -> str:
        return digest([self.text()])

    def source(self, name: str, arg_names: Sequence[str]) -> str:
        """The pattern as readable Python: one line per op, defaults left out.

        >>> print(pattern.source("MulAdd", ["x", "y", "z"]))
        def MulAdd(x, y, z):
            mul = aten.mul.Tensor(x, y)
            add = aten.add.Tensor(mul, z)
            return add
        """
        names = [n.name for n in self.nodes]
        lines = [f"def {name.split('(')[0]}({', '.join(arg_names)}):"]
        for n in self.nodes:
            lines.append(f"    {n.name} = {n.op}({', '.join(_call_source(n, names))})")
        lines.append(f"    return {', '.join(names[i] for i in self.outputs)}")
        shown = [g for g in self.guards if not _routine(g)]
        if shown:
            lines.append(f"    # traced assuming {'; '.join(_size_source(g) for g in shown)}")
        return "\n".join(lines)


def _routine(cond: Any) -> bool:
    """A size assumption not worth printing: every symbolic trace makes them (a size is not
    0 or 1, is at least 1, a product of sizes is at least 2). What is printed are the
    equalities and divisibilities a pattern's ops require."""
    import sympy

    if not isinstance(cond, sympy.Eq):
        return True
    return any(isinstance(a, sympy.Max) for a in cond.args)


def _call_source(n: PNode, names: list[str]) -> list[str]:
    """The arguments of a node as a call writes them: positional while nothing before was
    left out, keywords after; arguments left at their default are not written."""
    from .schema import schema_args

    kw_only = ([a.kwarg_only for a in schema_args(n.target)] if isinstance(n.target, torch._ops.OpOverload)
               else [not k.isdigit() and k != "_op" for k in n.names])
    parts, positional = [], True
    for k, t, kwo in zip(n.names, n.args, kw_only):
        if isinstance(t, Const) and t.default:
            positional = False
            continue
        text = _term_source(t, names)
        if positional and not kwo:
            parts.append(text)
        else:
            positional = False
            parts.append(f"{k}={text}")
    return parts


def _term_text(t: Term) -> str:
    if isinstance(t, Ref):
        return f"%{t.index}"
    if isinstance(t, Var):
        return f"${t.name}"
    if isinstance(t, Const):
        return f"{_literal(t.value)}{'(default)' if t.default else ''}"
    if isinstance(t, Size):
        return f"size({t.expr})"
    if isinstance(t, InputDevice):
        return "input_device"
    if isinstance(t, Seq):
        return "[" + ", ".join(_term_text(x) for x in t.items) + "]"
    raise TypeError(f"not a term: {t!r}")


def _literal(v: Any) -> str:
    if isinstance(v, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
        return op_name(v)
    if isinstance(v, torch.Tensor):
        return f"tensor({v.dtype}, {list(v.shape)})"
    return repr(v)


def _term_source(t: Term, names: list[str]) -> str:
    if isinstance(t, Ref):
        return names[t.index]
    if isinstance(t, Var):
        return t.name
    if isinstance(t, Const):
        return _literal(t.value)
    if isinstance(t, Size):
        return _size_source(t.expr)
    if isinstance(t, InputDevice):
        return "<the inputs' device>"
    return "[" + ", ".join(_term_source(x, names) for x in t.items) + "]"


def _size_source(expr: Any) -> str:
    """``x.0`` -> ``x.shape[0]`` in a size expression or condition."""
    text = str(expr)
    for s in sorted(getattr(expr, "free_symbols", ()), key=lambda s: -len(s.name)):
        arg, dim = s.name.rsplit(".", 1)
        text = text.replace(s.name, f"{arg}.shape[{dim}]")
    return text


def plan(nodes: Sequence[PNode], anchor: int) -> list[Step]:
    """The order in which the matcher reaches every node from the anchor.

    Depth first along the chain: from each node its inputs, then the users that lead on
    (so a chain is followed to its end before side outputs), then the last users; a
    tensor argument shared with another part of the pattern is followed through its
    other users. So the first failure met is where the chain stops.

    Raises ValueError when part of the pattern shares no value with the rest.
    """
    uses: dict[int, list[tuple[int, int, tuple]]] = {i: [] for i in range(len(nodes))}
    var_uses: dict[str, list[tuple[int, int, tuple]]] = {}
    for i, n in enumerate(nodes):
        for a, t in enumerate(n.args):
            for path, r in refs_at(t):
                if isinstance(r, Ref):
                    uses[r.index].append((i, a, path))
                else:
                    var_uses.setdefault(r.name, []).append((i, a, path))
    steps: list[Step] = []
    seen = {anchor}

    def visit(i: int) -> None:
        edges = [Step(r.index, "input", i, a, path)
                 for a, t in enumerate(nodes[i].args) for path, r in refs_at(t) if isinstance(r, Ref)]
        leads_on = sorted(uses[i], key=lambda u: nodes[u[0]].users == 0)
        edges += [Step(u, "user", i, a, path) for u, a, path in leads_on]
        for e in edges:
            if e.index not in seen:
                seen.add(e.index)
                steps.append(e)
                visit(e.index)

    visit(anchor)
    # Parts joined only through a shared argument (``(x * y, x + z)``): reached from the
    # users of the value that argument is bound to.
    grew = True
    while grew and len(seen) < len(nodes):
        grew = False
        for i in sorted(seen):
            for a, t in enumerate(nodes[i].args):
                for _, r in refs_at(t):
                    if not isinstance(r, Var):
                        continue
                    for u, ua, up in var_uses.get(r.name, ()):
                        if u not in seen:
                            seen.add(u)
                            steps.append(Step(u, "var", r.name, ua, up))
                            visit(u)
                            grew = True
    if len(seen) != len(nodes):
        lost = ", ".join(nodes[i].name for i in range(len(nodes)) if i not in seen)
        raise ValueError(f"the pattern's nodes {lost} share no value with its anchor {nodes[anchor].name}")
    return steps


# --------------------------------------------------------------------------- anchors

# The default anchor is the pattern's most specific op: a custom op or collective before
# an aten op, a matmul or reduction before other ops, the commonest pointwise ops last;
# within a class the op the pattern uses fewest times, then the first.
_MATMUL_REDUCE = frozenset({
    "mm", "bmm", "addmm", "baddbmm", "matmul", "_scaled_mm", "convolution", "linear", "sum", "mean", "amax", "amin",
    "max", "min", "prod", "var", "var_mean", "std", "_softmax", "_log_softmax", "softmax", "log_softmax", "argmax",
    "argmin", "cumsum", "cumprod", "logsumexp", "norm", "linalg_vector_norm", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "scaled_dot_product_attention", "topk", "sort",
})
_COMMON = frozenset({
    "add", "mul", "sub", "div", "neg", "convert_element_type", "_to_copy", "to", "clone", "copy", "where", "full",
    "empty", "empty_like", "full_like", "zeros", "ones", "scalar_tensor", "lift_fresh_copy", "fill",
})
_CORE = frozenset({"aten", "prims"})


def specificity(n: PNode) -> int:
    """0: custom op or collective; 1: matmul or reduction; 2: other ops; 3: the commonest
    pointwise ops; 4: views and ``getitem`` (anchors only of patterns made of nothing else)."""
    target = n.wrapped if n.wrapped is not None else n.target
    if n.wrapped is not None:
        return 0
    if not isinstance(target, torch._ops.OpOverload):
        return 4
    if target in VIEW_OPS:
        return 4
    if target.namespace not in _CORE:
        return 0
    base = target._schema.name.split("::")[-1]
    if base in _MATMUL_REDUCE:
        return 1
    return 3 if base in _COMMON else 2


def default_anchor(nodes: Sequence[PNode]) -> int:
    counts: dict[Any, int] = {}
    for n in nodes:
        counts[(n.target, n.wrapped)] = counts.get((n.target, n.wrapped), 0) + 1
    return min(range(len(nodes)), key=lambda i: (specificity(nodes[i]), counts[(nodes[i].target, nodes[i].wrapped)], i))


def anchor_for(nodes: Sequence[PNode], op: Any) -> Optional[int]:
    """The first node of the pattern running ``op`` (an OpOverload, or its packet)."""
    for i, n in enumerate(nodes):
        for t in (n.wrapped, n.target):
            if t is op or (isinstance(op, torch._ops.OpOverloadPacket) and getattr(t, "overloadpacket", None) is op):
                return i
    return None


# --------------------------------------------------------------------------- programs


@dataclasses.dataclass(frozen=True)
class PCall:
    """One node of a replacement program, as traced (not normalized: Inductor lowers this form)."""

    op: str  # "call_function" or "get_attr"
    target: Any  # the callable, or the constant tensor of a get_attr
    args: tuple[Term, ...]
    kwargs: tuple[tuple[str, Term], ...]
    name: str


@dataclasses.dataclass
class Program:
    """A replacement as data: its calls in order and its outputs (terms)."""

    calls: tuple[PCall, ...]
    outputs: tuple[Term, ...]
    guards: tuple[Any, ...] = ()  # size conditions its (symbolic) trace assumed

    def text(self) -> str:
        lines = []
        for i, c in enumerate(self.calls):
            args = ", ".join(_term_text(t) for t in c.args)
            kwargs = ", ".join(f"{k}={_term_text(t)}" for k, t in c.kwargs)
            target = _literal(c.target) if c.op == "get_attr" else op_name(c.target)
            lines.append(f"%{i} = {c.op} {target}({args}; {kwargs})")
        lines.append("return " + ", ".join(_term_text(t) for t in self.outputs))
        lines += [f"assume {g}" for g in self.guards]
        return "\n".join(lines)


# --------------------------------------------------------------------------- conversion


@dataclasses.dataclass
class Binder:
    """How the literals of a trace map back to the rewrite's arguments.

    ``sentinels``: a str/float wildcard's unique traced value -> its name. ``samples``: an
    int/bool wildcard's sample -> its name (every explicit literal equal to it, and a
    custom op's defaulted argument equal to it, is taken to be that wildcard).
    ``symbols``: a trace's size symbol -> its canonical symbol ``arg.dim``. ``device``: the
    example inputs' device.
    """

    sentinels: dict[tuple[type, Any], str]
    samples: dict[tuple[type, Any], str]
    symbols: dict[Any, Any]
    device: Optional[torch.device]
    placeholders: dict[str, str] = dataclasses.field(default_factory=dict)  # fx name -> argument name
    used: set[str] = dataclasses.field(default_factory=set)

    def literal(self, v: Any, *, explicit: bool, custom: bool) -> Term:
        if isinstance(v, (list, tuple)):
            return Seq(tuple(self.literal(x, explicit=explicit, custom=custom) for x in v))
        key = (type(v), v) if isinstance(v, (str, float, int, bool)) else None
        if key is not None and key in self.sentinels:
            self.used.add(self.sentinels[key])
            return Var(self.sentinels[key])
        if key is not None and key in self.samples and (explicit or custom):
            self.used.add(self.samples[key])
            return Var(self.samples[key])
        if isinstance(v, torch.device) and self.device is not None and v == self.device:
            return InputDevice()
        if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return self.size(v)
        return Const(v, default=not explicit)

    def size(self, v: Any) -> Term:
        import sympy

        expr = v.node.expr if hasattr(v, "node") else sympy.sympify(v)
        expr = expr.xreplace(self.symbols)
        if expr.free_symbols - set(self.symbols.values()):
            raise ValueError(f"a size of the trace ({v}) depends on something other than the inputs' sizes")
        return Const(int(expr)) if expr.is_Integer else Size(expr)

    def canonical(self, expr: Any) -> Any:
        return expr.xreplace(self.symbols)


def _is_size_node(n: torch.fx.Node) -> bool:
    if n.op != "call_function":
        return False
    if n.target in SIZE_QUERIES:
        return True
    return isinstance(n.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool))


def _is_custom(target: Any) -> bool:
    return isinstance(target, torch._ops.OpOverload) and target.namespace not in _CORE


def pattern_from_graph(gm: torch.fx.GraphModule, binder: Binder, *, static_sizes: bool = False,
                       guards: Sequence[Any] = ()) -> Pattern:
    """Convert a traced, canonicalized pattern graph into a `Pattern` (anchor: the default)."""
    from . import compat

    hops = tuple(compat.auto_functionalized_ops().values())
    index: dict[torch.fx.Node, int] = {}
    built: list[dict[str, Any]] = []
    outputs: list[int] = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            for o in _flatten(node.args[0]):
                if not isinstance(o, torch.fx.Node) or o not in index:
                    what = f"its argument {binder.placeholders.get(o.name, o.name)}" if isinstance(o, torch.fx.Node) else f"the constant {o!r}"
                    raise ValueError(f"output {len(outputs)} of pattern() is {what}; every output of a pattern must be "
                                     "computed by an op (a pattern that returns an input has nothing to replace)")
                outputs.append(index[o])
            continue
        if node.op != "call_function":
            raise ValueError(f"unsupported node {node.format_node()} in the traced pattern (a pattern may not "
                             "create tensor constants; pass them as arguments)")
        if node.target in _IGNORED or _is_size_node(node):
            continue
        call = normalize(node)
        custom = _is_custom(node.target) or node.target in hops
        args = tuple(_term(v, index, binder, explicit=e, custom=custom) for v, e in zip(call.values, call.explicit))
        wrapped = node.args[0] if node.target in hops else None
        index[node] = len(built)
        built.append(dict(target=node.target, wrapped=wrapped, names=call.names, args=args, kinds=call.kinds,
                          name=node.name))
    users = [0] * len(built)
    for i, b in enumerate(built):
        for t in b["args"]:
            for _, r in refs_at(t):
                if isinstance(r, Ref):
                    users[r.index] += 1
    names = _display_names([b["wrapped"] if b["wrapped"] is not None else b["target"] for b in built])
    nodes = tuple(PNode(**{**b, "name": names[i]}, users=users[i], output=i in outputs) for i, b in enumerate(built))
    if not nodes:
        raise ValueError("a pattern must call at least one op")
    return Pattern(nodes, tuple(outputs), default_anchor(nodes), tuple(guards), static_sizes)


def _display_names(targets: Sequence[Any]) -> list[str]:
    """``mul``, ``add``, ``mul_1``: a pattern's node names by op, numbered in order (a
    symbolic trace numbers its nodes with the size computations in between)."""
    seen: dict[str, int] = {}
    out = []
    for t in targets:
        base = t._schema.name.split("::")[-1] if isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", "op")
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.append(base if n == 0 else f"{base}_{n}")
    return out


def _term(v: Any, index: dict, binder: Binder, *, explicit: bool, custom: bool) -> Term:
    if isinstance(v, torch.fx.Node):
        if v in index:
            return Ref(index[v])
        if v.op == "placeholder":
            name = binder.placeholders[v.name]
            binder.used.add(name)
            return Var(name)
        if _is_size_node(v):
            return binder.size(v.meta["val"])
        raise ValueError(f"argument {v.name} of the trace is neither an input nor an op of the pattern")
    if isinstance(v, (list, tuple)) and any(isinstance(x, torch.fx.Node) for x in v):
        return Seq(tuple(_term(x, index, binder, explicit=explicit, custom=custom) for x in v))
    if v is MISSING:
        return Const(MISSING, default=True)
    return binder.literal(v, explicit=explicit, custom=custom)


def program_from_graph(gm: torch.fx.GraphModule, binder: Binder, *, symbolic: bool, guards: Sequence[Any] = ()) -> Program:
    """Convert a traced replacement graph into a `Program`.

    ``symbolic``: the trace ran on symbolic sizes, whose size computations become `Size`
    terms (evaluated per match); otherwise size nodes stay calls of the program.
    """
    index: dict[torch.fx.Node, int] = {}
    calls: list[PCall] = []
    outputs: tuple[Term, ...] = ()

    def term(v: Any) -> Term:
        if isinstance(v, torch.fx.Node):
            if v in index:
                return Ref(index[v])
            if v.op == "placeholder":
                return Var(binder.placeholders[v.name])
            if symbolic and _is_size_node(v):
                return binder.size(v.meta["val"])
            raise ValueError(f"argument {v.name} of the replacement trace is not available")
        if isinstance(v, (list, tuple)):
            return Seq(tuple(term(x) for x in v))
        if isinstance(v, dict):
            raise ValueError("a replacement call with a dict argument is not supported")
        # No int/bool samples here: a replacement is traced with the matched ints themselves.
        return binder.literal(v, explicit=False, custom=False)

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            outputs = tuple(term(o) for o in _flatten(node.args[0]))
            continue
        if node.op == "get_attr":
            index[node] = len(calls)
            calls.append(PCall("get_attr", _attr(gm, node.target), (), (), node.name))
            continue
        if node.target in _IGNORED or (symbolic and _is_size_node(node)):
            continue
        args = tuple(term(a) for a in node.args)
        kwargs = tuple((k, term(v)) for k, v in node.kwargs.items())
        index[node] = len(calls)
        calls.append(PCall("call_function", node.target, args, kwargs, node.name))
    return Program(tuple(calls), outputs, tuple(guards))


def _attr(gm: torch.fx.GraphModule, target: str) -> Any:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _flatten(out: Any) -> list[Any]:
    if isinstance(out, (list, tuple)):
        return [y for x in out for y in _flatten(x)]
    return [out]


__all__ = [
    "Ref", "Var", "Const", "Size", "InputDevice", "Seq", "PNode", "Pattern", "Program", "PCall", "Step", "Binder",
    "pattern_from_graph", "program_from_graph", "default_anchor", "anchor_for", "specificity", "plan", "operator",
]
