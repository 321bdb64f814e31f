"""split/chunk/unbind against slice/select: one pattern matches both graph forms.

torch 2.15 functionalizes ``split``/``unbind`` into ``slice``/``select`` (pytorch #194037),
earlier releases keep ``split`` + ``getitem``. The graphs here are built node by node in
each form, so the test holds on whatever release runs it.
"""

import operator
import sys

import pytest
import torch
import torch.fx
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import fxfuse
from fxfuse import compat
from fxfuse.canonicalize import DEFAULT_CANONICALIZATIONS, canonicalize, normalize_slice, split_to_slice
from conftest import targets, trace_graph

aten = torch.ops.aten
TOKENS = [1, 5, 8]  # the rewrites' examples have 8 tokens; a graph may hold any count


def build(fn, *shapes):
    """A GraphModule whose nodes ``fn(graph, *inputs)`` adds, with fake-tensor metadata."""
    graph = torch.fx.Graph()
    inputs = [graph.placeholder(f"x{i}") for i in range(len(shapes))]
    graph.output(fn(graph, *inputs))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    with compat.fake_mode() as mode:
        FakeTensorProp(gm, mode).propagate(*[mode.from_tensor(torch.empty(s)) for s in shapes])
    return gm


def call(graph, target, *args):
    return graph.call_function(target, args)


def run(gm, *args):
    gm.recompile()
    return gm(*args)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- chunk(2) * : a * b


class ChunkMul(fxfuse.Rewrite):
    """``a, b = x.chunk(2, -1); a * b`` -> the product over the two halves."""

    def __init__(self, half):
        self.half = half

    def pattern(self, x):
        a, b = x.chunk(2, -1)
        return a * b

    def replacement(self, x):
        return x.unflatten(-1, (2, x.shape[-1] // 2)).prod(-2)

    def example_inputs(self):
        return [fxfuse.TensorSpec((8, 2 * self.half))]


class SplitMul(ChunkMul):
    """``a, b = x.split(half, -1); a * b``: the piece size is a literal of the pattern."""

    def pattern(self, x):
        a, b = x.split(self.half, -1)
        return a * b


def chunk_as_split(g, x, half):
    parts = call(g, aten.split.Tensor, x, half, -1)
    return call(g, aten.mul.Tensor, call(g, operator.getitem, parts, 0), call(g, operator.getitem, parts, 1))


def chunk_as_slices(g, x, half):
    # As 2.15 writes it: a negative dim, the last piece ending at the size.
    a = call(g, aten.slice.Tensor, x, -1, 0, half)
    b = call(g, aten.slice.Tensor, x, -1, half, 2 * half)
    return call(g, aten.mul.Tensor, a, b)


@pytest.mark.parametrize("half", [1, 7, 16])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("form", [chunk_as_split, chunk_as_slices], ids=["split", "slice"])
def test_chunk_pattern_matches_both_forms(form, tokens, half):
    gm = build(lambda g, x: form(g, x, half), (tokens, 2 * half))
    x = rand(tokens, 2 * half, seed=tokens + half)
    want = x[:, :half] * x[:, half:]
    torch.testing.assert_close(run(gm, x), want)  # the hand-built graph is the function

    assert fxfuse.FusionPass("p", [ChunkMul(half)])(gm) == 1
    assert aten.mul.Tensor not in targets(gm) and aten.prod.dim_int in targets(gm)
    gm.graph.lint()
    torch.testing.assert_close(run(gm, rand(tokens, 2 * half, seed=tokens + half)), want)


def test_chunk_pattern_matches_halves_of_any_width():
    # chunk(2) takes its piece size from the input's width: a size the pattern computes,
    # so a pattern traced at width 8 matches width 10 (DESIGN section 11).
    gm = build(lambda g, x: chunk_as_slices(g, x, 5), (4, 10))
    x = rand(4, 10, seed=3)
    want = x[:, :5] * x[:, 5:]
    assert fxfuse.FusionPass("p", [ChunkMul(4)])(gm) == 1
    torch.testing.assert_close(run(gm, x), want)


def test_split_pattern_keeps_its_literal_piece_size():
    # split(4) writes its piece size in the pattern body: halves of width 10 are not it.
    gm = build(lambda g, x: chunk_as_slices(g, x, 5), (4, 10))
    p = fxfuse.FusionPass("p", [SplitMul(4)])
    assert p(gm) == 0
    assert p(build(lambda g, x: chunk_as_slices(g, x, 4), (3, 8))) == 1


# --------------------------------------------------------------------------- split sizes


class SplitSums(fxfuse.Rewrite):
    """``a, _, c = x.split(sizes, 1); a.sum(-1) + c.amax(-1)``; the middle piece is dead."""

    def __init__(self, sizes):
        self.sizes = sizes

    def pattern(self, x):
        a, _, c = torch.split(x, list(self.sizes), dim=1)
        return a.sum(-1) + c.amax(-1)

    def replacement(self, x):
        a, c = x.narrow(1, 0, self.sizes[0]), x.narrow(1, x.shape[1] - self.sizes[2], self.sizes[2])
        return a.sum(-1) - c.amax(-1).neg()  # exactly the sum, and tells the replacement apart

    def example_inputs(self):
        return [fxfuse.TensorSpec((8, sum(self.sizes)))]


def sizes_as_split(g, x, sizes):
    parts = call(g, aten.split_with_sizes.default, x, list(sizes), 1)
    a, c = call(g, operator.getitem, parts, 0), call(g, operator.getitem, parts, 2)
    return call(g, aten.add.Tensor, call(g, aten.sum.dim_IntList, a, [-1]), call(g, aten.amax.default, c, [-1]))


def sizes_as_slices(g, x, sizes):
    a = call(g, aten.slice.Tensor, x, 1, 0, sizes[0])
    c = call(g, aten.slice.Tensor, x, 1, sizes[0] + sizes[1], sum(sizes))
    return call(g, aten.add.Tensor, call(g, aten.sum.dim_IntList, a, [-1]), call(g, aten.amax.default, c, [-1]))


@pytest.mark.parametrize("sizes", [(3, 5, 8), (1, 1, 1), (7, 2, 3)])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("form", [sizes_as_split, sizes_as_slices], ids=["split", "slice"])
def test_split_pattern_matches_both_forms(form, tokens, sizes):
    gm = build(lambda g, x: form(g, x, sizes), (tokens, sum(sizes)))
    x = rand(tokens, sum(sizes), seed=tokens)
    a, _, c = x.split(list(sizes), 1)
    want = a.sum(-1) + c.amax(-1)
    torch.testing.assert_close(run(gm, x), want)

    assert fxfuse.FusionPass("p", [SplitSums(sizes)])(gm) == 1
    assert aten.sub.Tensor in targets(gm) and aten.add.Tensor not in targets(gm)
    gm.graph.lint()
    torch.testing.assert_close(run(gm, x), want)


# --------------------------------------------------------------------------- unbind


class UnbindMul(fxfuse.Rewrite):
    """``q, k = x.unbind(0); q * k + 1``."""

    def pattern(self, x):
        q, k = x.unbind(0)
        return q * k + 1

    def replacement(self, x):
        return x.prod(0) + 1  # the product of exactly two numbers: bit-equal to q * k

    def example_inputs(self):
        return [fxfuse.TensorSpec((2, 8, 4))]


def unbind_as_getitems(g, x):
    parts = call(g, aten.unbind.int, x)
    prod = call(g, aten.mul.Tensor, call(g, operator.getitem, parts, 0), call(g, operator.getitem, parts, 1))
    return call(g, aten.add.Tensor, prod, 1)


def unbind_as_selects(g, x):
    prod = call(g, aten.mul.Tensor, call(g, aten.select.int, x, 0, 0), call(g, aten.select.int, x, -3, -1))
    return call(g, aten.add.Tensor, prod, 1)


@pytest.mark.parametrize("shape", [(2, 8, 4), (2, 3, 5), (2, 1, 9)])
@pytest.mark.parametrize("form", [unbind_as_getitems, unbind_as_selects], ids=["unbind", "select"])
def test_unbind_pattern_matches_both_forms(form, shape):
    gm = build(form, shape)
    x = rand(*shape, seed=shape[1])
    want = x[0] * x[1] + 1
    torch.testing.assert_close(run(gm, x), want)

    assert fxfuse.FusionPass("p", [UnbindMul()])(gm) == 1
    assert aten.prod.dim_int in targets(gm) and aten.mul.Tensor not in targets(gm)
    torch.testing.assert_close(run(gm, x), want)


# --------------------------------------------------------------------------- the canonical form itself


def _form(gm):
    """The graph as (op, literal arguments) in order, with nodes named by position."""
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    arg = lambda a: ("node", index[a]) if isinstance(a, torch.fx.Node) else a  # noqa: E731
    return [
        (str(n.target), tuple(arg(a) if not isinstance(a, list) else [arg(b) for b in a] for a in n.args))
        for n in gm.graph.nodes
    ]


@pytest.mark.parametrize(
    "split_form, slice_form, args",
    [
        (chunk_as_split, chunk_as_slices, (7,)),
        (sizes_as_split, sizes_as_slices, ((3, 5, 8),)),
    ],
)
def test_both_forms_canonicalize_to_one_graph(split_form, slice_form, args):
    width = 2 * args[0] if isinstance(args[0], int) else sum(args[0])
    graphs = [build(lambda g, x, f=f: f(g, x, *args), (5, width)) for f in (split_form, slice_form)]
    assert _form(graphs[0]) != _form(graphs[1])
    for gm in graphs:
        canonicalize(gm.graph, DEFAULT_CANONICALIZATIONS)
        gm.graph.eliminate_dead_code()
    assert _form(graphs[0]) == _form(graphs[1])
    assert aten.split.Tensor not in targets(graphs[0]) and aten.split_with_sizes.default not in targets(graphs[0])


def test_split_to_slice_bounds_and_leftover_uses():
    # A piece in the middle, a negative getitem index, and the list itself used whole.
    def f(g, x):
        parts = call(g, aten.split.Tensor, x, 3, 1)  # width 11: pieces 3, 3, 3, 2
        mid, last = call(g, operator.getitem, parts, 1), call(g, operator.getitem, parts, -1)
        return call(g, aten.cat.default, parts, 1), mid, last

    gm = build(f, (4, 11))
    x = rand(4, 11, seed=11)
    assert split_to_slice(gm.graph) == 2
    slices = [n.args[1:] for n in gm.graph.nodes if n.target is aten.slice.Tensor]
    assert slices == [(1, 3, 6), (1, 9, sys.maxsize)]
    assert aten.split.Tensor in targets(gm)  # still feeds cat
    gm.graph.lint()
    cat, mid, last = run(gm, x)
    torch.testing.assert_close(cat, x)
    torch.testing.assert_close(mid, x[:, 3:6])
    torch.testing.assert_close(last, x[:, 9:])


@pytest.mark.parametrize("shape", [(3, 12), (5, 9), (2, 31)])
def test_split_to_slice_on_symbolic_sizes(shape):
    # Dynamic shapes: the piece size is a SymInt node; the later pieces' bounds are
    # computed in the graph and the last piece needs no size at all.
    def f(x):
        a, b, c = x.split(x.shape[1] // 3 + 1, 1)
        return a * 2, b + 1, c.sum(-1)

    gm = make_fx(f, tracing_mode="symbolic")(rand(4, 12))
    assert aten.split.Tensor in targets(gm)
    assert split_to_slice(gm.graph) == 3
    assert aten.split.Tensor not in targets(gm)
    gm.graph.lint()
    x = rand(*shape, seed=shape[1])
    for got, want in zip(run(gm, x), f(x), strict=True):
        torch.testing.assert_close(got, want)


def test_normalize_slice_writes_one_form():
    def f(g, x):
        return (
            call(g, aten.slice.Tensor, x, -1, -4, 5),  # = x[:, 2:5] on width 6
            g.call_function(aten.slice.Tensor, (x,), {"dim": 1, "start": 2}),
            call(g, aten.slice.Tensor, x, 0, 1, 100, 2),
            call(g, aten.select.int, x, -1, -2),
        )

    gm = build(f, (5, 6))
    x = rand(5, 6, seed=6)
    want = run(gm, x)
    assert normalize_slice(gm.graph) == 4
    args = [n.args[1:] for n in gm.graph.nodes if n.op == "call_function"]
    assert args == [(1, 2, 5), (1, 2, sys.maxsize), (0, 1, sys.maxsize, 2), (1, 4)]
    assert normalize_slice(gm.graph) == 0  # a fixed point
    for got, w in zip(run(gm, x), want, strict=True):
        torch.testing.assert_close(got, w)


@pytest.mark.parametrize("rows, width", [(1, 6), (3, 16), (5, 34)])
def test_views_regenerated_after_a_mutation_canonicalize_alike(rows, width):
    # After an in-place op on a piece, functionalization regenerates the pieces of the
    # mutated base: `split` + `getitem` before torch 2.15, `slice` from 2.15 on. This
    # graph comes from the release that runs the test; its canonical form must not.
    def f(x):
        a, b = x.chunk(2, -1)
        a.mul_(2)
        return a + b

    gm = trace_graph(f, rand(rows, width))
    canonicalize(gm.graph, DEFAULT_CANONICALIZATIONS)
    gm.graph.eliminate_dead_code()
    h = width // 2
    assert _form(gm) == [
        ("arg0_1", ()),
        ("aten.slice.Tensor", (("node", 0), 1, 0, h)),
        ("aten.mul.Tensor", (("node", 1), 2)),
        ("aten.slice_scatter.default", (("node", 0), ("node", 2), 1, 0, h)),
        ("aten.slice.Tensor", (("node", 3), 1, 0, h)),
        ("aten.slice.Tensor", (("node", 3), 1, h, sys.maxsize)),
        ("aten.add.Tensor", (("node", 4), ("node", 5))),
        ("output", (("node", 6),)),
    ]
    gm.recompile()
    x = rand(rows, width, seed=width)
    torch.testing.assert_close(gm(x), f(x.clone()))


def test_defaulted_custom_op_arguments_are_written_out():
    """A bool wildcard whose sample is the op's default must still match (tracing drops
    an argument equal to its default)."""
    from fxfuse.canonicalize import fill_custom_op_defaults

    fx = torch.ops.fxfuse
    gm = trace_graph(lambda x: (fx.dynamic_per_token_fp8_quant(x), x.relu()), torch.randn(3, 8))
    (node,) = [n for n in gm.graph.nodes if n.target is fx.dynamic_per_token_fp8_quant.default]
    assert len(node.args) == 1
    assert fill_custom_op_defaults(gm.graph) == 1 and node.args[1:] == (None,)
    relu = [n for n in gm.graph.nodes if n.target is torch.ops.aten.relu.default]
    assert all(len(n.args) == 1 for n in relu)  # aten ops are left as traced

    class FlagWildcard(fxfuse.Rewrite):
        def pattern(self, x, flag):
            return fx.group_fp8_quant(x.relu(), 64, flag)

        def replacement(self, x, flag):
            return fx.group_fp8_quant(x.abs() * (x > 0), 64, flag)

        def example_inputs(self):
            return [fxfuse.TensorSpec((4, 128)), False]

    for flag in (False, True):
        gm = trace_graph(lambda x: fx.group_fp8_quant(x.relu(), 64, flag), torch.randn(4, 128))
        assert fxfuse.FusionPass("p", [FlagWildcard()])(gm) == 1


def test_a_pass_leaves_custom_op_calls_in_their_traced_form():
    """Defaults are written out only while matching: Inductor's lowering of custom ops
    re-normalizes each call and requires its argument count unchanged."""
    fx = torch.ops.fxfuse
    x, w = torch.randn(3, 64), torch.randn(64)

    def f(x, w):
        q, s = fx.dynamic_per_token_fp8_quant(fx.rms_norm(x.relu(), w, 1e-6))
        return fx.group_fp8_quant(x, 64), q, s

    gm = trace_graph(f, x, w)
    before = {n.name: len(n.args) for n in gm.graph.nodes if n.op == "call_function"}
    fxfuse.FusionPass("p", [])(gm)  # no rewrites: only the canonicalizations and their undo
    after = {n.name: len(n.args) for n in gm.graph.nodes if n.op == "call_function"}
    assert after == before
