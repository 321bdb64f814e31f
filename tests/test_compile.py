"""fxfuse inside real Inductor compiles: installation, chaining, the FX graph cache."""

import pytest
import torch

import fxfuse
from fxfuse import TensorSpec

pytestmark = pytest.mark.compile


class TimesThree(fxfuse.Rewrite):
    """Deliberately changes the function (x*3 -> x*factor) so a stale graph is visible."""

    def __init__(self, factor):
        self.factor = factor

    def pattern(self, x):
        return x * 3

    def replacement(self, x):
        return x * self.factor

    def example_inputs(self):
        return [TensorSpec((4, 4))]


def f(x):
    return (x * 3).sin()


class CountingManager(fxfuse.PassManager):
    calls = 0

    def __call__(self, graph):
        type(self).calls += 1
        super().__call__(graph)


class KeyIgnoresParameters(CountingManager):
    """A broken cache key (what fxfuse's key guards against): same uuid whatever the rewrites."""

    def uuid(self):
        return "constant"


def _compile_and_run(manager, x):
    torch._dynamo.reset()
    return torch.compile(f, options={"post_grad_custom_post_pass": manager})(x)


def test_compile_fuses_chains_user_pass_and_leaves_global_config(fresh_inductor_cache):
    from torch._inductor import config

    seen = []

    class UserPass(fxfuse.compat.custom_graph_pass_base()):
        def __call__(self, graph):
            seen.append(sum(1 for n in graph.nodes if n.target is torch.ops.aten.mul.Tensor))

        def uuid(self):
            return "user-pass-v1"

    user = UserPass()
    x = torch.randn(4, 4)
    with config.patch(post_grad_custom_post_pass=user):
        compiled = fxfuse.compile(f, passes=[fxfuse.FusionPass("p", [TimesThree(0.5)])])
        out = compiled(x)
        assert config.post_grad_custom_post_pass is user  # untouched
    torch.testing.assert_close(out, (x * 0.5).sin())
    assert seen, "the user's pass did not run"
    assert fxfuse.match_table() == {"p": {"TimesThree": 1}}


def test_changed_parameter_recompiles_and_broken_key_would_be_stale(fresh_inductor_cache):
    x = torch.randn(4, 4)
    mk = lambda factor, cls=CountingManager: cls([fxfuse.FusionPass("p", [TimesThree(factor)])])  # noqa: E731

    torch.testing.assert_close(_compile_and_run(mk(2.0), x), (x * 2.0).sin())
    # fxfuse's key sees the new parameter: Inductor recompiles and the pass runs again.
    torch.testing.assert_close(_compile_and_run(mk(5.0), x), (x * 5.0).sin())

    # The counterexample: with a key that ignores parameters, Inductor serves the old graph.
    torch.testing.assert_close(_compile_and_run(mk(7.0, KeyIgnoresParameters), x), (x * 7.0).sin())
    KeyIgnoresParameters.calls = 0
    stale = _compile_and_run(mk(9.0, KeyIgnoresParameters), x)
    assert KeyIgnoresParameters.calls == 0, "expected an FX graph cache hit"
    torch.testing.assert_close(stale, (x * 7.0).sin())


def test_match_counts_survive_fx_graph_cache_hit(fresh_inductor_cache):
    x = torch.randn(4, 4)
    mk = lambda: CountingManager([fxfuse.FusionPass("p", [TimesThree(4.0)])])  # noqa: E731

    CountingManager.calls = 0
    _compile_and_run(mk(), x)
    assert CountingManager.calls == 1
    assert fxfuse.match_table() == {"p": {"TimesThree": 1}}

    fxfuse.reset_match_table()
    out = _compile_and_run(mk(), x)  # a new process would do the same: nothing in memory
    assert CountingManager.calls == 1, "the pass ran again: no cache hit"
    torch.testing.assert_close(out, (x * 4.0).sin())
    assert fxfuse.match_table() == {"p": {"TimesThree": 1}}


def test_compile_rejects_other_backends():
    with pytest.raises(ValueError, match="not Inductor"):
        fxfuse.compile(f, passes=[], backend="eager")
