"""Turn a `Rewrite` into search patterns, once, at registration.

The pattern function is traced on fake tensors into the aten graph Inductor's
post-grad stage holds, canonicalized, and converted into a pattern expression in
which each argument is a variable:

* tensors are placeholders;
* ``str`` and ``float`` wildcards are traced with unique sentinel values and every
  occurrence of the sentinel becomes the variable (Inductor would bake the sample in
  as a literal);
* ``int`` and ``bool`` wildcards cannot have sentinels (they feed shapes), so every
  literal equal to the sample becomes the variable, and the match is then verified by
  re-tracing the pattern with the bound values (`TracedRewrite.verify`);
* shape lists of view-like ops are ignored while searching (the token count differs
  between the pattern and every real graph) and verified the same way.

A pattern holding a mutating custom op yields two variants, one per functional form
(``auto_functionalized`` and ``auto_functionalized_v2``), so it matches whichever the
post-grad graph holds. A rewrite with ``commute = True`` adds a variant per other operand
order of its ``add``/``mul`` nodes.

Matches are typed (`TracedRewrite.bound_values`): a tensor argument never binds a Python
number, and tensor arguments whose example inputs share a dtype bind tensors of one dtype.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx

from . import compat
from .cache_key import digest, graph_key
from .canonicalize import Canonicalization, canonicalize
from .rewrite import Rewrite, RewriteError, TensorSpec

aten = torch.ops.aten
_SHAPE_OPS = frozenset({aten.reshape.default, aten.view.default, aten._unsafe_view.default, aten.expand.default})
_SCALAR_KINDS = (bool, int, float, str)
# Size queries a trace on symbolic shapes adds; they are not uses of the data.
_SHAPE_QUERIES = frozenset(
    {aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default, aten.sym_storage_offset.default}
)


@dataclasses.dataclass(frozen=True)
class Argument:
    """One argument of a rewrite: a tensor variable or a typed wildcard."""

    name: str
    kind: type  # torch.Tensor, or one of _SCALAR_KINDS
    sample: Any  # TensorSpec for tensors, the sample value for wildcards
    sentinel: Any = None  # the traced stand-in of a str/float wildcard
    free_dtype: bool = False  # a tensor whose dtype is not tied to its example's dtype group


@dataclasses.dataclass
class Variant:
    """One search pattern of a rewrite, for one functional form of its graph."""

    form: str  # "functional", "v1" or "v2"
    pattern: compat.PatternExpr
    graph: torch.fx.GraphModule  # the traced, canonicalized pattern graph
    needs_verification: bool
    swaps: frozenset[str] = frozenset()  # commutative nodes of `graph` matched with operands swapped

    @property
    def v2(self) -> bool:
        return self.form == "v2"

    @property
    def label(self) -> str:
        """The form, and the swapped operands of a commuted variant."""
        return self.form + (f", swapped {', '.join(sorted(self.swaps))}" if self.swaps else "")

    @property
    def anchor(self) -> Anchor:
        """The first op this pattern applies to its inputs (see `Anchor`)."""
        return Anchor.of(self.graph)


@dataclasses.dataclass(frozen=True)
class Anchor:
    """The op where a rewrite's chain starts: a site of the rewrite is a node running it.

    Inductor searches from a pattern's *output*; fxfuse counts sites and misses from the
    op the chain *starts* with (``rms_norm`` in norm -> quant), so a norm whose output
    goes somewhere else than the quant (the final norm of a model, before its head) is
    a near miss, not invisible. Views and getitems are not anchors. A mutating custom op
    is anchored on its functional wrapper, holding that op.
    """

    target: Any
    wrapped: Any = None  # the custom op inside auto_functionalized(_v2)

    @staticmethod
    def of(gm: torch.fx.GraphModule) -> Anchor:
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target in _SHAPE_QUERIES or node.target in _SHAPE_OPS:
                continue
            if node.target is operator.getitem:
                continue
            hops = tuple(compat.auto_functionalized_ops().values())
            return Anchor(node.target, node.args[0] if node.target in hops else None)
        raise RewriteError("a pattern must call at least one op")

    def sites(self, graph: torch.fx.Graph) -> list[torch.fx.Node]:
        nodes = graph.find_nodes(op="call_function", target=self.target)
        if self.wrapped is not None:
            nodes = [n for n in nodes if n.args and n.args[0] is self.wrapped]
        return list(nodes)

    def __str__(self) -> str:
        if self.wrapped is not None:
            return f"{_op_name(self.target)}({_op_name(self.wrapped)})"
        return _op_name(self.target)


def _op_name(op: Any) -> str:
    return str(getattr(op, "__name__", op)) if not isinstance(op, torch._ops.OpOverload) else str(op)


# Commutative binary ops: `commute = True` also matches them with operands swapped.
COMMUTATIVE = frozenset({aten.add.Tensor, aten.mul.Tensor})
# Each commutative node doubles the search patterns; past this many it is an error.
MAX_COMMUTATIVE_NODES = 6


def _float_sentinel(i: int) -> float:
    # A value no model would write as a constant, distinct per argument.
    return 1.0e-7 * (7919 + 104729 * i) + 3.0517578125e-13


def _arguments(rewrite: Rewrite) -> list[Argument]:
    name = rewrite.name
    try:
        examples = rewrite.example_inputs()
    except Exception as e:  # noqa: BLE001 - any failure here is the user's to fix
        raise RewriteError(f"rewrite {name}: example_inputs() raised {type(e).__name__}: {e}") from e
    if not isinstance(examples, (list, tuple)):
        raise RewriteError(f"rewrite {name}: example_inputs() must return a list, got {type(examples).__name__}")

    params = list(inspect.signature(rewrite.pattern).parameters.values())
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        raise RewriteError(f"rewrite {name}: pattern() must name each argument (no *args/**kwargs)")
    n_repl = len(inspect.signature(rewrite.replacement).parameters)
    if len(params) != len(examples):
        raise RewriteError(
            f"rewrite {name}: pattern() takes {len(params)} arguments "
            f"({', '.join(p.name for p in params)}) but example_inputs() gives {len(examples)}"
        )
    if n_repl != len(examples):
        raise RewriteError(
            f"rewrite {name}: replacement() takes {n_repl} arguments but example_inputs() gives {len(examples)}"
        )

    args: list[Argument] = []
    for i, (p, ex) in enumerate(zip(params, examples)):
        if isinstance(ex, torch.Tensor):
            ex = TensorSpec(tuple(ex.shape), ex.dtype, ex.device)
        if isinstance(ex, TensorSpec):
            args.append(Argument(p.name, torch.Tensor, ex))
        elif type(ex) is str:
            args.append(Argument(p.name, str, ex, sentinel=f"__fxfuse_wildcard_{p.name}__"))
        elif type(ex) is float:
            args.append(Argument(p.name, float, ex, sentinel=_float_sentinel(i)))
        elif type(ex) in (int, bool):
            args.append(Argument(p.name, type(ex), ex))
        else:
            raise RewriteError(
                f"rewrite {name}: example input {i} ({p.name}) is a {type(ex).__name__}; "
                "use a TensorSpec or tensor, or a float, int, bool or str wildcard"
            )
    free = getattr(rewrite, "free_dtypes", ())
    unknown = sorted(set(free) - {a.name for a in args if a.kind is torch.Tensor})
    if unknown:
        raise RewriteError(f"rewrite {name}: free_dtypes names {unknown}, which are not tensor arguments of pattern()")
    args = [dataclasses.replace(a, free_dtype=True) if a.name in free else a for a in args]
    ints = [a for a in args if a.kind in (int, bool)]
    for a in ints:
        twins = [b.name for b in ints if b is not a and b.sample == a.sample]
        if twins:
            raise RewriteError(
                f"rewrite {name}: wildcards {a.name} and {', '.join(twins)} share the sample value "
                f"{a.sample!r}; give each int/bool wildcard a distinct sample so they can be told apart"
            )
    return args


class _ToPattern:
    """Converts a traced graph into a pattern expression, applying the wildcard rules."""

    def __init__(self, args: Sequence[Argument], *, int_wildcards: bool, swaps: frozenset[str] = frozenset()) -> None:
        self.args = args
        self.int_wildcards = int_wildcards
        self.swaps = swaps
        self.by_sentinel = {(type(a.sentinel), a.sentinel): a.name for a in args if a.sentinel is not None}
        self.by_sample = {(a.kind, a.sample): a.name for a in args if a.kind in (int, bool)}
        self.ignored_shapes = False
        self.used: set[str] = set()

    def leaf(self, x: Any, target: Any) -> Any:
        if isinstance(x, (list, tuple)):
            return type(x)(self.leaf(v, target) for v in x)
        key = (type(x), x)
        if key in self.by_sentinel:
            self.used.add(self.by_sentinel[key])
            return compat.KeywordArg(self.by_sentinel[key])
        if self.int_wildcards and target is not operator.getitem and key in self.by_sample:
            self.used.add(self.by_sample[key])
            return compat.KeywordArg(self.by_sample[key])
        return x

    def convert(self, gm: torch.fx.GraphModule, rewrite: str = "?") -> compat.PatternExpr:
        env: dict[torch.fx.Node, Any] = {}
        placeholders = iter(self.args)
        out: Any = None
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                arg = next(placeholders)
                env[node] = compat.KeywordArg(arg.name)
                if arg.kind is torch.Tensor:  # scalars are traced in as literals instead
                    self.used.add(arg.name)
            elif node.op == "call_function":
                if node.target in _SHAPE_QUERIES:
                    continue
                conv = lambda v, t=node.target: (  # noqa: E731 - dropped size queries read as "any"
                    env.get(v, compat.Ignored()) if isinstance(v, torch.fx.Node) else self.leaf(v, t)
                )
                args = tuple(_map(conv, a) for a in node.args)
                if node.name in self.swaps:
                    args = (args[1], args[0], *args[2:])
                if node.target in _SHAPE_OPS and len(args) > 1:
                    # Sizes differ from the examples and may be symbolic: verified, not matched.
                    self.ignored_shapes = True
                    args = (args[0], compat.Ignored(), *args[2:])
                kwargs = {k: _map(conv, v) for k, v in node.kwargs.items()}
                users = sum(1 for u in node.users if u.target not in _SHAPE_QUERIES)
                expr = compat.CallFunction(node.target, *args, _users=users, **kwargs)
                env[node] = expr
            elif node.op == "output":
                out = node.args[0]
            else:
                raise RewriteError(f"rewrite {rewrite}: unsupported node {node.format_node()} in the traced pattern")
        outs = [env[o] if isinstance(o, torch.fx.Node) else o for o in _flatten(out)]
        for i, o in enumerate(outs):
            if not isinstance(o, compat.PatternExpr) or isinstance(o, compat.KeywordArg):
                what = f"its argument {o.name}" if isinstance(o, compat.KeywordArg) else f"the constant {o!r}"
                raise RewriteError(
                    f"rewrite {rewrite}: output {i} of pattern() is {what}; every output of a pattern must be "
                    "computed by an op (a pattern that returns an input has nothing to replace)"
                )
        return outs[0] if len(outs) == 1 else compat.MultiOutputPattern(outs)


def _map(fn: Callable[[Any], Any], v: Any) -> Any:
    if isinstance(v, (list, tuple)) and any(isinstance(x, torch.fx.Node) for x in v):
        return type(v)(fn(x) for x in v)
    return fn(v)


def _flatten(out: Any) -> list[Any]:
    if isinstance(out, (list, tuple)):
        return [y for x in out for y in _flatten(x)]
    return [out]


def _has_auto_functionalized(gm: torch.fx.GraphModule) -> bool:
    hops = tuple(compat.auto_functionalized_ops().values())
    return any(n.target in hops for n in gm.graph.nodes)


def output_metas(gm: torch.fx.GraphModule) -> list[tuple[tuple[int, ...], torch.dtype] | None]:
    """Shape and dtype of each output of a traced graph (None for non-tensor outputs)."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    return [tensor_meta(o) for o in _flatten(out.args[0])]


def tensor_meta(o: Any) -> tuple[tuple[int, ...], torch.dtype] | None:
    val = o.meta.get("val") if isinstance(o, torch.fx.Node) else o
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(_hint(s) for s in val.shape), val.dtype


def _hint(s: Any) -> int:
    if isinstance(s, torch.SymInt):
        hint = s.node.hint
        return int(hint) if hint is not None else -1
    return int(s)


class TracedRewrite:
    """A rewrite traced into its search patterns; built once by `FusionPass.register`."""

    def __init__(self, rewrite: Rewrite, canonicalizations: tuple[Canonicalization, ...]) -> None:
        self.rewrite = rewrite
        self.name = rewrite.name
        self.canonicalizations = canonicalizations
        self.args = _arguments(rewrite)
        self.variants = self._trace_variants()
        self._check_replacement()
        # Traces made for one graph, keyed by the matched values' signature: every layer
        # of a model matches with the same shapes, so each is traced once per graph.
        self._memo: dict[Any, Any] = {}

    def forget_traces(self) -> None:
        """Drop the per-graph traces (they hold that graph's fake tensors)."""
        self._memo.clear()

    def _memoized(self, key: Any, build: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    # -- registration -------------------------------------------------------------

    def _trace(
        self, fn: Callable[..., Any], values: Sequence[Any], *, v2: bool, what: str, mode: Any = None
    ) -> torch.fx.GraphModule:
        with mode if mode is not None else compat.fake_mode():
            args = [_fresh(v) for v in values]
            try:
                gm = compat.trace_functional(fn, args, v2=v2)
            except RewriteError:
                raise
            except Exception as e:  # noqa: BLE001 - report whatever the user's code raised
                raise RewriteError(
                    f"rewrite {self.name}: {what}() failed to trace: {type(e).__name__}: {e}"
                ) from e
        canonicalize(gm.graph, self.canonicalizations)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return gm

    def _trace_values(self) -> list[Any]:
        return [a.sample if a.sentinel is None else a.sentinel for a in self.args]

    def _trace_variants(self) -> list[Variant]:
        values = self._trace_values()
        gm = self._trace(self.rewrite.pattern, values, v2=True, what="pattern")
        if not _has_auto_functionalized(gm):
            forms = [("functional", gm)]
        else:
            forms = [("v2", gm), ("v1", self._trace(self.rewrite.pattern, values, v2=False, what="pattern"))]
        variants = [self._variant(form, g) for form, g in forms]
        if getattr(self.rewrite, "commute", False):
            variants += self.commuted(variants)
        return variants

    def commuted(self, variants: Sequence[Variant]) -> list[Variant]:
        """Every other operand order of the commutative nodes of ``variants``.

        Patterns, not traces: a swap only reorders two arguments of a converted node, so
        it costs a conversion (microseconds) per variant at registration, and one more
        pattern tried per anchor node at match time.
        """
        out = []
        for base in variants:
            nodes = _commutative_nodes(base.graph)
            if len(nodes) > MAX_COMMUTATIVE_NODES:
                raise RewriteError(
                    f"rewrite {self.name}: commute = True with {len(nodes)} commutative nodes would register "
                    f"{2 ** len(nodes)} search patterns; at most {MAX_COMMUTATIVE_NODES} are allowed "
                    "(split the rewrite, or write the operand orders you need as separate rewrites)"
                )
            for mask in range(1, 2 ** len(nodes)):
                swaps = frozenset(n for i, n in enumerate(nodes) if mask >> i & 1)
                out.append(self._variant(base.form, base.graph, swaps))
        return out

    def _variant(self, form: str, gm: torch.fx.GraphModule, swaps: frozenset[str] = frozenset()) -> Variant:
        conv = _ToPattern(self.args, int_wildcards=True, swaps=swaps)
        pattern = conv.convert(gm, self.name)
        unused = [a.name for a in self.args if a.name not in conv.used]
        if unused:
            raise RewriteError(
                f"rewrite {self.name}: argument(s) {', '.join(unused)} do not appear as-is in the traced "
                "pattern; a wildcard must be passed to an op unchanged (derive sizes from tensor shapes, "
                "or write exact values as constants in the pattern body)"
            )
        needs = conv.ignored_shapes or any(a.kind in (int, bool) for a in self.args)
        return Variant(form, pattern, gm, needs, swaps)

    def graphs_key(self) -> str:
        """The digest of every search pattern and of the replacement as traced here, for the
        cache key: it changes with any code the traces ran, wherever that code lives."""
        graphs = {id(v.graph): graph_key(v.graph) for v in self.variants if not v.swaps}  # commuted: same graph
        parts = [f"{v.form} {sorted(v.swaps)} {graphs[id(v.graph)]}" for v in self.variants]
        return digest([*parts, *self._replacement_keys])

    def _check_replacement(self) -> None:
        values = self._trace_values()
        self._replacement_keys: list[str] = []  # digests, not graphs: those hold fake tensors
        for variant in self.variants:
            if variant.swaps:  # a commuted variant shares its base's trace
                continue
            repl = self._trace(self.rewrite.replacement, values, v2=variant.v2, what="replacement")
            self._replacement_keys.append(graph_key(repl))
            want, got = output_metas(variant.graph), output_metas(repl)
            if len(want) != len(got):
                raise RewriteError(
                    f"rewrite {self.name}: replacement() returns {len(got)} output(s) but pattern() returns {len(want)}"
                )
            for i, (w, g) in enumerate(zip(want, got)):
                if w != g:
                    raise RewriteError(
                        f"rewrite {self.name}: output {i} of replacement() is {_fmt(g)} but pattern() gives {_fmt(w)}"
                    )

    # -- matching -----------------------------------------------------------------

    def bound_values(self, match: compat.Match) -> list[Any]:
        """The matched value of each argument: fake tensors for tensors, literals for wildcards.

        Matches are typed: a tensor argument binds a tensor, never a Python number; a
        wildcard binds a literal of its kind; tensor arguments whose example inputs share
        a dtype bind tensors that share a dtype (unless listed in ``free_dtypes``).
        """
        values = []
        for a in self.args:
            v = match.kwargs[a.name]
            if a.kind is torch.Tensor:
                if not isinstance(v, torch.fx.Node):
                    raise _Skip(f"argument {a.name} is bound to the Python {type(v).__name__} {v!r}, not a tensor")
                v = v.meta.get("val")
                if not isinstance(v, torch.Tensor):
                    raise _Skip(f"argument {a.name} is bound to {match.kwargs[a.name].name}, which is not a tensor")
            elif isinstance(v, torch.fx.Node):
                raise _Skip(f"wildcard {a.name} is bound to the node {v.name}, not a {a.kind.__name__} constant")
            elif type(v) is not a.kind and not (a.kind is float and type(v) is int):
                raise _Skip(f"wildcard {a.name} is bound to {v!r}, a {type(v).__name__}, not a {a.kind.__name__}")
            values.append(v)
        self._check_dtypes(values)
        return values

    def _check_dtypes(self, values: Sequence[Any]) -> None:
        first: dict[torch.dtype, tuple[str, torch.dtype]] = {}
        for a, v in zip(self.args, values):
            if a.kind is not torch.Tensor or a.free_dtype:
                continue
            want = a.sample.dtype
            if want not in first:
                first[want] = (a.name, v.dtype)
                continue
            other, dtype = first[want]
            if v.dtype != dtype:
                raise _Skip(
                    f"argument {a.name} is {_dtype(v.dtype)} but {other} is {_dtype(dtype)}; their example inputs "
                    f"share a dtype ({_dtype(want)}), so they must too (list {a.name} in free_dtypes to allow it)"
                )

    def trace_with(self, fn: Callable[..., Any], values: Sequence[Any], *, v2: bool, what: str) -> torch.fx.GraphModule:
        """Trace ``fn`` on fresh tensors like the matched values, in the graph's own fake mode."""
        from torch._guards import detect_fake_mode

        return self._trace(fn, values, v2=v2, what=what, mode=detect_fake_mode([v for v in values if isinstance(v, torch.Tensor)]))

    def _generic(self, values: Sequence[Any]) -> list[Any]:
        """Values with str/float wildcards swapped for their sentinels: one trace serves all."""
        return [v if a.sentinel is None else a.sentinel for a, v in zip(self.args, values)]

    def replacement_for(self, variant: Variant, values: Sequence[Any]) -> torch.fx.GraphModule:
        """The replacement traced for these matched values.

        Traced once per shape signature with the wildcard sentinels, then specialized:
        the matched strings and floats are written over the sentinels in a copy.
        """
        generic = self._generic(values)
        gm = self._memoized(
            ("replacement", variant.form, _signature(generic)),
            lambda: self.trace_with(self.rewrite.replacement, generic, v2=variant.v2, what="replacement"),
        )
        subst = {(type(a.sentinel), a.sentinel): v for a, v in zip(self.args, values) if a.sentinel is not None}
        return _specialize(gm, subst)

    def verify(self, variant: Variant, match: compat.Match, values: Sequence[Any]) -> None:
        """Re-trace the pattern with the bound values; its outputs must be the matched ones."""
        generic = self._generic(values)

        def build() -> tuple[list[Any], compat.PatternExpr]:
            specific = self.trace_with(self.rewrite.pattern, generic, v2=variant.v2, what="pattern")
            # The re-trace names its nodes as the registration trace did, so the swaps carry over.
            conv = _ToPattern(self.args, int_wildcards=False, swaps=variant.swaps)
            return output_metas(specific), conv.convert(specific, self.name)

        got, exact = self._memoized(("pattern", variant.form, variant.swaps, _signature(generic)), build)
        want = [tensor_meta(n) for n in match.output_nodes()]
        if want != got:
            raise _Skip(f"pattern re-traced with the matched values gives {got}, the graph holds {want}")
        result = exact.match(match.output_nodes()[0])
        if not compat.is_match(result):
            reason = compat.failed_match_reason(result)
            raise _Skip(f"pattern re-traced with the matched values does not match: {reason}")


def _commutative_nodes(gm: torch.fx.GraphModule) -> list[str]:
    """Names of the add/mul nodes of a pattern graph whose two operands are distinct values."""
    return [
        n.name for n in gm.graph.nodes
        if n.op == "call_function" and n.target in COMMUTATIVE and len(n.args) >= 2
        and all(isinstance(a, torch.fx.Node) for a in n.args[:2]) and n.args[0] is not n.args[1]
        and n.kwargs.get("alpha", 1) == 1  # a + alpha * b does not commute
    ]


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _specialize(gm: torch.fx.GraphModule, subst: dict[tuple[type, Any], Any]) -> torch.fx.GraphModule:
    """A copy of ``gm`` with each literal keyed in ``subst`` replaced by its value."""
    if not subst:
        return gm
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    swap = lambda x: subst.get((type(x), x), x) if isinstance(x, (str, float)) else x  # noqa: E731
    for node in graph.nodes:
        node.args = torch.utils._pytree.tree_map(swap, node.args)
        node.kwargs = torch.utils._pytree.tree_map(swap, node.kwargs)
    return torch.fx.GraphModule(gm, graph)


def _signature(values: Sequence[Any]) -> tuple:
    """What a trace depends on: sizes (symbols by name), strides, dtypes, devices, literals."""
    sig: list[Any] = []
    for v in values:
        if isinstance(v, torch.Tensor):
            sig.append((tuple(map(str, v.shape)), tuple(map(str, v.stride())), v.dtype, str(v.device)))
        else:
            sig.append((type(v), v))
    return tuple(sig)


def _fresh(v: Any) -> Any:
    """A new tensor shaped like ``v`` (in the ambient fake mode), or ``v`` itself if no tensor."""
    if isinstance(v, TensorSpec):
        return v.materialize()
    if isinstance(v, torch.Tensor):
        return torch.empty_strided(v.size(), v.stride(), dtype=v.dtype, device=v.device)
    return v


class _Skip(Exception):
    """A candidate match that turned out not to be one; the message says why."""


def _fmt(meta: Any) -> str:
    if meta is None:
        return "not a tensor"
    shape, dtype = meta
    return f"{str(dtype).replace('torch.', '')}{list(shape)}"
