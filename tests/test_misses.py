"""Near misses: counted per pass and rewrite, reset with the match table, logged once per
compile with the first reason, and replayed on FX-graph-cache hits."""

import logging

import pytest
import torch

import fxfuse
from fxfuse import TensorSpec
from conftest import trace_graph


class MulAddRelu(fxfuse.Rewrite):
    """(x * y + z).relu(): its chains are found from the relu, its most specific op."""

    def pattern(self, x, y, z):
        return (x * y + z).relu()

    def replacement(self, x, y, z):
        return torch.addcmul(z, x, y).relu()

    def example_inputs(self):
        return [TensorSpec((8, 16))] * 3


class MulAddReluFromMul(MulAddRelu):
    """The same chain, found and counted from its mul (`Rewrite.anchor`)."""

    anchor = torch.ops.aten.mul.Tensor


def _one_match_two_misses(a, b, c):
    fused = (a * b + c).relu()  # matches
    shared = a * c  # an extra user: the whole chain is there but cannot be replaced
    no_relu = b * c + a  # the chain stops before the relu: a miss only when counted from the mul
    return fused, (shared + b).relu(), shared.sum(), no_relu, (a - b).relu()


def _graph():
    return trace_graph(_one_match_two_misses, *[torch.randn(4, 8) for _ in range(3)])


def test_misses_are_counted_per_pass_and_rewrite():
    p = fxfuse.FusionPass("mar", [MulAddRelu()])
    assert p(_graph()) == 1
    assert fxfuse.match_table() == {"mar": {"MulAddRelu": 1}}
    # From the relu: the shared chain is a miss; (a - b).relu() shares only the op, the
    # relu-less chain has no relu: neither is a near miss.
    assert fxfuse.miss_table() == {"mar": {"MulAddRelu": 1}}
    misses = p.last_misses["MulAddRelu"]
    assert misses.total == 2 and misses.sites == ("relu_1",)
    p(_graph())  # a second graph adds up
    assert fxfuse.miss_table() == {"mar": {"MulAddRelu": 2}}


def test_an_anchor_chosen_by_the_rewrite_counts_from_there():
    p = fxfuse.FusionPass("mar", [MulAddReluFromMul()])
    assert p(_graph()) == 1
    misses = p.last_misses["MulAddReluFromMul"]
    # From the mul: the shared chain and the relu-less one (mul and add are there).
    assert misses.total == 3 and misses.sites == ("mul_1", "mul_2")
    assert "mul_1 (aten.mul.Tensor) is also used by sum_1" in misses.first_reason


def test_reset_clears_misses_with_matches():
    fxfuse.FusionPass("mar", [MulAddRelu()])(_graph())
    fxfuse.reset_match_table()
    assert fxfuse.match_table() == {} and fxfuse.miss_table() == {}


def test_each_rewrite_with_misses_logs_once_with_the_first_reason(caplog):
    class Other(MulAddRelu):
        def pattern(self, x, y, z):
            return (x * y - z).relu()

        def replacement(self, x, y, z):
            return (x * y - z).relu()

    with caplog.at_level(logging.INFO, logger="fxfuse"):
        fxfuse.FusionPass("mar", [MulAddRelu(), Other()])(_graph())
    lines = [r.getMessage() for r in caplog.records if r.name == "fxfuse"]
    mine = [line for line in lines if "mar/MulAddRelu " in line]
    assert len(mine) == 1, lines
    assert "missed 1 of 2 site(s); first at relu_1" in mine[0]
    assert "mul_1 (aten.mul.Tensor) is also used by sum_1 (aten.sum.default), outside the chain" in mine[0]
    # Other's chain never occurs whole: its near misses are reported in one line.
    assert len([line for line in lines if "mar/Other " in line]) == 1


def test_no_sites_no_misses():
    p = fxfuse.FusionPass("mar", [MulAddRelu()])
    assert p(trace_graph(lambda x: x.sin(), torch.randn(3))) == 0
    assert fxfuse.miss_table() == {} and p.last_misses == {}


def test_sites_consumed_by_a_sibling_rewrite_are_not_misses():
    class MulAddSigmoid(MulAddRelu):
        def pattern(self, x, y, z):
            return (x * y + z).sigmoid()

        def replacement(self, x, y, z):
            return torch.addcmul(z, x, y).sigmoid()

    gm = trace_graph(lambda a, b, c: ((a * b + c).relu(), (b * c + a).sigmoid()), *[torch.randn(4, 4) for _ in range(3)])
    p = fxfuse.FusionPass("p", [MulAddRelu(), MulAddSigmoid()])
    assert p(gm) == 2
    assert fxfuse.miss_table() == {}


@pytest.mark.compile
def test_misses_survive_fx_graph_cache_hit(fresh_inductor_cache):
    def f(a, b, c):
        shared = a * c  # a near miss: the sum also reads it
        return (a * b + c).relu() + (shared + b).relu() + shared.sum()

    args = [torch.randn(4, 8) for _ in range(3)]
    calls = []

    class Counting(fxfuse.PassManager):
        def __call__(self, graph):
            calls.append(1)
            super().__call__(graph)

    mk = lambda: Counting([fxfuse.FusionPass("mar", [MulAddRelu()])])  # noqa: E731
    torch.compile(f, options={"post_grad_custom_post_pass": mk()})(*args)
    first = (fxfuse.match_table(), fxfuse.miss_table())
    assert first == ({"mar": {"MulAddRelu": 1}}, {"mar": {"MulAddRelu": 1}})

    fxfuse.reset_match_table()
    torch._dynamo.reset()
    torch.compile(f, options={"post_grad_custom_post_pass": mk()})(*args)
    assert len(calls) == 1, "expected an FX graph cache hit"
    assert (fxfuse.match_table(), fxfuse.miss_table()) == first


class BrokenReplacement(MulAddRelu):
    def replacement(self, x, y, z):
        if x.shape[-1] != 16:  # the examples' width
            raise RuntimeError("no kernel for this shape")
        return super().replacement(x, y, z)


@pytest.mark.compile
def test_a_cache_hit_says_again_what_the_compile_said(fresh_inductor_cache, caplog):
    """The miss log and a failed replacement's warning come again with a graph served from
    the FX graph cache (what CI caught: a warm cache counted a miss and logged nothing)."""
    def f(a, b, c):
        shared = a * c
        return (shared + b).relu() + shared.sum() + (b * c + a).relu()

    args = [torch.randn(4, 8) for _ in range(3)]
    mk = lambda: fxfuse.PassManager([fxfuse.FusionPass("said", [BrokenReplacement()])])  # noqa: E731

    def compile_and_listen():
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="fxfuse"), pytest.warns(fxfuse.FusionWarning) as warned:
            torch.compile(f, options={"post_grad_custom_post_pass": mk()})(*args)
        lines = sorted(r.getMessage() for r in caplog.records if "said/" in r.getMessage())
        return lines, [str(w.message) for w in warned if issubclass(w.category, fxfuse.FusionWarning)]

    lines, warned = compile_and_listen()
    assert len(lines) == 2 and any("missed 2 of 2 site(s)" in line for line in lines)
    assert any("unreplaced" in line and "no kernel for this shape" in line for line in lines)
    assert "no kernel for this shape" in warned[0]

    fxfuse.reset_match_table()
    torch._dynamo.reset()
    again, warned_again = compile_and_listen()
    assert [line.split(" (said again")[0] for line in again] == lines
    assert all("served this graph from its FX graph cache" in line for line in again)
    assert "no kernel for this shape" in warned_again[0]
    assert fxfuse.miss_table() == {"said": {"BrokenReplacement": 2}}
