"""Turn a `Rewrite` into search patterns and replacement programs, once.

The pattern function is traced into the aten graph Inductor's post-grad stage holds
(functionalized, Inductor's decompositions, no-op ops removed), on fake tensors whose
sizes are *symbolic*: a size the pattern takes from an input (``x.shape[0]``) stays an
expression over the inputs' sizes and matches any size equal to it, static or dynamic,
while a number written in the pattern body stays a constant. What the trace assumed
about sizes (a width divisible by 16, two sizes equal) is kept and checked per match.
The replacement is traced the same way, on the same inputs, into a `Program` that is
instantiated per match without tracing again.

Arguments of the rewrite become variables of the pattern:

* tensors are placeholders (an ``optional`` one is also traced as ``None``);
* ``str`` and ``float`` wildcards are traced with unique sentinel values, and every
  occurrence of the sentinel becomes the variable;
* ``int`` and ``bool`` wildcards cannot have sentinels (they feed shapes), so every
  explicit literal equal to the sample becomes the variable; such a match is verified by
  tracing the pattern again with the matched values, and the replacement is traced with
  them, never guessed.

A pattern holding a mutating custom op yields a variant per functional form
(``auto_functionalized`` and ``auto_functionalized_v2``). ``commute = True`` adds a variant
per other operand order of its ``add``/``mul`` nodes. Matches are typed
(`TracedRewrite.bound_values`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import logging
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx

from . import compat, splice, trace_cache
from .cache_key import digest
from .canonicalize import Canonicalization, canonicalize
from .matcher import Context, Failure, Match, match_at
from .pattern import (
    Binder, Const, Pattern, Program, Ref, Seq, Var, anchor_for, pattern_from_graph, program_from_graph, refs_at, terms,
)
from .rewrite import Rewrite, RewriteError, TensorSpec
from .schema import dim_text, op_name

aten = torch.ops.aten
_SCALAR_KINDS = (bool, int, float, str)

# Commutative binary ops: `commute = True` also matches them with operands swapped.
COMMUTATIVE = frozenset({aten.add.Tensor, aten.mul.Tensor})
# Each commutative node doubles the search patterns; past this many it is an error.
MAX_COMMUTATIVE_NODES = 6
# Each optional tensor argument doubles the traced forms; past this many it is an error.
MAX_OPTIONAL_ARGUMENTS = 4


@dataclasses.dataclass(frozen=True)
class Argument:
    """One argument of a rewrite: a tensor variable or a typed wildcard."""

    name: str
    kind: type  # torch.Tensor, or one of _SCALAR_KINDS
    sample: Any  # TensorSpec for tensors, the sample value for wildcards
    sentinel: Any = None  # the traced stand-in of a str/float wildcard
    free_dtype: bool = False  # a tensor whose dtype is not tied to its example's dtype group
    optional: bool = False  # a tensor argument that may also be None


@dataclasses.dataclass(frozen=True)
class Anchor:
    """The op a rewrite's chain is found from: a site of the rewrite is a node running it.

    A mutating custom op is anchored on its functional wrapper holding that op.
    """

    target: Any
    wrapped: Any = None

    def matches(self, node: torch.fx.Node) -> bool:
        return node.op == "call_function" and node.target is self.target and (
            self.wrapped is None or (bool(node.args) and node.args[0] is self.wrapped))

    def sites(self, graph: torch.fx.Graph) -> list[torch.fx.Node]:
        return [n for n in graph.find_nodes(op="call_function", target=self.target) if self.matches(n)]

    def __str__(self) -> str:
        if self.wrapped is not None:
            return f"{op_name(self.target)}({op_name(self.wrapped)})"
        return op_name(self.target)


@dataclasses.dataclass
class Variant:
    """One search pattern of a rewrite, with the replacement program traced beside it."""

    form: str  # "functional", "v1" or "v2"
    pattern: Pattern
    program: Optional[Program]  # None: the replacement is traced per match (int/bool wildcards)
    needs_verification: bool
    nones: frozenset[str] = frozenset()  # optional arguments this variant was traced without
    swaps: frozenset[str] = frozenset()  # commutative nodes matched with operands swapped

    @property
    def v2(self) -> bool:
        return self.form == "v2"

    @property
    def label(self) -> str:
        """The form, the optional arguments left out, and the swapped operands."""
        parts = [self.form]
        if self.nones:
            parts.append(f"without {', '.join(sorted(self.nones))}")
        if self.swaps:
            parts.append(f"swapped {', '.join(sorted(self.swaps))}")
        return ", ".join(parts)

    @property
    def anchor(self) -> Anchor:
        return Anchor(*self.pattern.anchor_key())


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
    for what in ("pattern", "replacement"):
        if not callable(getattr(rewrite, what, None)):
            raise RewriteError(f"rewrite {name}: {what} must be a function")
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
            args.append(Argument(p.name, torch.Tensor, ex, optional=ex.optional))
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
        twins = [b.name for b in ints if b is not a and b.sample == a.sample and type(b.sample) is type(a.sample)]
        if twins:
            raise RewriteError(
                f"rewrite {name}: wildcards {a.name} and {', '.join(twins)} share the sample value "
                f"{a.sample!r}; give each int/bool wildcard a distinct sample so they can be told apart"
            )
    optional = [a.name for a in args if a.optional]
    if len(optional) > MAX_OPTIONAL_ARGUMENTS:
        raise RewriteError(f"rewrite {name}: {len(optional)} optional tensor arguments ({', '.join(optional)}) would "
                           f"trace {2 ** len(optional)} forms; at most {MAX_OPTIONAL_ARGUMENTS} are allowed")
    return args


# --------------------------------------------------------------------------- fake inputs


@dataclasses.dataclass
class _Inputs:
    """Fake inputs of one trace: the mode, the values, and each size symbol's canonical name."""

    mode: Any
    values: list[Any]
    symbols: dict[Any, Any]
    device: Optional[torch.device]

    def guards(self) -> list[Any]:
        env = getattr(self.mode, "shape_env", None)
        if env is None:
            return []
        out = []
        canonical = set(self.symbols.values())
        for g in env.guards:
            expr = g.expr.xreplace(self.symbols)
            if expr is True or expr == True or not expr.free_symbols or not expr.free_symbols <= canonical:  # noqa: E712
                continue
            if expr not in out:
                out.append(expr)
        return out


def _inputs(args: Sequence[Argument], values: Sequence[Any], *, symbolic: bool,
            hints: Optional[dict[str, int]] = None) -> _Inputs:
    """Fake tensors for ``values`` (TensorSpecs); each dimension a fresh size symbol when
    ``symbolic`` (neither duck-sized nor specialized at 0 and 1, so every assumption the
    trace makes about a size is recorded as a guard), whose value while tracing is the
    example's size or, for ``hints["x.0"]``, that."""
    import sympy
    from torch._subclasses.fake_tensor import FakeTensorMode

    if symbolic:
        from torch._dynamo.source import ConstantSource
        from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

        env = ShapeEnv(duck_shape=False, specialize_zero_one=False, should_record_events=False)
        mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=env)
    else:
        env, mode = None, FakeTensorMode(allow_non_fake_inputs=True)
    out, symbols, device = [], {}, None
    for a, v in zip(args, values):
        if a.kind is not torch.Tensor or v is None:
            out.append(v)
            continue
        spec: TensorSpec = v
        shape: list[Any] = list(spec.shape)
        if env is not None:
            for d, size in enumerate(spec.shape):
                size = (hints or {}).get(f"{a.name}.{d}", size)
                sym = env.create_symbol(size, ConstantSource(f"{a.name}.{d}"), dynamic_dim=DimDynamic.DYNAMIC)
                symbols[sym] = sympy.Symbol(f"{a.name}.{d}", integer=True)
                shape[d] = env.create_symintnode(sym, hint=size)
        with mode:
            t = torch.empty(shape, dtype=spec.dtype, device=spec.device or "cpu")
        device = device or t.device
        out.append(t)
    return _Inputs(mode, out, symbols, device)


def _fresh(v: Any) -> Any:
    """A new tensor shaped like ``v`` (in the ambient fake mode), or ``v`` itself if no tensor."""
    if isinstance(v, torch.Tensor):
        return torch.empty_strided(v.size(), v.stride(), dtype=v.dtype, device=v.device)
    return v


# --------------------------------------------------------------------------- the traced rewrite


class TracedRewrite:
    """A rewrite traced into its search patterns and replacement programs (`FusionPass.register`)."""

    def __init__(self, rewrite: Rewrite, canonicalizations: tuple[Canonicalization, ...],
                 canonicalization_key: Optional[str] = None) -> None:
        self.rewrite = rewrite
        self.name = rewrite.name
        self.canonicalizations = canonicalizations
        self.args = _arguments(rewrite)
        key = trace_cache.key(rewrite, canonicalization_key) if canonicalization_key is not None else None
        data = trace_cache.load(key)
        self._variants: Optional[list[Variant]] = None
        if data is not None and data.get("args") == repr(self.args):
            # The patterns themselves are read when a graph first holds an anchor op.
            self._blob, self._keys, self._used = data["variants"], data["keys"], set(data["used"])
            self._literal = set(data["literal"])
            self._anchors = [Anchor(t, w) for t, w in data["anchors"]]
            self.cached = True
        else:
            # Code outside fxfuse that the traces run is recorded: the cache entry is used
            # again only while those files are unchanged.
            outside = not type(rewrite).__module__.startswith("fxfuse.")
            with trace_cache.recording() if outside else contextlib.nullcontext(set()) as files:
                # What the arguments are (names, kinds, example specs: their dtypes group
                # the tensors a match must bind) is part of what the traces are keyed by.
                self._keys = [repr(self.args)]
                self._used: set[str] = set()
                self._variants = self._trace_variants()
            self._anchors = list(dict.fromkeys(v.anchor for v in self._variants))
            blob, schemas = trace_cache.dumps(self._variants)
            trace_cache.store(key, {"args": repr(self.args), "variants": blob, "keys": self._keys,
                                    "used": sorted(self._used), "literal": sorted(self._literal),
                                    "anchors": [(a.target, a.wrapped) for a in self._anchors]},
                              files, schemas)
            self.cached = False
        # Traces made per match signature: replacements of int/bool-wildcard rewrites and
        # verification patterns. Static signatures are kept for the process (programs are
        # data); symbolic ones hold one graph's symbols and are dropped after each graph.
        self._memo: dict[Any, Any] = {}
        self._static_memo: dict[Any, Any] = {}

    def forget_traces(self) -> None:
        """Drop the traces that belong to one graph (those made at symbolic sizes)."""
        self._memo.clear()

    @property
    def variants(self) -> list[Variant]:
        """The search patterns (read from the trace cache the first time they are needed)."""
        if self._variants is None:
            try:
                self._variants = trace_cache.loads(self._blob)
            except Exception as e:  # noqa: BLE001 - an entry another fxfuse wrote mid-run, a torn file
                logging.getLogger("fxfuse").debug("fxfuse: the stored patterns of %s do not read (%s); traced again",
                                                  self.name, e)
                # The same code traces to the same keys (they are the entry's, already in uuid()).
                self._keys, self._used = self._keys[:1], set()
                self._variants = self._trace_variants()
        return self._variants

    @property
    def anchors(self) -> list[Anchor]:
        """The ops this rewrite's chains are found from (no pattern needs reading for these)."""
        return list(self._anchors)

    # -- registration -------------------------------------------------------------

    def _trace(self, fn: Callable[..., Any], inputs: _Inputs, *, v2: bool, what: str) -> torch.fx.GraphModule:
        with inputs.mode:
            try:
                gm = compat.trace_functional(fn, [_fresh(v) for v in inputs.values], v2=v2)
            except RewriteError:
                raise
            except Exception as e:  # noqa: BLE001 - report whatever the user's code raised
                raise RewriteError(f"rewrite {self.name}: {what}() failed to trace: {type(e).__name__}: {e}") from e
        canonicalize(gm.graph, self.canonicalizations)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return gm

    # Wildcards are traced as sentinels (str, float: every occurrence of the unique value is
    # the wildcard) or as literals (int, bool, and a str/float whose sentinel the code
    # refuses, such as a rounding_mode: an explicit literal equal to the sample is the
    # wildcard, and each match is verified). `_samples` holds the literal traced for each.

    def _sentinel(self, a: Argument) -> Any:
        return None if a.name in self._literal else a.sentinel

    def _trace_values(self, nones: frozenset[str] = frozenset()) -> list[Any]:
        out = []
        for a in self.args:
            if a.name in nones:
                out.append(None)
            elif a.kind is torch.Tensor:
                out.append(a.sample)
            else:
                out.append(self._samples[a.name] if self._sentinel(a) is None else a.sentinel)
        return out

    def _binder(self, gm: torch.fx.GraphModule, inputs: _Inputs, *, samples: bool) -> Binder:
        placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        return Binder(
            sentinels={(type(a.sentinel), a.sentinel): a.name for a in self.args if self._sentinel(a) is not None},
            samples={(type(self._samples[a.name]), self._samples[a.name]): a.name for a in self.args
                     if a.kind is not torch.Tensor and self._sentinel(a) is None} if samples else {},
            symbols=inputs.symbols,
            device=inputs.device,
            placeholders=dict(zip(placeholders, (a.name for a in self.args))),
        )

    def _trace_variants(self) -> list[Variant]:
        self._samples = {a.name: a.sample for a in self.args if a.kind is not torch.Tensor}
        self._literal = {a.name for a in self.args if a.kind in (int, bool)}
        optional = [a.name for a in self.args if a.optional]
        combos = [frozenset(c) for k in range(len(optional) + 1) for c in itertools.combinations(optional, k)]
        try:
            first = self._trace_forms(combos[0])
        except RewriteError:
            sentinels = {a.name for a in self.args if a.sentinel is not None}
            if not sentinels:
                raise
            # Code that validates its str/float arguments refuses the sentinels: trace them as literals.
            self._literal |= sentinels
            self._keys, self._used = self._keys[:1], set()
            first = self._trace_forms(combos[0])
        first = self._find_hidden_samples(combos[0], first)
        variants = list(first)
        for nones in combos[1:]:
            variants += self._trace_forms(nones)
        if getattr(self.rewrite, "commute", False):
            variants += self.commuted(variants)
        self._check_used(variants)
        return variants

    def _find_hidden_samples(self, nones: frozenset[str], variants: list[Variant]) -> list[Variant]:
        """Trace again with another sample for a literal wildcard the trace does not show.

        A wildcard whose sample equals the default of the argument it is passed to is
        dropped by tracing, like any defaulted argument (``keepdim=False``); with another
        sample it is written, and found.
        """
        hidden = [a for a in self.args if a.name in self._literal and a.name not in self._used]
        for a in hidden:
            sample = self._samples[a.name]
            others = [not sample] if type(sample) is bool else (
                [sample + 1, 2 * sample, sample - 1] if type(sample) is int else [])
            taken = {(type(v), v) for k, v in self._samples.items() if k != a.name}
            for alt in others:
                if (type(alt), alt) in taken:
                    continue
                saved = (dict(self._samples), list(self._keys), set(self._used))
                self._samples[a.name] = alt
                self._keys, self._used = self._keys[:1], set()
                try:
                    again = self._trace_forms(nones)
                except RewriteError:
                    again = None
                if again is not None and a.name in self._used:
                    variants = again
                    break
                self._samples, self._keys, self._used = saved
        return variants

    def _trace_forms(self, nones: frozenset[str]) -> list[Variant]:
        first = self._trace_form(nones, v2=True)
        if not any(n.wrapped is not None for n in first.pattern.nodes):
            return [first]
        return [first, self._trace_form(nones, v2=False)]

    def _trace_pattern(self, values: list[Any], *, v2: bool) -> tuple[torch.fx.GraphModule, _Inputs, bool]:
        """The pattern traced on symbolic sizes (else at the example sizes, which then are
        constants); the inputs it was traced on; whether the sizes are static."""
        try:
            inputs = _inputs(self.args, values, symbolic=True)
            gm = self._trace(self.rewrite.pattern, inputs, v2=v2, what="pattern")
        except RewriteError as symbolic_error:
            # Code that cannot run on symbolic sizes: traced at the example sizes instead,
            # which then become constants of the pattern (docs/design-notes.md).
            inputs = _inputs(self.args, values, symbolic=False)
            try:
                return self._trace(self.rewrite.pattern, inputs, v2=v2, what="pattern"), inputs, True
            except RewriteError:
                raise symbolic_error from None
        return (*self._apart(gm, inputs, values, v2=v2, hints={}), False)

    def _apart(self, gm: torch.fx.GraphModule, inputs: _Inputs, values: list[Any], *, v2: bool,
               hints: dict[str, int], depth: int = 0) -> tuple[torch.fx.GraphModule, _Inputs]:
        """Undo what the example sizes alone made the trace assume.

        A trace compares sizes at their example values: square examples (4, 4) make
        ``x.reshape(x.shape[1], x.shape[0])`` look like a no-op, and the trace assumes the two
        sizes equal. Each equality of two sizes of one argument the trace assumed is tried
        again with one of them doubled; where the code runs and no longer assumes it, it was
        only the example's. (Sizes of two arguments that are equal are nearly always so
        because the code needs them to be, a norm's weight width and its input's: trying
        them apart would cost a trace each and find nothing; give such examples different
        sizes where the code does not need them equal.)"""
        import sympy

        if depth >= 4:
            return gm, inputs
        for g in inputs.guards():
            if not (isinstance(g, sympy.Eq) and all(isinstance(a, sympy.Symbol) for a in g.args)):
                continue
            if len({str(a).rsplit(".", 1)[0] for a in g.args}) != 1:
                continue  # two arguments' sizes
            for name in sorted((str(a) for a in g.args), reverse=True):  # either side may be the free one
                arg, dim = name.rsplit(".", 1)
                spec = next(v for a, v in zip(self.args, values) if a.name == arg)
                tried = {**hints, name: 2 * hints.get(name, spec.shape[int(dim)])}
                try:
                    other = _inputs(self.args, values, symbolic=True, hints=tried)
                    again = self._trace(self.rewrite.pattern, other, v2=v2, what="pattern")
                except RewriteError:
                    continue
                if g not in other.guards():
                    return self._apart(again, other, values, v2=v2, hints=tried, depth=depth + 1)
        return gm, inputs

    def _literal_positions(self, pattern: Pattern, nones: frozenset[str], *, v2: bool) -> Pattern:
        """Keep a literal wildcard only where it is: where its value changes with its sample.

        Every literal equal to an int/bool wildcard's sample was taken to be the wildcard;
        one that is the pattern's own number (``sum(x, d)`` then ``cumsum(..., dim=0)``
        with ``d``'s sample 0) is not. Traced again with other samples, the pattern's own
        numbers stay: those positions go back to constants. Where no other sample traces
        to the same ops, every position stays (verification still makes each match exact).
        """
        counts: dict[str, int] = {}
        for n in pattern.nodes:
            for t in n.args:
                for u in terms(t):
                    if isinstance(u, Var) and u.name in self._literal:
                        counts[u.name] = counts.get(u.name, 0) + 1
        twice = [name for name, k in counts.items() if k > 1]
        if not twice:
            return pattern
        saved = dict(self._samples)
        try:
            for shift in (1, -1, 2):
                for name in twice:
                    v = saved[name]
                    self._samples[name] = (not v) if type(v) is bool else (v + shift if shift != 2 else 2 * v + 3)
                try:
                    gm, inputs, static = self._trace_pattern(self._trace_values(nones), v2=v2)
                    other = pattern_from_graph(gm, self._binder(gm, inputs, samples=True), static_sizes=static)
                except (RewriteError, ValueError):
                    continue
                kept = _keep_changed(pattern, other, set(twice))
                if kept is not None:
                    return kept
        finally:
            self._samples = saved
        return pattern

    def _trace_form(self, nones: frozenset[str], *, v2: bool) -> Variant:
        values = self._trace_values(nones)
        gm, inputs, static = self._trace_pattern(values, v2=v2)
        pattern_guards = inputs.guards()
        binder = self._binder(gm, inputs, samples=True)
        try:
            pattern = pattern_from_graph(gm, binder, static_sizes=static, guards=pattern_guards)
        except ValueError as e:
            raise RewriteError(f"rewrite {self.name}: {e}") from e
        pattern = self._literal_positions(pattern, nones, v2=v2)
        self._check_tensor_uses(gm, binder, nones)
        anchor = getattr(self.rewrite, "anchor", None)
        if anchor is not None:
            i = anchor_for(pattern.nodes, anchor)
            if i is None:
                raise RewriteError(f"rewrite {self.name}: anchor {anchor} is not an op of its pattern "
                                   f"(it calls {', '.join(dict.fromkeys(n.op for n in pattern.nodes))})")
            pattern = pattern.with_anchor(i)
        try:
            pattern.with_anchor(pattern.anchor)  # plans the search: fails for a pattern in pieces
        except ValueError as e:
            raise RewriteError(f"rewrite {self.name}: {e}") from e
        self._check_var_steps(pattern)
        used = set(binder.used)
        repl = self._trace(self.rewrite.replacement, inputs, v2=v2, what="replacement")
        self._check_outputs(gm, repl)
        program_binder = self._binder(repl, inputs, samples=False)
        known = len(pattern_guards)
        try:
            program = program_from_graph(repl, program_binder, symbolic=not static, guards=inputs.guards()[known:])
        except ValueError as e:
            raise RewriteError(f"rewrite {self.name}: replacement(): {e}") from e
        has_ints = any(a.kind is not torch.Tensor and self._sentinel(a) is None for a in self.args)
        self._used |= used
        self._keys += [pattern.digest(), digest([program.text()])]
        form = "functional" if not any(n.wrapped is not None for n in pattern.nodes) else ("v2" if v2 else "v1")
        return Variant(form, pattern, None if has_ints else program, needs_verification=has_ints, nones=nones)

    def _check_tensor_uses(self, gm: torch.fx.GraphModule, binder: Binder, nones: frozenset[str]) -> None:
        from .pattern import SIZE_QUERIES

        for node in gm.graph.nodes:
            if node.op != "placeholder":
                continue
            arg = next(a for a in self.args if a.name == binder.placeholders[node.name])
            if arg.kind is not torch.Tensor or arg.name in nones:
                continue
            data_uses = [u for u in node.users if u.target not in SIZE_QUERIES]
            if not data_uses and node.users:
                raise RewriteError(
                    f"rewrite {self.name}: argument {arg.name} is used only for its sizes; a pattern can take sizes "
                    "only from tensors it also computes with (take them from another argument)"
                )

    def _check_var_steps(self, pattern: Pattern) -> None:
        tensors = {a.name for a in self.args if a.kind is torch.Tensor}
        for step in pattern.steps:
            if step.via == "var" and step.source not in tensors:
                raise RewriteError(
                    f"rewrite {self.name}: parts of its pattern share only the wildcard {step.source}; a pattern must "
                    "be one chain (its parts connected through ops or tensor arguments)"
                )

    def _check_used(self, variants: Sequence[Variant]) -> None:
        unused = [a for a in self.args if a.name not in self._used]
        if unused:
            kinds = ", ".join(f"{a.name} is a {'tensor' if a.kind is torch.Tensor else a.kind.__name__}" for a in unused)
            raise RewriteError(
                f"rewrite {self.name}: argument(s) {', '.join(a.name for a in unused)} do not appear in the traced "
                f"pattern ({kinds}); every argument of pattern() must be used by it: a tensor in a computation, a "
                "wildcard passed to an op unchanged (derive sizes from tensor shapes, write exact values as "
                "constants in the pattern body)"
            )

    def _check_outputs(self, pattern_gm: torch.fx.GraphModule, repl_gm: torch.fx.GraphModule) -> None:
        # At the example sizes: symbolic sizes may be written two ways that the trace's
        # assumptions make equal (``(n + 1) // 2`` and ``n // 2`` for an even n). Each
        # match compares its actual sizes again (`fxfuse.splice.prepare`).
        want, got = output_metas(pattern_gm, hints=True), output_metas(repl_gm, hints=True)
        if len(want) != len(got):
            raise RewriteError(
                f"rewrite {self.name}: replacement() returns {len(got)} output(s) but pattern() returns {len(want)}"
            )
        for i, (w, g) in enumerate(zip(want, got)):
            if w != g:
                raise RewriteError(f"rewrite {self.name}: output {i} of replacement() is {_fmt(g)} but pattern() gives {_fmt(w)}")

    def commuted(self, variants: Sequence[Variant]) -> list[Variant]:
        """Every other operand order of the commutative nodes of ``variants`` (patterns only:
        a swap reorders two arguments of a pattern node, no trace)."""
        out = []
        for base in variants:
            if base.swaps:
                continue
            nodes = commutative_nodes(base.pattern)
            if len(nodes) > MAX_COMMUTATIVE_NODES:
                raise RewriteError(
                    f"rewrite {self.name}: commute = True with {len(nodes)} commutative nodes would register "
                    f"{2 ** len(nodes)} search patterns; at most {MAX_COMMUTATIVE_NODES} are allowed "
                    "(split the rewrite, or write the operand orders you need as separate rewrites)"
                )
            for mask in range(1, 2 ** len(nodes)):
                swaps = frozenset(n for i, n in enumerate(nodes) if mask >> i & 1)
                out.append(dataclasses.replace(base, pattern=base.pattern.swapped(swaps), swaps=swaps))
        return out

    def patterns_digest(self) -> str:
        """A digest of the patterns and programs as they are now (read from the cache or
        traced): what a fresh trace must reproduce (`tests/test_trace_cache.py`)."""
        parts = []
        for v in self.variants:
            parts += [v.label, str(v.needs_verification), v.pattern.text(), v.program.text() if v.program else "-"]
        return digest(parts)

    def graphs_key(self) -> str:
        """The digest of every search pattern and replacement program as traced: it changes
        with any code the traces ran, wherever that code lives."""
        return digest(self._keys)

    # -- matching -----------------------------------------------------------------

    def bound_values(self, match: Match, variant: Variant) -> list[Any]:
        """The matched value of each argument: fake tensors for tensors, literals for wildcards.

        Matches are typed: a tensor argument binds a tensor, never a Python number; a
        wildcard binds a literal of its kind; tensor arguments whose example inputs share
        a dtype bind tensors that share a dtype (unless listed in ``free_dtypes``).
        """
        values = []
        for a in self.args:
            if a.name in variant.nones:
                match.kwargs[a.name] = None
                values.append(None)
                continue
            v = match.kwargs[a.name]
            if a.kind is torch.Tensor:
                if not isinstance(v, torch.fx.Node):
                    raise Skip(f"argument {a.name} is bound to the Python {type(v).__name__} {v!r}, not a tensor")
                v = v.meta.get("val")
                if not isinstance(v, torch.Tensor):
                    raise Skip(f"argument {a.name} is bound to {match.kwargs[a.name].name}, which is not a tensor")
            elif isinstance(v, torch.fx.Node):
                raise Skip(f"wildcard {a.name} is bound to the node {v.name}, not a {a.kind.__name__} constant")
            elif type(v) is not a.kind and not (a.kind is float and type(v) is int):
                raise Skip(f"wildcard {a.name} is bound to {v!r}, a {type(v).__name__}, not a {a.kind.__name__}")
            values.append(v)
        self._check_dtypes(values)
        return values

    def _check_dtypes(self, values: Sequence[Any]) -> None:
        first: dict[torch.dtype, tuple[str, torch.dtype]] = {}
        for a, v in zip(self.args, values):
            if a.kind is not torch.Tensor or a.free_dtype or v is None:
                continue
            want = a.sample.dtype
            if want not in first:
                first[want] = (a.name, v.dtype)
                continue
            other, dtype = first[want]
            if v.dtype != dtype:
                raise Skip(
                    f"argument {a.name} is {_dtype(v.dtype)} but {other} is {_dtype(dtype)}; their example inputs "
                    f"share a dtype ({_dtype(want)}), so they must too (list {a.name} in free_dtypes to allow it)"
                )

    def _generic(self, values: Sequence[Any]) -> list[Any]:
        """Values with str/float wildcards swapped for their sentinels: one trace serves all."""
        return [v if self._sentinel(a) is None else a.sentinel for a, v in zip(self.args, values)]

    def _memoized(self, key: Any, build: Callable[[], Any]) -> Any:
        memo = self._static_memo if _static(key) else self._memo
        if key not in memo:
            memo[key] = build()
        return memo[key]

    def _trace_at(self, fn: Callable[..., Any], values: Sequence[Any], *, v2: bool, what: str) -> tuple[torch.fx.GraphModule, _Inputs]:
        """Trace ``fn`` on fresh tensors like the matched values, in the graph's own fake mode."""
        from torch._guards import detect_fake_mode

        import sympy

        mode = detect_fake_mode([v for v in values if isinstance(v, torch.Tensor)]) or compat.fake_mode()
        device = next((v.device for v in values if isinstance(v, torch.Tensor)), None)
        # The graph's own size symbols, named as the pattern names sizes (``x.0``).
        symbols: dict[Any, Any] = {}
        for a, v in zip(self.args, values):
            if isinstance(v, torch.Tensor):
                for d, s in enumerate(v.shape):
                    if isinstance(s, torch.SymInt) and s.node.expr.is_Symbol and s.node.expr not in symbols:
                        symbols[s.node.expr] = sympy.Symbol(f"{a.name}.{d}", integer=True)
        inputs = _Inputs(mode, list(values), symbols, device)
        return self._trace(fn, inputs, v2=v2, what=what), inputs

    def verify(self, variant: Variant, match: Match, values: Sequence[Any], ctx: Context) -> None:
        """Trace the pattern again with the bound values; it must match the same nodes."""
        generic = self._generic(values)

        def build() -> Pattern:
            gm, inputs = self._trace_at(self.rewrite.pattern, generic, v2=variant.v2, what="pattern")
            exact = pattern_from_graph(gm, self._binder(gm, inputs, samples=False))
            i = anchor_for(exact.nodes, variant.anchor.wrapped or variant.anchor.target)
            exact = exact.with_anchor(i if i is not None else exact.anchor)
            return exact.swapped(variant.swaps) if variant.swaps else exact

        exact = self._memoized(("pattern", variant.form, variant.nones, variant.swaps, _signature(generic)), build)
        m = match_at(exact, match.anchor, ctx)
        if isinstance(m, Failure):
            raise Skip(f"the pattern traced again with the matched values does not match: {m.reason}")
        if set(m.nodes) != set(match.nodes):
            raise Skip("the pattern traced again with the matched values matches other nodes")

    def replacement_for(self, variant: Variant, match: Match, values: Sequence[Any], ctx: Context) -> splice.Prepared:
        """The replacement for this match, checked and ready to splice.

        The program traced at registration where it applies at these sizes; otherwise the
        replacement traced with the matched values (once per shape signature).
        """
        if variant.program is not None:
            try:
                return splice.prepare(variant.program, match, ctx, symbolic=not variant.pattern.static_sizes)
            except splice.NeedsConcrete:
                pass
        generic = self._generic(values)

        def build() -> Program:
            gm, inputs = self._trace_at(self.rewrite.replacement, generic, v2=variant.v2, what="replacement")
            return program_from_graph(gm, self._binder(gm, inputs, samples=False), symbolic=False)

        program = self._memoized(("replacement", variant.form, variant.nones, _signature(generic)), build)
        return splice.prepare(program, match, ctx, symbolic=False)


def _keep_changed(a: Pattern, b: Pattern, names: set[str]) -> Optional[Pattern]:
    """``a`` with each `Var` of ``names`` that ``b`` (traced with other samples) holds as a
    constant put back to a constant; None when the two traces differ in their ops."""
    if len(a.nodes) != len(b.nodes):
        return None

    def merge(ta: Any, tb: Any) -> Any:
        if isinstance(ta, Var) and ta.name in names:
            if isinstance(tb, Var) and tb.name == ta.name:
                return ta
            # The other trace holds a constant there: so did this one, the same constant.
            return Const(tb.value) if isinstance(tb, Const) else _Mismatch
        if isinstance(ta, Seq) and isinstance(tb, Seq) and len(ta.items) == len(tb.items):
            items = tuple(merge(x, y) for x, y in zip(ta.items, tb.items))
            return _Mismatch if _Mismatch in items else Seq(items)
        return ta if type(ta) is type(tb) else _Mismatch

    nodes = []
    for na, nb in zip(a.nodes, b.nodes):
        if (na.target, na.wrapped, na.names) != (nb.target, nb.wrapped, nb.names):
            return None
        args = tuple(merge(x, y) for x, y in zip(na.args, nb.args))
        if _Mismatch in args:
            return None
        nodes.append(dataclasses.replace(na, args=args))
    return Pattern(tuple(nodes), a.outputs, a.anchor, a.guards, a.static_sizes)


_Mismatch = object()


def commutative_nodes(p: Pattern) -> list[str]:
    """Names of the add/mul nodes of a pattern whose two operands are distinct values."""
    out = []
    for n in p.nodes:
        if n.target not in COMMUTATIVE or len(n.args) < 2:
            continue
        a, b = n.args[0], n.args[1]
        if not all(isinstance(t, (Ref, Var)) for t in (a, b)) or a == b:
            continue
        alpha = n.args[2] if len(n.args) > 2 else None
        if isinstance(alpha, Const) and alpha.value != 1:
            continue  # a + alpha * b does not commute
        out.append(n.name)
    return out


def output_metas(gm: torch.fx.GraphModule, *, hints: bool = False) -> list[Any]:
    """Shape and dtype of each output of a trace; sizes at their example values (``hints``)
    or as ints and symbolic text."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    return [tensor_meta(o, hints=hints) for o in _flatten(out.args[0])]


def tensor_meta(o: Any, *, hints: bool = False) -> Any:
    val = o.meta.get("val") if isinstance(o, torch.fx.Node) else o
    if not isinstance(val, torch.Tensor):
        return None
    if hints:
        return tuple(_hint(s) for s in val.shape), val.dtype
    return tuple(dim_text(s) for s in val.shape), val.dtype


def _hint(size: Any) -> Any:
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        return int(hint) if hint is not None else str(size)
    return int(size)


def _flatten(out: Any) -> list[Any]:
    if isinstance(out, (list, tuple)):
        return [y for x in out for y in _flatten(x)]
    return [out]


def _signature(values: Sequence[Any]) -> tuple:
    """What a trace depends on: sizes (symbols by name), strides, dtypes, devices, literals."""
    sig: list[Any] = []
    for v in values:
        if isinstance(v, torch.Tensor):
            sig.append((tuple(map(str, v.shape)), tuple(map(str, v.stride())), v.dtype, str(v.device)))
        else:
            sig.append((type(v), v))
    return tuple(sig)


def _static(key: Any) -> bool:
    """Whether a memo key holds only static sizes (its trace serves every graph)."""
    sig = key[-1]
    return all(not isinstance(s, tuple) or len(s) != 4 or all(x.lstrip("-").isdigit() for x in (*s[0], *s[1]))
               for s in sig)


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class Skip(Exception):
    """A candidate match that turned out not to be one; the message says why."""


_Skip = Skip  # the name earlier releases of this module used


def _fmt(meta: Any) -> str:
    if meta is None:
        return "not a tensor"
    shape, dtype = meta
    return f"{str(dtype).replace('torch.', '')}{list(shape)}"


__all__ = ["Argument", "Anchor", "Variant", "TracedRewrite", "Skip", "output_metas", "tensor_meta", "refs_at", "Var"]
