"""State read outside the graph is in the cache key: a graph compiled under one state is
never served from Inductor's FX graph cache under another (DESIGN §10)."""

import pytest
import torch

import fxfuse
from fxfuse.models import LlamaForCausalLM, ModelConfig, random_prompts, run

pytestmark = pytest.mark.compile


FLAGS = {"on": True}


class TimesThreeIfOn(fxfuse.Rewrite):
    """x * 3 -> x * 4 (deliberately different, so a stale graph shows) while FLAGS["on"]."""

    def pattern(self, x):
        return x * 3

    def replacement(self, x):
        return x * 4

    def example_inputs(self):
        return [fxfuse.TensorSpec((4, 4))]

    def check(self, match):
        return FLAGS["on"]

    def cache_state(self):
        return FLAGS["on"]


class StateNotInKey(TimesThreeIfOn):
    """The counterexample: the same check, its state left out of the key."""

    def cache_state(self):
        return None


def f(x):
    return (x * 3).sin()


def _compile_and_run(rewrite, x):
    torch._dynamo.reset()  # as a new process would: only the on-disk cache remains
    return fxfuse.compile(f, passes=[fxfuse.FusionPass("p", [rewrite])])(x)


@pytest.mark.parametrize("cls, stale", [(TimesThreeIfOn, False), (StateNotInKey, True)], ids=["in-key", "not-in-key"])
def test_state_change_recompiles_only_when_in_the_key(fresh_inductor_cache, monkeypatch, cls, stale):
    x = torch.randn(4, 4)
    monkeypatch.setitem(FLAGS, "on", True)
    torch.testing.assert_close(_compile_and_run(cls(), x), (x * 4).sin())
    monkeypatch.setitem(FLAGS, "on", False)
    expected = (x * 4).sin() if stale else (x * 3).sin()
    torch.testing.assert_close(_compile_and_run(cls(), x), expected)


def _demo_run(backend):
    """One `fxfuse demo` variant: the tiny model on ``backend``, compiled with the default passes."""
    model = LlamaForCausalLM(ModelConfig.preset("tiny", num_layers=1), attention_backend=backend)
    try:
        prompts = random_prompts(model.config, lengths=[5, 3], seed=0)
        torch._dynamo.reset()
        fxfuse.reset_match_table()
        compiled = fxfuse.compile(model, passes=fxfuse.default_passes(), fullgraph=True)
        result = run(model, compiled, prompts, max_new_tokens=2)
        eager = run(model, None, prompts, max_new_tokens=2)
        return fxfuse.match_table().get("attn_quant_fusion", {}), result, eager
    finally:
        model.close()


def test_attention_backend_switch_in_one_cache_is_not_served_stale(fresh_inductor_cache):
    # The reproduction: `fxfuse demo`, then `--attention-backend native-noquant` in
    # the same cache. Before cache_state the second run crashed (the cached graph asks a
    # backend without fused output quant for it); in the other order it silently lost the fusion.
    fused, result, eager = _demo_run("native")
    assert fused == {"AttentionStaticFp8Quant": 1}
    assert torch.equal(result.tokens, eager.tokens)

    unfused, result, eager = _demo_run("native-noquant")
    assert unfused == {}
    assert torch.equal(result.tokens, eager.tokens)

    fused_again, _, _ = _demo_run("native")
    assert fused_again == {"AttentionStaticFp8Quant": 1}
