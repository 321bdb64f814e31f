"""The matching engine: find a `Pattern`'s chain at one node of a graph, or say why not.

Matching starts at a *site*, a graph node running the pattern's anchor op, and reaches
every other pattern node along the chain's edges (`fxfuse.pattern.plan`): an input of a
node already matched, a user of one, or a user of a tensor already bound to an argument.
Where several users fit, it backtracks. A candidate node must run the same op and agree
with the pattern node argument by argument in normalized schema form
(`fxfuse.schema.normalize`): a `Const` only with an equal literal, a `Var` with the one
value it is bound to, a `Size` with the size it evaluates to. A complete mapping must
also leave no value inside the chain used outside it, stay within one mutation region,
and not feed the chain's outputs back into its inputs.

Failures carry a reason written for the user, and the one kept is the deepest (the most
pattern nodes matched): "the first pattern node that failed" on the way out from the
anchor. `partial` measures how much of a chain a site holds, for near misses.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import torch
import torch.fx

from . import compat
from .pattern import (
    SIZE_QUERIES, Const, InputDevice, Pattern, PNode, Ref, Seq, Size, Var, at_path, refs_at,
)
from .schema import MISSING, Call, node_op_name, normalize, same_value


@dataclasses.dataclass
class Match:
    """A chain found in a graph: what `Rewrite.check` receives.

    ``kwargs`` holds each argument of the rewrite as bound: an fx node for a tensor (its
    fake value in ``node.meta["val"]``), the literal for a wildcard, ``None`` for an
    optional argument the call left out.
    """

    pattern: Pattern
    kwargs: dict[str, Any]
    nodes: list[torch.fx.Node]  # pattern order
    anchor: torch.fx.Node
    outputs: list[torch.fx.Node]  # pattern output order

    def output_nodes(self) -> list[torch.fx.Node]:
        return list(self.outputs)


@dataclasses.dataclass
class Failure:
    """Why a pattern does not match at a site: ``reason``, after ``depth`` pattern nodes matched."""

    reason: str
    depth: int = 0
    structural: bool = True  # False: every node matched, a condition on the whole failed

    def __str__(self) -> str:
        return self.reason


_UNSET = object()


class Context:
    """What matching reads from one graph, computed once: normalized calls, positions,
    mutation regions, evaluated sizes. `Context.changed` keeps it right across splices."""

    def __init__(self, graph: torch.fx.Graph) -> None:
        self.graph = graph
        self._calls: dict[torch.fx.Node, Call] = {}
        self.position: dict[torch.fx.Node, float] = {n: float(i) for i, n in enumerate(graph.nodes)}
        self._regions: Optional[dict[torch.fx.Node, int]] = None
        self.size_memo: dict[Any, Any] = {}
        self.dims: dict[torch.fx.Node, tuple[Any, ...]] = {}  # node -> its sizes as sympy expressions
        self.needs_sort = False  # a splice put a node before one of its inputs
        self.outputs_memo: dict[Any, Any] = {}  # replacement program + input sizes -> output metadata
        self.guards_memo: dict[Any, bool] = {}
        self._symbols: Optional[dict[Any, torch.fx.Node]] = None
        self._shape_env: Any = _UNSET

    @property
    def shape_env(self) -> Any:
        """The ShapeEnv of the graph's symbolic sizes (None where every size is static)."""
        if self._shape_env is _UNSET:
            self._shape_env = None
            for n in self.graph.nodes:
                v = n.meta.get("val")
                dims = v.shape if isinstance(v, torch.Tensor) else (v,)
                sym = next((d for d in dims if isinstance(d, torch.SymInt)), None)
                if sym is not None:
                    self._shape_env = sym.node.shape_env
                    break
        return self._shape_env

    def call(self, node: torch.fx.Node) -> Call:
        c = self._calls.get(node)
        if c is None:
            c = self._calls[node] = normalize(node)
        return c

    def symbol_inputs(self) -> dict[Any, torch.fx.Node]:
        """Each size symbol the graph takes as a SymInt input -> that placeholder."""
        if self._symbols is None:
            self._symbols = {}
            for p in self.graph.find_nodes(op="placeholder"):
                v = p.meta.get("val")
                if isinstance(v, torch.SymInt) and v.node.expr.is_Symbol:
                    self._symbols.setdefault(v.node.expr, p)
        return self._symbols

    def changed(self, nodes: Any) -> None:
        """Forget what was computed for ``nodes`` (their arguments were rewritten)."""
        for n in nodes:
            self._calls.pop(n, None)

    def placed(self, new: list[torch.fx.Node], before: torch.fx.Node) -> None:
        """Record positions for nodes just inserted before ``before``."""
        prev = before.prev
        hi = self.position.get(before, float(len(self.position)))
        lo = self.position.get(prev, hi - 1.0) if prev.op != "root" else hi - 1.0
        for i, n in enumerate(new):
            self.position[n] = lo + (hi - lo) * (i + 1) / (len(new) + 1)
        if self._regions is not None:
            region = self._regions.get(before, 0)
            for n in new:
                self._regions[n] = region

    def region(self, node: torch.fx.Node) -> int:
        if self._regions is None:
            self._regions, region = {}, 0
            for n in self.graph.nodes:
                self._regions[n] = region
                if _mutates(n):
                    region += 1
        return self._regions.get(node, 0)


def _mutates(node: torch.fx.Node) -> bool:
    """Whether ``node`` writes to one of its arguments (``copy_`` into an input, an ``out=`` op):
    a chain must not span such a node, since moving computation across it changes what is read."""
    t = node.target
    if node.op != "call_function" or not isinstance(t, torch._ops.OpOverload):
        return False
    return t._schema.is_mutable


# --------------------------------------------------------------------------- matching


class _State:
    def __init__(self, pattern: Pattern, ctx: Context) -> None:
        self.p = pattern
        self.ctx = ctx
        self.mapped: list[Optional[torch.fx.Node]] = [None] * len(pattern.nodes)
        self.used: dict[torch.fx.Node, int] = {}
        self.bound: dict[str, Any] = {}
        self.bound_by: dict[str, str] = {}  # argument -> where it was bound, for messages
        self.deferred: list[tuple[Any, Any, str]] = []  # (Size or InputDevice, graph value, where)
        self.trail: list[tuple[str, Any]] = []
        self.best: Optional[Failure] = None
        self.region: Optional[int] = None
        self._sizes: Optional[dict[Any, Any]] = None

    # -- bookkeeping ---------------------------------------------------------------

    def fail(self, reason: str | Callable[[], str], structural: bool = True) -> None:
        """Keep ``reason`` if this failure is the deepest so far. A callable is called only
        then: most candidates fail at their first node, and naming ops costs more than matching."""
        depth = len(self.used)
        if self.best is None or depth > self.best.depth:
            self.best = Failure(reason() if callable(reason) else reason, depth, structural)

    def mark(self) -> int:
        return len(self.trail)

    def undo(self, mark: int) -> None:
        while len(self.trail) > mark:
            kind, key = self.trail.pop()
            if kind == "map":
                node = self.mapped[key]
                self.mapped[key] = None
                del self.used[node]
            elif kind == "bind":
                del self.bound[key]
                del self.bound_by[key]
                self._sizes = None
            else:
                self.deferred.pop()

    # -- one node ------------------------------------------------------------------

    def take(self, i: int, g: torch.fx.Node) -> bool:
        """Map pattern node ``i`` to graph node ``g`` if they agree; else record why not."""
        pn = self.p.nodes[i]
        if g.op != "call_function" or g.target is not pn.target or (
            pn.wrapped is not None and (not g.args or g.args[0] is not pn.wrapped)
        ):
            self.fail(lambda: f"{g.name} runs {node_op_name(g)}, the pattern has {pn.op} there")
            return False
        if g in self.used:
            self.fail(f"{g.name} would stand for two nodes of the pattern ({self.p.nodes[self.used[g]].name} and {pn.name})")
            return False
        region = self.ctx.region(g)
        if self.region is None:
            self.region = region
        elif region != self.region:
            self.fail(f"the chain would cross a mutation (an in-place write) at {g.name}")
            return False
        call = self.ctx.call(g)
        if call.names != pn.names:
            self.fail(lambda: f"{g.name}'s call has arguments {list(call.names)}, the pattern's {pn.op} has {list(pn.names)}")
            return False
        mark = self.mark()
        self.mapped[i] = g
        self.used[g] = i
        self.trail.append(("map", i))
        for name, t, v, kind in zip(call.names, pn.args, call.values, pn.kinds):
            reason = self.unify(t, v, kind, g, name)
            if reason is not None:
                self.fail(reason)
                self.undo(mark)
                return False
        return True

    def unify(self, t: Any, v: Any, kind: str, g: torch.fx.Node, arg: str) -> Optional[str]:
        if isinstance(t, Ref):
            if not isinstance(v, torch.fx.Node):
                return f"argument {arg} of {g.name} ({node_op_name(g)}) is {v!r}, the pattern has {self.p.nodes[t.index].op} there"
            m = self.mapped[t.index]
            if m is not None and m is not v:
                return f"argument {arg} of {g.name} is {v.name}, not {m.name} as the chain requires"
            return None
        if isinstance(t, Var):
            return self.bind(t.name, v, f"argument {arg} of {g.name}")
        if isinstance(t, Const):
            if t.value is MISSING or v is MISSING:
                return None if t.value is v else f"argument {arg} of {g.name} is missing"
            if not same_value(t.value, v, kind):
                default = " (its default)" if t.default else ""
                return (f"argument {arg} of {g.name} ({node_op_name(g)}) is {_show(v)}, "
                        f"the pattern's is {_show(t.value)}{default}")
            return None
        if isinstance(t, (Size, InputDevice)):
            if isinstance(t, Size) and not _size_like(v):
                return f"argument {arg} of {g.name} is {_show(v)}, the pattern computes a size there"
            if isinstance(t, InputDevice) and not isinstance(v, torch.device):
                return f"argument {arg} of {g.name} is {_show(v)}, the pattern has the inputs' device there"
            self.deferred.append((t, v, f"argument {arg} of {g.name}"))
            self.trail.append(("defer", None))
            return None
        if isinstance(t, Seq):
            if not isinstance(v, (list, tuple)) or len(v) != len(t.items):
                return f"argument {arg} of {g.name} is {_show(v)}, the pattern's has {len(t.items)} elements"
            for k, (ti, vi) in enumerate(zip(t.items, v)):
                reason = self.unify(ti, vi, "other", g, f"{arg}[{k}]")
                if reason is not None:
                    return reason
            return None
        raise TypeError(f"not a term: {t!r}")

    def bind(self, name: str, v: Any, where: str) -> Optional[str]:
        if name not in self.bound:
            self.bound[name] = v
            self.bound_by[name] = where
            self._sizes = None
            self.trail.append(("bind", name))
            return None
        w = self.bound[name]
        if isinstance(w, torch.fx.Node) or isinstance(v, torch.fx.Node):
            if w is v:
                return None
            if isinstance(w, torch.fx.Node) and isinstance(v, torch.fx.Node):
                return (f"argument {name} is bound to two different nodes: {w.name} ({self.bound_by[name]}) and "
                        f"{v.name} ({where}); a value computed twice is two values (the graph did not merge them)")
            return f"argument {name} is bound to {_show(w)} ({self.bound_by[name]}) and to {_show(v)} ({where})"
        if not same_value(w, v):
            return f"wildcard {name} is bound to two different values: {_show(w)} ({self.bound_by[name]}) and {_show(v)} ({where})"
        return None

    # -- the search ------------------------------------------------------------------

    def search(self, k: int) -> Optional[Match]:
        steps = self.p.steps
        if k == len(steps):
            return self.finish()
        step = steps[k]
        pn = self.p.nodes[step.index]
        if step.via == "input":
            src = self.mapped[step.source]
            v = at_path(self.ctx.call(src).values[step.arg], step.path)
            if not isinstance(v, torch.fx.Node):
                self.fail(f"argument {self.p.nodes[step.source].names[step.arg]} of {src.name} is {_show(v)}, "
                          f"the pattern has {pn.op} there")
                return None
            candidates = [v]
        else:
            src = self.mapped[step.source] if step.via == "user" else self.bound.get(step.source)
            if not isinstance(src, torch.fx.Node):
                self.fail(f"argument {step.source} is bound to {_show(src)}, which has no users to continue the chain from")
                return None
            candidates = [u for u in src.users if u.target is pn.target and u not in self.used and self._runs(u, pn)
                          and at_path(self.ctx.call(u).values[step.arg], step.path) is src]
            if not candidates:
                self.fail(lambda: f"the value of {value_name(src)} does not reach {pn.op} (it flows to: {flows_to(src)})")
                return None
        for g in candidates:
            mark = self.mark()
            if self.take(step.index, g):
                m = self.search(k + 1)
                if m is not None:
                    return m
            self.undo(mark)
        return None

    def _runs(self, u: torch.fx.Node, pn: PNode) -> bool:
        return u.op == "call_function" and (pn.wrapped is None or (bool(u.args) and u.args[0] is pn.wrapped)) and \
            self.ctx.call(u).names == pn.names

    def finish(self) -> Optional[Match]:
        p, ctx = self.p, self.ctx
        for i, pn in enumerate(p.nodes):
            g = self.mapped[i]
            call = ctx.call(g)
            for a, t in enumerate(pn.args):
                for path, r in refs_at(t):
                    if isinstance(r, Ref) and at_path(call.values[a], path) is not self.mapped[r.index]:
                        self.fail(f"argument {pn.names[a]} of {g.name} is not {self.mapped[r.index].name} as the chain requires")
                        return None
            if not pn.output:
                for u in g.users:
                    if u not in self.used and u.target not in SIZE_QUERIES:
                        self.fail(lambda: f"{g.name} ({node_op_name(g)}) is also used by {u.name} ({node_op_name(u)}), "
                                  "outside the chain", structural=False)
                        return None
        for t, v, where in self.deferred:
            reason = self.check_deferred(t, v, where)
            if reason is not None:
                self.fail(reason, structural=False)
                return None
        reason = self.check_no_cycle()
        if reason is not None:
            self.fail(reason, structural=False)
            return None
        nodes = [g for g in self.mapped if g is not None]
        outputs = [self.mapped[i] for i in p.outputs]
        return Match(p, dict(self.bound), nodes, self.mapped[p.anchor], outputs)

    # -- conditions on the whole ----------------------------------------------------

    def sizes(self) -> dict[Any, Any]:
        # Asked by each deferred size check of a candidate; forgotten when a binding changes.
        if self._sizes is None:
            self._sizes = bound_sizes(self.bound, self.ctx.dims)
        return self._sizes

    def check_deferred(self, t: Any, v: Any, where: str) -> Optional[str]:
        if isinstance(t, InputDevice):
            devices = {val.device for val in (_val(b) for b in self.bound.values()) if isinstance(val, torch.Tensor)}
            return None if v in devices or not devices else f"{where} is {v}, not the inputs' device ({', '.join(map(str, devices))})"
        want = evaluate_size(t.expr, self.sizes(), self.ctx.size_memo)
        have = v.meta.get("val") if isinstance(v, torch.fx.Node) else v
        have = have.node.expr if isinstance(have, torch.SymInt) else have
        if want is None or not _equal_sizes(want, have):
            return f"{where} is {_show(have)}, the pattern computes {_size_text(t.expr)} = {want} there"
        return None

    def check_no_cycle(self) -> Optional[str]:
        """No bound input may be computed from the chain (the replacement would need its own output)."""
        pos = self.ctx.position
        first = min(pos.get(g, 0.0) for g in self.used)
        inputs = [b for b in self.bound.values() if isinstance(b, torch.fx.Node) and pos.get(b, -1.0) > first]
        seen: set[torch.fx.Node] = set()
        stack = list(inputs)
        while stack:
            n = stack.pop()
            if n in seen or pos.get(n, -1.0) < first:
                continue
            seen.add(n)
            if n in self.used:
                return f"an input of the chain is computed from the chain itself (through {n.name})"
            stack.extend(n.all_input_nodes)
        return None


def guards_hold(match: Match, ctx: Context) -> bool:
    """Whether the size assumptions of the pattern's trace hold for ``match``'s sizes.

    Where they do not (a size of 1 the trace assumed was not 1; symbolic sizes it cannot
    decide), the pattern's trace does not vouch for the match: trace it again at these
    sizes (`TracedRewrite.verify`).
    """
    p = match.pattern
    if not p.guards or p.static_sizes:
        return True
    sizes = bound_sizes(match.kwargs, ctx.dims)
    key = (id(p), frozenset(sizes.items()))
    if key not in ctx.guards_memo:
        ctx.guards_memo[key] = all(evaluate_condition(g, sizes, ctx.size_memo, ctx.shape_env) is True
                                   for g in p.guards)
    return ctx.guards_memo[key]


def match_at(pattern: Pattern, site: torch.fx.Node, ctx: Context) -> Match | Failure:
    """The chain of ``pattern`` whose anchor is ``site``, or the deepest reason it is not there.

    Example:
        >>> m = match_at(pattern, node, Context(gm.graph))
        >>> m.kwargs if isinstance(m, Match) else m.reason
        {'x': mul, 'y': arg1_1}
    """
    st = _State(pattern, ctx)
    if st.take(pattern.anchor, site):
        m = st.search(0)
        if m is not None:
            return m
    return st.best or Failure(f"{site.name} does not match")


def partial(pattern: Pattern, site: torch.fx.Node, ctx: Context) -> list[torch.fx.Node]:
    """The graph nodes of the chain around ``site``, reached greedily along the pattern's
    edges by op alone (arguments, users and sizes unchecked): how much of a chain is there.

    The first entry is ``site``. A chain that is all there gives every pattern node.
    """
    p = pattern
    a = p.anchor_node
    if site.op != "call_function" or site.target is not a.target or (
        a.wrapped is not None and (not site.args or site.args[0] is not a.wrapped)
    ):
        return []
    mapped: dict[int, torch.fx.Node] = {p.anchor: site}
    used = {site}
    bound: dict[str, Any] = {}
    _bind_all(p.nodes[p.anchor], site, ctx, bound)
    for step in p.steps:
        pn = p.nodes[step.index]
        if step.via == "input":
            src = mapped.get(step.source)
            if src is None:
                continue
            v = at_path(ctx.call(src).values[step.arg], step.path)
            cands = [v] if isinstance(v, torch.fx.Node) else []
        else:
            src = mapped.get(step.source) if step.via == "user" else bound.get(step.source)
            if not isinstance(src, torch.fx.Node):
                continue
            cands = [u for u in src.users if u.op == "call_function" and u.target is pn.target]
        for g in cands:
            if g in used or g.op != "call_function" or g.target is not pn.target:
                continue
            if pn.wrapped is not None and (not g.args or g.args[0] is not pn.wrapped):
                continue
            if step.via != "input" and at_path(ctx.call(g).values[step.arg], step.path) is not src:
                continue
            mapped[step.index] = g
            used.add(g)
            _bind_all(pn, g, ctx, bound)
            break
    return [site] + [g for i, g in sorted(mapped.items()) if g is not site]


def _bind_all(pn: PNode, g: torch.fx.Node, ctx: Context, bound: dict[str, Any]) -> None:
    call = ctx.call(g)
    if call.names != pn.names:
        return
    for t, v in zip(pn.args, call.values):
        for path, r in refs_at(t):
            if isinstance(r, Var) and r.name not in bound:
                bound[r.name] = at_path(v, path)


# --------------------------------------------------------------------------- sizes


def bound_sizes(kwargs: dict[str, Any], memo: Optional[dict[Any, Any]] = None) -> dict[Any, Any]:
    """Each size symbol ``arg.dim`` of a pattern -> the bound tensor's size there (a sympy
    integer, or the graph's own symbolic expression). ``memo`` (a `Context`'s) keeps each
    node's sizes: every candidate match asks again for the same nodes."""
    out = {}
    for name, v in kwargs.items():
        if not isinstance(v, torch.fx.Node):
            continue
        dims = memo.get(v) if memo is not None else None
        if dims is None:
            dims = _node_dims(v)
            if memo is not None:
                memo[v] = dims
        for d, s in enumerate(dims):
            out[size_symbol(name, d)] = s
    return out


def _node_dims(node: torch.fx.Node) -> tuple[Any, ...]:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return ()
    return tuple(s.node.expr if isinstance(s, torch.SymInt) else _integer(s) for s in val.shape)


@functools.cache
def _integer(n: int) -> Any:
    import sympy

    return sympy.Integer(n)


@functools.cache
def size_symbol(name: str, dim: int) -> Any:
    """The pattern's symbol for ``name.shape[dim]`` (made once: sympy's constructor is
    slow, and every candidate match asks)."""
    import sympy

    return sympy.Symbol(f"{name}.{dim}", integer=True)


def evaluate_size(expr: Any, sizes: dict[Any, Any], memo: dict[Any, Any]) -> Any:
    """``expr`` with the pattern's size symbols replaced by the bound sizes (None if one is unknown)."""
    if not expr.free_symbols <= set(sizes):
        return None
    key = (expr, tuple(sizes.get(s) for s in sorted(expr.free_symbols, key=str)))
    if key not in memo:
        memo[key] = expr.xreplace(sizes)
    return memo[key]


def evaluate_condition(cond: Any, sizes: dict[Any, Any], memo: dict[Any, Any],
                       shape_env: Any = None) -> Optional[bool]:
    """True/False for a size condition of the pattern's trace at the bound sizes; at
    symbolic sizes, what the graph's ``shape_env`` proves of it from the graph's own
    assumptions; None when nothing decides it."""
    import sympy

    value = evaluate_size(cond, sizes, memo)
    if value is None:
        return None
    if value in (sympy.true, True):
        return True
    if value in (sympy.false, False):
        return False
    key = ("decided", value)
    if key not in memo:
        memo[key] = compat.decide_statically(value, shape_env)
    return memo[key]


def _equal_sizes(want: Any, have: Any) -> bool:
    import sympy

    if isinstance(have, int) and not isinstance(have, bool):
        have = sympy.Integer(have)
    if not isinstance(have, sympy.Basic):
        return False
    if want == have:
        return True
    try:
        return sympy.simplify(want - have) == 0
    except Exception:  # noqa: BLE001
        return False


def _size_like(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, torch.SymInt)):
        return True
    return isinstance(v, torch.fx.Node) and isinstance(v.meta.get("val"), (int, torch.SymInt))


def _size_text(expr: Any) -> str:
    from .pattern import _size_source

    return _size_source(expr)


def _val(v: Any) -> Any:
    return v.meta.get("val") if isinstance(v, torch.fx.Node) else None


def _show(v: Any) -> str:
    if isinstance(v, torch.fx.Node):
        return f"{v.name} ({node_op_name(v)})" if v.op == "call_function" else v.name
    if v is MISSING:
        return "missing"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    return repr(v)


def value_name(node: torch.fx.Node) -> str:
    """A node's name, and for an item of a multi-output op, ``op_node[i]``."""
    import operator

    if node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node):
        return f"{node.args[0].name}[{node.args[1]}]"
    return node.name


def flows_to(node: torch.fx.Node) -> str:
    """The first ops (past getitems and views) that use ``node``'s value."""
    import operator

    from .pattern import VIEW_OPS

    out, stack, seen = [], list(node.users), set()
    while stack:
        u = stack.pop(0)
        if u in seen:
            continue
        seen.add(u)
        if u.target is operator.getitem or u.target in VIEW_OPS or u.target in SIZE_QUERIES:
            stack.extend(u.users)
        else:
            out.append(f"{u.name} ({node_op_name(u)})" if u.op == "call_function" else u.name)
    return ", ".join(out) or "nothing"
