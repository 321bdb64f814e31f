"""The reference Llama model: determinism, shapes, graph contract, FP8 accuracy, config.

Eager only (no torch.compile): compiled runs are tested elsewhere.
"""

import math
import operator
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from fxfuse.models import PRESETS, LlamaForCausalLM, ModelConfig, RunResult, generate, random_prompts, run

fx = torch.ops.fxfuse

# Relative Frobenius error of the FP8 logits against the unquantized forward. Measured
# 0.026-0.038 for tiny with 2-3 layers and seeds 0-3; doubling a single weight scale
# (a real scale bug) gives >= 0.23.
FP8_REL_TOL = 0.06


@pytest.fixture(scope="module")
def tiny():
    return LlamaForCausalLM(ModelConfig.preset("tiny"))


@pytest.fixture(scope="module")
def ids():
    return random_prompts(PRESETS["tiny"], batch=2, seq_len=12, seed=7)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)


def _rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------- determinism, shapes


def test_same_seed_same_logits(tiny, ids):
    again = LlamaForCausalLM(ModelConfig.preset("tiny"))
    assert torch.equal(_logits(tiny, ids), _logits(again, ids))
    for (name, a), (_, b) in zip(tiny.named_buffers(), again.named_buffers()):
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b), name


def test_different_seed_different_logits(tiny, ids):
    other = LlamaForCausalLM(ModelConfig.preset("tiny", seed=1))
    assert not torch.allclose(_logits(tiny, ids).float(), _logits(other, ids).float())


def test_output_shape_dtype_finite(tiny, ids):
    logits = _logits(tiny, ids)
    assert logits.shape == (2, 12, 256)
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


def test_batch_rows_independent(tiny, ids):
    full = _logits(tiny, ids)
    assert torch.equal(full[1:], _logits(tiny, ids[1:]))


def test_causal(tiny, ids):
    # Changing the last token must not change any earlier position's logits.
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 256
    a, b = _logits(tiny, ids), _logits(tiny, changed)
    assert torch.equal(a[:, :-1], b[:, :-1])
    assert not torch.equal(a[:, -1], b[:, -1])


def test_greedy_tokens_not_degenerate(tiny):
    prompts = random_prompts(tiny.config, batch=4, seq_len=8, seed=3)
    tokens = generate(tiny, prompts, max_new_tokens=6)
    assert tokens.shape == (4, 6)
    assert tokens.dtype == torch.long
    assert tokens.unique().numel() > 4


def test_generate_appends_argmax(tiny, ids):
    tokens = generate(tiny, ids, max_new_tokens=3)
    seq = ids
    for step in range(3):
        expected = _logits(tiny, seq)[:, -1].argmax(-1)
        assert torch.equal(tokens[:, step], expected)
        seq = torch.cat([seq, expected[:, None]], dim=1)
    assert generate(tiny, ids, max_new_tokens=0).shape == (2, 0)


def test_run_result(tiny, ids):
    result = run(tiny, tiny, ids, max_new_tokens=2)
    assert isinstance(result, RunResult)
    assert torch.equal(result.logits, _logits(tiny, ids))
    assert torch.equal(result.tokens, generate(tiny, ids, max_new_tokens=2))
    assert result.compile_s > 0 and result.run_s > 0


def test_random_prompts_deterministic():
    cfg = PRESETS["tiny"]
    a = random_prompts(cfg, batch=3, seq_len=5, seed=11)
    assert a.shape == (3, 5) and a.dtype == torch.long
    assert torch.equal(a, random_prompts(cfg, batch=3, seq_len=5, seed=11))
    assert not torch.equal(a, random_prompts(cfg, batch=3, seq_len=5, seed=12))
    assert 0 <= a.min() and a.max() < cfg.vocab_size


# --------------------------------------------------------------------------- graph contract

_PASS_THROUGH = {
    torch.ops.aten.view.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten.transpose.int,
    torch.ops.aten.permute.default,
    torch.ops.aten.clone.default,
    torch.ops.aten.contiguous.default,
}
_NORMS = {fx.rms_norm.default, fx.fused_add_rms_norm.default}


def _quant_producer(node):
    """What a static quant's input comes from: 'norm', 'silu_and_mul', 'attention' or the op."""
    src = node.args[0]
    while src.target in _PASS_THROUGH:
        src = src.args[0]
    if src.target is operator.getitem:
        parent, index = src.args
        if parent.target is fx.fused_add_rms_norm.default:
            # Output 0 is the normalized value; output 1 is the residual sum.
            return "norm" if index == 0 else "residual"
        if "scaled_dot_product" in str(parent.target) and index == 0:
            return "attention"
        return str(parent.target)
    if src.target in _NORMS:
        return "norm"
    if src.target is fx.silu_and_mul.default:
        return "silu_and_mul"
    if "scaled_dot_product" in str(src.target):
        return "attention"
    return str(src.target)


@pytest.mark.parametrize("num_layers", [2, 3])
def test_quant_sites_per_layer(num_layers):
    model = LlamaForCausalLM(ModelConfig.preset("tiny", num_layers=num_layers))
    with torch.no_grad():
        gm = make_fx(model)(random_prompts(model.config, batch=2, seq_len=6, seed=0))
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    quants = [n for n in calls if n.target is fx.static_scaled_fp8_quant.default]
    n = num_layers
    assert Counter(_quant_producer(q) for q in quants) == {"norm": 2 * n, "silu_and_mul": n, "attention": n}
    targets = Counter(node.target for node in calls)
    assert targets[fx.rms_norm.default] == 1
    # Two per layer except layer 0's input norm, plus the final norm.
    assert targets[fx.fused_add_rms_norm.default] == 2 * n
    assert targets[fx.silu_and_mul.default] == n
    assert targets[fx.fp8_linear.default] == 4 * n
    assert targets[fx.dynamic_per_token_fp8_quant.default] == 0
    # Every quant feeds exactly one fp8_linear, and every fp8_linear reads a static quant.
    for q in quants:
        assert [u.target for u in q.users] == [fx.fp8_linear.default]
    # The final norm's output goes to the LM head, not to a quant.
    final_norm = [node for node in calls if node.target is fx.fused_add_rms_norm.default][-1]
    normed = [u for u in final_norm.users if u.args[1] == 0]
    assert all(u.target is operator.getitem for u in final_norm.users)
    assert not any(v.target is fx.static_scaled_fp8_quant.default for u in normed for v in u.users)


# --------------------------------------------------------------------------- numerics


def _independent_reference(model, ids):
    """The model's math in fp32, written without the model's code: complex-number RoPE,
    explicit masked softmax, repeated KV heads, dequantized weights."""
    c = model.config
    batch, seq = ids.shape
    hd = c.head_dim

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_eps) * w.float()

    def rope(x):  # x: [batch, seq, heads, hd]; pairs (i, i + hd/2) rotate by pos * theta^(-2i/hd)
        inv = c.rope_theta ** (-torch.arange(hd // 2, dtype=torch.float64) * 2 / hd)
        angle = torch.arange(seq, dtype=torch.float64)[:, None] * inv[None]
        rot = torch.polar(torch.ones_like(angle), angle).to(torch.complex64)[None, :, None, :]
        z = torch.complex(x[..., : hd // 2], x[..., hd // 2 :]) * rot
        return torch.cat([z.real, z.imag], dim=-1)

    x = model.embed_tokens.float()[ids]
    mask = torch.ones(seq, seq, dtype=torch.bool).tril()
    group = c.num_heads // c.num_kv_heads
    for layer in model.layers:
        h = norm(x, layer.input_norm_weight)
        qkv = h @ layer.qkv_proj.dequantized_weight().t()
        q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q = rope(q.reshape(batch, seq, c.num_heads, hd)).transpose(1, 2)
        k = rope(k.reshape(batch, seq, c.num_kv_heads, hd)).transpose(1, 2).repeat_interleave(group, dim=1)
        v = v.reshape(batch, seq, c.num_kv_heads, hd).transpose(1, 2).repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        attn = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        x = x + attn.transpose(1, 2).reshape(batch, seq, c.q_size) @ layer.o_proj.dequantized_weight().t()
        h = norm(x, layer.post_attention_norm_weight)
        gate, up = (h @ layer.gate_up_proj.dequantized_weight().t()).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ layer.down_proj.dequantized_weight().t()
    return norm(x, model.final_norm_weight) @ model.lm_head_weight.float().t()


def test_reference_forward_matches_independent_math(tiny, ids):
    # Only bf16 roundings separate the two (measured 0.005).
    assert _rel_err(tiny.forward_reference(ids), _independent_reference(tiny, ids)) < 0.02


@pytest.mark.parametrize("num_layers", [2, 3])
def test_fp8_close_to_unquantized(num_layers, ids):
    model = LlamaForCausalLM(ModelConfig.preset("tiny", num_layers=num_layers))
    fp8, ref = _logits(model, ids), model.forward_reference(ids)
    assert _rel_err(fp8, ref) < FP8_REL_TOL
    # Quantization noise should rarely flip the top token.
    agree = (fp8.float().argmax(-1) == ref.float().argmax(-1)).float().mean().item()
    assert agree > 0.8


def test_fp8_bound_catches_wrong_scale(ids):
    model = LlamaForCausalLM(ModelConfig.preset("tiny"))
    ref = model.forward_reference(ids)
    lin = model.linears()["layers.1.down_proj"]
    lin.weight_scale.mul_(2.0)  # the FP8 path only; ref was taken before
    assert _rel_err(_logits(model, ids), ref) > FP8_REL_TOL


def test_calibration_sets_amax_scales(ids):
    model = LlamaForCausalLM(ModelConfig.preset("tiny"))
    scales = model.calibrate(ids)
    assert list(scales) == [
        f"layers.{i}.{p}" for i in range(2) for p in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    ]
    # The first site's input is the layer-0 norm output, computable directly.
    h = fx.rms_norm(model.embed_tokens[ids.reshape(-1)], model.layers[0].input_norm_weight, model.config.rms_eps)
    assert scales["layers.0.qkv_proj"] == pytest.approx(h.abs().amax().float().item() / 448, rel=1e-6)
    assert all(s > 0 and math.isfinite(s) for s in scales.values())
    # Calibrated on this prompt, no activation of this prompt clips.
    assert _rel_err(_logits(model, ids), model.forward_reference(ids)) < FP8_REL_TOL


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
