"""Values the ops cannot take, and what they do with inf/NaN inputs (docs/kernels.md, "Values").

What is checked:
- every op argument that is a static scale (the op divides by it or multiplies with it)
  rejects 0, -0.0, a negative, NaN, +inf and -inf with a ValueError naming the op, the
  argument and the value, and the mutating ``attention`` writes nothing (output, block
  scales, KV cache) before raising;
- valid scales, tiny and huge included, still give the native reference's result;
- ``fp8_linear``'s per-token ``x_scale`` is data, not a static scale: not checked;
- fake tensors, fake tracing and ``torch.compile`` see no data-dependent read, and a
  compiled graph still checks at run time;
- the switch: always on off CUDA, ``FXFUSE_CHECK_SCALES=1`` on CUDA, never during capture;
- the inf/NaN input behaviour the docs state, for the native ops and for the Triton
  kernels (CPU interpreter here, the GPU where there is one).
"""

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fxfuse.ops  # noqa: F401  (registers torch.ops.fxfuse.*)
from fxfuse import compat
from fxfuse.attention import AttentionLayer, AttentionMetadata, ForwardContext, KVCache, NativeAttentionBackend
from fxfuse.attention import set_forward_context, temporary_layers
from fxfuse.ops import _dispatch
from fxfuse.ops import _validate as V
from fxfuse.ops.activation import silu_and_mul_native
from fxfuse.ops.fused import (
    fused_add_rms_norm_dynamic_per_token_fp8_quant_native,
    fused_add_rms_norm_static_fp8_quant_native,
    rms_norm_dynamic_per_token_fp8_quant_native,
    rms_norm_static_fp8_quant_native,
    silu_and_mul_static_fp8_quant_native,
)
from fxfuse.ops.linear import fp8_linear_native
from fxfuse.ops.nvfp4 import (
    nvfp4_block_scales_shape,
    nvfp4_dequantize,
    nvfp4_quant_native,
    silu_and_mul_nvfp4_quant_native,
    unswizzle_block_scales,
)
from fxfuse.ops.quant import dynamic_per_token_fp8_quant_native, static_scaled_fp8_quant_native

from conftest import targets, trace_graph

fx = torch.ops.fxfuse
FP8 = torch.float8_e4m3fn
EPS = 1e-6
POS_448, NEG_448 = 0x7E, 0xFE  # float8_e4m3fn +-448
INF, NAN = float("inf"), float("nan")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(shape, dtype=torch.bfloat16, seed=0, scale=1.0):
    return (torch.randn(shape, generator=_gen(seed)) * scale).to(dtype)


def rand_scale(seed, lo=0.01, hi=0.1):
    """A fresh positive fp32 scale, shape [1]."""
    return lo + (hi - lo) * torch.rand(1, generator=_gen(seed))


def bits(t):
    return t.contiguous().view(torch.uint8)


# --------------------------------------------------------------------------- the ops and their scales

_X = randn((7, 48), seed=1)  # odd token count; 48 = three NVFP4 blocks
_R = randn((7, 48), seed=2)
_W = (0.5 + torch.rand(48, generator=_gen(3))).to(torch.bfloat16)
_XS = randn((7, 2 * 48), seed=4)  # silu_and_mul input


def _linear_operands(seed):
    x = randn((5, 32), seed=seed, scale=2.0)
    w = randn((24, 32), seed=seed + 1, scale=0.1)
    xs, ws = rand_scale(seed + 2), rand_scale(seed + 3, 1e-4, 1e-3)
    return static_scaled_fp8_quant_native(x, xs), static_scaled_fp8_quant_native(w, ws), xs, ws


_XQ, _WQ, _XSC, _WSC = _linear_operands(5)

# id -> (op name, argument name, call(scale) -> output, native reference(scale) or None).
# Each call differs from a valid call in the scale only.
SCALE_ARGS = {
    "static_scaled_fp8_quant": (
        "static_scaled_fp8_quant", "scale",
        lambda s: fx.static_scaled_fp8_quant(_X, s), lambda s: static_scaled_fp8_quant_native(_X, s)),
    "rms_norm_static_fp8_quant": (
        "rms_norm_static_fp8_quant", "scale",
        lambda s: fx.rms_norm_static_fp8_quant(_X, _W, s, EPS),
        lambda s: rms_norm_static_fp8_quant_native(_X, _W, s, EPS)),
    "fused_add_rms_norm_static_fp8_quant": (
        "fused_add_rms_norm_static_fp8_quant", "scale",
        lambda s: fx.fused_add_rms_norm_static_fp8_quant(_X, _R, _W, s, EPS),
        lambda s: fused_add_rms_norm_static_fp8_quant_native(_X, _R, _W, s, EPS)),
    "silu_and_mul_static_fp8_quant": (
        "silu_and_mul_static_fp8_quant", "scale",
        lambda s: fx.silu_and_mul_static_fp8_quant(_XS, s), lambda s: silu_and_mul_static_fp8_quant_native(_XS, s)),
    "nvfp4_quant": (
        "nvfp4_quant", "global_scale", lambda s: fx.nvfp4_quant(_X, s), lambda s: nvfp4_quant_native(_X, s)),
    "silu_and_mul_nvfp4_quant": (
        "silu_and_mul_nvfp4_quant", "global_scale",
        lambda s: fx.silu_and_mul_nvfp4_quant(_XS, s), lambda s: silu_and_mul_nvfp4_quant_native(_XS, s)),
    "dynamic_per_token_fp8_quant": (
        "dynamic_per_token_fp8_quant", "scale_ub",
        lambda s: fx.dynamic_per_token_fp8_quant(_X, s), lambda s: dynamic_per_token_fp8_quant_native(_X, s)),
    "rms_norm_dynamic_per_token_fp8_quant": (
        "rms_norm_dynamic_per_token_fp8_quant", "scale_ub",
        lambda s: fx.rms_norm_dynamic_per_token_fp8_quant(_X, _W, EPS, s),
        lambda s: rms_norm_dynamic_per_token_fp8_quant_native(_X, _W, EPS, s)),
    "fused_add_rms_norm_dynamic_per_token_fp8_quant": (
        "fused_add_rms_norm_dynamic_per_token_fp8_quant", "scale_ub",
        lambda s: fx.fused_add_rms_norm_dynamic_per_token_fp8_quant(_X, _R, _W, EPS, s),
        lambda s: fused_add_rms_norm_dynamic_per_token_fp8_quant_native(_X, _R, _W, EPS, s)),
    "fp8_linear-x_scale": (
        "fp8_linear", "x_scale",
        lambda s: fx.fp8_linear(_XQ, _WQ, s, _WSC, None, torch.bfloat16),
        lambda s: fp8_linear_native(_XQ, _WQ, s, _WSC, None, torch.bfloat16)),
    "fp8_linear-w_scale": (
        "fp8_linear", "w_scale",
        lambda s: fx.fp8_linear(_XQ, _WQ, _XSC, s, None, torch.bfloat16),
        lambda s: fp8_linear_native(_XQ, _WQ, _XSC, s, None, torch.bfloat16)),
}

# A negative value drawn fresh, next to the special ones.
BAD_VALUES = [0.0, -0.0, -float(rand_scale(6).item()), NAN, INF, -INF]
BAD_IDS = ["zero", "neg_zero", "negative", "nan", "inf", "neg_inf"]


def _message(op, name, value):
    """The exact text the ops raise, as a regex."""
    return rf"^fxfuse\.{op}: `{name}` must be a positive finite number, got {_repr(value)}$"


def _repr(value):
    # Python formats the fp32 value read back from the tensor.
    v = torch.tensor([value], dtype=torch.float32).item()
    return "nan" if math.isnan(v) else str(v).replace(".", r"\.")


@pytest.mark.parametrize("value", BAD_VALUES, ids=BAD_IDS)
@pytest.mark.parametrize("case", sorted(SCALE_ARGS))
@pytest.mark.parametrize("shape", [(1,), ()], ids=["shape1", "shape0"])
def test_bad_static_scale_is_rejected(case, value, shape):
    op, name, call, _ = SCALE_ARGS[case]
    with pytest.raises(ValueError, match=_message(op, name, value)):
        call(torch.full(shape, value, dtype=torch.float32))


@pytest.mark.parametrize("case", sorted(SCALE_ARGS))
@pytest.mark.parametrize("magnitude", ["random", "tiny", "huge"])
def test_valid_scales_still_work(case, magnitude):
    _, _, call, native = SCALE_ARGS[case]
    s = {"random": rand_scale(sorted(SCALE_ARGS).index(case)),
         "tiny": torch.tensor([1e-30]), "huge": torch.tensor([1e30])}[magnitude]
    out, ref = call(s), native(s)
    for a, b in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(bits(a), bits(b)) if a.dtype in (FP8, torch.uint8) else torch.equal(a, b)


def test_per_token_x_scale_is_data_not_checked():
    """A per-token ``x_scale`` comes from the dynamic quant: an inf in it is that row's own
    inf propagating (no error), and the other rows are untouched."""
    x = randn((5, 32), seed=21, scale=2.0)
    x[2, 7] = INF
    x_q, x_scale = fx.dynamic_per_token_fp8_quant(x)
    assert math.isinf(x_scale[2].item())
    out = fx.fp8_linear(x_q, _WQ, x_scale, _WSC, None, torch.float32)
    assert not out[2].isfinite().any()
    others = [0, 1, 3, 4]
    assert out[others].isfinite().all()
    rows = x_q.view(torch.uint8)[others].view(x_q.dtype)  # as bytes: torch 2.9 cannot index float8 on the CPU
    ref = fp8_linear_native(rows, _WQ, x_scale[others], _WSC, None, torch.float32)
    torch.testing.assert_close(out[others], ref, rtol=1e-6, atol=1e-6)  # BLAS may block 4 rows differently


# --------------------------------------------------------------------------- attention: nothing written


def _attention_setup(scheme, seed):
    hq, hkv, d, bs = 4, 2, 32, 8
    meta = AttentionMetadata.from_lens([3, 2], [3, 10], [[1], [0, 2]], bs)  # a prefill and a chunked prefill
    cache = KVCache.allocate(3, bs, hkv, d, torch.bfloat16)
    cache.key_cache.copy_(randn(cache.key_cache.shape, seed=seed))
    cache.value_cache.copy_(randn(cache.value_cache.shape, seed=seed + 1))
    q, k, v = (randn((5, h, d), seed=seed + i) for i, h in ((2, hq), (3, hkv), (4, hkv)))
    if scheme == "fp8_static":
        output, block_scale = torch.full((5, hq, d), 1.0).to(FP8), None
    else:
        output = torch.randint(0, 256, (5, hq * d // 2), dtype=torch.uint8, generator=_gen(seed))
        block_scale = torch.full(nvfp4_block_scales_shape(5, hq * d), 2.0).to(FP8)
    layer = AttentionLayer("test.scales", hq, hkv, d, NativeAttentionBackend())
    return layer, ForwardContext(meta, {"test.scales": cache}), cache, (q, k, v, output), block_scale


@pytest.mark.parametrize("value", BAD_VALUES, ids=BAD_IDS)
@pytest.mark.parametrize("scheme", ["fp8_static", "nvfp4"])
def test_attention_rejects_bad_output_scale_before_any_write(scheme, value):
    layer, ctx, cache, (q, k, v, output), block_scale = _attention_setup(scheme, seed=31)
    before = [t.clone() for t in (cache.key_cache, cache.value_cache, output)]
    bs_before = block_scale.clone() if block_scale is not None else None
    with temporary_layers(layer), set_forward_context(ctx):
        with pytest.raises(ValueError, match=_message("attention", "output_scale", value)):
            fx.attention(q, k, v, output, "test.scales", torch.tensor([value]), block_scale)
    for t, t0 in zip((cache.key_cache, cache.value_cache, output), before):
        assert torch.equal(bits(t), bits(t0))
    if block_scale is not None:
        assert torch.equal(bits(block_scale), bits(bs_before))


@pytest.mark.parametrize("scheme", ["fp8_static", "nvfp4"])
def test_attention_valid_output_scale_still_works(scheme):
    layer, ctx, cache, (q, k, v, output), block_scale = _attention_setup(scheme, seed=41)
    s = rand_scale(42) if scheme == "fp8_static" else rand_scale(42, 100.0, 1000.0)
    ref = torch.empty(q.shape, dtype=q.dtype)
    with temporary_layers(layer), set_forward_context(ctx):
        fx.attention(q, k, v, ref, "test.scales")
        fx.attention(q, k, v, output, "test.scales", s, block_scale)
    flat = ref.reshape(5, -1)
    if scheme == "fp8_static":
        assert torch.equal(bits(output), bits(static_scaled_fp8_quant_native(flat, s).view(output.shape)))
    else:
        q_ref, bs_ref = nvfp4_quant_native(flat, s)
        assert torch.equal(output, q_ref) and torch.equal(bits(block_scale), bits(bs_ref))


# --------------------------------------------------------------------------- tracing reads no data


@pytest.mark.parametrize("case", sorted(SCALE_ARGS))
def test_fake_tensors_skip_the_value_check(case):
    # A fake scale has no value: the fake impl must neither raise nor try to read it.
    _, _, call, _ = SCALE_ARGS[case]
    with FakeTensorMode(allow_non_fake_inputs=True):
        call(torch.full((1,), NAN))


@pytest.mark.parametrize("case", ["static_scaled_fp8_quant", "nvfp4_quant", "fp8_linear-w_scale"])
def test_fake_tracing_with_a_bad_sample_scale(case):
    # Patterns are traced with sample inputs whose values mean nothing.
    op, _, call, _ = SCALE_ARGS[case]
    gm = trace_graph(call, torch.tensor([0.0]))
    assert getattr(fx, op).default in targets(gm)


def test_has_readable_data():
    t = torch.ones(2)
    assert compat.has_readable_data(t)
    assert compat.has_readable_data(torch.nn.Parameter(t))
    assert not compat.has_readable_data(t.to("meta"))
    with FakeTensorMode():
        assert not compat.has_readable_data(torch.ones(2))
    seen = []

    def probe(a):
        seen.append(compat.has_readable_data(a))
        return a + 1

    torch.func.functionalize(probe)(t)
    torch.vmap(probe)(t)
    assert seen == [False, False]


@pytest.mark.compile
def test_compiled_graph_checks_at_run_time():
    """The one compile here: tracing sees fake scales (no error, no graph break), and the
    compiled graph's call into the op checks the real scale on every run."""
    torch._dynamo.reset()

    def fn(x, s):
        return fx.static_scaled_fp8_quant(x * 2, s)

    compiled = torch.compile(fn, fullgraph=True)
    s = rand_scale(51)
    assert torch.equal(bits(compiled(_X, s)), bits(fn(_X, s)))
    with pytest.raises(ValueError, match=_message("static_scaled_fp8_quant", "scale", -INF)):
        compiled(_X, torch.tensor([-INF]))
    torch._dynamo.reset()


# --------------------------------------------------------------------------- the switch


def test_values_are_always_checked_off_cuda(monkeypatch):
    for env in (None, "0", "1"):
        if env is None:
            monkeypatch.delenv(_dispatch.CHECK_SCALES_ENV, raising=False)
        else:
            monkeypatch.setenv(_dispatch.CHECK_SCALES_ENV, env)
        assert _dispatch.should_check_values(torch.device("cpu"))
        assert _dispatch.should_check_values(torch.device("meta"))  # the tensor-level guard skips meta


def test_cuda_checks_only_with_the_env_var_and_never_in_capture(monkeypatch):
    cuda = torch.device("cuda", 0)
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.delenv(_dispatch.CHECK_SCALES_ENV, raising=False)
    assert not _dispatch.should_check_values(cuda)
    for env, expected in (("0", False), ("true", False), ("1", True)):
        monkeypatch.setenv(_dispatch.CHECK_SCALES_ENV, env)
        assert _dispatch.should_check_values(cuda) is expected, env
    capturing[0] = True
    assert not _dispatch.should_check_values(cuda)


def test_the_helper_follows_the_switch(monkeypatch):
    bad = torch.tensor([-1.5])
    with pytest.raises(ValueError, match=_message("some_op", "s", -1.5)):
        V.check_scale_value("some_op", "s", bad)
    V.check_scale_value("some_op", "s", None)  # an absent optional scale passes
    monkeypatch.setattr(V, "should_check_values", lambda device: False)
    V.check_scale_value("some_op", "s", bad)  # what CUDA does by default
    fx.static_scaled_fp8_quant(_X, bad)


def test_the_helper_checks_every_element():
    # Not used by today's ops (their static scales have one element), but by block-scaled weights.
    s = 0.5 + torch.rand(3, 5, generator=_gen(61))
    V.check_scale_value("some_op", "w_scale", s)
    s[2, 1] = 0.0
    with pytest.raises(ValueError, match=r"^fxfuse\.some_op: `w_scale` must be a positive finite number, "
                                         r"got 0\.0 \(element 11 of 15\)$"):
        V.check_scale_value("some_op", "w_scale", s)


@pytest.mark.gpu
def test_cuda_switch_end_to_end(monkeypatch):
    x, bad = _X.cuda(), torch.tensor([0.0], device="cuda")
    monkeypatch.delenv(_dispatch.CHECK_SCALES_ENV, raising=False)
    fx.static_scaled_fp8_quant(x, bad)  # unchecked by default: no sync
    monkeypatch.setenv(_dispatch.CHECK_SCALES_ENV, "1")
    with pytest.raises(ValueError, match=_message("static_scaled_fp8_quant", "scale", 0.0)):
        fx.static_scaled_fp8_quant(x, bad)
    # Capture must still work with the check on: it is skipped while capturing.
    good = torch.tensor([0.05], device="cuda")
    fx.static_scaled_fp8_quant(x, good)  # warm-up, checked
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fx.static_scaled_fp8_quant(x, good)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(bits(out), bits(static_scaled_fp8_quant_native(x, good)))


# --------------------------------------------------------------------------- inf/NaN inputs: native ops

SHAPES = [(3, 16), (5, 48), (2, 3, 80)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _with_specials(shape, dtype, seed, specials):
    """Random ``x`` with ``specials`` at distinct random flat positions; returns (x, positions)."""
    x = randn(shape, dtype, seed)
    pos = torch.randperm(x.numel(), generator=_gen(seed + 1))[: len(specials)]
    x.view(-1)[pos] = torch.tensor(specials, dtype=dtype)
    return x, pos


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_static_fp8_native_saturates_inf_and_keeps_nan(shape, dtype):
    x, pos = _with_specials(shape, dtype, seed=sum(shape), specials=[INF, -INF, NAN])
    s = rand_scale(sum(shape))
    q = bits(static_scaled_fp8_quant_native(x, s)).view(-1)
    assert q[pos[0]].item() == POS_448 and q[pos[1]].item() == NEG_448
    assert q[pos[2]].item() in (0x7F, 0xFF)  # the e4m3fn NaN; its sign bit follows the platform's NaN
    clean = x.clone()
    clean.view(-1)[pos] = 0
    others = torch.ones(x.numel(), dtype=torch.bool)
    others[pos] = False
    assert torch.equal(q[others], bits(static_scaled_fp8_quant_native(clean, s)).view(-1)[others])


@pytest.mark.parametrize("shape", SHAPES)
def test_dynamic_fp8_native_inf_and_nan_rows(shape):
    k = shape[-1]
    x = randn((4, k), torch.bfloat16, seed=k)
    x[1, k // 3] = INF
    x[2, k // 2] = NAN
    q, s = dynamic_per_token_fp8_quant_native(x)
    q8 = bits(q)
    # inf row: scale inf, finite elements +-0, the inf element NaN -> the row dequantizes to NaN
    assert math.isinf(s[1].item()) and q8[1, k // 3].item() in (0x7F, 0xFF)
    finite = torch.ones(k, dtype=torch.bool)
    finite[k // 3] = False
    assert ((q8[1][finite] & 0x7F) == 0).all()
    assert (q[1].float() * s[1]).isnan().all()
    # NaN row: scale NaN, every element NaN
    assert math.isnan(s[2].item()) and q[2].float().isnan().all()
    # the other rows do not notice
    q_ref, s_ref = dynamic_per_token_fp8_quant_native(x[[0, 3]])
    assert torch.equal(s[[0, 3]], s_ref) and torch.equal(q8[[0, 3]], bits(q_ref))
    # with scale_ub the inf row's amax is capped: inf saturates to 448, the row stays usable;
    # a NaN row stays NaN (the cap is a minimum, and NaN wins)
    ub = rand_scale(k, 0.5, 2.0)
    q, s = dynamic_per_token_fp8_quant_native(x, ub)
    assert s[1].item() == torch.clamp(ub / torch.tensor(448.0), min=1 / (448 * 512)).item()
    assert bits(q)[1, k // 3].item() == POS_448
    assert math.isnan(s[2].item()) and q[2].float().isnan().all()


@pytest.mark.parametrize("rows, blocks", [(1, 1), (3, 2), (5, 5)])
def test_nvfp4_native_nan_poisons_its_block_inf_saturates(rows, blocks):
    k = 16 * blocks
    x = randn((rows, k), torch.bfloat16, seed=rows * k)
    nan_row, nan_block = rows - 1, blocks - 1
    x[nan_row, 16 * nan_block + 5] = NAN
    x[0, 2] = -INF  # block (0, 0); with one row of one block it shares the NaN's block
    gs = rand_scale(rows, 100.0, 1000.0)
    q, sf = nvfp4_quant_native(x, gs)
    scales = bits(unswizzle_block_scales(sf, rows, blocks))
    qb = q.view(rows, blocks, 8)
    # the NaN's block: scale byte 0x7F (NaN), all codes 0 -> dequantizes to NaN
    assert scales[nan_row, nan_block].item() == 0x7F and (qb[nan_row, nan_block] == 0).all()
    back = nvfp4_dequantize(q, sf, gs, x.shape).view(rows, blocks, 16)
    assert back[nan_row, nan_block].isnan().all()
    if (nan_row, nan_block) != (0, 0):
        # -inf: its block gets the largest scale (448) and the code -6 (0xF, even element -> low nibble)
        assert scales[0, 0].item() == POS_448 and (qb[0, 0, 1] & 0xF).item() == 0xF
    # every other block is what it would be without the specials
    clean = x.clone()
    clean[nan_row, 16 * nan_block + 5] = 0
    clean[0, 2] = 0
    q_c, sf_c = nvfp4_quant_native(clean, gs)
    keep = torch.ones(rows, blocks, dtype=torch.bool)
    keep[nan_row, nan_block] = keep[0, 0] = False
    assert torch.equal(qb[keep], q_c.view(rows, blocks, 8)[keep])
    assert torch.equal(scales[keep], bits(unswizzle_block_scales(sf_c, rows, blocks))[keep])


# --------------------------------------------------------------------------- inf/NaN inputs: Triton kernels


def _kernels():
    pytest.importorskip("triton", reason="Triton is part of the test extras")
    from fxfuse.kernels import quant

    return quant


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter (conftest)


@pytest.mark.parametrize("shape", [(3, 16), (5, 48)])
def test_kernels_static_fp8_saturate_inf_like_the_reference(shape):
    Q = _kernels()
    x, pos = _with_specials(shape, torch.bfloat16, seed=71 + sum(shape), specials=[INF, -INF])
    x, s = x.to(DEVICE), rand_scale(72).to(DEVICE)
    assert torch.equal(bits(Q.static_fp8(x, s)), bits(static_scaled_fp8_quant_native(x, s)))


@pytest.mark.parametrize("k", [16, 80])
def test_kernels_dynamic_fp8_ignore_nan_in_the_row_max(k):
    """Triton's max returns the non-NaN operand: a NaN row keeps the scale of its other
    elements, which quantize as in the reference; the NaN's own code is unspecified."""
    Q = _kernels()
    x = randn((3, k), torch.bfloat16, seed=81 + k)
    x[1, k // 2] = NAN
    x[2, k // 3] = INF
    x = x.to(DEVICE)
    q, s = Q.dynamic_fp8(x)
    clean = x.clone()
    clean[1, k // 2] = 0
    q_c, s_c = dynamic_per_token_fp8_quant_native(clean[:2])
    assert torch.equal(s[:2], s_c)
    others = torch.ones(k, dtype=torch.bool, device=DEVICE)
    others[k // 2] = False
    assert torch.equal(bits(q)[1][others], bits(q_c)[1][others]) and torch.equal(bits(q)[0], bits(q_c)[0])
    # an inf row: scale inf and its finite elements +-0, as in the reference
    assert math.isinf(s[2].item())
    finite = torch.ones(k, dtype=torch.bool, device=DEVICE)
    finite[k // 3] = False
    assert ((bits(q)[2][finite] & 0x7F) == 0).all()
    # with scale_ub the inf row is bit-exact again
    ub = rand_scale(83, 0.5, 2.0).to(DEVICE)
    q, s = Q.dynamic_fp8(x[2:], ub)
    q_ref, s_ref = dynamic_per_token_fp8_quant_native(x[2:], ub)
    assert torch.equal(s, s_ref) and torch.equal(bits(q), bits(q_ref))


@pytest.mark.parametrize("rows, blocks", [(2, 1), (5, 3)])
def test_kernels_nvfp4_treat_nan_as_zero(rows, blocks):
    """Unlike the reference, the kernels' block max skips NaN and the NaN gets code 0:
    the result equals the quant of the input with the NaN replaced by 0."""
    Q = _kernels()
    k = 16 * blocks
    x = randn((rows, k), torch.bfloat16, seed=91 + rows * k)
    x[rows - 1, k - 7] = NAN
    x[0, 2] = INF
    x, gs = x.to(DEVICE), rand_scale(92, 100.0, 1000.0).to(DEVICE)
    q, sf = Q.nvfp4(x, gs)
    clean = x.clone()
    clean[rows - 1, k - 7] = 0
    q_ref, sf_ref = nvfp4_quant_native(clean, gs)
    assert torch.equal(q, q_ref) and torch.equal(bits(sf), bits(sf_ref))
