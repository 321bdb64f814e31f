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


# ---------------------------------------------------------------- compile modes

MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_compiles_with_the_passes_and_the_modes_options(mode, fresh_inductor_cache):
    from torch._inductor import config

    implied = fxfuse.compat.mode_options(mode)
    seen = {}

    class ReadsConfig(fxfuse.compat.custom_graph_pass_base()):
        """Chained after the fusion passes: records the Inductor config the compile ran with."""

        def __call__(self, graph):
            seen.update({k: config.get_config_copy()[k] for k in implied})

        def uuid(self):
            return "reads-config"

    x = torch.randn(5, 3)
    compiled = fxfuse.compile(f, passes=[fxfuse.FusionPass("p", [TimesThree(0.5)])], mode=mode,
                              options={"post_grad_custom_post_pass": ReadsConfig()})
    # On CPU, reduce-overhead just runs without CUDA graphs.
    torch.testing.assert_close(compiled(x), (x * 0.5).sin())
    assert fxfuse.match_table() == {"p": {"TimesThree": 1}}
    assert seen == implied
    assert not config.max_autotune and not config.triton.cudagraphs  # global config untouched


def test_mode_options_merge_with_the_pass_and_explicit_options_win(monkeypatch):
    got = {}
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: got.update(kwargs))
    p = fxfuse.FusionPass("p", [TimesThree(2.0)])
    fxfuse.compile(f, passes=[p], mode="max-autotune", options={"coordinate_descent_tuning": False}, dynamic=True)
    options = got.pop("options")
    manager = options.pop("post_grad_custom_post_pass")
    assert isinstance(manager, fxfuse.PassManager) and manager.passes == [p]
    assert options.pop("joint_custom_pre_pass") is manager.pre_stage  # the pre stage, installed with it
    assert options == {"max_autotune": True, "triton.cudagraphs": True, "coordinate_descent_tuning": False}
    assert "mode" not in got and got["dynamic"] is True
    assert fxfuse.inductor_options([p], mode="reduce-overhead")["triton.cudagraphs"] is True


def test_modes_that_cannot_run_the_passes_are_errors():
    with pytest.raises(ValueError, match="unknown torch.compile mode 'fastest'; known modes: .*reduce-overhead"):
        fxfuse.compile(f, passes=[], mode="fastest")
    with pytest.raises(ValueError, match="options turns Inductor's post-grad passes off"):
        fxfuse.compile(f, passes=[], options={"use_post_grad_passes": False})
    if "lite" in torch._inductor.list_mode_options():  # torch >= 2.13: a mode without post-grad passes
        with pytest.raises(ValueError, match="mode='lite' turns Inductor's post-grad passes off"):
            fxfuse.compile(f, passes=[], mode="lite")


@pytest.mark.gpu
def test_reduce_overhead_cuda_graphs_fuse_the_reference_model():
    """CUDA graphs (mode="reduce-overhead") with the passes: the expected fusions, and the
    same tokens as an unfused CUDA-graph compile.

    The model reads its batch layout and KV caches from the forward context, outside the
    graph, so every call here runs inside one context (the same tensors a replay reads);
    the calls warm up, record and replay the graph.
    """
    from torch._dynamo.utils import counters

    from fxfuse.cli import expected_matches
    from fxfuse.models import LlamaForCausalLM, ModelConfig, ModelRunner, random_prompts

    model = LlamaForCausalLM(ModelConfig.preset("tiny", num_layers=2), device="cuda", attention_backend="triton")
    prompts = random_prompts(model.config, lengths=[7, 5, 3], seed=11)
    variants = {
        "unfused": torch.compile(model, mode="reduce-overhead", fullgraph=True),
        "fused": fxfuse.compile(model, passes=fxfuse.PassManager(fxfuse.default_passes()),
                                mode="reduce-overhead", fullgraph=True),
    }
    logits = {}
    try:
        for name, fwd in variants.items():
            torch._dynamo.reset()
            fxfuse.reset_match_table()
            skips = counters["inductor"]["cudagraph_skips"]
            runs = []
            with torch.no_grad(), ModelRunner(model).prefill_context(prompts) as (ids, pos):
                for _ in range(3):  # warm-up, record, replay
                    torch.compiler.cudagraph_mark_step_begin()
                    runs.append(fwd(ids, pos).clone())
            assert counters["inductor"]["cudagraph_skips"] == skips, f"{name}: CUDA graphs were skipped"
            for again in runs[1:]:
                torch.testing.assert_close(again, runs[0], rtol=0, atol=0)
            logits[name] = runs[-1]
            if name == "fused":
                table = fxfuse.match_table()
                got = {p: sum(table.get(p, {}).values()) for p in expected_matches(model)}
                assert got == expected_matches(model) == {"rms_quant_fusion": 4, "act_quant_fusion": 2,
                                                          "attn_quant_fusion": 2, "qk_norm_rope_fusion": 0,
                                                          "rope_kv_cache_fusion": 2}
        assert torch.equal(logits["fused"].argmax(-1), logits["unfused"].argmax(-1))
    finally:
        model.close()
