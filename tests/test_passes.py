"""Each built-in rewrite: matches its chain, preserves numerics exactly, refuses look-alikes."""

import pytest
import torch

import fxfuse
from conftest import targets, trace_graph

fx = torch.ops.fxfuse
FP8 = torch.float8_e4m3fn


def _rand(*shape, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype)


def _equal(a, b):
    if isinstance(a, (tuple, list)):
        return all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if a.dtype == FP8:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


def _fuse(fn, args, passes):
    gm = trace_graph(fn, *args)
    n = sum(p(gm) for p in passes)
    gm.recompile()
    return gm, n


def _rms():
    return fxfuse.passes.rms_quant_fusion()


def _act():
    return fxfuse.passes.act_quant_fusion()


# One chain per rewrite, written the way a model writes it.
def static_chain(x, w, s):
    return fx.static_scaled_fp8_quant(fx.rms_norm(x, w, 1e-5), s)


def add_static_chain(x, r, w, s):
    y, r2 = fx.fused_add_rms_norm(x, r, w, 1e-6)
    return fx.static_scaled_fp8_quant(y, s), r2 * 2


def dynamic_chain(x, w):
    return fx.dynamic_per_token_fp8_quant(fx.rms_norm(x, w, 1e-5))


def dynamic_ub_chain(x, w, ub):
    return fx.dynamic_per_token_fp8_quant(fx.rms_norm(x, w, 1e-5), ub)


def add_dynamic_chain(x, r, w):
    y, r2 = fx.fused_add_rms_norm(x, r, w, 1e-5)
    q, s = fx.dynamic_per_token_fp8_quant(y)
    return q, s, r2


def add_dynamic_ub_chain(x, r, w, ub):
    y, r2 = fx.fused_add_rms_norm(x, r, w, 1e-5)
    q, s = fx.dynamic_per_token_fp8_quant(y, ub)
    return q, s, r2


def act_chain(x, s):
    return fx.static_scaled_fp8_quant(fx.silu_and_mul(x), s)


def act_nvfp4_chain(x, gs):
    return fx.nvfp4_quant(fx.silu_and_mul(x), gs)


def gemma_static_chain(x, w, s):
    return fx.static_scaled_fp8_quant(fx.gemma_rms_norm(x, w, 1e-6), s)


def gemma_add_static_chain(x, r, w, s):
    y, r2 = fx.fused_add_gemma_rms_norm(x, r, w, 1e-6)
    return fx.static_scaled_fp8_quant(y, s), r2 * 2


def gemma_dynamic_chain(x, w):
    return fx.dynamic_per_token_fp8_quant(fx.gemma_rms_norm(x, w, 1e-6))


def gemma_dynamic_ub_chain(x, w, ub):
    return fx.dynamic_per_token_fp8_quant(fx.gemma_rms_norm(x, w, 1e-6), ub)


def gemma_add_dynamic_chain(x, r, w):
    y, r2 = fx.fused_add_gemma_rms_norm(x, r, w, 1e-6)
    q, s = fx.dynamic_per_token_fp8_quant(y)
    return q, s, r2


def gemma_add_dynamic_ub_chain(x, r, w, ub):
    y, r2 = fx.fused_add_gemma_rms_norm(x, r, w, 1e-6)
    q, s = fx.dynamic_per_token_fp8_quant(y, ub)
    return q, s, r2


def _gemma_w(h):
    return 0.1 * torch.randn(h)  # fp32 offsets from 1, as Gemma checkpoints keep them


CASES = [
    ("RmsNormStaticFp8Quant", static_chain, lambda t, h, d: (_rand(t, h, dtype=d, scale=30), _rand(h, dtype=d), torch.tensor([0.01])), fx.rms_norm_static_fp8_quant),
    ("FusedAddRmsNormStaticFp8Quant", add_static_chain, lambda t, h, d: (_rand(t, h, dtype=d), _rand(t, h, dtype=d), _rand(h, dtype=d), torch.tensor([0.02])), fx.fused_add_rms_norm_static_fp8_quant),
    ("RmsNormDynamicFp8Quant", dynamic_chain, lambda t, h, d: (_rand(t, h, dtype=d), _rand(h, dtype=d)), fx.rms_norm_dynamic_per_token_fp8_quant),
    ("RmsNormDynamicFp8QuantUb", dynamic_ub_chain, lambda t, h, d: (_rand(t, h, dtype=d), _rand(h, dtype=d), torch.tensor([0.5])), fx.rms_norm_dynamic_per_token_fp8_quant),
    ("FusedAddRmsNormDynamicFp8Quant", add_dynamic_chain, lambda t, h, d: (_rand(t, h, dtype=d), _rand(t, h, dtype=d), _rand(h, dtype=d)), fx.fused_add_rms_norm_dynamic_per_token_fp8_quant),
    ("FusedAddRmsNormDynamicFp8QuantUb", add_dynamic_ub_chain, lambda t, h, d: (_rand(t, h, dtype=d), _rand(t, h, dtype=d), _rand(h, dtype=d), torch.tensor([1.0])), fx.fused_add_rms_norm_dynamic_per_token_fp8_quant),
    ("SiluMulStaticFp8Quant", act_chain, lambda t, h, d: (_rand(t, 2 * h, dtype=d, scale=4), torch.tensor([0.01])), fx.silu_and_mul_static_fp8_quant),
    ("SiluMulNvfp4Quant", act_nvfp4_chain, lambda t, h, d: (_rand(t, 2 * (h // 16 * 16 or 16), dtype=d, scale=4), torch.tensor([448.0 * 6 / 8])), fx.silu_and_mul_nvfp4_quant),
    ("GemmaRmsNormStaticFp8Quant", gemma_static_chain, lambda t, h, d: (_rand(t, h, dtype=d, scale=30), _gemma_w(h), torch.tensor([0.01])), fx.gemma_rms_norm_static_fp8_quant),
    ("FusedAddGemmaRmsNormStaticFp8Quant", gemma_add_static_chain, lambda t, h, d: (_rand(t, h, dtype=d), _rand(t, h, dtype=d), _gemma_w(h).to(d), torch.tensor([0.02])), fx.fused_add_gemma_rms_norm_static_fp8_quant),
    ("GemmaRmsNormDynamicFp8Quant", gemma_dynamic_chain, lambda t, h, d: (_rand(t, h, dtype=d), _gemma_w(h)), fx.gemma_rms_norm_dynamic_per_token_fp8_quant),
    ("GemmaRmsNormDynamicFp8QuantUb", gemma_dynamic_ub_chain, lambda t, h, d: (_rand(t, h, dtype=d), _gemma_w(h), torch.tensor([0.5])), fx.gemma_rms_norm_dynamic_per_token_fp8_quant),
    ("FusedAddGemmaRmsNormDynamicFp8Quant", gemma_add_dynamic_chain, lambda t, h, d: (_rand(t, h, dtype=d), _rand(t, h, dtype=d), _gemma_w(h)), fx.fused_add_gemma_rms_norm_dynamic_per_token_fp8_quant),
    ("FusedAddGemmaRmsNormDynamicFp8QuantUb", gemma_add_dynamic_ub_chain, lambda t, h, d: (_rand(t, h, dtype=d), _rand(t, h, dtype=d), _gemma_w(h), torch.tensor([1.0])), fx.fused_add_gemma_rms_norm_dynamic_per_token_fp8_quant),
]


@pytest.mark.parametrize("name, chain, make, fused_op", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("tokens, hidden, dtype", [(7, 40, torch.bfloat16), (1, 130, torch.float16), (33, 64, torch.bfloat16)])
def test_rewrite_matches_and_is_exact(name, chain, make, fused_op, tokens, hidden, dtype):
    torch.manual_seed(tokens * hidden)
    args = make(tokens, hidden, dtype)
    gm, n = _fuse(chain, args, [_rms(), _act()])
    assert n == 1
    assert fused_op.default in targets(gm)
    assert fxfuse.match_table() in ({"rms_quant_fusion": {name: 1}}, {"act_quant_fusion": {name: 1}})
    assert _equal(gm(*args), chain(*args))


def test_a_gemma_norm_is_not_a_llama_norm():
    """Each norm to its own fused op: a Gemma chain is no Llama-norm chain (their numerics
    differ), and the Gemma rewrites take the weight in fp32 or the model dtype only."""
    args = (_rand(5, 64), _gemma_w(64), torch.tensor([0.05]))
    gm, n = _fuse(gemma_static_chain, args, [_rms()])
    assert n == 1 and fxfuse.match_table() == {"rms_quant_fusion": {"GemmaRmsNormStaticFp8Quant": 1}}
    assert fx.rms_norm_static_fp8_quant.default not in targets(gm)


def test_every_eps_and_both_dtypes_from_one_registration():
    p = _rms()

    def two(x, y, w, w16, s):
        a = fx.static_scaled_fp8_quant(fx.rms_norm(x, w, 1e-5), s)
        b = fx.static_scaled_fp8_quant(fx.rms_norm(y, w16, 1e-6), s)
        return a, b

    args = (_rand(5, 64), _rand(3, 32, dtype=torch.float16), _rand(64), _rand(32, dtype=torch.float16), torch.tensor([0.05]))
    gm = trace_graph(two, *args)
    assert p(gm) == 2
    gm.recompile()
    eps = sorted(n.args[3] for n in gm.graph.nodes if n.target is fx.rms_norm_static_fp8_quant.default)
    assert eps == [1e-6, 1e-5]
    assert _equal(gm(*args), two(*args))


def test_norm_output_with_another_user_is_not_fused():
    def chain(x, w, s):
        y = fx.rms_norm(x, w, 1e-5)
        return fx.static_scaled_fp8_quant(y, s), y.sum()

    gm, n = _fuse(chain, (_rand(4, 64), _rand(64), torch.tensor([0.1])), [_rms()])
    assert n == 0 and fx.rms_norm.default in targets(gm)


def test_dtype_cast_between_norm_and_quant_is_not_fused():
    # Quantizing the fp16 rounding of a bf16 norm is not what the fused op computes.
    def chain(x, w, s):
        return fx.static_scaled_fp8_quant(fx.rms_norm(x, w, 1e-5).to(torch.float16), s)

    args = (_rand(4, 64), _rand(64), torch.tensor([0.1]))
    gm, n = _fuse(chain, args, [_rms()])
    assert n == 0 and fx.rms_norm.default in targets(gm)
    assert _equal(gm(*args), chain(*args))


def test_fp32_chain_fuses_exactly():
    def chain(x, r, w, s):
        y, r2 = fx.fused_add_rms_norm(x, r, w, 1e-6)
        return fx.static_scaled_fp8_quant(y, s), r2

    args = (_rand(4, 64, dtype=torch.float32), _rand(4, 64, dtype=torch.float32), _rand(64, dtype=torch.float32), torch.tensor([0.1]))
    gm, n = _fuse(chain, args, [_rms()])
    assert n == 1  # fp32 throughout is a model dtype the op accepts
    assert _equal(gm(*args), chain(*args))


def test_noop_elimination_removes_only_noops():
    def f(x):
        a = x.reshape(4, 8)  # same shape: no-op
        b = x.reshape(8, 4)  # real reshape
        c = x[0:4]  # full slice
        return a + 1, b * 2, c - 1

    from torch.fx.experimental.proxy_tensor import make_fx

    x = torch.randn(4, 8)
    gm = make_fx(f, tracing_mode="fake")(x)  # unlike Inductor's tracer, keeps the no-ops
    p = fxfuse.passes.NoopElimination()
    n = p(gm)
    gm.recompile()
    assert n == 2 and p.last_counts == {"reshape": 1, "slice": 1}
    shapes = [n.meta["val"].shape for n in gm.graph.nodes if n.target in (torch.ops.aten.reshape.default, torch.ops.aten.view.default)]
    assert torch.Size([8, 4]) in shapes and torch.Size([4, 8]) not in shapes
    for got, want in zip(gm(x), f(x)):
        torch.testing.assert_close(got, want)


def test_default_passes_order_and_config():
    # allreduce_rms_fusion before rms_quant_fusion: its chains contain that pass's chains.
    # qk_norm_rope_fusion before rms_quant_fusion (the per-head norms are not that pass's)
    # and before rope_kv_cache_fusion (both want the rotation); rope_kv_cache_fusion after
    # attn_quant_fusion (whose attention has no rotation folded in).
    assert [p.name for p in fxfuse.default_passes()] == [
        "noop_elimination", "qk_norm_rope_fusion", "allreduce_rms_fusion", "rms_quant_fusion", "act_quant_fusion",
        "attn_quant_fusion", "rope_kv_cache_fusion", "gemm_fusion", "native_lowering",
    ]
    only = fxfuse.default_passes(fxfuse.FusionConfig(noop_elimination=False, qk_norm_rope=False, allreduce_rms=False,
                                                     act_quant=False, attn_quant=False, rope_kv_cache=False,
                                                     native_lowering=False, gemm_fusion=False))
    assert [p.name for p in only] == ["rms_quant_fusion"]
    with pytest.raises(TypeError, match="FusionConfig"):
        fxfuse.default_passes({"rms_quant": True})
