"""``qk_norm_rope_fusion`` on traced graphs: the per-head norm of q and k (Llama's or Gemma's)
then the rotary embedding becomes one fused op, bit for bit, whatever the shapes, style and
rotary dim; the copies of the packed projection's slices go with it; look-alikes are left
alone and reported as near misses with their reason."""

import pytest
import torch

import fxfuse
from conftest import targets, trace_graph
from fxfuse.ops.rotary import rotary_cos_sin_cache
from fxfuse.passes.qk_norm_rope import QkGemmaNormRope, QkNormRope, drop_copies, qk_norm_rope_fusion

fx = torch.ops.fxfuse
aten = torch.ops.aten
EPS = 1e-6

# (tokens, q heads, kv heads, head size, rotary dim): one token (its slices are contiguous:
# no copies), odd token and head counts, full and partial rotary (half, 48 of 128: not a
# power of two, 6 of 16).
CASES = [
    (1, 4, 2, 64, 64),
    (7, 5, 1, 128, 64),
    (33, 3, 3, 128, 48),
    (6, 2, 1, 16, 6),
]


@pytest.fixture(scope="module")
def qk_pass():
    return qk_norm_rope_fusion()


def _norm(gemma):
    return fx.gemma_rms_norm if gemma else fx.rms_norm


def _heads_norm(norm, x, w, heads, head):
    # As the reference models write it (fxfuse.models.layers.head_norm).
    t = x.shape[0]
    return norm(x.contiguous().view(t, heads, head), w, EPS).view(t, heads * head)


def _inputs(case, dtype, gemma, seed, wdtype=None):
    tokens, hq, hk, hd, rot = case
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (hq + 2 * hk) * hd, generator=g).to(dtype)
    pos = torch.randint(0, 4096, (tokens,), generator=g)
    wdtype = wdtype or (torch.float32 if gemma else dtype)
    base = 0.0 if gemma else 1.0  # Gemma's weights are offsets from 1
    qw = (base + 0.1 * torch.randn(hd, generator=g)).to(wdtype)
    kw = (base + 0.1 * torch.randn(hd, generator=g)).to(wdtype)
    cache = rotary_cos_sin_cache(4096, rot, base=1e6)
    return qkv, pos, qw, kw, cache


def _chain(case, gemma, is_neox):
    _, hq, hk, hd, _ = case
    norm = _norm(gemma)

    def chain(qkv, pos, qw, kw, cache):
        q, k, v = qkv.split([hq * hd, hk * hd, hk * hd], dim=-1)
        qn = _heads_norm(norm, q, qw, hq, hd)
        kn = _heads_norm(norm, k, kw, hk, hd)
        q2, k2 = fx.rotary_embedding(pos, qn, kn, hd, cache, is_neox)
        return q2, k2, v * 2

    return chain


def _apply(p, gm):
    fxfuse.reset_match_table()
    n = p(gm)
    gm.recompile()
    return n


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("gemma", [False, True])
def test_fuses_exactly_every_shape_style_and_rotary_dim(qk_pass, case, dtype, is_neox, gemma):
    args = _inputs(case, dtype, gemma, seed=sum(case))
    chain = _chain(case, gemma, is_neox)
    gm = trace_graph(chain, *args)
    copies = targets(gm).count(aten.clone.default)
    assert copies == (0 if case[0] == 1 else 2)  # one token: the slices are contiguous already
    assert _apply(qk_pass, gm) == 1
    name = "QkGemmaNormRope" if gemma else "QkNormRope"
    assert fxfuse.match_table() == {"qk_norm_rope_fusion": {name: 1}}
    assert fxfuse.miss_table() == {}
    ops = targets(gm)
    fused = fx.qk_gemma_norm_rope.default if gemma else fx.qk_norm_rope.default
    assert ops.count(fused) == 1
    assert not {fx.rms_norm.default, fx.gemma_rms_norm.default, fx.rotary_embedding.default} & set(ops)
    # The fused op reads the slices of the packed projection in place: the copies are gone.
    assert aten.clone.default not in ops and qk_pass.last_copies_dropped == copies
    for a, b in zip(gm(*args), chain(*args), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_gemma_weights_in_fp32_or_the_model_dtype(qk_pass, wdtype):
    case = CASES[1]
    args = _inputs(case, torch.bfloat16, True, seed=5, wdtype=wdtype)
    gm = trace_graph(_chain(case, True, True), *args)
    assert _apply(qk_pass, gm) == 1
    assert torch.equal(gm(*args)[0], _chain(case, True, True)(*args)[0])


def test_one_registration_for_every_layer_and_norm_kind(qk_pass):
    """Two layers of each norm, other head counts and eps in one graph: four matches from
    the pass's two rewrites."""
    case_a, case_b = (5, 4, 2, 32, 32), (5, 2, 2, 64, 32)
    chains = [(_chain(case_a, False, True), _inputs(case_a, torch.bfloat16, False, 1)),
              (_chain(case_b, True, False), _inputs(case_b, torch.bfloat16, True, 2)),
              (_chain(case_a, False, True), _inputs(case_a, torch.bfloat16, False, 3)),
              (_chain(case_b, True, True), _inputs(case_b, torch.bfloat16, True, 4))]

    def layers(*flat):
        return [out for i, (chain, _) in enumerate(chains) for out in chain(*flat[5 * i: 5 * i + 5])]

    flat = [a for _, args in chains for a in args]
    gm = trace_graph(layers, *flat)
    assert _apply(qk_pass, gm) == 4
    assert fxfuse.match_table() == {"qk_norm_rope_fusion": {"QkNormRope": 2, "QkGemmaNormRope": 2}}
    assert all(torch.equal(a, b) for a, b in zip(gm(*flat), layers(*flat)))


def _miss_reason(p):
    (misses,) = p.last_misses.values()
    return misses.first_reason


def test_fp32_weight_on_a_bf16_llama_norm_chain_is_refused(qk_pass):
    """Llama's norm multiplies in the model dtype: an fp32 weight there is not the chain the
    fused op computes (its kernel reads the weight as the model dtype). The op refuses such
    a weight itself, so the graph here is the bf16 chain with the weight's value made fp32,
    as a graph from another op library (or an Inductor pass) could hold it."""
    case = CASES[1]
    args = _inputs(case, torch.bfloat16, False, seed=9)
    gm = trace_graph(_chain(case, False, True), *args)
    weight = [n for n in gm.graph.nodes if n.op == "placeholder"][2]
    fake = weight.meta["val"]
    with fake.fake_mode:
        weight.meta["val"] = torch.empty(fake.shape, dtype=torch.float32)
    assert _apply(qk_pass, gm) == 0
    assert fx.rotary_embedding.default in targets(gm)
    assert fxfuse.miss_table() == {"qk_norm_rope_fusion": {"QkNormRope": 1}}
    reason = _miss_reason(qk_pass)
    assert "q_weight" in reason and "float32" in reason


def test_a_normalized_head_read_elsewhere_is_not_fused(qk_pass):
    case = CASES[2]
    args = _inputs(case, torch.bfloat16, False, seed=11)
    _, hq, hk, hd, _ = case

    def chain(qkv, pos, qw, kw, cache):
        q, k, _ = qkv.split([hq * hd, hk * hd, hk * hd], dim=-1)
        qn = _heads_norm(fx.rms_norm, q, qw, hq, hd)
        kn = _heads_norm(fx.rms_norm, k, kw, hk, hd)
        return (*fx.rotary_embedding(pos, qn, kn, hd, cache, True), qn)  # the normalized q escapes

    gm = trace_graph(chain, *args)
    assert _apply(qk_pass, gm) == 0
    assert fxfuse.miss_table() == {"qk_norm_rope_fusion": {"QkNormRope": 1}}
    assert "outside the chain" in _miss_reason(qk_pass)
    assert all(torch.equal(a, b) for a, b in zip(gm(*args), chain(*args)))


def test_a_norm_over_another_width_than_the_rotated_head_is_not_fused(qk_pass):
    """Normalizing 64-wide groups of 128-wide heads is another computation than the fused
    op's per-head norm: the norm's width is the rotation's head size in the pattern."""
    hq, hk, hd = 2, 1, 128
    args = _inputs((5, hq, hk, hd, hd), torch.bfloat16, False, seed=13)
    qkv, pos, _, _, cache = args
    qw, kw = torch.ones(hd // 2, dtype=torch.bfloat16), torch.ones(hd // 2, dtype=torch.bfloat16)

    def chain(qkv, pos, qw, kw, cache):
        q, k, _ = qkv.split([hq * hd, hk * hd, hk * hd], dim=-1)
        qn = _heads_norm(fx.rms_norm, q, qw, 2 * hq, hd // 2)
        kn = _heads_norm(fx.rms_norm, k, kw, 2 * hk, hd // 2)
        return fx.rotary_embedding(pos, qn, kn, hd, cache, True)

    gm = trace_graph(chain, qkv, pos, qw, kw, cache)
    assert _apply(qk_pass, gm) == 0
    assert fxfuse.miss_table() == {"qk_norm_rope_fusion": {"QkNormRope": 1}}
    assert "head_size" in _miss_reason(qk_pass)


def test_the_gemma_norm_chain_is_not_the_llama_norm_chain(qk_pass):
    """Each norm only to its own fused op (their numerics differ): a Gemma chain fuses into
    qk_gemma_norm_rope, and is no near miss of the Llama-norm rewrite."""
    case = CASES[1]
    args = _inputs(case, torch.bfloat16, True, seed=17)
    gm = trace_graph(_chain(case, True, True), *args)
    assert _apply(qk_pass, gm) == 1
    assert fxfuse.match_table() == {"qk_norm_rope_fusion": {"QkGemmaNormRope": 1}}
    assert fxfuse.miss_table() == {}


def test_a_rotation_without_norms_and_a_hidden_state_norm_are_not_near_misses(qk_pass):
    """The chain is found from the reshape of q into heads: a Llama's rotation and the norm
    of a hidden state (both custom ops, which alone would count) are not chains of this pass."""
    hq, hk, hd = 4, 2, 32
    w = torch.ones(hq * hd, dtype=torch.bfloat16)

    def llama(x, qkv, pos, cache):
        h = fx.rms_norm(x, w, EPS)
        q, k, v = qkv.split([hq * hd, hk * hd, hk * hd], dim=-1)
        q2, k2 = fx.rotary_embedding(pos, q, k, hd, cache, True)
        return h, q2.view(5, hq, hd), k2, v.reshape(5, hk, hd).contiguous()

    args = (torch.randn(5, hq * hd).bfloat16(), torch.randn(5, (hq + 2 * hk) * hd).bfloat16(), torch.arange(5),
            rotary_cos_sin_cache(64, hd))
    gm = trace_graph(llama, *args)
    assert _apply(qk_pass, gm) == 0
    assert fxfuse.miss_table() == {} and qk_pass.last_copies_dropped == 0


def test_copies_another_op_reads_stay():
    """`drop_copies` removes a copy only where the fused op is its one reader."""
    hq, hk, hd = 2, 1, 16
    qw = kw = torch.ones(hd, dtype=torch.bfloat16)
    cache = rotary_cos_sin_cache(64, hd)

    def f(qkv, pos):
        q, k, _ = qkv.split([hq * hd, hk * hd, hk * hd], dim=-1)
        qc, kc = q.contiguous(), k.contiguous()
        q2, k2 = fx.qk_norm_rope(pos, qc, kc, qw, kw, EPS, hd, cache, True)
        return q2, k2, qc * 2

    args = (torch.randn(5, (hq + 2 * hk) * hd).bfloat16(), torch.arange(5))
    gm = trace_graph(f, *args)
    assert targets(gm).count(aten.clone.default) == 2
    assert drop_copies(gm.graph) == 1  # k's copy; q's is read by the multiply too
    gm.recompile()
    assert targets(gm).count(aten.clone.default) == 1
    assert all(torch.equal(a, b) for a, b in zip(gm(*args), f(*args)))


def test_rewrites_declare_their_anchor_and_free_dtypes():
    assert QkNormRope.anchor is aten.reshape.default and QkGemmaNormRope.anchor is aten.reshape.default
    assert "q_weight" not in QkNormRope.free_dtypes  # typed: the Llama norm's weight is q's dtype
    assert {"q_weight", "k_weight"} <= set(QkGemmaNormRope.free_dtypes)
    assert "qk_norm_rope_fusion" not in [p.name for p in fxfuse.default_passes(fxfuse.FusionConfig(qk_norm_rope=False))]
