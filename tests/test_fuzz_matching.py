"""A seeded differential fuzzer for fxfuse's pattern matcher (DESIGN §1, §10, §11).

The rule under test (§11, "matching means what the code means"): a pattern node matches
a graph node only where both, written out in the op's full schema form, agree; an
argument the pattern leaves at its default matches only that default (or an equal
explicit value), an explicit one only its value, a wildcard (a float/int/bool/str
example input) any value of its kind; sizes a pattern takes from its inputs are
symbolic, a number written in the body is a constant.

Public API only: ``fxfuse.Rewrite``, ``fxfuse.FusionPass``, ``fxfuse.TensorSpec``,
``fxfuse.match_table``/``reset_match_table``, ``fxfuse.FusionWarning``, and
``conftest.trace_graph``. A case (``Case``), all drawn from ``random.Random(seed)`` and
``torch.Generator().manual_seed(seed)``:

* a random small program: steps over a pool of values (inputs, earlier results), each
  one op of ``OPS`` with random arguments (keywords, defaults written or left out,
  constants, sizes read from inputs), kept only where it runs eagerly;
* a pattern cut out of it: a connected, convex set of steps; the values it reads from
  outside become tensor arguments (``TensorSpec`` of their shape and dtype), the values
  used outside (or returned by the program) its outputs. The ``Rewrite`` is generated
  as Python source whose ``replacement`` is the pattern's body again, so a correct
  match changes nothing, bit for bit. Its ``check`` only records what each match bound
  (``_recording_check``), which tells a match at the cut from one elsewhere;
* two graphs from ``conftest.trace_graph`` (the functionalized, decomposed aten graph
  post-grad passes see): the program's, and the cut's own (the cut traced alone). Each
  is run on real random inputs before and after ``fxfuse.FusionPass("fuzz", [rw])``;
* the unchanged pattern must match the cut's own graph at the cut, and the program's
  graph in at least ``MIN_MATCH_RATE`` of the cases (``test_match_rate``: a matcher
  that never matches must not pass);
* then one variant:
  - ``changed``: one argument of one step changed (alpha, beta, keepdim, dim, dtype,
    rounding_mode, a constant, a clamp bound, a literal size...). Whether the change
    matters is decided by running the original and the changed cut on the same inputs
    (the program's actual intermediate values and fresh random ones). Where it
    matters, the changed pattern must not match the cut's own graph at the cut: there a
    match changes the outputs or makes fxfuse refuse its replacement. (A match
    elsewhere can be right, so the count alone does not tell: ``clamp(x, min=-1)`` is
    the first node of ``clamp(x, min=-1, max=.5)``, bound to the same input);
  - ``wildcard``: a float/int/bool/str argument made a wildcard whose example value
    differs from the graph's; it must match wherever the unchanged pattern does. Only
    wildcards that reach an op argument unchanged are drawn (``Case._in_contract``):
    ``transpose(w, 1)`` traces to ``permute([...])``, which no wildcard can bind;
  - ``resized``: the same pattern registered with example shapes other than the
    graph's (sizes read from inputs are symbolic); it must match wherever the
    unchanged pattern does;
  - ``explicit``: the graphs rewritten into full schema form (every defaulted argument
    written out, same meaning); the unchanged pattern must still match them.

Checked at every application: registration does not raise, the pass does not raise and
emits no ``fxfuse.FusionWarning`` (the replacement is the pattern itself, traced on the
matched values, so a failed replacement means a wrong match), the graph lints, every
output is bit-identical (NaN-aware) to the untouched graph's, and ``fxfuse.match_table()``
agrees with the count the pass returned.

Options (environment variables):

* ``FXFUSE_FUZZ_CASES=N``: run seeds ``0..N-1`` (default 160, about 20 s of CPU here; in
  blocks of 20 seeds, each block one test named by its seeds);
* ``FXFUSE_FUZZ_SEED=S``: run case S alone (replay). Every finding names its seed and
  prints the program and the rewrites as Python source.
"""

from __future__ import annotations

import dataclasses
import itertools
import linecache
import logging
import os
import random
import textwrap
import warnings
from typing import Any, Callable

import pytest
import torch
import torch.fx
from torch.utils._pytree import tree_leaves

import fxfuse
from conftest import trace_graph


@pytest.fixture(autouse=True)
def _no_trace_cache(monkeypatch):
    # Each case's rewrites are traced once and never again: keeping them in the trace
    # cache would only cost disk writes and the recording of what their traces ran.
    monkeypatch.setenv("FXFUSE_TRACE_CACHE", "0")

CASES = int(os.environ.get("FXFUSE_FUZZ_CASES", "160"))
BLOCK = 20
ONLY_SEED = os.environ.get("FXFUSE_FUZZ_SEED")
SEEDS = [int(ONLY_SEED)] if ONLY_SEED is not None else list(range(CASES))
BLOCKS = [SEEDS[i:i + BLOCK] for i in range(0, len(SEEDS), BLOCK)]
MIN_MATCH_RATE = 0.70

# ===================================================================== program model


class _Omit:
    """An argument not written at all (the op's default applies)."""

    def __repr__(self) -> str:
        return "OMIT"


OMIT = _Omit()


@dataclasses.dataclass(frozen=True)
class Wild:
    """A wildcard argument of the rewrite, written by its name."""

    name: str
    kind: type
    sample: Any


def lit(v: Any) -> str:
    if isinstance(v, Wild):
        return v.name
    if isinstance(v, torch.dtype):
        return str(v)
    return repr(v)


def call(fn: str, pos: list[str], kw: list[tuple[str, Any]] = ()) -> str:
    parts = list(pos) + [f"{k}={lit(v)}" for k, v in kw if v is not OMIT]
    return f"{fn}({', '.join(parts)})"


def same_written(a: Any, b: Any) -> bool:
    """Whether two written argument values are the same text (1, 1.0, True all differ)."""
    return type(a) is type(b) and lit(a) == lit(b)


FLOATS = (2.5, -0.5, 0.75, 3.0, -1.25, 0.3)
FLOAT_SAMPLES = (0.37, -1.75, 4.5)  # wildcard examples: never a value the generator writes
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclasses.dataclass
class Step:
    op: str
    ins: tuple[int, ...]  # value ids
    p: dict[str, Any]
    out: int  # value id


class Op:
    """One entry of the menu. ``draw`` picks operands from the pool (value id, example
    tensor) and arguments; ``render`` writes the step as Python; ``changes`` lists the
    written values each argument may be changed to; ``wild`` the arguments that may
    become a wildcard, with their kind."""

    name = "?"
    size_op = False  # reads sizes from its inputs (x.shape)
    changes: dict[str, tuple] = {}
    wild: dict[str, type] = {}
    wild_if_omitted: tuple[str, ...] = ()  # wildcards that may stand for a left-out default
    defaults: dict[str, Any] = {}  # the schema default of each of those

    def draw(self, rng: random.Random, pool: list[tuple[int, torch.Tensor]]) -> tuple[tuple[int, ...], dict] | None:
        raise NotImplementedError

    def render(self, a: list[str], p: dict) -> str:
        raise NotImplementedError

    def int_choices(self, p: dict, key: str, ins: list[torch.Tensor]) -> tuple:
        return ()


def _floating(t: torch.Tensor) -> bool:
    return t.is_floating_point()


def _pick(rng: random.Random, pool, pred: Callable[[torch.Tensor], bool]):
    cands = [(i, t) for i, t in pool if pred(t)]
    return rng.choice(cands) if cands else None


def _dims(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(t.dim())) + tuple(range(-t.dim(), 0))


class Binary(Op):
    """``torch.add/sub(a, b, alpha=)``, ``torch.mul``, ``torch.div(a, b, rounding_mode=)``."""

    def __init__(self, fn: str):
        self.name = fn
        self.fn = fn
        if fn in ("add", "sub"):
            self.changes = {"alpha": (OMIT, 2.5, -0.5, 0.75, 1)}
            self.wild = {"alpha": float}
            self.wild_if_omitted = ("alpha",)
            self.defaults = {"alpha": 1}
        elif fn == "div":
            self.changes = {"rounding_mode": (OMIT, None, "trunc", "floor")}
            self.wild = {"rounding_mode": str}
        else:
            self.changes, self.wild = {}, {}

    def draw(self, rng, pool):
        a = _pick(rng, pool, _floating)
        b = _pick(rng, pool, lambda t: _floating(t) and t.dim() <= a[1].dim()
                  and tuple(t.shape) == tuple(a[1].shape[a[1].dim() - t.dim():]))
        if rng.random() < 0.5:
            a, b = b, a
        p = {}
        if self.fn in ("add", "sub"):
            p["alpha"] = rng.choice((OMIT, OMIT, 2.5, -0.5, 1))
        elif self.fn == "div":
            p["rounding_mode"] = rng.choice((OMIT, None, "trunc", "floor", "floor"))
        return (a[0], b[0]), p

    def render(self, a, p):
        if self.fn == "mul":
            return f"{a[0]} * {a[1]}"
        return call(f"torch.{self.fn}", a, list(p.items()))


class Scalar(Op):
    """``a * c``, ``a + c``, ``a / c``, ``c - a`` with a float constant."""

    changes = {"c": FLOATS}
    wild = {"c": float}

    def __init__(self, kind: str):
        self.kind = kind
        self.name = f"scalar{kind}"

    def draw(self, rng, pool):
        a = _pick(rng, pool, _floating)
        return (a[0],), {"c": rng.choice(FLOATS)}

    def render(self, a, p):
        c = lit(p["c"])
        return f"{c} - {a[0]}" if self.kind == "rsub" else f"{a[0]} {self.kind} {c}"


class Addmm(Op):
    name = "addmm"
    changes = {"beta": (OMIT, 0.5, 2.0, 1), "alpha": (OMIT, 2.0, -1.5, 1)}
    wild = {"beta": float, "alpha": float}
    wild_if_omitted = ("beta", "alpha")
    defaults = {"beta": 1, "alpha": 1}

    def draw(self, rng, pool):
        two = [(i, t) for i, t in pool if t.dim() == 2 and _floating(t)]
        triples = [(i, a, b) for a in two for b in two for i in pool
                   if b[1].dtype == a[1].dtype == i[1].dtype and b[1].shape[0] == a[1].shape[1]
                   and tuple(i[1].shape) in ((a[1].shape[0], b[1].shape[1]), (b[1].shape[1],))]
        if not triples:
            return None
        i, a, b = rng.choice(triples)
        return (i[0], a[0], b[0]), {"beta": rng.choice((OMIT, OMIT, 0.5, 2.0, 1)),
                                     "alpha": rng.choice((OMIT, OMIT, 2.0, -1.5, 1))}

    def render(self, a, p):
        return call("torch.addmm", a, list(p.items()))


class Mm(Op):
    name = "mm"

    def draw(self, rng, pool):
        two = [(i, t) for i, t in pool if t.dim() == 2 and _floating(t)]
        pairs = [(a, b) for a in two for b in two if b[1].dtype == a[1].dtype and b[1].shape[0] == a[1].shape[1]]
        if not pairs:
            return None
        a, b = rng.choice(pairs)
        return (a[0], b[0]), {"at": rng.random() < 0.5}

    def render(self, a, p):
        return f"{a[0]} @ {a[1]}" if p["at"] else f"torch.mm({a[0]}, {a[1]})"


class Reduce(Op):
    """``torch.sum(a, dim=, keepdim=, dtype=)``, ``torch.mean``, ``torch.amax``."""

    def __init__(self, fn: str):
        self.name = self.fn = fn
        self.changes = {"dim": (), "keepdim": (OMIT, True, False)}
        self.wild = {"dim": int, "keepdim": bool}
        self.wild_if_omitted = ("keepdim",)
        self.defaults = {"keepdim": False}
        if fn == "sum":
            self.changes["dtype"] = (OMIT, None, torch.float64, torch.float32)

    def draw(self, rng, pool):
        a = _pick(rng, pool, lambda t: _floating(t) and t.dim() >= 2)
        if a is None:
            return None
        p = {"dim": rng.choice(_dims(a[1])), "keepdim": rng.choice((OMIT, OMIT, True, False))}
        if self.fn == "sum":
            p["dtype"] = rng.choice((OMIT, OMIT, OMIT, torch.float64, None))
        return (a[0],), p

    def int_choices(self, p, key, ins):
        return _dims(ins[0])

    def render(self, a, p):
        return call(f"torch.{self.fn}", [a[0], lit(p["dim"])], [(k, v) for k, v in p.items() if k != "dim"])


class Softmax(Op):
    """``torch.softmax(a, dim, dtype=)``, ``torch.log_softmax``, ``aten._softmax(a, dim, half_to_float)``."""

    def __init__(self, fn: str):
        self.name = self.fn = fn
        if fn == "_softmax":
            self.changes = {"dim": (), "half_to_float": (True, False)}
            self.wild = {"dim": int, "half_to_float": bool}
        else:
            self.changes = {"dim": (), "dtype": (OMIT, torch.float64, None)}
            self.wild = {"dim": int}

    def draw(self, rng, pool):
        if self.fn == "_softmax":
            a = _pick(rng, pool, lambda t: t.dtype in (torch.float32, torch.float16) and t.dim() >= 1)
            htf = a is not None and a[1].dtype == torch.float16 and rng.random() < 0.7
            return None if a is None else ((a[0],), {"dim": rng.choice(_dims(a[1])), "half_to_float": htf})
        a = _pick(rng, pool, lambda t: _floating(t) and t.dim() >= 1)
        return (a[0],), {"dim": rng.choice(_dims(a[1])), "dtype": rng.choice((OMIT, OMIT, torch.float64))}

    def int_choices(self, p, key, ins):
        return _dims(ins[0])

    def render(self, a, p):
        if self.fn == "_softmax":
            return call("torch.ops.aten._softmax", [a[0], lit(p["dim"]), lit(p["half_to_float"])])
        return call(f"torch.{self.fn}", [a[0], lit(p["dim"])], [("dtype", p["dtype"])])


class To(Op):
    name = "to"
    changes = {"dtype": DTYPES}

    def draw(self, rng, pool):
        a = _pick(rng, pool, _floating)
        return (a[0],), {"dtype": rng.choice([d for d in DTYPES if d != a[1].dtype])}

    def render(self, a, p):
        return f"{a[0]}.to({lit(p['dtype'])})"


class Clamp(Op):
    name = "clamp"
    changes = {"min": (OMIT, -0.5, -1.0, 0.25), "max": (OMIT, 0.5, 1.25)}
    wild = {"min": float, "max": float}

    def draw(self, rng, pool):
        a = _pick(rng, pool, _floating)
        p = {"min": rng.choice((OMIT, -0.5, -1.0, 0.25)), "max": rng.choice((OMIT, 0.5, 1.25))}
        if p["min"] is OMIT and p["max"] is OMIT:
            p["min"] = -0.5
        return (a[0],), p

    def render(self, a, p):
        return call("torch.clamp", [a[0]], list(p.items()))


class Unary(Op):
    def __init__(self, fn: str):
        self.name = self.fn = fn

    def draw(self, rng, pool):
        a = _pick(rng, pool, _floating)
        return (a[0],), {}

    def render(self, a, p):
        return f"torch.{self.fn}({a[0]})"


class Pow(Op):
    name = "pow"
    changes = {"e": (2, 3, 2.0, 0.5, 3.5)}
    wild = {"e": float}  # an int exponent gets an int wildcard (see _wild_kind)

    def draw(self, rng, pool):
        a = _pick(rng, pool, _floating)
        return (a[0],), {"e": rng.choice((2, 3, 2.0, 0.5))}

    def render(self, a, p):
        return call("torch.pow", [a[0], lit(p["e"])])


class Cumsum(Op):
    name = "cumsum"
    changes = {"dim": (), "dtype": (OMIT, torch.float64, None)}
    wild = {"dim": int}

    def draw(self, rng, pool):
        a = _pick(rng, pool, lambda t: _floating(t) and t.dim() >= 1)
        return (a[0],), {"dim": rng.choice(_dims(a[1])), "dtype": rng.choice((OMIT, OMIT, OMIT, torch.float64))}

    def int_choices(self, p, key, ins):
        return _dims(ins[0])

    def render(self, a, p):
        return call("torch.cumsum", [a[0]], [("dim", p["dim"]), ("dtype", p["dtype"])])


class Transpose(Op):
    name = "transpose"
    changes = {"d0": (), "d1": ()}
    wild = {"d0": int, "d1": int}

    def draw(self, rng, pool):
        a = _pick(rng, pool, lambda t: t.dim() >= 2)
        d0, d1 = rng.sample(range(a[1].dim()), 2)
        return (a[0],), {"d0": d0, "d1": d1}

    def int_choices(self, p, key, ins):
        return _dims(ins[0])

    def render(self, a, p):
        return f"{a[0]}.transpose({lit(p['d0'])}, {lit(p['d1'])})"


class Where(Op):
    name = "where"
    changes = {"c": FLOATS}
    wild = {"c": float}

    def draw(self, rng, pool):
        a = _pick(rng, pool, _floating)
        b = _pick(rng, pool, lambda t: _floating(t) and t.shape == a[1].shape)
        return (a[0], b[0]), {"c": rng.choice(FLOATS)}

    def render(self, a, p):
        return f"torch.where({a[0]} > {lit(p['c'])}, {a[0]}, {a[1]})"


# -- sizes read from inputs (symbolic in a pattern: §11)


class Reshape(Op):
    """``a.reshape(a.shape[0], -1)``, ``a.reshape(-1, a.shape[-1])`` (3-d),
    ``a.reshape(a.shape[1], a.shape[0])`` (2-d)."""

    name = "reshape"
    size_op = True
    changes = {"mode": ("rows", "cols", "swap")}

    def draw(self, rng, pool):
        a = _pick(rng, pool, lambda t: t.dim() in (2, 3))
        return (a[0],), {"mode": rng.choice(("rows", "cols") if a[1].dim() == 3 else ("swap",))}

    def render(self, a, p):
        x = a[0]
        return {"rows": f"{x}.reshape({x}.shape[0], -1)", "cols": f"{x}.reshape(-1, {x}.shape[-1])",
                "swap": f"{x}.reshape({x}.shape[1], {x}.shape[0])"}[p["mode"]]


class ReshapeLit(Op):
    """``a.reshape(R, -1)`` (3-d) with R a number written in the body: a constant (§11)."""

    name = "reshape_lit"
    changes = {"R": ()}
    wild = {"R": int}

    def draw(self, rng, pool):
        a = _pick(rng, pool, lambda t: t.dim() == 3)
        return (a[0],), {"R": int(a[1].shape[0])}

    def int_choices(self, p, key, ins):
        return tuple(int(n) for n in ins[0].shape)

    def render(self, a, p):
        return f"{a[0]}.reshape({lit(p['R'])}, -1)"


class Pad(Op):
    """``torch.cat([a, a.new_zeros(a.shape[0], L)], dim=1)``: one size read, one literal."""

    name = "pad"
    size_op = True
    changes = {"L": (2, 4)}
    wild = {"L": int}

    def draw(self, rng, pool):
        a = _pick(rng, pool, lambda t: t.dim() == 2)
        return (a[0],), {"L": rng.choice((2, 4))}

    def int_choices(self, p, key, ins):
        return (2, 4, 6)

    def render(self, a, p):
        return f"torch.cat([{a[0]}, {a[0]}.new_zeros({a[0]}.shape[0], {lit(p['L'])})], dim=1)"


class ExpandAdd(Op):
    """``a + b.expand(a.shape)``."""

    name = "expand_add"
    size_op = True

    def draw(self, rng, pool):
        a = _pick(rng, pool, lambda t: t.dim() >= 2 and _floating(t))
        b = _pick(rng, pool, lambda t: t.dim() == 1 and _floating(t) and t.shape[0] == a[1].shape[-1])
        return None if b is None else ((a[0], b[0]), {})

    def render(self, a, p):
        return f"{a[0]} + {a[1]}.expand({a[0]}.shape)"


class FullMul(Op):
    """``a * torch.full(a.shape, c, dtype=a.dtype)``."""

    name = "full_mul"
    size_op = True
    changes = {"c": FLOATS}
    wild = {"c": float}

    def draw(self, rng, pool):
        a = _pick(rng, pool, _floating)
        return (a[0],), {"c": rng.choice(FLOATS)}

    def render(self, a, p):
        return f"{a[0]} * torch.full({a[0]}.shape, {lit(p['c'])}, dtype={a[0]}.dtype)"


class EmptyFill(Op):
    """``a - torch.empty(a.shape, dtype=a.dtype).fill_(c)``."""

    name = "empty_fill"
    size_op = True
    changes = {"c": FLOATS}
    wild = {"c": float}

    def draw(self, rng, pool):
        a = _pick(rng, pool, _floating)
        return (a[0],), {"c": rng.choice(FLOATS)}

    def render(self, a, p):
        return f"{a[0]} - torch.empty({a[0]}.shape, dtype={a[0]}.dtype).fill_({lit(p['c'])})"


OPS: dict[str, Op] = {op.name: op for op in [
    Binary("add"), Binary("sub"), Binary("mul"), Binary("div"),
    Scalar("*"), Scalar("+"), Scalar("/"), Scalar("rsub"),
    Addmm(), Mm(), Reduce("sum"), Reduce("mean"), Reduce("amax"),
    Softmax("softmax"), Softmax("log_softmax"), Softmax("_softmax"),
    To(), Clamp(), Unary("relu"), Unary("sigmoid"), Unary("exp"), Pow(), Cumsum(), Transpose(), Where(),
    Reshape(), ReshapeLit(), Pad(), ExpandAdd(), FullMul(), EmptyFill(),
]}
# Weights: matmuls and the ops with keyword arguments and defaults more often.
WEIGHTS = {"add": 3, "sub": 2, "div": 2, "addmm": 5, "sum": 2, "softmax": 1, "_softmax": 1, "clamp": 2,
           "reshape": 2, "pad": 2, "expand_add": 2, "full_mul": 1, "empty_fill": 1}

# Symbolic input shapes; a size environment gives them numbers (no size 1: Inductor's
# decompositions of mm/addmm change with size-1 dimensions).
INPUT_SHAPES = (("M", "N"), ("M", "N"), ("N", "K"), ("K", "N"), ("M", "K"), ("N",), ("K",), ("M", "N", "K"))
GRAPH_ENVS = ({"M": 3, "N": 5, "K": 7}, {"M": 5, "N": 7, "K": 3}, {"M": 6, "N": 3, "K": 5})
EXAMPLE_ENVS = ({"M": 4, "N": 4, "K": 6}, {"M": 8, "N": 2, "K": 9}, {"M": 7, "N": 9, "K": 2})


# ===================================================================== evaluation


_SOURCES = itertools.count()


def _exec(src: str, name: str, what: str) -> Any:
    """Define ``name`` from generated source, kept in ``linecache`` so that ``inspect``
    reads it as it reads a file (fxfuse's cache key reads a rewrite's source)."""
    filename = f"<fxfuse-fuzz {next(_SOURCES)}: {what}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    ns = {"torch": torch, "fxfuse": fxfuse, "__name__": "fxfuse_fuzz"}
    exec(compile(src, filename, "exec"), ns)  # noqa: S102 - generated test code
    return ns[name]


def _traced_call(fn: Callable, args: list) -> list[torch.Tensor]:
    """``fn`` run as its traced aten graph: for ops eager CPU lacks (``_softmax(half_to_float=True)``)."""
    return tree_leaves(trace_graph(fn, *args)(*args))


def _evaluate(fn: Callable, args: list) -> list[Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return tree_leaves(fn(*args))
        except RuntimeError as e:
            if "not supported on CPU" not in str(e):
                raise
            return _traced_call(fn, args)  # eager CPU lacks a few ops the traced graph has


def _bits(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        nan = t.isnan()
        return torch.where(nan, torch.zeros((), dtype=ints), t.view(ints)), nan
    return t, None


def identical(a: Any, b: Any) -> bool:
    """Bit-identical (NaN-aware: NaN where the other has NaN, whatever its payload)."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return type(a) is type(b) and a == b
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    (ba, na), (bb, nb) = _bits(a.contiguous()), _bits(b.contiguous())
    return torch.equal(ba, bb) and (na is None or torch.equal(na, nb))


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"
    return repr(t)


def _diff(want: list, got: list) -> str | None:
    if len(want) != len(got):
        return f"{len(got)} outputs, expected {len(want)}"
    for i, (w, g) in enumerate(zip(want, got)):
        if not identical(w, g):
            if isinstance(w, torch.Tensor) and isinstance(g, torch.Tensor) and w.shape == g.shape and w.dtype == g.dtype:
                d = (w.double() - g.double()).abs().nan_to_num(nan=float("inf")).max().item()
                return f"output {i} ({_describe(w)}) differs, max abs diff {d:g}"
            return f"output {i} is {_describe(g)}, expected {_describe(w)}"
    return None


def _copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy to apply a pass to (node metadata, fake values included, is shared)."""
    g = torch.fx.Graph()
    g._codegen = gm.graph._codegen
    g.output(g.graph_copy(gm.graph, {}))
    return torch.fx.GraphModule(gm, g)


def _run(gm: torch.fx.GraphModule, args: list) -> list:
    with torch.no_grad():
        return tree_leaves(gm(*args))


def full_schema_form(gm: torch.fx.GraphModule, rng: random.Random | None = None) -> int:
    """Rewrite aten nodes to their full schema form: every argument written out, defaults
    included (positional ones positionally, keyword-only ones as keywords). The graph
    computes the same function; §11 says a pattern must still match it."""
    changed = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if rng is not None and rng.random() < 0.2:
            continue  # some nodes left as they were: a graph mixes both spellings
        schema = node.target._schema
        args, kwargs, ok = [], {}, True
        for i, arg in enumerate(schema.arguments):
            if arg.kwarg_only:
                if arg.name in node.kwargs:
                    kwargs[arg.name] = node.kwargs[arg.name]
                elif arg.has_default_value():
                    kwargs[arg.name] = arg.default_value
                else:
                    ok = False
            elif i < len(node.args):
                args.append(node.args[i])
            elif arg.name in node.kwargs:
                args.append(node.kwargs[arg.name])
            elif arg.has_default_value():
                args.append(arg.default_value)
            else:
                ok = False
        if ok and (tuple(args), kwargs) != (tuple(node.args), dict(node.kwargs)):
            node.args, node.kwargs = tuple(args), kwargs
            changed += 1
    gm.recompile()
    return changed


# ===================================================================== programs


class Program:
    def __init__(self, rng: random.Random, gen: torch.Generator):
        self.env = rng.choice(GRAPH_ENVS)
        n_inputs = rng.randint(2, 4)
        shapes = [INPUT_SHAPES[0]] + [rng.choice(INPUT_SHAPES) for _ in range(n_inputs - 1)]
        if rng.random() < 0.3:  # operands of a matmul, and its bias
            shapes = [("M", "N"), ("N", "K"), rng.choice((("M", "K"), ("K",)))] + shapes[3:]
        dtypes = [torch.float32 if rng.random() < 0.8 else rng.choice((torch.float64, torch.bfloat16, torch.float16))
                  for _ in shapes]
        self.inputs = list(zip(shapes, dtypes))  # symbolic shape, dtype
        self.values: list[torch.Tensor] = self.make_inputs(self.env, gen)
        self.names = [f"x{i}" for i in range(len(self.inputs))]
        self.steps: list[Step] = []
        n_steps = rng.randint(3, 7)
        ops, weights = list(OPS), [WEIGHTS.get(k, 1) for k in OPS]
        tries = 0
        while len(self.steps) < n_steps and tries < 200:
            tries += 1
            op = OPS[rng.choices(ops, weights)[0]]
            # Prefer recent values so that programs are chains, not independent leaves.
            pool = list(enumerate(self.values))
            pool = pool[-4:] + pool if rng.random() < 0.6 else pool
            try:
                drawn = op.draw(rng, pool)
            except TypeError:  # nothing in the pool fits
                continue
            if drawn is None:
                continue
            ins, p = drawn
            out = len(self.values)
            step = Step(op.name, tuple(ins), p, out)
            try:
                v = self.eval_step(step, self.values)
            except Exception:  # noqa: BLE001 - an invalid draw: draw again
                continue
            if not isinstance(v, torch.Tensor) or v.numel() == 0 or v.dim() == 0:
                continue
            if any(v.shape == self.values[i].shape and v.dtype == self.values[i].dtype and op.name in ("to", "reshape")
                   for i in ins):
                continue  # a no-op Inductor removes: nothing to match
            self.steps.append(step)
            self.values.append(v)
            self.names.append(f"v{out}")
        used = {i for s in self.steps for i in s.ins}
        sinks = [s.out for s in self.steps if s.out not in used]
        extra = [s.out for s in self.steps if s.out in used and rng.random() < 0.15]
        self.outputs = sorted(set(sinks + extra))

    def make_inputs(self, env: dict, gen: torch.Generator) -> list[torch.Tensor]:
        return [torch.randn([env[d] for d in shape], generator=gen).to(dtype) for shape, dtype in self.inputs]

    def expr(self, step: Step, names: list[str] | None = None) -> str:
        names = names or self.names
        return OPS[step.op].render([names[i] for i in step.ins], step.p)

    def eval_step(self, step: Step, values: list) -> torch.Tensor:
        names = [f"_{i}" for i in range(len(values))]
        env = {n: values[i] for i, n in enumerate(names) if i in step.ins}
        src = OPS[step.op].render([names[i] for i in step.ins], step.p)
        fn = eval(f"lambda {', '.join(env)}: {src}", {"torch": torch})  # noqa: S307 - generated test code
        (out,) = _evaluate(fn, list(env.values()))
        return out

    def run_all(self, inputs: list) -> list[torch.Tensor]:
        values = list(inputs)
        for s in self.steps:
            values.append(self.eval_step(s, values))
        return values

    def source(self) -> str:
        body = [f"    {self.names[s.out]} = {self.expr(s)}" for s in self.steps]
        outs = ", ".join(self.names[i] for i in self.outputs)
        return f"def program({', '.join(self.names[:len(self.inputs)])}):\n" + "\n".join(body) + f"\n    return ({outs},)\n"

    def describe_inputs(self, values: list) -> str:
        return ", ".join(f"{n}: {_describe(v)}" for n, v in zip(self.names, values[:len(self.inputs)]))


@dataclasses.dataclass
class Cut:
    steps: list[Step]  # in program order
    ins: list[int]  # value ids read from outside
    outs: list[int]  # value ids used outside or returned


def choose_cut(rng: random.Random, prog: Program, prefer_size: bool) -> Cut:
    steps = prog.steps
    by_out = {s.out: k for k, s in enumerate(steps)}
    seeds = [k for k, s in enumerate(steps) if OPS[s.op].size_op] if prefer_size else []
    chosen = {rng.choice(seeds or range(len(steps)))}
    size = rng.choice((1, 1, 2, 2, 3, 4))
    while len(chosen) < size:
        near = set()
        for k in chosen:
            near |= {by_out[i] for i in steps[k].ins if i in by_out}
            near |= {j for j, s in enumerate(steps) if steps[k].out in s.ins}
        near -= chosen
        if not near:
            break
        chosen.add(rng.choice(sorted(near)))
    # Convex: a step between two chosen steps (fed by one, feeding the other) joins.
    down: set[int] = set()
    for k, s in enumerate(steps):
        if k in chosen or any(by_out.get(i) in down for i in s.ins):
            down.add(k)
    up = set(chosen)
    for k in reversed(range(len(steps))):
        if k in up:
            up |= {by_out[i] for i in steps[k].ins if i in by_out}
    chosen |= down & up
    cut = [steps[k] for k in sorted(chosen)]
    made = {s.out for s in cut}
    ins = sorted({i for s in cut for i in s.ins if i not in made})
    used_outside = {i for s in steps if s not in cut for i in s.ins}
    outs = [s.out for s in cut if s.out in used_outside or s.out in prog.outputs]
    return Cut(cut, ins, outs)


def cut_body(prog: Program, steps: list[Step], outs: list[int]) -> str:
    body = [f"{prog.names[s.out]} = {prog.expr(s)}" for s in steps]
    ret = prog.names[outs[0]] if len(outs) == 1 else "(" + ", ".join(prog.names[i] for i in outs) + ")"
    return "\n".join(body + [f"return {ret}"])


def rewrite_source(cls: str, arg_names: list[str], body: str, examples: list[str]) -> str:
    sig = ", ".join(["self", *arg_names])
    ind = textwrap.indent(body, " " * 8)
    return (f"class {cls}(fxfuse.Rewrite):\n"
            f"    def pattern({sig}):\n{ind}\n"
            f"    def replacement({sig}):\n{ind}\n"
            f"    def example_inputs(self):\n"
            f"        return [{', '.join(examples)}]\n")


def spec(t: torch.Tensor) -> str:
    return f"fxfuse.TensorSpec({tuple(t.shape)}, {t.dtype})"


# ===================================================================== one case


@dataclasses.dataclass
class Finding:
    kind: str
    seed: int
    message: str


@dataclasses.dataclass
class Outcome:
    seed: int
    matched_program: bool | None = None  # the unchanged pattern matched the program's graph
    variant: str = ""
    detail: str = ""  # what the variant changed
    findings: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Applied:
    count: int | None  # None: the pass raised
    problems: list  # (kind, text)
    bindings: list  # what each match bound (see _recording_check)


class Case:
    def __init__(self, seed: int):
        self.seed = seed
        self.rng = rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.prog = Program(rng, self.gen)
        self.values = self.prog.values  # eager values at the graph inputs
        self.inputs = self.values[:len(self.prog.inputs)]
        self.outcome = Outcome(seed)
        self.sources: dict[str, str] = {}
        self.passes: dict[str, tuple[fxfuse.FusionPass, type]] = {}

    # -- reporting

    def context(self, *labels: str) -> str:
        prog = self.prog
        parts = [f"seed {self.seed} (replay: FXFUSE_FUZZ_SEED={self.seed} pytest tests/test_fuzz_matching.py)",
                 f"graph inputs: {prog.describe_inputs(self.values)}", prog.source()]
        parts += [self.sources[k] for k in dict.fromkeys(labels) if k in self.sources]
        return "\n".join(parts)

    def find(self, kind: str, text: str, *labels: str) -> None:
        self.outcome.findings.append(Finding(kind, self.seed, f"[{kind}] {text}\n{self.context(*labels)}"))

    # -- building rewrites

    def rewrite(self, label: str, steps: list[Step], examples: list[Any], wild: Wild | None = None) -> str:
        names = [self.prog.names[i] for i in self.cut.ins] + ([wild.name] if wild else [])
        ex = [spec(t) for t in examples] + ([repr(wild.sample)] if wild else [])
        cls = f"Fuzz{self.seed}_{label}"
        self.sources[label] = rewrite_source(cls, names, cut_body(self.prog, steps, self.cut.outs), ex)
        return cls

    def sub_fn(self, steps: list[Step], wild: Wild | None = None) -> Callable:
        names = [self.prog.names[i] for i in self.cut.ins] + ([wild.name] if wild else [])
        body = textwrap.indent(cut_body(self.prog, steps, self.cut.outs), "    ")
        return _exec(f"def sub({', '.join(names)}):\n{body}\n", "sub", f"sub {self.seed}")

    def register(self, label: str, cls_name: str) -> bool:
        cls = _exec(self.sources[label], cls_name, f"{label} {self.seed}")
        cls.seen, cls.check = [], _recording_check
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                p = fxfuse.FusionPass("fuzz", [cls()])
            except Exception as e:  # noqa: BLE001 - the pattern is valid Python over valid inputs
                self.find("register-raised", f"registering {label}: {type(e).__name__}: {e}", label)
                return False
        for w in caught:
            if issubclass(w.category, fxfuse.FusionWarning):
                self.find("fusion-warning", f"registering {label}: {w.message}", label)
        self.passes[label] = (p, cls)
        return True

    # -- applying

    def apply(self, label: str, gm: torch.fx.GraphModule, args_sets: list[list], where: str,
              shown: tuple[str, ...] = ()) -> Applied:
        """Apply the pass of ``label`` to a copy of ``gm``; check outputs on each set of
        arguments; report what is wrong (with the rewrites ``"same"``, ``label``, ``shown``)."""
        fx_pass, cls = self.passes[label]
        want = [_run(gm, args) for args in args_sets]
        g = _copy(gm)
        problems = []
        cls.seen.clear()
        fxfuse.reset_match_table()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                count = fx_pass(g)
            except Exception as e:  # noqa: BLE001 - a finding, never a skip
                problems.append(("pass-raised", f"{where}: the pass raised {type(e).__name__}: {e}"))
                count = None
        # A FusionWarning is a replacement that failed. The replacement here is the pattern
        # itself, traced on the matched values: it cannot legitimately fail.
        for w in caught:
            if issubclass(w.category, fxfuse.FusionWarning):
                problems.append(("fusion-warning", f"{where}: {w.message}"))
        applied = Applied(count, problems, list(cls.seen))
        if count is not None:
            table = fxfuse.match_table().get("fuzz", {}).get(cls.__name__, 0)
            if table != count:
                problems.append(("match-table", f"{where}: the pass returned {count}, match_table() says {table}"))
            self._check_outputs(g, args_sets, want, count, where, problems)
        for kind, text in problems:
            self.find(kind, f"{label}: {text}", "same", label, *shown)
        return applied

    def _check_outputs(self, g, args_sets, want, count, where, problems) -> None:
        try:
            g.graph.lint()
        except Exception as e:  # noqa: BLE001
            # Nodes out of topological order: fxfuse.PassManager's cleanup sorts the graph,
            # a FusionPass run by itself hands back one that does not lint. Reported, then
            # sorted, to check what the graph computes.
            problems.append(("unsorted-graph", f"{where}: after {count} replacement(s) the graph does not lint: "
                                               f"{type(e).__name__}: {str(e).splitlines()[0]}"))
            from torch._inductor.pattern_matcher import stable_topological_sort

            stable_topological_sort(g.graph)
        try:
            g.graph.lint()
            g.recompile()
            got = [_run(g, args) for args in args_sets]
        except Exception as e:  # noqa: BLE001
            problems.append(("broken-graph", f"{where}: after {count} replacement(s) the graph fails: "
                                             f"{type(e).__name__}: {e}"))
            return
        for k, (w_, g_) in enumerate(zip(want, got)):
            d = _diff(w_, g_)
            if d:
                problems.append(("wrong-result", f"{where}: after {count} replacement(s), on input set {k}: {d}"))
                return

    def at_site(self, applied: Applied) -> bool:
        """Whether a match on the cut's own graph bound the pattern's tensor arguments to the
        graph's inputs, in order: the cut itself, not a piece of it elsewhere."""
        site = dict(zip((self.prog.names[i] for i in self.cut.ins), self.placeholders))
        return any(all(b.get(n) == ph for n, ph in site.items()) for b in applied.bindings)

    # -- the case

    def run(self) -> Outcome:
        prog, rng = self.prog, self.rng
        has_size = any(OPS[s.op].size_op for s in prog.steps)
        self.cut = cut = choose_cut(rng, prog, prefer_size=has_size and rng.random() < 0.5)
        # Contiguous, as TensorSpec describes them (a transposed input would trace the cut
        # with a clone before its reshapes, another graph than the pattern's).
        sub_ins = [self.values[i].contiguous() for i in cut.ins]
        fresh = [[self._fresh(t) for t in sub_ins] for _ in range(2)]
        self.gm = trace_graph(_exec(prog.source(), "program", f"program {self.seed}"), *self.inputs)
        self.gsub = trace_graph(self.sub_fn(cut.steps), *sub_ins)
        self.placeholders = [n.name for n in self.gsub.graph.nodes if n.op == "placeholder"]
        self.prog_args = [self.inputs, self.prog.make_inputs(self.prog.env, self.gen)]
        self.sub_args = [sub_ins, *fresh]

        if not self.register("same", self.rewrite("same", cut.steps, sub_ins)):
            return self.outcome
        self.on_prog = self.apply("same", self.gm, self.prog_args, "the program's graph")
        self.on_sub = self.apply("same", self.gsub, self.sub_args, "the cut's own graph")
        self.outcome.matched_program = bool(self.on_prog.count)
        self.self_match = self.at_site(self.on_sub)
        if not self.self_match and self.on_sub.count is not None:  # (a pass that raised is reported)
            self.find("self-miss", "the unchanged pattern does not match its own traced graph "
                                   f"({self.on_sub.count} replacement(s) elsewhere)", "same")

        kinds = ["changed"] * 5 + ["wildcard"] * 3 + ["explicit"] * 1
        kinds += ["resized"] * (6 if any(OPS[s.op].size_op for s in cut.steps) else 1)
        rng.shuffle(kinds)
        for kind in kinds:
            if getattr(self, f"variant_{kind}")():
                self.outcome.variant = kind
                break
        return self.outcome

    def _fresh(self, t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=self.gen).to(t.dtype)

    def _sub_values(self, steps: list[Step], sub_ins: list) -> dict[int, Any]:
        vals = dict(zip(self.cut.ins, sub_ins))
        for s in steps:
            vals[s.out] = self.values[s.out]
        return vals

    def _must_match(self, label: str, what: str, on_prog: Applied, on_sub: Applied, shown: tuple = ()) -> None:
        """A variant that must match wherever the unchanged pattern does (differential)."""
        if self.self_match and not self.at_site(on_sub):
            self.find(f"{label}-miss", f"{what}: does not match the cut's own graph, which the unchanged pattern "
                                       "matches", "same", label, *shown)
        elif self.on_prog.count and on_prog.count == 0:
            self.find(f"{label}-miss", f"{what}: matches 0 times on the program's graph, where the unchanged "
                                       f"pattern matches {self.on_prog.count} time(s)", "same", label, *shown)

    def variant_changed(self) -> bool:
        cut, rng = self.cut, self.rng
        choices = []
        sub_vals = self._sub_values(cut.steps, self.sub_args[0])
        for k, s in enumerate(cut.steps):
            op = OPS[s.op]
            for key, cands in op.changes.items():
                cands = cands or op.int_choices(s.p, key, [sub_vals[i] for i in s.ins])
                choices += [(k, key, c) for c in cands if not same_written(c, s.p[key])]
        rng.shuffle(choices)
        if rng.random() < 0.5:  # half the time, first the changes between a default and a written value
            choices.sort(key=lambda c: not (c[2] is OMIT or cut.steps[c[0]].p[c[1]] is OMIT))
        want = [_evaluate(self.sub_fn(cut.steps), a) for a in self.sub_args]
        for k, key, new in choices[:8]:
            steps = [dataclasses.replace(s, p=dict(s.p)) for s in cut.steps]
            steps[k].p[key] = new
            if any(s.op == steps[k].op and s.ins == steps[k].ins and s.p == steps[k].p
                   for s in steps if s is not steps[k]):
                # The changed step now repeats another step of the cut: a match may then
                # bind both pattern outputs to that one node, which is right.
                continue
            try:
                got = [_evaluate(self.sub_fn(steps), a) for a in self.sub_args]
                step_out = self.prog.eval_step(steps[k], self.values)
            except Exception:  # noqa: BLE001 - the change made the cut invalid: another one
                continue
            if any(identical(step_out, self.values[i]) for i in steps[k].ins):
                continue  # the change made a step a no-op (a cast to its own dtype): nothing to match
            matters = any(_diff(w, g) for w, g in zip(want, got))
            what = (f"changed pattern ({self.prog.names[steps[k].out]}: {key}={lit(cut.steps[k].p[key])} -> "
                    f"{lit(new)}; the change {'matters' if matters else 'does not matter'} on these inputs)")
            self.outcome.detail = what
            if not self.register("changed", self.rewrite("changed", steps, self.sub_args[0])):
                return True
            self.apply("changed", self.gm, self.prog_args, "the program's graph")
            res = self.apply("changed", self.gsub, self.sub_args, "the cut's own graph")
            # A match at the cut, where the change matters, is wrong: the cut's outputs then
            # change (the cut's own graph returns them), or fxfuse refuses the replacement
            # it traced (FusionWarning), both reported above; this names the cause. A match
            # elsewhere can be right and keeps the outputs: a changed pattern may be a
            # piece of the cut (clamp(x, min=-1) is the first node of clamp(x, min=-1, max=.5),
            # bound to the same input).
            consequence = [k for k, _ in res.problems if k in ("wrong-result", "fusion-warning")]
            if matters and self.at_site(res) and consequence:
                self.find("changed-matched", f"{what}: matched the cut's own graph at the cut ({consequence[0]}); "
                                             "it must not match where the change matters", "same", "changed")
            return True
        return False

    def variant_wildcard(self) -> bool:
        cut, rng = self.cut, self.rng
        sub_ins = self.sub_args[0]
        sub_vals = self._sub_values(cut.steps, sub_ins)
        choices = []
        for k, s in enumerate(cut.steps):
            op = OPS[s.op]
            for key, kind in op.wild.items():
                v = s.p[key]
                if v is OMIT and key not in op.wild_if_omitted:
                    continue
                if v is not OMIT:
                    if kind is float and type(v) is int:
                        kind = int
                    if type(v) is not kind:
                        continue
                if kind is float:
                    samples = [x for x in FLOAT_SAMPLES if x != v]
                elif kind is bool:
                    samples = [not v] if v is not OMIT else [True]
                elif kind is str:
                    samples = [x for x in ("trunc", "floor") if x != v]
                else:
                    samples = [x for x in op.int_choices(s.p, key, [sub_vals[i] for i in s.ins]) or (2, 3, 4)
                               if x != v]
                choices += [(k, key, kind, x) for x in samples]
        rng.shuffle(choices)
        for k, key, kind, sample in choices[:4]:
            w = Wild("w0", kind, sample)
            steps = [dataclasses.replace(s, p=dict(s.p)) for s in cut.steps]
            steps[k].p[key] = w
            try:  # the sample must give a valid pattern (it is traced with it)
                _evaluate(self.sub_fn(steps, w), [*sub_ins, sample])
            except Exception:  # noqa: BLE001
                continue
            orig = cut.steps[k].p[key]
            graph_value = OPS[cut.steps[k].op].defaults[key] if orig is OMIT else orig
            if not self._in_contract(steps, w, graph_value, sub_ins):
                continue
            what = (f"wildcard pattern ({self.prog.names[steps[k].out]}: {key}={lit(orig)} in the graph, "
                    f"{kind.__name__} wildcard with example {sample!r})")
            self.outcome.detail = what
            if not self.register("wildcard", self.rewrite("wildcard", steps, sub_ins, w)):
                return True
            on_prog = self.apply("wildcard", self.gm, self.prog_args, "the program's graph")
            on_sub = self.apply("wildcard", self.gsub, self.sub_args, "the cut's own graph")
            self._must_match("wildcard", what, on_prog, on_sub)
            return True
        return False

    def _in_contract(self, steps: list[Step], w: Wild, graph_value: Any, sub_ins: list) -> bool:
        """Whether the traced cut depends on the wildcard only through op arguments equal to
        it (compared in full schema form): the wildcards §1 promises. Not so for a value
        consumed while tracing: ``transpose(w, 1)`` becomes ``permute([...])``,
        ``_softmax(x, d, half_to_float=w)`` becomes casts or none."""
        fn = self.sub_fn(steps, w)
        try:
            graphs = [trace_graph(fn, *sub_ins, v) for v in (graph_value, w.sample)]
        except Exception:  # noqa: BLE001 - the graph's value does not fit the cut (see variant_wildcard)
            return False
        for g in graphs:
            full_schema_form(g)
        a_nodes, b_nodes = list(graphs[0].graph.nodes), list(graphs[1].graph.nodes)
        if len(a_nodes) != len(b_nodes):
            return False
        index = {n: i for i, n in enumerate(a_nodes)} | {n: i for i, n in enumerate(b_nodes)}
        found = []

        def same(x: Any, y: Any) -> bool:
            if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
                return len(x) == len(y) and all(same(u, v) for u, v in zip(x, y))
            if isinstance(x, torch.fx.Node) or isinstance(y, torch.fx.Node):
                return isinstance(x, torch.fx.Node) and isinstance(y, torch.fx.Node) and index[x] == index[y]
            if same_written(x, y) or (x == y and type(x) is type(y)):
                return True
            # Where the traces differ, they hold the two values of the wildcard.
            found.append(x)
            return x == graph_value and y == w.sample and isinstance(x, bool) == (w.kind is bool)

        return all(a.op == b.op and a.target == b.target and same(a.args, b.args)
                   and a.kwargs.keys() == b.kwargs.keys() and same(tuple(a.kwargs.values()), tuple(b.kwargs.values()))
                   for a, b in zip(a_nodes, b_nodes)) and bool(found)

    def variant_resized(self) -> bool:
        env = self.rng.choice(EXAMPLE_ENVS)
        try:
            values = self.prog.run_all(self.prog.make_inputs(env, torch.Generator().manual_seed(self.seed)))
        except Exception:  # noqa: BLE001 - the program is not size-generic (a literal size)
            return False
        examples = [values[i] for i in self.cut.ins]
        if [t.shape for t in examples] == [t.shape for t in self.sub_args[0]]:
            return False
        if not self.register("resized", self.rewrite("resized", self.cut.steps, examples)):
            return True
        what = (f"resized pattern (example sizes {', '.join(_describe(t) for t in examples)}; "
                f"the graph's {', '.join(_describe(t) for t in self.sub_args[0])})")
        on_prog = self.apply("resized", self.gm, self.prog_args, "the program's graph")
        on_sub = self.apply("resized", self.gsub, self.sub_args, "the cut's own graph")
        self._must_match("resized", what, on_prog, on_sub)
        return True

    def variant_explicit(self) -> bool:
        g1, g2 = _copy(self.gm), _copy(self.gsub)
        if not full_schema_form(g1, self.rng) + full_schema_form(g2, self.rng):
            return False
        self.sources["explicit"] = "the cut's own graph in full schema form:\n" + g2.code
        shown = ("explicit",)
        on_prog = self.apply("same", g1, self.prog_args, "the program's graph in full schema form", shown)
        on_sub = self.apply("same", g2, self.sub_args, "the cut's own graph in full schema form", shown)
        what = "the unchanged pattern, on the graph with every defaulted argument written out"
        self._must_match("explicit", what, on_prog, on_sub, shown)
        return True


def _recording_check(self: fxfuse.Rewrite, match: Any) -> bool:
    """Added to each generated rewrite as its ``check``: observes, never declines. Records
    what each match bound (§1: ``match.kwargs`` holds the bound arguments), so that a test
    can tell a match at the cut from a match of the same pattern elsewhere."""
    type(self).seen.append({k: v.name if isinstance(v, torch.fx.Node) else v for k, v in match.kwargs.items()})
    return True


# ===================================================================== tests

_RESULTS: dict[int, Outcome] = {}


def run_case(seed: int) -> Outcome:
    if seed not in _RESULTS:
        torch.manual_seed(seed)  # nothing should draw from it; set anyway, for replay
        # Fake-tensor tracing logs every op that fails on a discarded draw at ERROR level;
        # what matters here is recorded as findings.
        fake_log = logging.getLogger("torch._subclasses.fake_tensor")
        level = fake_log.level
        fake_log.setLevel(logging.CRITICAL)
        try:
            _RESULTS[seed] = Case(seed).run()
        finally:
            fake_log.setLevel(level)
    return _RESULTS[seed]


def _summary(findings: list[Finding]) -> str:
    kinds: dict[str, list[Finding]] = {}
    for f in findings:
        kinds.setdefault(f.kind, []).append(f)
    head = [f"{len(findings)} finding(s): " + ", ".join(
        f"{k} x{len(v)} (seeds {sorted({f.seed for f in v})})" for k, v in sorted(kinds.items()))]
    # The first two of each kind in full: each names its seed, program and rewrite.
    body = [f.message for v in kinds.values() for f in v[:2]]
    return "\n\n".join(head + body)


@pytest.mark.parametrize("seeds", BLOCKS, ids=[f"seeds{b[0]}-{b[-1]}" for b in BLOCKS])
def test_fuzz_matching(seeds):
    findings = [f for s in seeds for f in run_case(s).findings]
    if findings:
        pytest.fail(_summary(findings), pytrace=False)


def test_match_rate():
    """The unchanged pattern matches the program's graph in most cases (a matcher that
    never matches must not pass the fuzzer)."""
    outcomes = [run_case(s) for s in SEEDS]
    counted = [o for o in outcomes if o.matched_program is not None]
    if ONLY_SEED is not None:
        pytest.skip("one seed: no rate")
    rate = sum(o.matched_program for o in counted) / max(len(counted), 1)
    missed = [o.seed for o in counted if not o.matched_program]
    assert len(counted) >= 0.9 * len(outcomes), (
        f"only {len(counted)} of {len(outcomes)} cases got to apply their unchanged pattern (registration failed)")
    assert rate >= MIN_MATCH_RATE, (
        f"the unchanged pattern matched the program's graph in {rate:.0%} of {len(counted)} cases "
        f"(at least {MIN_MATCH_RATE:.0%} required); missed: seeds {missed}")
