"""The Qwen3 and Gemma 3 families of the reference model: presets, configuration, the graph
each family produces, its math against an independent fp32 reference, quantization error,
the KV-cache path, and the fusion passes on its traced graph (expected counts and near
misses, logits bit for bit). Eager and traced only; the compiled models run in
tests/test_cli.py (the demo of each family)."""

import copy
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import fxfuse
from conftest import trace_graph
from fxfuse.cli import expected_matches, expected_misses
from fxfuse.models import (
    FAMILIES,
    PRESETS,
    DecoderForCausalLM,
    Gemma3ForCausalLM,
    LlamaForCausalLM,
    ModelConfig,
    ModelRunner,
    Qwen3ForCausalLM,
    build_model,
    model_class,
    pack_prompts,
    random_prompts,
)

fx = torch.ops.fxfuse
FAMILY_TINY = {"qwen3": "qwen3-tiny", "gemma3": "gemma3-tiny"}
PROMPT_LENS = [12, 7, 10]


@pytest.fixture(scope="module", params=["qwen3", "gemma3"])
def model(request):
    m = build_model(ModelConfig.preset(FAMILY_TINY[request.param]))
    yield m
    m.close()


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(PRESETS["qwen3-tiny"], lengths=PROMPT_LENS, seed=7)


def _logits(model, prompts, block_size=4):
    return ModelRunner(model, block_size=block_size).logits(prompts)


def _reference(model, prompts):
    ids, pos, _ = pack_prompts(prompts)
    return model.forward_reference(ids, pos)


def _rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------- presets, config


def test_presets_have_the_real_models_shapes():
    q = PRESETS["qwen3-8b"]
    assert (q.family, q.num_layers, q.hidden_size, q.num_heads, q.num_kv_heads, q.head_dim) == (
        "qwen3", 36, 4096, 32, 8, 128)
    assert (q.intermediate_size, q.vocab_size, q.rms_eps, q.rope_theta) == (12288, 151936, 1e-6, 1e6)
    g = PRESETS["gemma3-12b"]
    assert (g.family, g.num_layers, g.hidden_size, g.num_heads, g.num_kv_heads, g.head_dim) == (
        "gemma3", 48, 3840, 16, 8, 256)
    assert (g.intermediate_size, g.vocab_size, g.rms_eps, g.rope_theta) == (15360, 262208, 1e-6, 1e6)
    assert g.q_size == 4096 != g.hidden_size
    for name in ("qwen3-tiny", "gemma3-tiny"):
        tiny = PRESETS[name]
        assert tiny.num_layers == 2 and tiny.hidden_size == 64 and tiny.vocab_size == 256
    assert PRESETS["gemma3-tiny"].q_size != PRESETS["gemma3-tiny"].hidden_size  # as in every Gemma 3


def test_families_are_compositions():
    assert [f.qk_norm for f in FAMILIES.values()] == [False, True, True]
    gemma = FAMILIES["gemma3"]
    assert (gemma.norm, gemma.activation, gemma.sandwich_norms, gemma.scale_embeddings) == (
        "gemma", "gelu_tanh", True, True)
    assert FAMILIES["qwen3"].norm == "rms" and FAMILIES["qwen3"].activation == "silu"
    assert ModelConfig.preset("tiny").family == "llama"  # the default


@pytest.mark.parametrize("overrides, message", [
    ({"family": "mistral"}, r"ModelConfig.family must be one of \['gemma3', 'llama', 'qwen3'\]"),
    ({"tp_size": 2}, r"ModelConfig.tp_size must be 1 for the gemma3 family"),
    ({"max_position": 0}, r"ModelConfig.max_position must be positive"),
    ({"quant": "fp8-block", "head_dim": 24}, r"ModelConfig.num_heads \* head_dim \(96\) must be a multiple of"),
])
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.preset("gemma3-tiny", **overrides)


def test_q_width_may_differ_from_hidden_except_in_llama():
    assert ModelConfig.preset("qwen3-tiny", head_dim=32).q_size == 128
    with pytest.raises(ValueError, match="ModelConfig.hidden_size .* in the llama family"):
        ModelConfig.preset("tiny", head_dim=32)


def test_each_family_has_its_class():
    assert model_class("llama") is LlamaForCausalLM and model_class("qwen3") is Qwen3ForCausalLM
    assert model_class("gemma3") is Gemma3ForCausalLM
    assert all(issubclass(c, DecoderForCausalLM) for c in (LlamaForCausalLM, Qwen3ForCausalLM, Gemma3ForCausalLM))
    with pytest.raises(ValueError, match=r"LlamaForCausalLM builds the 'llama' family, .* of family 'qwen3': "
                                         r"use Qwen3ForCausalLM or fxfuse.models.build_model"):
        LlamaForCausalLM(ModelConfig.preset("qwen3-tiny"))


def test_buffers_of_each_family(model):
    c = model.config
    layer = model.layers[0]
    assert layer.q_norm_weight.shape == layer.k_norm_weight.shape == (c.head_dim,)
    assert model.cos_sin_cache.shape == (c.max_position, c.head_dim) and model.cos_sin_cache.dtype == torch.float32
    if c.family == "gemma3":
        # Gemma's norm weights: fp32 offsets from 1.
        for name in ("input_norm_weight", "post_attention_norm_weight", "pre_feedforward_norm_weight",
                     "post_feedforward_norm_weight", "q_norm_weight"):
            w = getattr(layer, name)
            assert w.dtype == torch.float32 and w.abs().mean() < 0.2, name
        assert model.final_norm_weight.dtype == torch.float32
    else:
        assert layer.q_norm_weight.dtype == c.dtype and (layer.q_norm_weight.float() - 1).abs().mean() < 0.2
        assert not hasattr(layer, "pre_feedforward_norm_weight")
    assert list(model.linears()) == [f"layers.{i}.{p}" for i in range(2)
                                     for p in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")]


# --------------------------------------------------------------------------- the graph


def _trace(model, prompts):
    with torch.no_grad(), ModelRunner(model, block_size=8).prefill_context(prompts) as (ids, pos):
        return trace_graph(model, ids, pos)


def test_graph_holds_each_familys_chains(model, prompts):
    gm = _trace(model, prompts)
    ops = Counter(n.target for n in gm.graph.nodes if n.op == "call_function")
    n = model.config.num_layers
    assert ops[fx.rotary_embedding.default] == n
    assert ops[torch.ops.aten.clone.default] == 3 * n  # the q, k and v slices made contiguous
    if model.config.family == "qwen3":
        # Layer 0's input norm, and q's and k's per layer.
        assert ops[fx.rms_norm.default] == 1 + 2 * n and ops[fx.fused_add_rms_norm.default] == 2 * n
        assert ops[fx.silu_and_mul.default] == n
    else:
        # Layer 0's input norm, per layer q, k and the two sandwich norms; the others add.
        assert ops[fx.gemma_rms_norm.default] == 1 + 4 * n and ops[fx.fused_add_gemma_rms_norm.default] == 2 * n
        assert ops[fx.rms_norm.default] == ops[fx.silu_and_mul.default] == 0
        assert ops[torch.ops.aten.tanh.default] == n  # GeGLU's gelu_tanh, decomposed
    assert ops[fx.static_scaled_fp8_quant.default] == 4 * n


@pytest.mark.parametrize("quant", ["fp8", "nvfp4", "fp8-block"])
@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_default_passes_match_what_the_demo_expects_and_keep_the_logits(family, quant, prompts):
    """The whole pipeline on the traced prefill graph: the counts and near misses `fxfuse demo`
    asserts, and logits bit for bit the unfused graph's (and the model's)."""
    model = build_model(ModelConfig.preset(FAMILY_TINY[family], quant=quant))
    try:
        passes = fxfuse.default_passes()
        unfused = _trace(model, prompts)
        fused = copy.deepcopy(unfused)
        fxfuse.reset_match_table()
        for p in passes:
            p(fused.graph)
        fused.graph.eliminate_dead_code()
        fused.recompile()
        got = {name: sum(fxfuse.match_table().get(name, {}).values()) for name in expected_matches(model)}
        assert got == expected_matches(model)
        assert fxfuse.miss_table() == expected_misses(model, passes)
        assert got["qk_norm_rope_fusion"] == 2 and got["rope_kv_cache_fusion"] == 0
        ops = {n.target for n in fused.graph.nodes if n.op == "call_function"}
        assert fx.rotary_embedding.default not in ops and torch.ops.aten.clone.default in ops  # v's copy only

        def run(gm):
            with torch.no_grad(), ModelRunner(model, block_size=8).prefill_context(prompts) as (ids, pos):
                return gm(ids, pos)

        assert torch.equal(run(fused), run(unfused))
        assert torch.equal(run(unfused), _logits(model, prompts, block_size=8))
    finally:
        model.close()


# --------------------------------------------------------------------------- numerics


def _independent_reference(model, prompts):
    """The family's math in fp32, written without the model's code, one sequence at a time:
    complex-number RoPE, explicit masked softmax, repeated KV heads, dequantized weights;
    per-head q/k norm, and for Gemma its (1 + w) norms, sandwich norms, GeGLU and scaled
    embeddings."""
    c = model.config
    hd = c.head_dim
    group = c.num_heads // c.num_kv_heads
    gemma = c.family == "gemma3"

    def norm(x, w):
        scale = 1.0 + w.float() if gemma else w.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_eps) * scale

    def rope(x):  # x: [seq, heads, hd]; pairs (i, i + hd/2) rotate by pos * theta^(-2i/hd)
        seq = x.shape[0]
        inv = c.rope_theta ** (-torch.arange(hd // 2, dtype=torch.float64) * 2 / hd)
        angle = torch.arange(seq, dtype=torch.float64)[:, None] * inv[None]
        rot = torch.polar(torch.ones_like(angle), angle).to(torch.complex64)[:, None, :]
        z = torch.complex(x[..., : hd // 2], x[..., hd // 2:]) * rot
        return torch.cat([z.real, z.imag], dim=-1)

    outs = []
    for prompt in prompts:
        seq = len(prompt)
        x = model.embed_tokens.float()[torch.tensor(prompt)]
        if gemma:
            x = x * math.sqrt(c.hidden_size)
        mask = torch.ones(seq, seq, dtype=torch.bool).tril()
        for layer in model.layers:
            h = norm(x, layer.input_norm_weight)
            q, k, v = (h @ layer.qkv_proj.dequantized_weight().t()).split([c.q_size, c.kv_size, c.kv_size], -1)
            q = norm(q.reshape(seq, c.num_heads, hd), layer.q_norm_weight)
            k = norm(k.reshape(seq, c.num_kv_heads, hd), layer.k_norm_weight)
            q = rope(q).transpose(0, 1)
            k = rope(k).transpose(0, 1).repeat_interleave(group, dim=0)
            v = v.reshape(seq, c.num_kv_heads, hd).transpose(0, 1).repeat_interleave(group, dim=0)
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
            attn = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
            a = attn.transpose(0, 1).reshape(seq, c.q_size) @ layer.o_proj.dequantized_weight().t()
            if gemma:
                x = x + norm(a, layer.post_attention_norm_weight)
                h = norm(x, layer.pre_feedforward_norm_weight)
            else:
                x = x + a
                h = norm(x, layer.post_attention_norm_weight)
            gate, up = (h @ layer.gate_up_proj.dequantized_weight().t()).chunk(2, dim=-1)
            act = F.gelu(gate, approximate="tanh") if gemma else F.silu(gate)
            m = (act * up) @ layer.down_proj.dequantized_weight().t()
            x = x + (norm(m, layer.post_feedforward_norm_weight) if gemma else m)
        outs.append(norm(x, model.final_norm_weight) @ model.lm_head_weight.float().t())
    return torch.cat(outs)


def test_reference_forward_matches_independent_math(model, prompts):
    # Only bf16 roundings separate the two (measured 0.004-0.005).
    assert _rel_err(_reference(model, prompts), _independent_reference(model, prompts)) < 0.02


# Relative Frobenius error of the quantized prefill logits against the unquantized reference
# forward, tiny presets, 2-3 layers, seeds 0-3, prompts [12, 7, 10]. Qwen3 measured as Llama
# (FP8 0.026-0.038, NVFP4 0.054-0.064). Gemma 3 measured FP8 0.060-0.085, NVFP4 0.135-0.167:
# its sandwich norms scale every layer's write to unit RMS, where Llama's residual-writing
# projections are shrunk, so each write's quantization noise weighs more.
REL_TOL = {("qwen3", "fp8"): 0.06, ("qwen3", "nvfp4"): 0.09, ("gemma3", "fp8"): 0.12, ("gemma3", "nvfp4"): 0.22}


@pytest.mark.parametrize("quant", ["fp8", "nvfp4"])
@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_quantized_close_to_unquantized(family, quant, prompts):
    m = build_model(ModelConfig.preset(FAMILY_TINY[family], quant=quant))
    try:
        logits, ref = _logits(m, prompts), _reference(m, prompts)
        assert _rel_err(logits, ref) < REL_TOL[family, quant]
        assert (logits.float().argmax(-1) == ref.float().argmax(-1)).float().mean().item() > 0.6
    finally:
        m.close()


@pytest.mark.parametrize("quant", ["fp8", "nvfp4"])
def test_gemma_bound_catches_a_clipping_scale_and_its_norms_absorb_a_weight_scale(quant, prompts):
    """A 16x too small input scale clips the gate/up input (measured 0.39-0.42, far past the
    bound). A doubled down-projection weight scale changes nothing: the post-feedforward
    norm divides it out, as Gemma's math says (so the bound cannot, and need not, see it)."""
    m = build_model(ModelConfig.preset("gemma3-tiny", quant=quant))
    try:
        ref = _reference(m, prompts)
        before = _logits(m, prompts)
        if quant == "fp8":
            m.linears()["layers.1.down_proj"].weight_scale.mul_(2.0)
            assert _rel_err(_logits(m, prompts), before) < 0.01
        m.linears()["layers.1.gate_up_proj"].input_scale.mul_(1 / 16)  # FP8 in both schemes
        assert _rel_err(_logits(m, prompts), ref) > REL_TOL["gemma3", quant]
    finally:
        m.close()


def test_a_wrong_q_norm_weight_is_seen(prompts):
    """The q/k norm is on the quantized path: a doubled q-norm weight moves the logits past
    the quantization bound (so the bound would catch a norm the model dropped or misapplied)."""
    m = build_model(ModelConfig.preset("qwen3-tiny"))
    try:
        ref = _reference(m, prompts)
        assert _rel_err(_logits(m, prompts), ref) < 0.06
        m.layers[1].q_norm_weight.mul_(2.0)
        assert _rel_err(_logits(m, prompts), ref) > 0.06
    finally:
        m.close()


def test_the_kv_cache_path_equals_recompute(model, prompts):
    """The last decode step's logits (keys rotated and normalized once, read back from the
    cache) against the same positions computed by a fresh prefill of the whole sequences."""
    seen = []

    def forward(ids, pos):
        out = model(ids, pos)
        seen.append(out)
        return out

    tokens = ModelRunner(model, forward, block_size=4).generate(prompts, 4)
    assert len({t for seq in tokens for t in seq}) > 4  # not a degenerate continuation
    seqs = [p + t[:-1] for p, t in zip(prompts, tokens)]
    full = ModelRunner(model).logits(seqs)
    ends = torch.tensor([len(s) for s in seqs]).cumsum(0) - 1
    # Attention over another number of keys sums in another order: bf16 steps apart, no more.
    torch.testing.assert_close(seen[-1].float(), full[ends].float(), atol=0.05, rtol=0.02)


def test_same_seed_same_model(model, prompts):
    again = build_model(model.config)
    try:
        assert torch.equal(_logits(model, prompts), _logits(again, prompts))
    finally:
        again.close()


# --------------------------------------------------------------------------- on the GPU


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["llama3-8b", "qwen3-8b", "gemma3-12b"])
def test_real_shapes_on_the_triton_backend_fuse_and_keep_the_tokens(preset):
    """Two layers at each family's real shapes, on CUDA with the triton backend and the
    kernels: the expected fusions and near misses, the same greedy tokens fused and unfused,
    and prefill logits within bf16 noise of eager (the fused q/k-norm kernel sums squares in
    another order than the norm kernel: an ulp of rstd on rare elements, so not bit for bit)."""
    from fxfuse.models import run

    model = build_model(ModelConfig.preset(preset, num_layers=2), device="cuda", attention_backend="triton")
    try:
        prompts = random_prompts(model.config, lengths=[37, 5, 130], seed=3)
        eager = run(model, None, prompts, 6)
        torch._dynamo.reset()
        unfused = run(model, torch.compile(model, fullgraph=True), prompts, 6)
        torch._dynamo.reset()
        fxfuse.reset_match_table()
        passes = fxfuse.default_passes()
        fused = run(model, fxfuse.compile(model, passes=fxfuse.PassManager(passes), fullgraph=True), prompts, 6)
        table = fxfuse.match_table()
        want = expected_matches(model)
        assert {name: sum(table.get(name, {}).values()) for name in want} == want
        assert fxfuse.miss_table() == expected_misses(model, passes)
        assert torch.equal(fused.tokens, unfused.tokens)
        assert _rel_err(fused.logits, eager.logits) < 0.01 and _rel_err(unfused.logits, eager.logits) < 0.01
    finally:
        model.close()
