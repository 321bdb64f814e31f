"""The rewrite framework on traced post-grad-style graphs (no Inductor compile needed)."""

import operator

import pytest
import torch

import fxfuse
from fxfuse import TensorSpec
from conftest import targets, trace_graph

aten = torch.ops.aten

# ---------------------------------------------------------------- test ops

lib = torch.library.Library("fxtest", "FRAGMENT")


@torch.library.custom_op("fxtest::fma", mutates_args=())
def fma(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return x * y + z


@fma.register_fake
def _(x, y, z):
    return torch.empty_like(x)


@torch.library.custom_op("fxtest::norm", mutates_args=())
def norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@norm.register_fake
def _(x, eps):
    return torch.empty_like(x)


@torch.library.custom_op("fxtest::norm_scale", mutates_args=())
def norm_scale(x: torch.Tensor, eps: float, s: torch.Tensor) -> torch.Tensor:
    return norm(x, eps) * s


@norm_scale.register_fake
def _(x, eps, s):
    return torch.empty_like(x)


@torch.library.custom_op("fxtest::tagged", mutates_args=())
def tagged(x: torch.Tensor, tag: str) -> torch.Tensor:
    return x + len(tag)


@tagged.register_fake
def _(x, tag):
    return torch.empty_like(x)


@torch.library.custom_op("fxtest::tagged_double", mutates_args=())
def tagged_double(x: torch.Tensor, tag: str) -> torch.Tensor:
    return (x + len(tag)) * 2


@tagged_double.register_fake
def _(x, tag):
    return torch.empty_like(x)


@torch.library.custom_op("fxtest::write", mutates_args=("out",))
def write(x: torch.Tensor, out: torch.Tensor, name: str, scale: torch.Tensor | None = None) -> None:
    y = x * 2 if scale is None else x * 2 / scale
    out.copy_(y.view(out.shape))


@write.register_fake
def _(x, out, name, scale=None):
    return None


# ---------------------------------------------------------------- rewrites


class MulAddToFma(fxfuse.Rewrite):
    def pattern(self, x, y, z):
        return x * y + z

    def replacement(self, x, y, z):
        return torch.ops.fxtest.fma(x, y, z)

    def example_inputs(self):
        return [TensorSpec((8, 16), torch.float32)] * 3


class NormScale(fxfuse.Rewrite):
    """Float wildcard: every eps."""

    def pattern(self, x, s, eps):
        return torch.ops.fxtest.norm(x, eps) * s

    def replacement(self, x, s, eps):
        return torch.ops.fxtest.norm_scale(x, eps, s)

    def example_inputs(self):
        return [TensorSpec((4, 32)), TensorSpec(()), 1e-6]


class NormScaleFixedEps(NormScale):
    """eps written as a constant: only that eps matches."""

    def __init__(self, eps=1e-6):
        self.eps = eps

    def pattern(self, x, s):
        return torch.ops.fxtest.norm(x, self.eps) * s

    def replacement(self, x, s):
        return torch.ops.fxtest.norm_scale(x, self.eps, s)

    def example_inputs(self):
        return [TensorSpec((4, 32)), TensorSpec(())]


class TaggedDouble(fxfuse.Rewrite):
    """Str wildcard: every tag."""

    def pattern(self, x, tag):
        return torch.ops.fxtest.tagged(x, tag) * 2

    def replacement(self, x, tag):
        return torch.ops.fxtest.tagged_double(x, tag)

    def example_inputs(self):
        return [TensorSpec((4, 8)), "layer"]

    def check(self, match):
        return not match.kwargs["tag"].startswith("skip")


class AddIntThenMul(fxfuse.Rewrite):
    """Int wildcard: every k."""

    def pattern(self, x, k):
        return (x + k) * 3

    def replacement(self, x, k):
        return x * 3 + 3 * k

    def example_inputs(self):
        return [TensorSpec((4, 8)), 5]


@torch.library.custom_op("fxtest::maybe_neg", mutates_args=())
def maybe_neg(x: torch.Tensor, neg: bool) -> torch.Tensor:
    return -x if neg else x.clone()


@maybe_neg.register_fake
def _(x, neg):
    return torch.empty_like(x)


class MaybeNegThenAbs(fxfuse.Rewrite):
    """Bool wildcard: both flags, one registration."""

    def pattern(self, x, neg):
        return torch.ops.fxtest.maybe_neg(x, neg).abs()

    def replacement(self, x, neg):
        return x.abs()

    def example_inputs(self):
        return [TensorSpec((4, 8)), True]


class WriteThenDivide(fxfuse.Rewrite):
    """A mutating op, written as the user calls it."""

    def pattern(self, x, out, s, name):
        torch.ops.fxtest.write(x, out, name)
        return out.view(-1, 32) / s

    def replacement(self, x, out, s, name):
        torch.ops.fxtest.write(x, out, name, s)
        return out.view(-1, 32)

    def example_inputs(self):
        return [TensorSpec((4, 32)), TensorSpec((4, 4, 8)), TensorSpec(()), "attn.0"]


def _model_fma(a, b, c):
    return (a * b + c).relu()


# ---------------------------------------------------------------- matching


def test_basic_rewrite_matches_and_preserves_numerics():
    args = [torch.randn(5, 7) for _ in range(3)]
    gm = trace_graph(_model_fma, *args)
    p = fxfuse.FusionPass("fma_fusion", [MulAddToFma()])
    assert p(gm) == 1
    gm.recompile()
    assert torch.ops.fxtest.fma.default in targets(gm)
    assert aten.mul.Tensor not in targets(gm)
    torch.testing.assert_close(gm(*args), _model_fma(*args))
    assert fxfuse.match_table() == {"fma_fusion": {"MulAddToFma": 1}}


def test_extra_user_of_intermediate_blocks_match():
    def f(a, b, c):
        m = a * b
        return m + c, m.sum()

    gm = trace_graph(f, *[torch.randn(4, 4) for _ in range(3)])
    assert fxfuse.FusionPass("p", [MulAddToFma()])(gm) == 0


def test_float_wildcard_matches_every_eps():
    def f(x, s):
        a = torch.ops.fxtest.norm(x, 1e-5) * s
        b = torch.ops.fxtest.norm(x + 1, 1e-2) * s
        return a + b

    x, s = torch.randn(3, 32), torch.tensor(1.5)
    gm = trace_graph(f, x, s)
    assert fxfuse.FusionPass("p", [NormScale()])(gm) == 2
    gm.recompile()
    epsilons = sorted(n.args[1] for n in gm.graph.nodes if n.target is torch.ops.fxtest.norm_scale.default)
    assert epsilons == [1e-5, 1e-2]
    torch.testing.assert_close(gm(x, s), f(x, s))


def test_constant_eps_in_body_matches_only_that_eps():
    def f(x, s):
        return torch.ops.fxtest.norm(x, 1e-5) * s + torch.ops.fxtest.norm(x, 1e-6) * s

    gm = trace_graph(f, torch.randn(3, 32), torch.tensor(2.0))
    assert fxfuse.FusionPass("p", [NormScaleFixedEps(1e-6)])(gm) == 1


def test_str_wildcard_and_check():
    def f(x):
        a = torch.ops.fxtest.tagged(x, "model.layers.0.attn") * 2
        b = torch.ops.fxtest.tagged(x, "model.layers.17.attn") * 2
        c = torch.ops.fxtest.tagged(x, "skip.me") * 2
        return a + b + c

    x = torch.randn(4, 8)
    gm = trace_graph(f, x)
    p = fxfuse.FusionPass("p", [TaggedDouble()])
    assert p(gm) == 2  # the third is refused by check()
    gm.recompile()
    tags = sorted(n.args[1] for n in gm.graph.nodes if n.target is torch.ops.fxtest.tagged_double.default)
    assert tags == ["model.layers.0.attn", "model.layers.17.attn"]
    torch.testing.assert_close(gm(x), f(x))


def test_int_wildcard_binds_each_value():
    def f(x):
        return (x + 2) * 3 + (x + 9) * 3

    x = torch.randn(4, 8)
    gm = trace_graph(f, x)
    assert fxfuse.FusionPass("p", [AddIntThenMul()])(gm) == 2
    gm.recompile()
    torch.testing.assert_close(gm(x), f(x))


def test_bool_wildcard_matches_both_values():
    def f(x):
        return torch.ops.fxtest.maybe_neg(x, False).abs() + torch.ops.fxtest.maybe_neg(x, True).abs()

    x = torch.randn(4, 8)
    gm = trace_graph(f, x)
    assert fxfuse.FusionPass("p", [MaybeNegThenAbs()])(gm) == 2
    gm.recompile()
    assert torch.ops.fxtest.maybe_neg.default not in targets(gm)
    torch.testing.assert_close(gm(x), f(x))


@pytest.mark.parametrize("v2", [False, True], ids=["auto_functionalized", "auto_functionalized_v2"])
def test_mutating_op_matches_functionalized_form(v2):
    hop = fxfuse.compat.auto_functionalized_ops()["v2" if v2 else "v1"]

    def f(x, s):
        out = torch.empty(x.shape[0], 4, 8)
        torch.ops.fxtest.write(x, out, "layer.3")
        return out.view(-1, 32) / s + 1

    x, s = torch.randn(6, 32), torch.tensor(4.0)
    gm = trace_graph(f, x, s, v2=v2)
    assert hop in targets(gm)
    p = fxfuse.FusionPass("p", [WriteThenDivide()])
    assert {v.form for v in p.traced[0].variants} == {"v1", "v2"}
    assert p(gm) == 1
    gm.recompile()
    assert aten.div.Tensor not in targets(gm)
    af = next(n for n in gm.graph.nodes if n.target is hop)
    assert af.kwargs["scale"] is not None and af.kwargs["name"] == "layer.3"
    torch.testing.assert_close(gm(x, s), f(x, s))


def test_view_in_pattern_matches_reshape_in_graph():
    class ViewThenMul(fxfuse.Rewrite):
        def pattern(self, x):
            return x.view(-1, 4) * 2

        def replacement(self, x):
            return torch.ops.fxtest.fma(x.view(-1, 4), torch.full_like(x.view(-1, 4), 2.0), torch.zeros_like(x.view(-1, 4)))

        def example_inputs(self):
            return [TensorSpec((4, 8))]

    def f(x):
        return x.reshape(-1, 4) * 2

    from torch._inductor.fx_passes.post_grad import view_to_reshape

    x = torch.randn(6, 8)
    graphs = [trace_graph(f, x) for _ in range(2)]
    for gm in graphs:
        view_to_reshape(gm)  # what Inductor's post-grad graph holds
        assert aten.reshape.default in targets(gm) and aten.view.default not in targets(gm)
    assert fxfuse.FusionPass("raw", [ViewThenMul()], canonicalize=())(graphs[0]) == 0
    assert fxfuse.FusionPass("p", [ViewThenMul()])(graphs[1]) == 1
    graphs[1].recompile()
    torch.testing.assert_close(graphs[1](x), f(x))


def test_shape_mismatch_behind_ignored_reshape_is_refused():
    class SumOf16(fxfuse.Rewrite):
        def pattern(self, x):
            return x.reshape(-1, 16).sum(-1)

        def replacement(self, x):
            return x.reshape(-1, 16).sum(-1) * 1.0

        def example_inputs(self):
            return [TensorSpec((4, 32))]

    def f(x):
        return x.reshape(-1, 32).sum(-1)  # same ops, different shape: not the pattern

    gm = trace_graph(f, torch.randn(4, 64))
    assert fxfuse.FusionPass("p", [SumOf16()])(gm) == 0


def test_noop_permute_is_canonicalized_away():
    def f(a, b, c):
        return (a * b).permute(0, 1) + c

    args = [torch.randn(3, 5) for _ in range(3)]
    graphs = [trace_graph(f, *args) for _ in range(2)]
    assert aten.permute.default in targets(graphs[0])
    assert fxfuse.FusionPass("raw", [MulAddToFma()], canonicalize=())(graphs[0]) == 0
    assert fxfuse.FusionPass("p", [MulAddToFma()])(graphs[1]) == 1
    graphs[1].recompile()
    torch.testing.assert_close(graphs[1](*args), f(*args))


# ---------------------------------------------------------------- failures and errors


class Raises(fxfuse.Rewrite):
    def pattern(self, x):
        raise RuntimeError("boom in pattern")

    def replacement(self, x):
        return x

    def example_inputs(self):
        return [TensorSpec((2, 2))]


class TooFewInputs(MulAddToFma):
    def example_inputs(self):
        return [TensorSpec((8, 16))] * 2


class InputsDoNotFit(MulAddToFma):
    def example_inputs(self):
        return [TensorSpec((8, 16)), TensorSpec((3, 5)), TensorSpec((8, 16))]


class TwoOutputs(MulAddToFma):
    def replacement(self, x, y, z):
        return x * y + z, x


class WrongDtype(MulAddToFma):
    def replacement(self, x, y, z):
        return (x * y + z).to(torch.float16)


class BadExample(MulAddToFma):
    def example_inputs(self):
        return [TensorSpec((8, 16)), TensorSpec((8, 16)), object()]


class UnusedWildcard(fxfuse.Rewrite):
    def pattern(self, x, eps):
        return x * 2

    def replacement(self, x, eps):
        return x + x

    def example_inputs(self):
        return [TensorSpec((2, 2)), 1e-6]


class UnstableParam(MulAddToFma):
    def __init__(self):
        self.thing = object()


@pytest.mark.parametrize(
    "rewrite, message",
    [
        (Raises(), r"Raises: pattern\(\) failed to trace.*boom in pattern"),
        (TooFewInputs(), r"TooFewInputs: pattern\(\) takes 3 arguments .* gives 2"),
        (InputsDoNotFit(), r"InputsDoNotFit: pattern\(\) failed to trace"),
        (TwoOutputs(), r"TwoOutputs: replacement\(\) returns 2 output\(s\) but pattern\(\) returns 1"),
        (WrongDtype(), r"WrongDtype: output 0 of replacement\(\) is float16.* pattern\(\) gives float32"),
        (BadExample(), r"BadExample: example input 2 \(z\) is a object"),
        (UnusedWildcard(), r"UnusedWildcard: argument\(s\) eps do not appear"),
        (UnstableParam(), r"parameter 'thing' of rewrite UnstableParam is a object"),
    ],
)
def test_registration_errors_name_rewrite_and_cause(rewrite, message):
    with pytest.raises(fxfuse.RewriteError, match=message):
        fxfuse.FusionPass("p", [rewrite])


def test_register_rejects_non_rewrites_and_duplicates():
    p = fxfuse.FusionPass("p", [MulAddToFma()])
    with pytest.raises(fxfuse.RewriteError, match="registered already"):
        p.register(MulAddToFma())
    with pytest.raises(fxfuse.RewriteError, match="is not an fxfuse.Rewrite"):
        p.register(lambda x: x)
    with pytest.raises(fxfuse.RewriteError, match="non-empty name"):
        fxfuse.FusionPass("")


class FailsForSevenRows(MulAddToFma):
    def replacement(self, x, y, z):
        if x.shape[0] == 7:
            raise RuntimeError("no kernel for 7 rows")
        return torch.ops.fxtest.fma(x, y, z)


def test_failed_replacement_leaves_valid_graph_and_is_reported():
    def f(a, b, c, d):
        return (a * b + c) + (d * d + d).sum()

    args = [torch.randn(7, 4), torch.randn(7, 4), torch.randn(7, 4), torch.randn(3, 4)]
    gm = trace_graph(f, *args)
    p = fxfuse.FusionPass("p", [FailsForSevenRows()])
    with pytest.warns(fxfuse.FusionWarning, match="no kernel for 7 rows"):
        n = p(gm)
    assert n == 1  # the 3-row site still fuses
    assert len(p.failures) == 1 and "no kernel for 7 rows" in p.failures[0].error
    gm.graph.lint()
    gm.recompile()
    torch.testing.assert_close(gm(*args), f(*args))
    assert fxfuse.match_table() == {"p": {"FailsForSevenRows": 1}}


def test_explain_reports_a_failing_replacement_without_recording_a_failure(recwarn):
    gm = trace_graph(lambda a, b, c: a * b + c, *[torch.randn(7, 4) for _ in range(3)])
    p = fxfuse.FusionPass("p", [FailsForSevenRows()])
    (site,) = fxfuse.explain(gm, [p]).for_rewrite("FailsForSevenRows")
    assert not site.matched and "no kernel for 7 rows" in site.reason
    assert p.failures == [] and not [w for w in recwarn if issubclass(w.category, fxfuse.FusionWarning)]
    assert fxfuse.match_table() == {} and fxfuse.miss_table() == {}


# ---------------------------------------------------------------- explain


def test_explain_reports_match_and_near_misses():
    def f(a, b, c):
        m = a * b
        return (m + c) + m.sum() + (c + 1)

    gm = trace_graph(f, *[torch.randn(4, 4) for _ in range(3)])
    report = fxfuse.explain(gm, [fxfuse.FusionPass("p", [MulAddToFma()])])
    sites = report.for_rewrite("MulAddToFma")
    # A site is where the chain starts: the one mul.
    assert len(sites) == len([n for n in gm.graph.nodes if n.target is aten.mul.Tensor]) == 1
    assert not any(s.matched for s in sites)  # m has two users: no site matches
    assert "mul (aten.mul.Tensor) is also used by sum_1 (aten.sum.default), outside the chain" in sites[0].reason
    assert "MulAddToFma" in str(report)
    before = targets(gm)
    assert targets(gm) == before  # explain does not modify the graph


def test_explain_reports_failed_check():
    def f(x):
        return torch.ops.fxtest.tagged(x, "skip.this") * 2 + torch.ops.fxtest.tagged(x, "keep") * 2

    gm = trace_graph(f, torch.randn(4, 8))
    sites = fxfuse.explain(gm, [fxfuse.FusionPass("p", [TaggedDouble()])]).for_rewrite("TaggedDouble")
    verdicts = sorted((s.matched, s.reason) for s in sites)
    assert (True, "") in verdicts
    assert any("check() returned False" in r for _, r in verdicts)
