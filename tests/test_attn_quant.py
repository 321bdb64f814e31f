"""attn_quant_fusion: attention -> reshape -> FP8/NVFP4 quant, one registration for all layers."""

import pytest
import torch

import fxfuse
from fxfuse.attention import (
    AttentionLayer,
    AttentionMetadata,
    ForwardContext,
    KVCache,
    NativeAttentionBackend,
    NoQuantNativeBackend,
    set_forward_context,
    temporary_layers,
)
from fxfuse.passes.attn_quant import attn_quant_fusion
from conftest import targets, trace_graph

fx = torch.ops.fxfuse
HQ, HKV, D = 4, 2, 32


def _layers(n, backend=NativeAttentionBackend()):
    return [AttentionLayer(f"model.layers.{i}.self_attn", HQ, HKV, D, backend) for i in range(n)]


def _model(names, scheme):
    """n attention layers, each followed by the quant of its flattened output."""

    def f(q, k, v, s):
        outs = []
        for name in names:
            out = torch.empty(q.shape[0], HQ, D, dtype=q.dtype)
            fx.attention(q, k, v, out, name)
            flat = out.reshape(q.shape[0], HQ * D)
            outs.append(fx.static_scaled_fp8_quant(flat, s) if scheme == "fp8" else fx.nvfp4_quant(flat, s))
        return outs

    return f


def _inputs(tokens, dtype=torch.bfloat16):
    torch.manual_seed(tokens)
    q = torch.randn(tokens, HQ, D, dtype=dtype)
    k = torch.randn(tokens, HKV, D, dtype=dtype)
    v = torch.randn(tokens, HKV, D, dtype=dtype)
    return q, k, v, torch.tensor([0.01])


def _context(names, query_lens, block_size=8):
    blocks, next_block, table = [], 0, []
    for n in query_lens:
        need = (n + block_size - 1) // block_size
        table.append(list(range(next_block, next_block + need)))
        next_block += need
    meta = AttentionMetadata.from_lens(query_lens, query_lens, table, block_size)
    caches = {name: KVCache.allocate(next_block, block_size, HKV, D, torch.bfloat16) for name in names}
    return ForwardContext(meta, caches)


def _bytes(outs):
    flat = []
    for o in outs:
        flat.extend(o if isinstance(o, (tuple, list)) else [o])
    return [t.view(torch.uint8) if t.dtype != torch.uint8 else t for t in flat]


@pytest.mark.parametrize("scheme, rewrite, global_scale", [("fp8", "AttentionStaticFp8Quant", 0.01), ("nvfp4", "AttentionNvfp4Quant", 448.0 * 6 / 4)])
@pytest.mark.parametrize("v2", [True, False], ids=["auto_functionalized_v2", "auto_functionalized"])
def test_fuses_every_layer_and_is_bit_exact(scheme, rewrite, global_scale, v2):
    layers = _layers(3)
    names = [l.name for l in layers]
    q, k, v, _ = _inputs(11)
    s = torch.tensor([global_scale])
    f = _model(names, scheme)
    p = attn_quant_fusion()
    assert len(p.rewrites) == 2  # one per scheme, not per layer
    with temporary_layers(*layers):
        gm = trace_graph(f, q, k, v, s, v2=v2)
        assert p(gm) == 3
        gm.recompile()
        assert fxfuse.match_table() == {"attn_quant_fusion": {rewrite: 3}}
        quant = fx.static_scaled_fp8_quant.default if scheme == "fp8" else fx.nvfp4_quant.default
        assert quant not in targets(gm)
        lens = [4, 7]
        with set_forward_context(_context(names, lens)):
            fused = gm(q, k, v, s)
        with set_forward_context(_context(names, lens)):
            unfused = f(q, k, v, s)
    for a, b in zip(_bytes(fused), _bytes(unfused), strict=True):
        assert torch.equal(a, b)


def test_backend_without_fused_quant_keeps_the_chain():
    supported, unsupported = _layers(1)[0], AttentionLayer("model.layers.1.self_attn", HQ, HKV, D, NoQuantNativeBackend())
    q, k, v, s = _inputs(5)
    f = _model([supported.name, unsupported.name], "fp8")
    with temporary_layers(supported, unsupported):
        gm = trace_graph(f, q, k, v, s)
        p = attn_quant_fusion()
        assert p(gm) == 1
        gm.recompile()
        assert targets(gm).count(fx.static_scaled_fp8_quant.default) == 1
        sites = fxfuse.explain(trace_graph(f, q, k, v, s), [attn_quant_fusion()], rewrite="AttentionStaticFp8Quant")
        v2_sites = [x for x in sites.sites if x.form == "v2"]  # the graph holds the v2 form
        assert sorted(x.matched for x in v2_sites) == [False, True]
        assert any("check() returned False" in x.reason for x in v2_sites)
        assert not any(x.matched for x in sites.sites if x.form == "v1")


def test_unregistered_layer_is_not_fused():
    q, k, v, s = _inputs(5)
    f = _model(["not.registered"], "fp8")
    with temporary_layers(*_layers(1)):
        gm = trace_graph(f, q, k, v, s)
        assert attn_quant_fusion()(gm) == 0


def test_attention_output_with_another_user_is_not_fused():
    (layer,) = _layers(1)
    q, k, v, s = _inputs(5)

    def f(q, k, v, s):
        out = torch.empty(q.shape[0], HQ, D, dtype=q.dtype)
        fx.attention(q, k, v, out, layer.name)
        flat = out.reshape(q.shape[0], HQ * D)
        return fx.static_scaled_fp8_quant(flat, s), flat.sum()

    with temporary_layers(layer):
        gm = trace_graph(f, q, k, v, s)
        assert attn_quant_fusion()(gm) == 0
