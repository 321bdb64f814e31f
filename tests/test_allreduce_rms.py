"""``allreduce_rms_fusion`` on traced graphs with functional collectives, in one process (a
one-rank gloo world). Over 2 and 4 ranks, on the tensor-parallel model: tests/test_tp.py."""

import pytest
import torch
import torch.distributed as dist

import fxfuse
from fxfuse.passes.allreduce_rms import CAST_DTYPES, REWRITES, allreduce_rms_fusion
from conftest import trace_graph

fx = torch.ops.fxfuse
c10d = torch.ops._c10d_functional
EPS = 1e-5


@pytest.fixture(scope="module")
def group():
    assert not dist.is_initialized(), "another test left a process group behind"
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD.group_name
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def fusion():
    return allreduce_rms_fusion()


def _reduced(x, g, model_dtype):
    total = c10d.wait_tensor(c10d.all_reduce(x, "sum", g))
    return total.to(model_dtype) if x.dtype != model_dtype else total


def _chains(g, dt):
    """(rewrite class, fn(x, r, w, s) -> outputs) for each chain of the pass; ``s`` holds the
    scale the chain's quant takes (graph inputs, as Dynamo lifts them)."""

    def norm(x, r, w, s):
        return fx.fused_add_rms_norm(_reduced(x, g, dt), r, w, EPS)

    def unused_residual(x, r, w, s):
        return norm(x, r, w, s)[0]

    def static(x, r, w, s):
        y, r_out = norm(x, r, w, s)
        return fx.static_scaled_fp8_quant(y, s), r_out

    def dynamic(x, r, w, s):
        y, r_out = norm(x, r, w, s)
        return (*fx.dynamic_per_token_fp8_quant(y), r_out)

    def dynamic_ub(x, r, w, s):
        y, r_out = norm(x, r, w, s)
        return (*fx.dynamic_per_token_fp8_quant(y, s * 40), r_out)

    def nvfp4(x, r, w, s):
        y, r_out = norm(x, r, w, s)
        return (*fx.nvfp4_quant(y, s * 10000), r_out)

    def group_quant(x, r, w, s):
        y, r_out = norm(x, r, w, s)
        return (*fx.group_fp8_quant(y, 64, True), r_out)

    return list(zip(REWRITES, [norm, unused_residual, static, dynamic, dynamic_ub, nvfp4, group_quant], strict=True))


def _inputs(tokens, hidden, dt, fp32_partials, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    x = x if fp32_partials else x.to(dt)
    return x, torch.randn(tokens, hidden, generator=gen).to(dt), (0.5 + torch.rand(hidden, generator=gen)).to(dt)


def _apply(fusion, gm):
    """Run the pass as Inductor would (a PassManager: topological sort and lint after it);
    returns the number of replacements."""
    fxfuse.PassManager([fusion])(gm.graph)
    gm.recompile()
    return sum(fusion.last_counts.values())


def _bits(t):
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.uint8) else t


@pytest.mark.parametrize("dt, fp32_partials", [(torch.bfloat16, False), (torch.float16, False),
                                               (torch.bfloat16, True), (torch.float16, True)])
@pytest.mark.parametrize("tokens", [1, 7])
def test_each_chain_becomes_its_fused_op_and_computes_the_same(group, fusion, dt, fp32_partials, tokens):
    for cls, fn in _chains(group, dt):
        args = (*_inputs(tokens, 128, dt, fp32_partials, seed=tokens), torch.tensor([0.05]))
        gm = trace_graph(fn, *args)
        fxfuse.reset_match_table()
        assert _apply(fusion, gm) == 1, cls.__name__
        name = cls.__name__ if not fp32_partials else f"{cls.__name__}(cast_to={dt})"
        assert fxfuse.match_table() == {"allreduce_rms_fusion": {name: 1}}
        targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
        assert c10d.all_reduce.default not in targets and fx.fused_add_rms_norm.default not in targets
        for got, want in zip(gm(*args), fn(*args), strict=True):
            assert got.dtype == want.dtype and torch.equal(_bits(got), _bits(want)), cls.__name__


def test_one_rewrite_per_chain_whatever_the_number_of_layers(group, fusion):
    def layers(x0, x1, x2, x3, r, w, s):
        outs = []
        for x in (x0, x1, x2, x3):  # four "layers", one all-reduce each
            y, r = fx.fused_add_rms_norm(_reduced(x, group, torch.bfloat16), r, w, EPS)
            outs.append(fx.static_scaled_fp8_quant(y, s))
        return (*outs, r)

    x, r, w = _inputs(5, 64, torch.bfloat16, True)
    gm = trace_graph(layers, x, x * 2, x * 3, x * 4, r, w, torch.tensor([0.1]))
    assert _apply(fusion, gm) == 4
    assert fxfuse.match_table() == {
        "allreduce_rms_fusion": {"AllReduceFusedAddRmsNormStaticFp8Quant(cast_to=torch.bfloat16)": 4}
    }
    # Seven chains, each with partial sums in the model dtype or fp32 for each of CAST_DTYPES.
    assert len(fusion.rewrites) == len(REWRITES) * (1 + len(CAST_DTYPES))


def test_a_group_this_process_does_not_have_is_not_fused(group, fusion):
    x, r, w = _inputs(5, 64, torch.bfloat16, False)
    gm = trace_graph(lambda x, r, w: fx.fused_add_rms_norm(_reduced(x, "tp-elsewhere", torch.bfloat16), r, w, EPS),
                     x, r, w)
    assert _apply(fusion, gm) == 0
    # Every rewrite of the pass starts at the all-reduce: one near miss each.
    misses = fxfuse.miss_table()["allreduce_rms_fusion"]
    assert misses["AllReduceFusedAddRmsNorm"] == 1 and len(misses) == len(fusion.rewrites)
    reason = fusion.last_misses["AllReduceFusedAddRmsNorm"].first_reason
    assert "AllReduceFusedAddRmsNorm.check() returned False" in reason


def test_a_group_without_a_fused_implementation_on_the_device_is_not_fused(group, fusion):
    # gloo serves CUDA tensors through host copies: nothing to fuse for (fake CUDA tensors).
    with fxfuse.compat.fake_mode():
        x, r = (torch.empty(5, 64, dtype=torch.bfloat16, device="cuda") for _ in range(2))
        w = torch.empty(64, dtype=torch.bfloat16, device="cuda")
        gm = fxfuse.compat.trace_functional(
            lambda x, r, w: fx.fused_add_rms_norm(_reduced(x, group, torch.bfloat16), r, w, EPS), [x, r, w], v2=True)
    assert _apply(fusion, gm) == 0
    assert "check() returned False" in fusion.last_misses["AllReduceFusedAddRmsNorm"].first_reason
    assert fxfuse.ops._groups.fused_implementation(group, "cuda") is None


def test_all_reduces_outside_the_chains_are_left_alone_and_counted_as_misses(group, fusion):
    def f(x, x2, r, w):
        a = _reduced(x, group, torch.bfloat16)
        no_residual = fx.rms_norm(a, w, EPS)  # an all-reduce into a plain norm (no residual)
        b = _reduced(x2, group, torch.bfloat16)
        y, r_out = fx.fused_add_rms_norm(b, r, w, EPS)
        return no_residual, y, r_out, b.sum()  # b has another user besides the norm

    x, r, w = _inputs(5, 64, torch.bfloat16, False)
    gm = trace_graph(f, x, x.clone(), r, w)
    assert _apply(fusion, gm) == 0
    assert sum(1 for n in gm.graph.nodes if n.target is c10d.all_reduce.default) == 2
    assert fxfuse.miss_table()["allreduce_rms_fusion"]["AllReduceFusedAddRmsNorm"] == 2


def test_dtypes_the_fused_op_does_not_take_are_not_matched(group, fusion):
    x, r, w = _inputs(5, 64, torch.bfloat16, False)

    def fp16_partials(x, r, w):  # fp16 partial sums rounded to bf16: no fused op takes that
        return fx.fused_add_rms_norm(_reduced(x.half(), group, torch.bfloat16), r, w, EPS)

    assert _apply(fusion, trace_graph(fp16_partials, x, r, w)) == 0

    def fp32_model(x, r, w):  # the control: an fp32 model reduces in its own dtype
        return fx.fused_add_rms_norm(_reduced(x, group, torch.float32), r, w, EPS)

    assert _apply(fusion, trace_graph(fp32_model, x.float(), r.float(), w.float())) == 1
    assert fxfuse.match_table() == {"allreduce_rms_fusion": {"AllReduceFusedAddRmsNorm": 1}}


def test_cache_state_names_every_group_and_changes_with_them(group, fusion):
    before = fusion.uuid()
    state = fusion.rewrites[0].cache_state()
    assert state == {group: ((("cpu", "gloo"), ("cuda", "gloo")), 1, (("cpu", "native"), ("cuda", None)))}
    sub = dist.new_group([0], backend="gloo")
    try:
        assert set(fusion.rewrites[0].cache_state()) == {group, sub.group_name}
        assert fusion.uuid() != before
    finally:
        dist.destroy_process_group(sub)
    assert fusion.uuid() == before


def test_default_passes_run_it_before_rms_quant_fusion():
    names = [p.name for p in fxfuse.default_passes()]
    assert names.index("allreduce_rms_fusion") < names.index("rms_quant_fusion") < names.index("native_lowering")
    assert "allreduce_rms_fusion" not in [
        p.name for p in fxfuse.default_passes(fxfuse.FusionConfig(allreduce_rms=False))
    ]


def test_it_absorbs_the_norm_quant_fusion_of_its_chain(group):
    def f(x, r, w, s):
        y, r_out = fx.fused_add_rms_norm(_reduced(x, group, torch.bfloat16), r, w, EPS)
        return fx.static_scaled_fp8_quant(y, s), r_out

    x, r, w = _inputs(5, 64, torch.bfloat16, True)
    gm = trace_graph(f, x, r, w, torch.tensor([0.1]))
    fxfuse.PassManager(fxfuse.default_passes())(gm.graph)
    table = fxfuse.match_table()
    assert table == {"allreduce_rms_fusion": {"AllReduceFusedAddRmsNormStaticFp8Quant(cast_to=torch.bfloat16)": 1}}
    assert "rms_quant_fusion" not in fxfuse.miss_table()  # its site went into the all-reduce fusion
