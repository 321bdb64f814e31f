"""The reference Llama model: determinism, shapes, attention layers, graph contract, accuracy, config.

Eager only (no torch.compile): compiled runs are tested elsewhere. The runner (KV cache,
batching, generation) is tested in test_runner.py.
"""

import gc
import math
import operator
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from fxfuse.attention import (
    AttentionMetadata,
    ForwardContext,
    KVCache,
    NoForwardContextError,
    UnknownLayerError,
    get_layer,
    registered_layer_names,
    set_forward_context,
)
from fxfuse.models import (
    PRESETS,
    LlamaForCausalLM,
    ModelConfig,
    ModelRunner,
    Nvfp4Linear,
    pack_prompts,
    random_prompts,
)

fx = torch.ops.fxfuse

# Relative Frobenius error of the quantized prefill logits against the unquantized
# reference forward, tiny preset, 2-3 layers, seeds 0-3, prompts [12, 7, 10]:
# FP8 measured 0.028-0.038; doubling one weight scale (a real scale bug) gives 0.24.
# NVFP4 (o_proj/down_proj inputs and weights NVFP4) measured 0.057-0.067; doubling one
# NVFP4 weight gives 0.24, a 16x too large global scale (block scales saturate) 0.19-0.30.
FP8_REL_TOL = 0.06
NVFP4_REL_TOL = 0.09
# Fraction of positions whose top token matches the reference (measured >= 0.90 FP8, >= 0.83 NVFP4).
MIN_TOP1_AGREEMENT = {"fp8": 0.8, "nvfp4": 0.75}
REL_TOL = {"fp8": FP8_REL_TOL, "nvfp4": NVFP4_REL_TOL}

PROMPT_LENS = [12, 7, 10]


@pytest.fixture(scope="module")
def tiny():
    model = LlamaForCausalLM(ModelConfig.preset("tiny"))
    yield model
    model.close()


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(PRESETS["tiny"], lengths=PROMPT_LENS, seed=7)


def _logits(model, prompts, block_size=4):
    return ModelRunner(model, block_size=block_size).logits(prompts)


def _reference(model, prompts):
    ids, pos, _ = pack_prompts(prompts)
    return model.forward_reference(ids, pos)


def _rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def _buffer_bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


# --------------------------------------------------------------------------- determinism, shapes


# First in the file, before the module fixture builds a model.
def test_first_model_uses_plain_names():
    gc.collect()
    if any(n.startswith("model.") for n in registered_layer_names()):
        pytest.skip("another live model in this process holds the 'model' prefix")
    model = LlamaForCausalLM(ModelConfig.preset("tiny"))
    try:
        assert model.attention_layer_names == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    finally:
        model.close()


def test_same_seed_same_logits(tiny, prompts):
    again = LlamaForCausalLM(ModelConfig.preset("tiny"))
    try:
        assert torch.equal(_logits(tiny, prompts), _logits(again, prompts))
        for (name, a), (_, b) in zip(tiny.named_buffers(), again.named_buffers()):
            assert torch.equal(_buffer_bits(a), _buffer_bits(b)), name
    finally:
        again.close()


def test_different_seed_different_logits(tiny, prompts):
    other = LlamaForCausalLM(ModelConfig.preset("tiny", seed=1))
    try:
        assert not torch.allclose(_logits(tiny, prompts).float(), _logits(other, prompts).float())
    finally:
        other.close()


def test_output_shape_dtype_finite(tiny, prompts):
    logits = _logits(tiny, prompts)
    assert logits.shape == (sum(PROMPT_LENS), 256)
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits.float()).all()
    # Unit-scale logits: neither vanishing nor exploding.
    assert 0.1 < logits.float().std().item() < 10.0


def test_no_parameters_nothing_requires_grad(tiny):
    assert list(tiny.parameters()) == []
    assert all(not b.requires_grad for b in tiny.buffers())
    lin = tiny.linears()["layers.0.qkv_proj"]
    assert lin.weight_q.dtype == torch.float8_e4m3fn
    assert lin.weight_scale.dtype == lin.input_scale.dtype == torch.float32
    assert lin.weight_scale.shape == lin.input_scale.shape == (1,)


def test_nvfp4_linears():
    model = LlamaForCausalLM(ModelConfig.preset("tiny", quant="nvfp4"))
    try:
        kinds = {name.split(".")[-1]: type(m).__name__ for name, m in model.linears().items()}
        assert kinds == {"qkv_proj": "Fp8Linear", "o_proj": "Nvfp4Linear",
                         "gate_up_proj": "Fp8Linear", "down_proj": "Nvfp4Linear"}
        lin = model.linears()["layers.0.down_proj"]
        assert isinstance(lin, Nvfp4Linear)
        c = model.config
        assert lin.weight_q.dtype == torch.uint8 and lin.weight_q.shape == (c.hidden_size, c.intermediate_size // 2)
        assert lin.weight_block_scales.dtype == torch.float8_e4m3fn
        assert lin.input_global_scale.dtype == torch.float32 and lin.input_global_scale.shape == (1,)
        # The stored fp32 weight is exactly the NVFP4 weight's dequantization.
        from fxfuse.ops.nvfp4 import nvfp4_dequantize

        w = nvfp4_dequantize(lin.weight_q, lin.weight_block_scales, lin.weight_global_scale,
                             lin.weight_dequant.shape, torch.float32)
        assert torch.equal(w, lin.dequantized_weight())
    finally:
        model.close()


# --------------------------------------------------------------------------- attention layers


def _expected_prefix():
    """The documented rule: the first of model, model_1, ... that no registered layer uses."""
    names = registered_layer_names()
    k = 0
    while True:
        prefix = "model" if k == 0 else f"model_{k}"
        if not any(n.startswith(prefix + ".") for n in names):
            return prefix
        k += 1


def test_layer_names_registration_and_release():
    gc.collect()
    cfg = ModelConfig.preset("tiny", num_layers=3)
    expected = _expected_prefix()
    a = LlamaForCausalLM(cfg)
    assert a.layer_prefix == expected
    assert a.attention_layer_names == [f"{expected}.layers.{i}.self_attn" for i in range(3)]
    for name in a.attention_layer_names:
        layer = get_layer(name)
        assert (layer.num_heads, layer.num_kv_heads, layer.head_size) == (4, 2, 16)
        assert layer.backend.name == "native"
    # A second live model gets other names; the two never share a layer.
    b = LlamaForCausalLM(cfg, attention_backend="native-noquant")
    assert b.layer_prefix != a.layer_prefix
    assert not set(a.attention_layer_names) & set(b.attention_layer_names)
    assert get_layer(b.attention_layer_names[0]).backend.name == "native-noquant"
    assert get_layer(a.attention_layer_names[0]).backend.name == "native"
    # close() unregisters and frees the prefix, which the next model reuses.
    b_names, b_prefix = b.attention_layer_names, b.layer_prefix
    b.close()
    b.close()  # idempotent
    assert b.closed
    assert not set(b_names) & set(registered_layer_names())
    c = LlamaForCausalLM(cfg)
    assert c.layer_prefix == b_prefix
    # Garbage collection releases the layers too.
    c_names = c.attention_layer_names
    del c
    gc.collect()
    assert not set(c_names) & set(registered_layer_names())
    assert set(a.attention_layer_names) <= set(registered_layer_names())
    a.close()


def test_explicit_layer_prefix():
    model = LlamaForCausalLM(ModelConfig.preset("tiny"), layer_prefix="draft")
    try:
        assert model.attention_layer_names == ["draft.layers.0.self_attn", "draft.layers.1.self_attn"]
        with pytest.raises(ValueError, match="draft.*in use"):
            LlamaForCausalLM(ModelConfig.preset("tiny"), layer_prefix="draft")
    finally:
        model.close()


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown attention backend 'nope'.*native"):
        LlamaForCausalLM(ModelConfig.preset("tiny"), attention_backend="nope")


def test_forward_without_context_errors(tiny, prompts):
    ids, pos, _ = pack_prompts(prompts)
    with pytest.raises(NoForwardContextError, match="no forward context is set"):
        tiny(ids, pos)


def test_forward_after_close_errors(prompts):
    model = LlamaForCausalLM(ModelConfig.preset("tiny"))
    runner = ModelRunner(model)
    name = model.attention_layer_names[0]
    model.close()
    with pytest.raises(UnknownLayerError, match=f"no attention layer named '{name}'"):
        runner.logits(prompts)


def test_forward_input_validation(tiny):
    with pytest.raises(ValueError, match="flat"):
        tiny(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="one entry per token"):
        tiny(torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="whole sequences"):
        tiny.forward_reference(torch.zeros(3, dtype=torch.long), torch.tensor([0, 2, 3]))


# --------------------------------------------------------------------------- graph contract

_PASS_THROUGH = {
    torch.ops.aten.view.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.reshape.default,
}
_NORMS = {fx.rms_norm.default, fx.fused_add_rms_norm.default}
_QUANTS = {fx.static_scaled_fp8_quant.default: "fp8", fx.nvfp4_quant.default: "nvfp4"}


def _quant_producer(node):
    """What a quant's input comes from: 'norm', 'silu_and_mul', 'attention' or the op's name.

    'attention' means: a reshape/view (at least one) of a buffer that an
    ``fxfuse.attention`` call writes as its output (argument 3).
    """
    src = node.args[0]
    views = 0
    while src.target in _PASS_THROUGH:
        src = src.args[0]
        views += 1
    if src.target is operator.getitem:
        parent, index = src.args
        if parent.target is fx.fused_add_rms_norm.default:
            # Output 0 is the normalized value; output 1 is the residual sum.
            return "norm" if index == 0 else "residual"
        return str(parent.target)
    if src.target in _NORMS:
        return "norm"
    if src.target is fx.silu_and_mul.default:
        return "silu_and_mul"
    writers = [u for u in src.users if u.target is fx.attention.default and u.args[3] is src]
    if writers and views:
        return "attention"
    return str(src.target)


def _trace(model, prompts):
    """make_fx of the model's forward on ``prompts`` (one prefill), under a forward context."""
    c = model.config
    ids, pos, lens = pack_prompts(prompts)
    block_size = 8
    blocks, table = 0, []
    for n in lens:
        k = -(-n // block_size)
        table.append(list(range(blocks, blocks + k)))
        blocks += k
    meta = AttentionMetadata.from_lens(lens, lens, table, block_size)
    caches = {
        name: KVCache.allocate(blocks, block_size, c.num_kv_heads, c.head_dim, c.dtype)
        for name in model.attention_layer_names
    }
    with torch.no_grad(), set_forward_context(ForwardContext(meta, caches)):
        return make_fx(model)(ids, pos)


@pytest.mark.parametrize("quant", ["fp8", "nvfp4"])
@pytest.mark.parametrize("num_layers", [2, 3])
def test_quant_sites_per_layer(num_layers, quant):
    model = LlamaForCausalLM(ModelConfig.preset("tiny", num_layers=num_layers, quant=quant))
    try:
        gm = _trace(model, random_prompts(model.config, lengths=[6, 3], seed=0))
        calls = [n for n in gm.graph.nodes if n.op == "call_function"]
        sites = Counter((_QUANTS[n.target], _quant_producer(n)) for n in calls if n.target in _QUANTS)
        n = num_layers
        if quant == "fp8":
            assert sites == {("fp8", "norm"): 2 * n, ("fp8", "silu_and_mul"): n, ("fp8", "attention"): n}
        else:
            assert sites == {("fp8", "norm"): 2 * n, ("nvfp4", "silu_and_mul"): n, ("nvfp4", "attention"): n}
        targets = Counter(node.target for node in calls)
        assert targets[fx.rms_norm.default] == 1
        # Two per layer except layer 0's input norm, plus the final norm.
        assert targets[fx.fused_add_rms_norm.default] == 2 * n
        assert targets[fx.silu_and_mul.default] == n
        assert targets[fx.fp8_linear.default] == (4 if quant == "fp8" else 2) * n
        for other in (fx.dynamic_per_token_fp8_quant, fx.silu_and_mul_nvfp4_quant, fx.silu_and_mul_static_fp8_quant,
                      fx.rms_norm_static_fp8_quant, fx.fused_add_rms_norm_static_fp8_quant):
            assert targets[other.default] == 0
        # One attention per layer, writing the model dtype (no fused output quant yet), in layer order.
        attn = [node for node in calls if node.target is fx.attention.default]
        assert [a.args[4] for a in attn] == model.attention_layer_names
        assert all(len(a.args) == 5 for a in attn)
        # Every FP8 quant feeds exactly one fp8_linear; every NVFP4 quant's outputs are both used.
        for q in calls:
            if q.target is fx.static_scaled_fp8_quant.default:
                assert [u.target for u in q.users] == [fx.fp8_linear.default]
            elif q.target is fx.nvfp4_quant.default:
                assert sorted(u.args[1] for u in q.users if u.target is operator.getitem) == [0, 1]
        # The final norm's output goes to the LM head, not to a quant.
        final_norm = [node for node in calls if node.target is fx.fused_add_rms_norm.default][-1]
        assert all(u.target is operator.getitem for u in final_norm.users)
        normed = [u for u in final_norm.users if u.args[1] == 0]
        assert not any(v.target in _QUANTS for u in normed for v in u.users)
    finally:
        model.close()


# --------------------------------------------------------------------------- numerics


def _independent_reference(model, prompts):
    """The model's math in fp32, written without the model's code, one sequence at a time:
    complex-number RoPE, explicit masked softmax, repeated KV heads, dequantized weights."""
    c = model.config
    hd = c.head_dim
    group = c.num_heads // c.num_kv_heads

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_eps) * w.float()

    def rope(x):  # x: [seq, heads, hd]; pairs (i, i + hd/2) rotate by pos * theta^(-2i/hd)
        seq = x.shape[0]
        inv = c.rope_theta ** (-torch.arange(hd // 2, dtype=torch.float64) * 2 / hd)
        angle = torch.arange(seq, dtype=torch.float64)[:, None] * inv[None]
        rot = torch.polar(torch.ones_like(angle), angle).to(torch.complex64)[:, None, :]
        z = torch.complex(x[..., : hd // 2], x[..., hd // 2 :]) * rot
        return torch.cat([z.real, z.imag], dim=-1)

    outs = []
    for prompt in prompts:
        seq = len(prompt)
        x = model.embed_tokens.float()[torch.tensor(prompt)]
        mask = torch.ones(seq, seq, dtype=torch.bool).tril()
        for layer in model.layers:
            h = norm(x, layer.input_norm_weight)
            q, k, v = (h @ layer.qkv_proj.dequantized_weight().t()).split([c.q_size, c.kv_size, c.kv_size], -1)
            q = rope(q.reshape(seq, c.num_heads, hd)).transpose(0, 1)
            k = rope(k.reshape(seq, c.num_kv_heads, hd)).transpose(0, 1).repeat_interleave(group, dim=0)
            v = v.reshape(seq, c.num_kv_heads, hd).transpose(0, 1).repeat_interleave(group, dim=0)
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
            attn = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
            x = x + attn.transpose(0, 1).reshape(seq, c.q_size) @ layer.o_proj.dequantized_weight().t()
            h = norm(x, layer.post_attention_norm_weight)
            gate, up = (h @ layer.gate_up_proj.dequantized_weight().t()).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ layer.down_proj.dequantized_weight().t()
        outs.append(norm(x, model.final_norm_weight) @ model.lm_head_weight.float().t())
    return torch.cat(outs)


@pytest.mark.parametrize("quant", ["fp8", "nvfp4"])
def test_reference_forward_matches_independent_math(quant, prompts):
    model = LlamaForCausalLM(ModelConfig.preset("tiny", quant=quant))
    try:
        # Only bf16 roundings separate the two (measured 0.005).
        assert _rel_err(_reference(model, prompts), _independent_reference(model, prompts)) < 0.02
    finally:
        model.close()


def test_reference_query_lens(tiny, prompts):
    ids, pos, lens = pack_prompts(prompts)
    assert torch.equal(tiny.forward_reference(ids, pos, lens), tiny.forward_reference(ids, pos))
    with pytest.raises(ValueError, match="add up"):
        tiny.forward_reference(ids, pos, [1, 2])


@pytest.mark.parametrize("quant", ["fp8", "nvfp4"])
@pytest.mark.parametrize("num_layers", [2, 3])
def test_quantized_close_to_unquantized(num_layers, quant, prompts):
    model = LlamaForCausalLM(ModelConfig.preset("tiny", num_layers=num_layers, quant=quant))
    try:
        logits, ref = _logits(model, prompts), _reference(model, prompts)
        assert _rel_err(logits, ref) < REL_TOL[quant]
        # Quantization noise should rarely flip the top token.
        agree = (logits.float().argmax(-1) == ref.float().argmax(-1)).float().mean().item()
        assert agree > MIN_TOP1_AGREEMENT[quant]
    finally:
        model.close()


def test_fp8_bound_catches_wrong_scale(prompts):
    model = LlamaForCausalLM(ModelConfig.preset("tiny"))
    try:
        ref = _reference(model, prompts)
        model.linears()["layers.1.down_proj"].weight_scale.mul_(2.0)  # the FP8 path only
        assert _rel_err(_logits(model, prompts), ref) > FP8_REL_TOL
    finally:
        model.close()


@pytest.mark.parametrize(
    "site, buffer, factor",
    [
        ("layers.1.down_proj", "weight_dequant", 2.0),  # a wrong weight scale
        ("layers.0.o_proj", "input_global_scale", 16.0),  # block scales saturate at 448
        ("layers.1.down_proj", "input_global_scale", 16.0),
    ],
)
def test_nvfp4_bound_catches_wrong_scale(site, buffer, factor, prompts):
    model = LlamaForCausalLM(ModelConfig.preset("tiny", quant="nvfp4"))
    try:
        ref = _reference(model, prompts)
        assert _rel_err(_logits(model, prompts), ref) < NVFP4_REL_TOL
        getattr(model.linears()[site], buffer).mul_(factor)
        assert _rel_err(_logits(model, prompts), ref) > NVFP4_REL_TOL
    finally:
        model.close()


@pytest.mark.parametrize("quant", ["fp8", "nvfp4"])
def test_calibration_sets_amax_scales(quant, prompts):
    model = LlamaForCausalLM(ModelConfig.preset("tiny", quant=quant))
    seen = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[0].abs().amax().float()))
        for name, m in model.linears().items()
    ]
    try:
        scales = model.calibrate(prompts)
        assert list(scales) == [
            f"layers.{i}.{p}" for i in range(2) for p in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
        ]
        for name, m in model.linears().items():
            amax = seen[name].item()
            if isinstance(m, Nvfp4Linear):
                assert scales[name] == pytest.approx(448.0 * 6.0 / amax, rel=1e-6)
            else:
                assert scales[name] == pytest.approx(amax / 448.0, rel=1e-6)
        # The first site's input is the layer-0 norm output, computable directly.
        ids, _, _ = pack_prompts(prompts)
        h = fx.rms_norm(model.embed_tokens[ids], model.layers[0].input_norm_weight, model.config.rms_eps)
        assert scales["layers.0.qkv_proj"] == pytest.approx(h.abs().amax().float().item() / 448, rel=1e-6)
        assert all(s > 0 and math.isfinite(s) for s in scales.values())
        # Calibrated on these prompts, no activation of these prompts clips.
        for h_ in hooks:
            h_.remove()
        assert _rel_err(_logits(model, prompts), _reference(model, prompts)) < REL_TOL[quant]
    finally:
        for h_ in hooks:
            h_.remove()
        model.close()


# --------------------------------------------------------------------------- config


def test_presets():
    tiny, big = PRESETS["tiny"], PRESETS["llama3-8b"]
    assert (tiny.vocab_size, tiny.hidden_size, tiny.intermediate_size, tiny.num_layers) == (256, 64, 128, 2)
    assert (tiny.num_heads, tiny.num_kv_heads, tiny.head_dim) == (4, 2, 16)
    assert (big.vocab_size, big.hidden_size, big.intermediate_size, big.num_layers) == (128256, 4096, 14336, 32)
    assert (big.num_heads, big.num_kv_heads, big.head_dim) == (32, 8, 128)
    assert (tiny.rms_eps, tiny.rope_theta, tiny.dtype, tiny.seed, tiny.quant) == (
        1e-5, 500000.0, torch.bfloat16, 0, "fp8"
    )
    assert ModelConfig.preset("llama3-8b", num_layers=2, quant="nvfp4").quant == "nvfp4"


def test_preset_overrides():
    cfg = ModelConfig.preset("tiny", num_layers=3, seed=5)
    assert (cfg.num_layers, cfg.seed, cfg.hidden_size) == (3, 5, 64)
    assert PRESETS["tiny"].num_layers == 2  # the preset itself is untouched
    with pytest.raises(ValueError, match="llama3-8b.*tiny|tiny.*llama3-8b"):
        ModelConfig.preset("nope")
    with pytest.raises(TypeError, match="num_layer"):
        ModelConfig.preset("tiny", num_layer=3)
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig.preset("tiny", num_kv_heads=3)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"num_kv_heads": 3}, "num_kv_heads"),
        ({"hidden_size": 80}, "hidden_size"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"intermediate_size": -1}, "intermediate_size"),
        ({"num_layers": 0}, "num_layers"),
        ({"num_heads": 0}, "num_heads"),
        ({"head_dim": 0}, "head_dim"),
        ({"num_heads": 16, "head_dim": 4, "num_kv_heads": 4, "hidden_size": 64, "vocab_size": 2.5}, "vocab_size"),
        ({"head_dim": 15, "num_heads": 4, "hidden_size": 60}, "head_dim"),
        ({"rms_eps": 0.0}, "rms_eps"),
        ({"rope_theta": -1.0}, "rope_theta"),
        ({"dtype": torch.int32}, "dtype"),
        ({"seed": -1}, "seed"),
        ({"quant": "int8"}, "quant"),
        ({"quant": "nvfp4", "intermediate_size": 120}, "intermediate_size"),
        ({"quant": "nvfp4", "num_heads": 4, "head_dim": 6, "hidden_size": 24, "num_kv_heads": 2}, "hidden_size"),
    ],
)
def test_config_validation(overrides, field):
    kwargs = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16)
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}"):
        ModelConfig(**kwargs)


def test_config_frozen():
    with pytest.raises(Exception):
        PRESETS["tiny"].num_layers = 4  # type: ignore[misc]


# --------------------------------------------------------------------------- quant="fp8-block"

# Block-scaled FP8 (per-token-group activations, 128x128 block weights), tiny preset,
# 2-3 layers, seeds 0-3, PROMPT_LENS: relative error 0.024-0.026, top-1 agreement >= 0.90;
# doubling one weight block scale gives 0.20-0.24. Bounded as for "fp8".
FP8_BLOCK_REL_TOL = FP8_REL_TOL
FP8_BLOCK_MIN_TOP1 = MIN_TOP1_AGREEMENT["fp8"]


def _fp8_block(num_layers=2, **overrides):
    return LlamaForCausalLM(ModelConfig.preset("tiny", num_layers=num_layers, quant="fp8-block", **overrides))


def test_fp8_block_config_group_size():
    assert ModelConfig.preset("tiny", quant="fp8-block").activation_group_size == 64  # hidden 64
    assert ModelConfig.preset("llama3-8b", quant="fp8-block").activation_group_size == 128
    wide = dict(hidden_size=256, num_heads=4, head_dim=64, intermediate_size=384)
    assert ModelConfig.preset("tiny", quant="fp8-block", **wide).activation_group_size == 128
    assert ModelConfig.preset("tiny", quant="fp8-block", group_size=64, **wide).activation_group_size == 64
    assert ModelConfig.preset("tiny").activation_group_size is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"quant": "fp8-block", "group_size": 128}, r"ModelConfig\.hidden_size \(64\) must be a multiple of .* \(128\)"),
        ({"quant": "fp8-block", "group_size": 32}, r"ModelConfig\.group_size must be one of \(64, 128\)"),
        ({"quant": "fp8-block", "intermediate_size": 96}, r"ModelConfig\.intermediate_size \(96\) must be a multiple"),
        ({"quant": "fp8", "group_size": 64}, r"ModelConfig\.group_size .* leave it None for quant='fp8'"),
    ],
)
def test_fp8_block_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.preset("tiny", **overrides)


def test_fp8_block_linears():
    from fxfuse.models import BlockFp8Linear
    from fxfuse.ops.block_linear import dequantize_weight_blocks, weight_scales_shape

    model = _fp8_block()
    try:
        linears = model.linears()
        assert len(linears) == 8 and all(isinstance(m, BlockFp8Linear) for m in linears.values())
        for m in linears.values():
            assert m.group_size == 64 and m.weight_q.dtype == torch.float8_e4m3fn
            assert tuple(m.weight_scales.shape) == weight_scales_shape(m.out_features, m.in_features)
            assert torch.equal(m.dequantized_weight(), dequantize_weight_blocks(m.weight_q, m.weight_scales))
        # Nothing to calibrate: the activation scales are dynamic.
        assert model.calibrate([[1, 2, 3]]) == {}
    finally:
        model.close()


@pytest.mark.parametrize("num_layers", [2, 3])
def test_fp8_block_quant_sites_per_layer(num_layers):
    model = _fp8_block(num_layers)
    try:
        gm = _trace(model, random_prompts(model.config, lengths=[6, 3], seed=0))
        calls = [n for n in gm.graph.nodes if n.op == "call_function"]
        quants = [n for n in calls if n.target is fx.group_fp8_quant.default]
        n = num_layers
        assert Counter(_quant_producer(q) for q in quants) == {"norm": 2 * n, "silu_and_mul": n, "attention": n}
        # Group size 64 (the tiny preset's), column-major scales, each feeding one block linear.
        for q in quants:
            assert q.args[1:] == (64, True)
            (q_out, s_out) = sorted(q.users, key=lambda u: u.args[1])
            (linear,) = q_out.users
            assert linear.target is fx.block_fp8_linear.default and linear.args[:2] == (q_out, s_out)
        targets = Counter(node.target for node in calls)
        assert targets[fx.block_fp8_linear.default] == 4 * n
        for other in (fx.fp8_linear, fx.static_scaled_fp8_quant, fx.nvfp4_quant, fx.dynamic_per_token_fp8_quant):
            assert targets[other.default] == 0
    finally:
        model.close()


def test_fp8_block_fusions_match_2n_n_0_and_keep_the_logits():
    """The passes on the model's traced graph: 2n norm-quant and n act-quant fusions; the
    attention output's group quant stays unfused (no backend fuses group FP8); the fused
    graph's logits equal the unfused graph's bit for bit, so greedy tokens are identical."""
    import copy

    import fxfuse
    from conftest import trace_graph

    model = _fp8_block(3)
    try:
        prompts = random_prompts(model.config, lengths=[12, 7, 10], seed=7)

        def run(graph_module):
            with torch.no_grad(), ModelRunner(model, block_size=8).prefill_context(prompts) as (ids, pos):
                return graph_module(ids, pos)

        with torch.no_grad(), ModelRunner(model, block_size=8).prefill_context(prompts) as (ids, pos):
            unfused = trace_graph(model, ids, pos)
        fused = copy.deepcopy(unfused)
        fxfuse.reset_match_table()
        for p in fxfuse.default_passes():
            p(fused.graph)
        fused.recompile()
        table = fxfuse.match_table()
        assert table.get("rms_quant_fusion") == {"RmsNormGroupFp8Quant": 1, "FusedAddRmsNormGroupFp8Quant": 5}
        assert table.get("act_quant_fusion") == {"SiluMulGroupFp8Quant": 3}
        assert sum(table.get("attn_quant_fusion", {}).values()) == 0
        # What stays unfused: the quant of each layer's attention output (functionalized here).
        remaining = [n for n in fused.graph.nodes if n.target is fx.group_fp8_quant.default]
        assert [_quant_producer(q) for q in remaining] == ["auto_functionalized_v2"] * 3
        a, b = run(unfused), run(fused)
        assert torch.equal(a, b)
        assert torch.equal(a, _logits(model, prompts, block_size=8))  # the traced graph is the model
    finally:
        model.close()


@pytest.mark.parametrize("num_layers", [2, 3])
def test_fp8_block_close_to_unquantized(num_layers, prompts):
    model = _fp8_block(num_layers)
    try:
        logits, ref = _logits(model, prompts), _reference(model, prompts)
        assert _rel_err(logits, ref) < FP8_BLOCK_REL_TOL
        agree = (logits.float().argmax(-1) == ref.float().argmax(-1)).float().mean().item()
        assert agree > FP8_BLOCK_MIN_TOP1
    finally:
        model.close()


def test_fp8_block_reference_forward_matches_independent_math(prompts):
    model = _fp8_block()
    try:
        assert _rel_err(_reference(model, prompts), _independent_reference(model, prompts)) < 0.02
    finally:
        model.close()


def test_fp8_block_bound_catches_wrong_scale(prompts):
    model = _fp8_block()
    try:
        ref = _reference(model, prompts)
        model.linears()["layers.1.down_proj"].weight_scales.mul_(2.0)  # the quantized path only
        assert _rel_err(_logits(model, prompts), ref) > FP8_BLOCK_REL_TOL
    finally:
        model.close()


# --------------------------------------------------------------------------- tensor parallelism
# (over real process groups: tests/test_tp.py; here what one process can check)


def test_tp_config_splits_heads_kv_cache_and_mlp():
    c = ModelConfig.preset("tiny", tp_size=2)
    assert (c.local_num_heads, c.local_num_kv_heads, c.local_q_size, c.local_kv_size, c.local_intermediate_size) == (
        2, 1, 32, 16, 64)
    one = ModelConfig.preset("tiny")
    assert (one.local_num_heads, one.local_q_size, one.local_intermediate_size) == (4, 64, 128)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"tp_size": 0}, r"ModelConfig\.tp_size must be positive"),
        ({"tp_size": 3}, r"ModelConfig\.num_heads \(4\) must be a multiple of tp_size \(3\)"),
        ({"tp_size": 4}, r"ModelConfig\.num_kv_heads \(2\) must be a multiple of tp_size \(4\)"),
        ({"tp_size": 2, "intermediate_size": 129}, r"ModelConfig\.intermediate_size \(129\) must be a multiple of tp_size"),
        ({"tp_size": 2, "quant": "nvfp4", "intermediate_size": 48},
         r"intermediate_size / tp_size \(24\) must be a multiple of 16 for quant='nvfp4' at tp_size=2"),
        ({"tp_size": 2, "quant": "fp8-block"}, r"q_size / tp_size \(32\) must be a multiple of 128"),
    ],
)
def test_tp_config_rejects_splits_that_do_not_fit(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.preset("tiny", **overrides)


def test_shard_takes_this_ranks_part_of_every_segment():
    from fxfuse.models.parallel import Shard, TensorParallel

    w = torch.arange(12.0).reshape(6, 2)
    # Three segments of two rows (as q, k, v): rank 1 of 2 holds the second row of each.
    assert Shard(0, (2, 2, 2), 1, 2).take(w)[:, 0].tolist() == [2.0, 6.0, 10.0]
    assert Shard(1, (2,), 0, 2).take(w).tolist() == [[0.0], [2.0], [4.0], [6.0], [8.0], [10.0]]
    with pytest.raises(ValueError, match="segments \\[4\\] add up to 4"):
        Shard(0, (4,), 0, 2).take(w)
    tp = TensorParallel(2, 1, "0")
    assert tp.column((2, 2, 2)) == Shard(0, (2, 2, 2), 1, 2) and tp.row(2) == Shard(1, (2,), 1, 2)
    single = TensorParallel()
    assert single.column((2, 2, 2)) is None and single.partial_sum_dtype(torch.bfloat16) is torch.bfloat16
    x = torch.randn(3)
    assert single.reduce_partial_sums(x, torch.bfloat16) is x


def test_sharded_linears_hold_the_slice_of_the_full_quantized_weight():
    from fxfuse.models import BlockFp8Linear, Fp8Linear
    from fxfuse.models.parallel import Shard

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(256, 256, generator=gen).to(torch.bfloat16)
    w[0, 0] = 40.0  # the largest value sits in rank 0's slice: rank 1's scale must still come from it
    rows, cols = Shard(0, (128, 64, 64), 1, 2), Shard(1, (256,), 1, 2)
    full = Fp8Linear(w, torch.bfloat16)
    part = Fp8Linear(w, torch.bfloat16, shard=rows)
    assert torch.equal(part.weight_scale, full.weight_scale)
    assert torch.equal(part.weight_q.view(torch.uint8), rows.take(full.weight_q.view(torch.uint8)))
    full4, part4 = Nvfp4Linear(w, torch.bfloat16), Nvfp4Linear(w, torch.bfloat16, shard=cols)
    assert torch.equal(part4.weight_global_scale, full4.weight_global_scale)
    assert torch.equal(part4.dequantized_weight(), cols.take(full4.dequantized_weight()))
    fullb, partb = BlockFp8Linear(w, torch.bfloat16, 128), BlockFp8Linear(w, torch.bfloat16, 128, shard=cols)
    assert torch.equal(partb.dequantized_weight(), cols.take(fullb.dequantized_weight()))


def test_tp_model_needs_a_process_group_of_its_size():
    import torch.distributed as dist

    with pytest.raises(RuntimeError, match="call init_process_group first"):
        LlamaForCausalLM(ModelConfig.preset("tiny", tp_size=2))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="tp_size is 2 but the process group '0' has 1 ranks"):
            LlamaForCausalLM(ModelConfig.preset("tiny", tp_size=2))
    finally:
        dist.destroy_process_group()
