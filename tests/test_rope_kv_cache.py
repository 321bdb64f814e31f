"""The rotary embedding folded into ``attention`` (which writes the KV cache): the op's new
arguments on each backend, the triton backend's fused rope + cache-write kernel (in Triton's
interpreter on CPU), and ``rope_kv_cache_fusion`` on traced graphs: every output scheme,
shape, style and rotary dim, bit for bit (outputs and cache contents); backends that do not
rotate, unregistered layers and extra users keep the unfused chain, as near misses."""

import pytest
import torch

import fxfuse
from conftest import covering, targets, trace_graph
from fxfuse.attention import (
    AttentionLayer,
    AttentionMetadata,
    ForwardContext,
    KVCache,
    NativeAttentionBackend,
    TritonAttentionBackend,
    set_forward_context,
    temporary_layers,
    write_kv_cache_native,
)
from fxfuse.ops.rotary import rotary_cos_sin_cache, rotary_embedding_native
from fxfuse.passes.attn_quant import attn_quant_fusion
from fxfuse.passes.rope_kv_cache import rope_kv_cache_fusion, sizes_from_symbol_inputs

fx = torch.ops.fxfuse
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class NoRopeBackend(NativeAttentionBackend):
    """The native computation, declaring that it does not rotate query and key itself."""

    name = "test-norope"
    fuses_rope = False


def _qkv(tokens, hq, hkv, d, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, generator=g).to(dtype).to(device)
    return qkv.split([hq * d, hkv * d, hkv * d], dim=-1)  # token-strided slices, as a model has them


def _batch(query_lens, block_size=8, device="cpu"):
    """Metadata of whole sequences (prefill) and their positions."""
    table, nxt = [], 0
    for n in query_lens:
        need = -(-n // block_size)
        table.append(list(range(nxt, nxt + need)))
        nxt += need
    meta = AttentionMetadata.from_lens(query_lens, query_lens, table, block_size, device=device)
    positions = torch.cat([torch.arange(n) for n in query_lens]).to(device)
    return meta, positions, nxt


# --------------------------------------------------------------------------- the kernel


def _kernel():
    from fxfuse import kernels

    if not kernels.available(DEVICE):
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    from fxfuse.kernels import rotary

    return rotary


KERNEL_CASES = [  # (tokens, q heads, kv heads, head size, rotary dim)
    (1, 4, 2, 64, 64),
    (7, 5, 1, 128, 64),
    (13, 3, 3, 32, 12),
]


@pytest.mark.parametrize("case, dtype, is_neox", [(v0,) + (v1,) + (v2,) for v0, v1, v2 in covering(
    KERNEL_CASES,
    [torch.bfloat16, torch.float16, torch.float32],
    [True, False],
)])
def test_kernel_writes_what_rotation_then_cache_write_writes(case, dtype, is_neox):
    R = _kernel()
    tokens, hq, hkv, d, rot = case
    q, k, v = _qkv(tokens, hq, hkv, d, dtype, sum(case), DEVICE)
    q3, k3 = q.view(tokens, hq, d), k.view(tokens, hkv, d)
    # The value in another layout than q and k: its heads transposed with its tokens.
    v3 = v.view(tokens, hkv, d).transpose(0, 1).contiguous().transpose(0, 1) if hkv > 1 else v.view(tokens, hkv, d)
    pos = torch.randint(0, 256, (tokens,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    cos_sin = rotary_cos_sin_cache(256, rot, device=DEVICE)
    slots = torch.randperm(32, generator=torch.Generator().manual_seed(2))[:tokens].to(DEVICE)
    got, want = (KVCache.allocate(4, 8, hkv, d, dtype, DEVICE) for _ in range(2))
    q_out = R.rope_kv_cache(pos, q3, k3, v3, d, cos_sin, is_neox, got.key_cache, got.value_cache, slots)
    q_ref, k_ref = rotary_embedding_native(pos, q3, k3, d, cos_sin, is_neox)
    write_kv_cache_native(k_ref, v3.contiguous(), want, slots)
    assert q_out.is_contiguous() and torch.equal(q_out, q_ref)
    assert torch.equal(got.key_cache, want.key_cache) and torch.equal(got.value_cache, want.value_cache)


def test_kernel_with_no_tokens_writes_nothing():
    R = _kernel()
    q, k, v = _qkv(0, 2, 1, 16, torch.bfloat16, 0, DEVICE)
    cache = KVCache.allocate(2, 8, 1, 16, torch.bfloat16, DEVICE)
    out = R.rope_kv_cache(torch.zeros(0, dtype=torch.long, device=DEVICE), q.view(0, 2, 16), k.view(0, 1, 16),
                          v.view(0, 1, 16), 16, rotary_cos_sin_cache(8, 16, device=DEVICE), True,
                          cache.key_cache, cache.value_cache, torch.zeros(0, dtype=torch.long, device=DEVICE))
    assert out.shape == (0, 2, 16) and not cache.key_cache.any()


# --------------------------------------------------------------------------- the op


def _run_attention(backend, query_lens, hq, hkv, d, rot, is_neox, fused, dtype=torch.bfloat16, device="cpu"):
    meta, pos, blocks = _batch(query_lens, device=device)
    q, k, v = _qkv(sum(query_lens), hq, hkv, d, dtype, 3, device)
    t = q.shape[0]
    cos_sin = rotary_cos_sin_cache(64, rot, device=device)
    cache = KVCache.allocate(blocks, 8, hkv, d, dtype, device)
    out = torch.empty(t, hq, d, dtype=dtype, device=device)
    v3 = v.reshape(t, hkv, d).contiguous()
    with temporary_layers(AttentionLayer("L", hq, hkv, d, backend)), set_forward_context(ForwardContext(meta, {"L": cache})):
        if fused:
            fx.attention(q.view(t, hq, d), k.view(t, hkv, d), v3, out, "L", None, None, pos, cos_sin, is_neox)
        else:
            q2, k2 = fx.rotary_embedding(pos, q, k, d, cos_sin, is_neox)
            fx.attention(q2.view(t, hq, d), k2.view(t, hkv, d), v3, out, "L")
    return out, cache.key_cache, cache.value_cache


@pytest.mark.parametrize("backend, rot, is_neox", [(v0,) + tuple(v1) for v0, v1 in covering(
    ["native", "triton"],
    [(32, True), (12, False)],
)])
def test_attention_rotating_itself_equals_rotation_then_attention(backend, rot, is_neox):
    if backend == "triton":
        _kernel()
        b, device = TritonAttentionBackend(), DEVICE
    else:
        b, device = NativeAttentionBackend(), "cpu"
    for query_lens in ([5, 3], [1]):
        fused = _run_attention(b, query_lens, 4, 2, 32, rot, is_neox, True, device=device)
        unfused = _run_attention(b, query_lens, 4, 2, 32, rot, is_neox, False, device=device)
        for a, c in zip(fused, unfused):
            assert torch.equal(a, c)


def test_rotating_attention_validates_its_rotary_arguments():
    meta, pos, blocks = _batch([3])
    q, k, v = _qkv(3, 2, 1, 16, torch.bfloat16, 0)
    q3, k3, v3 = q.view(3, 2, 16), k.view(3, 1, 16), v.reshape(3, 1, 16).contiguous()
    out = torch.empty(3, 2, 16, dtype=torch.bfloat16)
    cache = rotary_cos_sin_cache(8, 16)
    with temporary_layers(AttentionLayer("L", 2, 1, 16, NativeAttentionBackend())), \
            set_forward_context(ForwardContext(meta, {"L": KVCache.allocate(blocks, 8, 1, 16, torch.bfloat16)})):
        with pytest.raises(ValueError, match=r"fxfuse.attention: `positions` and `cos_sin_cache` go together"):
            fx.attention(q3, k3, v3, out, "L", None, None, pos, None, True)
        with pytest.raises(ValueError, match=r"fxfuse.attention: `positions` must be in \[0, 8\)"):
            fx.attention(q3, k3, v3, out, "L", None, None, pos + 6, cache, True)
        with pytest.raises(ValueError, match=r"fxfuse.attention: the rotary dim .* must be even"):
            fx.attention(q3, k3, v3, out, "L", None, None, pos, torch.ones(8, 7), True)


def test_a_backend_that_does_not_rotate_refuses_the_rotary_arguments():
    meta, pos, blocks = _batch([3])
    q, k, v = _qkv(3, 2, 1, 16, torch.bfloat16, 0)
    with temporary_layers(AttentionLayer("L", 2, 1, 16, NoRopeBackend())), \
            set_forward_context(ForwardContext(meta, {"L": KVCache.allocate(blocks, 8, 1, 16, torch.bfloat16)})):
        with pytest.raises(ValueError, match=r"backend 'test-norope', which does not apply the rotary embedding"):
            fx.attention(q.view(3, 2, 16), k.view(3, 1, 16), v.reshape(3, 1, 16).contiguous(),
                         torch.empty(3, 2, 16, dtype=torch.bfloat16), "L", None, None, pos,
                         rotary_cos_sin_cache(8, 16), True)


def test_backends_declare_whether_they_rotate():
    assert NativeAttentionBackend.fuses_rope and TritonAttentionBackend.fuses_rope
    layer = AttentionLayer("x", 2, 1, 16, NoRopeBackend())
    assert not layer.fuses_rope

    class Typo(NativeAttentionBackend):
        name = "typo"
        fuses_rope = "yes"

    with pytest.raises(TypeError, match="`fuses_rope` must be a bool"):
        AttentionLayer("x", 2, 1, 16, Typo())


# --------------------------------------------------------------------------- the pass

HQ, HKV = 4, 2


def _layer_names(n):
    return [f"model.layers.{i}.self_attn" for i in range(n)]


def _model(names, d, rot, is_neox, scheme, extra_user=False):
    """Per layer, as the reference models write it: the rotation of the q/k slices, then
    attention, then (scheme) the quant of its flattened output."""
    cos_sin = rotary_cos_sin_cache(64, rot)
    gs = torch.tensor([448.0 * 6 / 4]) if scheme == "nvfp4" else torch.tensor([0.02])

    def f(qkv, pos):
        outs = []
        for name in names:
            q, k, v = qkv.split([HQ * d, HKV * d, HKV * d], dim=-1)
            t = q.shape[0]
            q, k = fx.rotary_embedding(pos, q, k, d, cos_sin, is_neox)
            v = v.reshape(t, HKV, d).contiguous()
            out = torch.empty(t, HQ, d, dtype=q.dtype)
            fx.attention(q.view(t, HQ, d), k.view(t, HKV, d), v, out, name)
            flat = out.view(t, HQ * d)
            if scheme == "fp8":
                flat = fx.static_scaled_fp8_quant(flat, gs)
            elif scheme == "nvfp4":
                flat = fx.nvfp4_quant(flat, gs)
            outs.append(flat)
            if extra_user:
                outs.append(k * 2)  # the rotated key read by something else than attention
        return outs

    return f


def _packed(tokens, d, seed):
    """A packed qkv projection's output ``[T, (HQ + 2 HKV) d]``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, (HQ + 2 * HKV) * d, generator=g).to(torch.bfloat16)


def _run(gm_or_fn, names, query_lens, d, args):
    meta, _, blocks = _batch(query_lens)
    caches = {n: KVCache.allocate(blocks, 8, HKV, d, torch.bfloat16) for n in names}
    with set_forward_context(ForwardContext(meta, caches)):
        outs = gm_or_fn(*args)
    flat = [t for o in outs for t in (o if isinstance(o, (tuple, list)) else [o])]
    return [t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t for t in flat], caches


SCHEMES = {"none": "RopeAttention", "fp8": "RopeAttentionFp8", "nvfp4": "RopeAttentionNvfp4"}


@pytest.mark.parametrize("scheme, d, rot, is_neox, query_lens, v2", [(v0,) + tuple(v1) + (v2,) + (v3,) for v0, v1, v2, v3 in covering(
    list(SCHEMES),
    [(32, 32, True), (64, 48, False), (16, 6, True)],
    [[5, 2], [1]],
    [True, False],
)])
def test_fuses_every_layer_bit_for_bit(scheme, d, rot, is_neox, query_lens, v2):
    """Two layers from one registration; the attention quant fused first where the model
    quantizes (what the pipeline does); outputs and KV caches as the unfused graph's."""
    names = _layer_names(2)
    layers = [AttentionLayer(n, HQ, HKV, d, NativeAttentionBackend()) for n in names]
    f = _model(names, d, rot, is_neox, scheme)
    args = (_packed(sum(query_lens), d, d + rot), _batch(query_lens)[1])
    with temporary_layers(*layers):
        gm = trace_graph(f, *args, v2=v2)
        want, want_caches = _run(gm, names, query_lens, d, args)
        fxfuse.reset_match_table()
        if scheme != "none":
            assert attn_quant_fusion()(gm) == 2
        p = rope_kv_cache_fusion()
        assert p(gm) == 2
        gm.recompile()
        assert fxfuse.match_table()["rope_kv_cache_fusion"] == {SCHEMES[scheme]: 2}
        assert fxfuse.miss_table() == {}
        assert fx.rotary_embedding.default not in targets(gm)
        got, got_caches = _run(gm, names, query_lens, d, args)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    for n in names:
        assert torch.equal(got_caches[n].key_cache, want_caches[n].key_cache)
        assert torch.equal(got_caches[n].value_cache, want_caches[n].value_cache)


def _traced(backend, names, extra_user=False, register=True):
    d = 32
    f = _model(names, d, d, True, "none", extra_user)
    args = (_packed(7, d, 0), _batch([7])[1])
    layers = [AttentionLayer(n, HQ, HKV, d, backend) for n in names] if register else []
    with temporary_layers(*layers):
        gm = trace_graph(f, *args)
        p = rope_kv_cache_fusion()
        fxfuse.reset_match_table()
        n = p(gm)
    return gm, p, n


def _reasons(p):
    return {name: m.first_reason for name, m in p.last_misses.items()}


def test_a_backend_that_does_not_rotate_keeps_the_chain_and_reports_it():
    names = _layer_names(3)
    gm, p, n = _traced(NoRopeBackend(), names)
    assert n == 0 and targets(gm).count(fx.rotary_embedding.default) == 3
    # Each rewrite starts at the rotation: every layer is a near miss of all three, the
    # one for the attention's output scheme because its backend said no.
    assert fxfuse.miss_table() == {"rope_kv_cache_fusion": {r: 3 for r in SCHEMES.values()}}
    assert _reasons(p)["RopeAttention"] == "RopeAttention.check() returned False"


def test_an_unregistered_layer_keeps_the_chain():
    gm, p, n = _traced(NativeAttentionBackend(), ["nowhere.attn"], register=False)
    assert n == 0 and _reasons(p)["RopeAttention"] == "RopeAttention.check() returned False"


def test_a_rotated_key_read_elsewhere_keeps_the_chain():
    gm, p, n = _traced(NativeAttentionBackend(), _layer_names(1), extra_user=True)
    assert n == 0
    assert "outside the chain" in _reasons(p)["RopeAttention"]


def test_the_cache_key_follows_the_layers_backends():
    p = rope_kv_cache_fusion()
    layer = AttentionLayer("model.layers.0.self_attn", HQ, HKV, 32, NativeAttentionBackend())
    with temporary_layers(layer):
        native = p.uuid()
    with temporary_layers(AttentionLayer(layer.name, HQ, HKV, 32, NoRopeBackend())):
        assert p.uuid() != native


def test_sizes_read_off_nodes_become_the_size_inputs():
    """In a dynamic graph a replacement that allocates reads the token count off a node of
    its match; the canonicalization reads it from the graph's own size input instead."""
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env)
    sym = env.create_symbol(5, ConstantSource("s"), dynamic_dim=DimDynamic.DYNAMIC)
    s0 = env.create_symintnode(sym, hint=5)
    with mode:
        x = torch.empty(s0, 8)
    g = torch.fx.Graph()
    size_in = g.placeholder("s0")
    size_in.meta["val"] = s0
    t = g.placeholder("x")
    t.meta["val"] = x
    view = g.call_function(torch.ops.aten.reshape.default, (t, [size_in, 2, 4]))
    view.meta["val"] = x.view(s0, 2, 4)
    n = g.call_function(torch.ops.aten.sym_size.int, (view, 0))
    n.meta["val"] = s0
    e = g.call_function(torch.ops.aten.empty.memory_format, ([n, 2, 4],))
    g.output((e, view))
    assert sizes_from_symbol_inputs(g) == 1
    assert e.args[0][0] is size_in and not any(x.target is torch.ops.aten.sym_size.int for x in g.nodes)
    g.lint()


# --------------------------------------------------------------------------- on the GPU


@pytest.mark.gpu
@pytest.mark.parametrize("hq, hkv, d, tokens", [tuple(v0) + (v1,) for v0, v1 in covering(
    [(32, 8, 128), (16, 8, 256)],
    [1, 256, 4097],
)])
def test_kernel_at_model_shapes_on_the_gpu(hq, hkv, d, tokens):
    """The compiled kernel (not the interpreter) at Qwen3-8B's and Gemma-3-12B's head shapes,
    pages of 64 slots: the same bits as the rotation kernel followed by the cache write."""
    from fxfuse.kernels import rotary as R

    q, k, v = _qkv(tokens, hq, hkv, d, torch.bfloat16, tokens, "cuda")
    q3, k3, v3 = q.view(tokens, hq, d), k.view(tokens, hkv, d), v.view(tokens, hkv, d)
    pos = torch.randint(0, 8192, (tokens,), device="cuda")
    cos_sin = rotary_cos_sin_cache(8192, d, base=1e6, device="cuda")
    blocks = -(-tokens // 64) + 1
    slots = torch.randperm(blocks * 64, device="cuda")[:tokens]
    got, want = (KVCache.allocate(blocks, 64, hkv, d, torch.bfloat16, "cuda") for _ in range(2))
    q_out = R.rope_kv_cache(pos, q3, k3, v3, d, cos_sin, True, got.key_cache, got.value_cache, slots)
    q_ref, k_ref = R.rope(pos, q3, k3, d, cos_sin, True)
    write_kv_cache_native(k_ref, v3.contiguous(), want, slots)
    assert torch.equal(q_out, q_ref)
    assert torch.equal(got.key_cache, want.key_cache) and torch.equal(got.value_cache, want.value_cache)
