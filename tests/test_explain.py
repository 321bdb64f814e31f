"""fxfuse.explain: the report's shape, every graph of a function, and no disturbance of
the user's own compiles."""

import pytest
import torch

import fxfuse
from fxfuse import TensorSpec
from fxfuse.explain import capture_post_grad_graphs
from conftest import trace_graph


class MulAddRelu(fxfuse.Rewrite):
    """(x * y + z).relu(): its chains are found from the relu."""

    def pattern(self, x, y, z):
        return (x * y + z).relu()

    def replacement(self, x, y, z):
        return torch.addcmul(z, x, y).relu()

    def example_inputs(self):
        return [TensorSpec((8, 16))] * 3


class SigmoidSub(MulAddRelu):
    """A chain that starts at a sigmoid, which the graphs below never run."""

    def pattern(self, x, y, z):
        return (x.sigmoid() - y) * z

    def replacement(self, x, y, z):
        return (x.sigmoid() - y) * z


def _one_match_one_shared(a, b, c):
    fused = (a * b + c).relu()
    shared = a * c  # its chain would match, but the sum also reads it
    return fused, (shared + b).relu(), shared.sum(), (a * c).sigmoid() * b


def _passes():
    return [fxfuse.FusionPass("mar", [MulAddRelu(), SigmoidSub()])]


@pytest.mark.parametrize("shape", [(4, 8), (5, 7), (1, 3)])
def test_report_prints_each_pattern_once_then_one_line_per_site(shape):
    gm = trace_graph(_one_match_one_shared, *[torch.randn(shape) for _ in range(3)])
    report = fxfuse.explain(gm, _passes())
    text = str(report).splitlines()

    traced = fxfuse.FusionPass("p", [MulAddRelu()]).traced[0]
    pattern = traced.variants[0].pattern.source("MulAddRelu", ["x", "y", "z"])
    assert pattern.splitlines()[0] == "def MulAddRelu(x, y, z):"
    for line in pattern.splitlines():
        assert sum(t.strip() == line.strip() for t in text) == 1, f"pattern line {line!r} not printed exactly once"
    sites = [t for t in text if t.startswith("mar/MulAddRelu [")]
    assert len(sites) == 2 == len(report.for_rewrite("MulAddRelu"))
    assert sum(t.endswith(": MATCH") for t in sites) == 1
    (miss,) = [t for t in sites if ": no: " in t]
    # The extra user is named, on the line of the chain's anchor.
    assert "at relu_1: no: mul_1 (aten.mul.Tensor) is also used by sum_1 (aten.sum.default)" in miss
    assert fxfuse.match_table() == {} and fxfuse.miss_table() == {}  # explaining is not compiling


def test_absent_anchor_op_is_named_in_one_line():
    gm = trace_graph(lambda a, b, c: (a * b + c).relu(), *[torch.randn(3, 5) for _ in range(3)])
    report = fxfuse.explain(gm, _passes())
    assert report.for_rewrite("SigmoidSub") == []
    lines = [t for t in str(report).splitlines() if t.startswith("mar/SigmoidSub")]
    assert lines == ["mar/SigmoidSub: no site: aten.sigmoid.default does not occur in the graph"]


def test_a_node_sharing_only_the_anchor_op_is_not_a_site():
    # (a * c).sigmoid() * b: SigmoidSub's anchor op, but not its sub: no chain of it.
    gm = trace_graph(_one_match_one_shared, *[torch.randn(3, 5) for _ in range(3)])
    assert fxfuse.explain(gm, _passes()).for_rewrite("SigmoidSub") == []


def test_unknown_rewrite_name_lists_the_known_ones():
    gm = trace_graph(_one_match_one_shared, *[torch.randn(3, 5) for _ in range(3)])
    with pytest.raises(ValueError, match="no rewrite named 'MulAddRelu2'; known: MulAddRelu, SigmoidSub"):
        fxfuse.explain(gm, _passes(), rewrite="MulAddRelu2")
    only = fxfuse.explain(gm, _passes(), rewrite="SigmoidSub")
    assert [r.rewrite for r in only.rewrites] == ["SigmoidSub"]


def _broken(a, b, c):
    x = (a * b + c).relu()
    torch._dynamo.graph_break()  # what a print or a .item() in model code does
    shared = a * c
    return (x * b + c).relu() + (shared + b).relu() + shared.sum()


@pytest.mark.compile
def test_explain_reports_every_graph_of_a_function_with_graph_breaks():
    args = [torch.randn(6, 5) for _ in range(3)]
    report = fxfuse.explain(_broken, _passes(), *args, rewrite="MulAddRelu")
    assert report.num_graphs == 2
    by_graph = {g: [s.matched for s in report.sites if s.graph == g] for g in (0, 1)}
    assert by_graph == {0: [True], 1: [True, False]}
    assert "graph 0: mar/MulAddRelu" in str(report) and "graph 1: mar/MulAddRelu" in str(report)
    with pytest.raises(ValueError, match="compiles into 2 graphs"):
        fxfuse.capture_post_grad_graph(_broken, *args)


def _user_fn(a, b, c):
    return (a * b + c).relu().neg()


@pytest.mark.compile
def test_explain_leaves_the_users_compiled_functions_and_recompile_budget_alone():
    args = [torch.randn(5, 3) for _ in range(3)]
    compiles, calls = [], []

    def backend(gm, example_inputs):  # counts compiles, and calls of the compiled code
        compiles.append(gm)

        def compiled(*inputs):
            calls.append(1)
            return gm(*inputs)

        return compiled

    with torch._dynamo.config.patch(recompile_limit=1):
        user = torch.compile(_user_fn, backend=backend)
        user(*args)
        # Two explains: the second would hit the recompile limit of 1 if the first's
        # compile had counted against the function's budget.
        for _ in range(2):
            report = fxfuse.explain(_user_fn, _passes(), *args, rewrite="MulAddRelu")
            assert [s.matched for s in report.sites] == [True]
        user(*args)
    # Still served by the code compiled before: not recompiled (a reset would force that)
    # and not fallen back to eager (an exhausted recompile budget would).
    assert (len(compiles), len(calls)) == (1, 2)
    assert fxfuse.match_table() == {}


@pytest.mark.compile
def test_capture_of_an_already_compiled_module_sees_its_graph():
    class M(torch.nn.Module):
        def forward(self, a, b, c):
            return _user_fn(a, b, c)

    compiled = torch.compile(M())
    args = [torch.randn(7, 2) for _ in range(3)]
    (gm,) = capture_post_grad_graphs(compiled, *args)
    assert torch.ops.aten.relu.default in [n.target for n in gm.graph.nodes]
