"""Per-token-group FP8 (block-scaled activations): the ops and their fusions.

- ``group_fp8_quant`` against an independent float64 reference (the per-token contract
  applied to each group), its scale floor, the column-major layout, and equality with
  the per-token op when one group spans the row;
- each fused op against its unfused chain, bit for bit, and its fake implementation
  (shapes, dtypes, strides) against the real one;
- bad input: clear errors naming the argument, eagerly and at trace time;
- the rewrites of ``rms_quant_fusion`` / ``act_quant_fusion`` on traced graphs: one
  registration for both group sizes and both scale layouts (each reaching its fused op
  unchanged), exact, and refusing look-alikes (an extra user, a cast between).
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fxfuse
from conftest import targets, trace_graph
from fxfuse.ops.group_quant import (
    fused_add_rms_norm_group_fp8_quant_native,
    group_fp8_quant_native,
    rms_norm_group_fp8_quant_native,
    silu_and_mul_group_fp8_quant_native,
)
from fxfuse.ops.quant import dynamic_per_token_fp8_quant_native
from test_ops import dynamic_quant_ref

fx = torch.ops.fxfuse
FP8 = torch.float8_e4m3fn
MIN_SCALE = 1.0 / (448.0 * 512.0)

# (leading dims, hidden, group size): odd token counts, one group and several, 1-D and 3-D inputs.
QUANT_CASES = [((1,), 64, 64), ((7,), 192, 64), ((33,), 256, 128), ((33,), 256, 64), ((2, 3), 128, 128),
               ((), 128, 64), ((5,), 384, 128)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _rand(*shape, dtype=torch.bfloat16, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _weight(hidden, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (1 + 0.2 * torch.randn(hidden, generator=g)).to(dtype)


def _bits(t):
    return t.view(torch.uint8) if t.dtype == FP8 else t


def _equal(a, b):
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a.shape == b.shape and a.stride() == b.stride() and torch.equal(_bits(a), _bits(b))


# --------------------------------------------------------------------------- the quant op


@pytest.mark.parametrize("lead, hidden, group_size", QUANT_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_quant_matches_float64_reference(lead, hidden, dtype, group_size):
    # Groups of very different magnitudes, so every group needs its own scale.
    x = _rand(*lead, hidden, dtype=dtype, seed=hidden + group_size)
    x = (x.float() * torch.logspace(-2, 2, hidden // group_size).repeat_interleave(group_size)).to(dtype)
    q, scales = fx.group_fp8_quant(x, group_size)
    assert q.dtype == FP8 and q.shape == x.shape
    assert scales.dtype == torch.float32 and scales.shape == (*lead, hidden // group_size)
    # The per-token contract (test_ops' float64 reference) applied to each group as a row.
    ref_q, ref_s = dynamic_quant_ref(x.unflatten(-1, (-1, group_size)))
    assert torch.equal(scales, ref_s.squeeze(-1))
    assert torch.equal(q.double(), ref_q.flatten(-2))


def test_group_size_equal_to_hidden_is_the_per_token_op():
    x = _rand(9, 128, scale=5.0, seed=3)
    q, s = fx.group_fp8_quant(x, 128)
    ref_q, ref_s = dynamic_per_token_fp8_quant_native(x)
    assert torch.equal(_bits(q), _bits(ref_q)) and torch.equal(s, ref_s)


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_quant_scale_floor(dtype):
    x = _rand(3, 192, dtype=dtype, seed=4)
    x[0, 64:128] = 0  # one all-zero group
    x[1, :64] = (x[1, :64].float() * 1e-9).to(dtype)  # one group far below the floor
    q, s = fx.group_fp8_quant(x, 64)
    assert s[0, 1].item() == pytest.approx(MIN_SCALE, rel=0) and s[1, 0].item() == pytest.approx(MIN_SCALE, rel=0)
    assert torch.equal(_bits(q[0, 64:128]), torch.zeros(64, dtype=torch.uint8))
    assert (s[2] > MIN_SCALE).all()  # ordinary groups are not floored


@pytest.mark.parametrize("lead", [(5,), (1,), (2, 3)])
def test_column_major_scales(lead):
    x = _rand(*lead, 256, seed=5)
    q, s = fx.group_fp8_quant(x, 64)
    q_cm, s_cm = fx.group_fp8_quant(x, 64, True)
    assert torch.equal(_bits(q), _bits(q_cm)) and torch.equal(s, s_cm)
    assert s.is_contiguous()
    # The group dim is outermost in memory: [groups, *lead] storage seen as [*lead, groups].
    assert s_cm.movedim(-1, 0).is_contiguous()
    if len(lead) == 1:
        assert s_cm.stride() == (1, lead[0])


# --------------------------------------------------------------------------- fused ops == chains


def _fused_cases(lead, hidden, dtype, group_size, column_major, seed):
    x = _rand(*lead, hidden, dtype=dtype, scale=3.0, seed=seed)
    r = _rand(*lead, hidden, dtype=dtype, seed=seed + 1)
    w = _weight(hidden, dtype, seed + 2)
    a = _rand(*lead, 2 * hidden, dtype=dtype, scale=3.0, seed=seed + 3)
    g, cm = group_size, column_major

    def add_chain(x, r, w):
        y, r_out = fx.fused_add_rms_norm(x, r, w, 1e-6)
        return (*fx.group_fp8_quant(y, g, cm), r_out)

    return [
        (fx.rms_norm_group_fp8_quant(x, w, 1e-6, g, cm), fx.group_fp8_quant(fx.rms_norm(x, w, 1e-6), g, cm)),
        (fx.fused_add_rms_norm_group_fp8_quant(x, r, w, 1e-6, g, cm), add_chain(x, r, w)),
        (fx.silu_and_mul_group_fp8_quant(a, g, cm), fx.group_fp8_quant(fx.silu_and_mul(a), g, cm)),
    ]


@pytest.mark.parametrize("lead, hidden", [((1,), 64), ((7,), 192), ((33,), 128), ((2, 3), 256)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("column_major", [False, True])
def test_fused_ops_equal_their_chains(lead, hidden, dtype, column_major):
    for fused, chain in _fused_cases(lead, hidden, dtype, 64, column_major, seed=hidden):
        assert _equal(fused, chain)


def test_fused_ops_quantize_the_rounded_producer_output():
    # Quantizing the fp32 norm (before its rounding to bf16) gives other codes: the fused
    # op must not skip the rounding the unfused chain does.
    x, w = _rand(16, 128, scale=3.0, seed=8), _weight(128, torch.bfloat16, 9)
    q, s = fx.rms_norm_group_fp8_quant(x, w, 1e-6, 64)
    xf = x.float()
    unrounded = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()
    q_unrounded, _ = group_fp8_quant_native(unrounded, 64)
    assert not torch.equal(_bits(q), _bits(q_unrounded))


OP_CASES = [
    ("group_fp8_quant", lambda: (_rand(7, 256), 128, True)),
    ("group_fp8_quant", lambda: (_rand(2, 3, 128, dtype=torch.float16), 64)),
    ("rms_norm_group_fp8_quant", lambda: (_rand(5, 192), _weight(192, torch.bfloat16), 1e-6, 64, True)),
    ("fused_add_rms_norm_group_fp8_quant",
     lambda: (_rand(5, 128), _rand(5, 128, seed=2), _weight(128, torch.bfloat16), 1e-6, 128)),
    ("silu_and_mul_group_fp8_quant", lambda: (_rand(3, 256, dtype=torch.float32), 64, True)),
]


@pytest.mark.parametrize("name, make", OP_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(OP_CASES)])
def test_fake_impl_matches_real(name, make):
    args = make()
    op = getattr(fx, name)
    real = op(*args)
    with FakeTensorMode() as mode:
        fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    for f, r in zip(fake, real, strict=True):
        assert (f.shape, f.dtype, f.stride()) == (r.shape, r.dtype, r.stride())


def test_native_functions_are_the_ops_on_cpu():
    x, r, w = _rand(5, 128, seed=11), _rand(5, 128, seed=12), _weight(128, torch.bfloat16)
    a = _rand(5, 256, seed=13)
    assert _equal(fx.group_fp8_quant(x, 64, True), group_fp8_quant_native(x, 64, True))
    assert _equal(fx.rms_norm_group_fp8_quant(x, w, 1e-5, 128), rms_norm_group_fp8_quant_native(x, w, 1e-5, 128))
    assert _equal(fx.fused_add_rms_norm_group_fp8_quant(x, r, w, 1e-5, 64),
                  fused_add_rms_norm_group_fp8_quant_native(x, r, w, 1e-5, 64))
    assert _equal(fx.silu_and_mul_group_fp8_quant(a, 128), silu_and_mul_group_fp8_quant_native(a, 128))


# --------------------------------------------------------------------------- bad input

BAD = [
    (lambda: fx.group_fp8_quant(_rand(4, 96), 64), ValueError, r"group_fp8_quant: the last dim of `x` \(96\) must be a multiple of `group_size` \(64\)"),
    (lambda: fx.group_fp8_quant(_rand(4, 256), 32), ValueError, r"group_fp8_quant: `group_size` must be one of \(64, 128\).*got 32"),
    (lambda: fx.group_fp8_quant(_rand(4, 256), 256), ValueError, r"`group_size` must be one of \(64, 128\).*got 256"),
    # The schema types group_size: torch's dispatcher names it.
    (lambda: fx.group_fp8_quant(_rand(4, 256), 64.0), RuntimeError, r"type 'int' for argument 'group_size'"),
    (lambda: fx.group_fp8_quant(_rand(4, 256).to(torch.int32), 64), ValueError, r"group_fp8_quant: `x` must have dtype in"),
    (lambda: fx.rms_norm_group_fp8_quant(_rand(4, 192), _weight(192, torch.bfloat16), 1e-6, 128), ValueError,
     r"rms_norm_group_fp8_quant: the last dim of `x` \(192\) must be a multiple of `group_size` \(128\)"),
    (lambda: fx.fused_add_rms_norm_group_fp8_quant(_rand(4, 128), _rand(4, 64), _weight(128, torch.bfloat16), 1e-6, 64),
     ValueError, r"fused_add_rms_norm_group_fp8_quant: `residual` must have shape"),
    (lambda: fx.silu_and_mul_group_fp8_quant(_rand(4, 192), 64), ValueError,
     r"silu_and_mul_group_fp8_quant: half the last dim of `x` .* \(96\) must be a multiple of `group_size` \(64\)"),
]


@pytest.mark.parametrize("call, exc, msg", BAD)
def test_bad_input_is_named(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


def test_bad_input_fails_at_trace_time():
    # The fake implementation validates too, so a bad model fails when it is compiled.
    with pytest.raises(ValueError, match=r"the last dim of `x` \(96\) must be a multiple of `group_size` \(64\)"):
        trace_graph(lambda x: fx.group_fp8_quant(x, 64), _rand(4, 96))


# --------------------------------------------------------------------------- the rewrites


@pytest.fixture(scope="module")
def passes():
    # Registered once and reused across graphs, as a compiled model does.
    return [fxfuse.passes.rms_quant_fusion(), fxfuse.passes.act_quant_fusion()]


def _fuse(fn, args, passes):
    gm = trace_graph(fn, *args)
    n = sum(p(gm) for p in passes)
    gm.recompile()
    return gm, n


def _chains(group_size, column_major):
    g, cm = group_size, column_major
    # column_major=False is also written as the default (left out), as models write it.
    flag = (cm,) if cm else ()

    def rms(x, r, w, a):
        return fx.group_fp8_quant(fx.rms_norm(x, w, 1e-5), g, *flag)

    def add_rms(x, r, w, a):
        y, r_out = fx.fused_add_rms_norm(x, r, w, 1e-6)
        q, s = fx.group_fp8_quant(y, g, *flag)
        return q, s, r_out * 2

    def act(x, r, w, a):
        return fx.group_fp8_quant(fx.silu_and_mul(a), g, *flag)

    return [
        ("rms_quant_fusion", "RmsNormGroupFp8Quant", rms, fx.rms_norm_group_fp8_quant),
        ("rms_quant_fusion", "FusedAddRmsNormGroupFp8Quant", add_rms, fx.fused_add_rms_norm_group_fp8_quant),
        ("act_quant_fusion", "SiluMulGroupFp8Quant", act, fx.silu_and_mul_group_fp8_quant),
    ]


@pytest.mark.parametrize("tokens, hidden, dtype, group_size, column_major", [
    (7, 128, torch.bfloat16, 64, False), (1, 384, torch.float16, 128, True),
    (33, 256, torch.bfloat16, 128, False), (5, 192, torch.float32, 64, True),
])
def test_group_rewrites_match_and_are_exact(tokens, hidden, dtype, group_size, column_major, passes):
    seed = tokens * hidden + group_size
    args = (_rand(tokens, hidden, dtype=dtype, scale=3.0, seed=seed), _rand(tokens, hidden, dtype=dtype, seed=seed + 1),
            _weight(hidden, dtype, seed + 2), _rand(tokens, 2 * hidden, dtype=dtype, scale=3.0, seed=seed + 3))
    for pass_name, rewrite, chain, fused_op in _chains(group_size, column_major):
        fxfuse.reset_match_table()
        gm, n = _fuse(chain, args, passes)
        assert n == 1 and fxfuse.match_table() == {pass_name: {rewrite: 1}}
        assert fx.group_fp8_quant.default not in targets(gm)
        assert fused_op.default in targets(gm)
        # Bits, shapes and strides: the matched group size and layout reach the fused op.
        assert _equal(gm(*args), chain(*args))


def test_one_registration_serves_both_group_sizes_and_layouts(passes):
    def four(x, y, w, w2):
        a = fx.group_fp8_quant(fx.rms_norm(x, w, 1e-5), 64)
        b = fx.group_fp8_quant(fx.rms_norm(x, w, 1e-5), 128, True)
        c = fx.group_fp8_quant(fx.rms_norm(y, w2, 1e-6), 128)
        d = fx.group_fp8_quant(fx.rms_norm(y, w2, 1e-6), 64, True)
        return a, b, c, d

    args = (_rand(5, 256, scale=2.0, seed=20), _rand(3, 384, dtype=torch.float16, seed=21),
            _weight(256, torch.bfloat16), _weight(384, torch.float16))
    gm, n = _fuse(four, args, passes)
    assert n == 4 and fxfuse.match_table() == {"rms_quant_fusion": {"RmsNormGroupFp8Quant": 4}}
    calls = sorted((nd.args[3], nd.args[4] if len(nd.args) > 4 else False)
                   for nd in gm.graph.nodes if nd.target is fx.rms_norm_group_fp8_quant.default)
    assert calls == [(64, False), (64, True), (128, False), (128, True)]
    assert _equal(gm(*args), four(*args))


def test_norm_output_with_another_user_is_not_fused(passes):
    def chain(x, w):
        y = fx.rms_norm(x, w, 1e-5)
        return fx.group_fp8_quant(y, 64), y.sum()

    args = (_rand(4, 128), _weight(128, torch.bfloat16))
    gm, n = _fuse(chain, args, passes)
    assert n == 0 and fx.rms_norm.default in targets(gm)
    sites = fxfuse.explain(trace_graph(chain, *args), passes[:1],
                           rewrite="RmsNormGroupFp8Quant").sites
    assert sites and all(not s.matched and "is also used by sum" in s.reason for s in sites)


def test_silu_output_with_another_user_is_not_fused(passes):
    def chain(a):
        y = fx.silu_and_mul(a)
        q, s = fx.group_fp8_quant(y, 64, True)
        return q, s, y

    gm, n = _fuse(chain, (_rand(4, 256),), passes)
    assert n == 0 and fx.silu_and_mul.default in targets(gm)


@pytest.mark.parametrize("producer", ["rms", "add_rms", "silu"])
def test_dtype_cast_between_is_not_fused(producer, passes):
    # Quantizing the fp16 rounding of a bf16 producer is not what the fused op computes.
    def chain(x, r, w, a):
        if producer == "rms":
            y = fx.rms_norm(x, w, 1e-5)
        elif producer == "add_rms":
            y = fx.fused_add_rms_norm(x, r, w, 1e-5)[0]
        else:
            y = fx.silu_and_mul(a)
        return fx.group_fp8_quant(y.to(torch.float16), 64)

    args = (_rand(4, 128, scale=3.0), _rand(4, 128, seed=1), _weight(128, torch.bfloat16), _rand(4, 256, scale=3.0))
    gm, n = _fuse(chain, args, passes)
    assert n == 0 and fx.group_fp8_quant.default in targets(gm)
    assert _equal(gm(*args), chain(*args))
    sites = fxfuse.explain(trace_graph(chain, *args), passes).sites
    group_sites = [s for s in sites if "Group" in s.rewrite]
    assert group_sites and not any(s.matched for s in group_sites)
    assert any("convert_element_type" in s.reason for s in group_sites)


def test_group_rewrites_leave_per_token_chains_to_their_own_rewrites(passes):
    def chain(x, w):
        return fx.dynamic_per_token_fp8_quant(fx.rms_norm(x, w, 1e-5)), fx.group_fp8_quant(fx.rms_norm(x * 2, w, 1e-5), 128)

    args = (_rand(6, 128), _weight(128, torch.bfloat16))
    gm, n = _fuse(chain, args, passes)
    assert n == 2
    assert fxfuse.match_table() == {"rms_quant_fusion": {"RmsNormDynamicFp8Quant": 1, "RmsNormGroupFp8Quant": 1}}
    assert _equal(gm(*args), chain(*args))


def test_default_flag_canonicalization_only_fills_the_default():
    from fxfuse.canonicalize import fill_custom_op_defaults

    gm = trace_graph(lambda x: (fx.group_fp8_quant(x, 64), fx.group_fp8_quant(x * 2, 128, True)), _rand(3, 128))
    assert fill_custom_op_defaults(gm.graph) == 1
    flags = [nd.args[1:] for nd in gm.graph.nodes if nd.target is fx.group_fp8_quant.default]
    assert flags == [(64, False), (128, True)]
    assert fill_custom_op_defaults(gm.graph) == 0  # idempotent
