"""Tests for the ``torch.ops.fxfuse`` operator library (fxfuse.ops).

What is checked:
- the unfused native ops against independent float64 references (fp8 rounding is
  re-derived here from the e4m3fn format, not taken from torch's cast);
- every fused op against its chain of unfused ops, bit for bit;
- fake implementations (shapes, dtypes, strides; symbolic tracing);
- ``torch.library.opcheck`` on a few ops;
- argument validation messages (op name + offending argument), eagerly and under fake mode.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fxfuse.ops  # noqa: F401  (registers torch.ops.fxfuse.*)
from fxfuse.ops import FP8_DTYPE, FP8_MAX
from fxfuse.ops.activation import silu_and_mul_native
from fxfuse.ops.linear import fp8_linear_native
from fxfuse.ops.norm import fused_add_rms_norm_native, rms_norm_native
from fxfuse.ops.quant import dynamic_per_token_fp8_quant_native, static_scaled_fp8_quant_native

fx = torch.ops.fxfuse

MODEL_DTYPES = [torch.bfloat16, torch.float16]
# [..., hidden] activation shapes: odd token counts, odd and even hidden sizes, 1-D and 3-D.
NORM_SHAPES = [(1, 16), (7, 40), (33, 129), (2, 3, 40), (40,)]
# silu_and_mul inputs [..., 2 * d]
SILU_SHAPES = [(1, 2 * 8), (7, 2 * 37), (33, 2 * 64), (2, 3, 2 * 37)]
EPS = 1e-6
MIN_SCALE_F32 = torch.tensor(1.0 / (448.0 * 512.0), dtype=torch.float32)

# Tolerances for "one or two roundings to the output dtype" against float64.
RTOL = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, dtype, seed, scale=1.0):
    """Random normal values (never all zero), scaled in fp32, then cast."""
    return (torch.randn(shape, generator=_gen(seed)) * scale).to(dtype)


def rand_weight(hidden, dtype, seed, scale=1.0):
    """Norm weights around 1 with some spread, never zero."""
    w = 0.5 + torch.rand(hidden, generator=_gen(seed))
    sign = torch.where(torch.rand(hidden, generator=_gen(seed + 1)) < 0.2, -1.0, 1.0)
    return (w * sign * scale).to(dtype)


def f32_scalar(v, shape=(1,)):
    return torch.full(shape, v, dtype=torch.float32)


def fp8_bits(t):
    assert t.dtype == FP8_DTYPE
    return t.view(torch.uint8)


def assert_fp8_equal(a, b):
    assert a.shape == b.shape
    assert torch.equal(fp8_bits(a), fp8_bits(b)), (
        f"{(fp8_bits(a) != fp8_bits(b)).sum().item()} of {a.numel()} fp8 values differ"
    )


# --------------------------------------------------------------------------- independent references


def e4m3fn_round_ref(v: torch.Tensor) -> torch.Tensor:
    """Round float64 values with |v| <= 448 to the nearest float8_e4m3fn value, ties to even.

    e4m3fn: 3 mantissa bits, smallest normal exponent -6 (subnormal spacing 2**-9).
    Derived from the format, independent of torch's fp8 cast.
    """
    assert v.dtype == torch.float64
    assert (v.abs() <= 448).all()
    _, exp = torch.frexp(v)  # v = m * 2**exp with 0.5 <= |m| < 1
    e = torch.clamp(exp - 1, min=-6)  # exponent of the leading bit, floored at the subnormal range
    quantum = torch.ldexp(torch.ones_like(v), e - 3)
    return torch.round(v / quantum) * quantum  # torch.round is half-to-even


def f32_div(a: torch.Tensor, b) -> torch.Tensor:
    """Correctly rounded fp32 a / b (float64 division is exact enough to round once)."""
    return (a.double() / (b.double() if isinstance(b, torch.Tensor) else b)).float()


def f32_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 a * b (the float64 product of two fp32 values is exact)."""
    return (a.double() * b.double()).float()


def quant_ref(x: torch.Tensor, scale_f32: torch.Tensor) -> torch.Tensor:
    """Contract: q = round_e4m3fn(clamp(x_f32 * fp32(1 / scale), -448, 448)); returns float64 values."""
    inv = f32_div(torch.ones_like(scale_f32), scale_f32)
    prod = f32_mul(x.float(), inv)
    return e4m3fn_round_ref(prod.double().clamp(-FP8_MAX, FP8_MAX))


def dynamic_quant_ref(x: torch.Tensor, scale_ub=None):
    amax = x.double().abs().amax(dim=-1, keepdim=True)  # exact
    if scale_ub is not None:
        amax = torch.minimum(amax, scale_ub.double().reshape(()))
    scales = torch.maximum(f32_div(amax.float(), 448.0), MIN_SCALE_F32)
    return quant_ref(x, scales), scales


def rms_norm_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x64 = x.double()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w.double()


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    x64 = x.double()
    d = x.shape[-1] // 2
    g, u = x64[..., :d], x64[..., d:]
    return g / (1 + torch.exp(-g)) * u


# --------------------------------------------------------------------------- unfused ops vs references


@pytest.mark.parametrize("dtype", MODEL_DTYPES + [torch.float32])
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_rms_norm_matches_float64(dtype, shape):
    x = randn(shape, dtype, 1, scale=3.0)
    w = rand_weight(shape[-1], dtype, 2)
    y = fx.rms_norm(x, w, EPS)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), rms_norm_ref(x, w, EPS), rtol=RTOL[dtype], atol=1e-6)


def test_rms_norm_rounds_before_weight():
    # The contract multiplies by weight in x.dtype after rounding the normalized value.
    x = randn((7, 40), torch.bfloat16, 3)
    w = rand_weight(40, torch.bfloat16, 4)
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(torch.bfloat16)
    assert torch.equal(fx.rms_norm(x, w, EPS), normed * w)


@pytest.mark.parametrize("dtype", MODEL_DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_fused_add_rms_norm_matches_float64(dtype, shape):
    x = randn(shape, dtype, 5)
    r = randn(shape, dtype, 6, scale=2.0)
    w = rand_weight(shape[-1], dtype, 7)
    y, r_out = fx.fused_add_rms_norm(x, r, w, EPS)
    assert torch.equal(r_out, x + r)  # the add is done (and rounded) in x.dtype
    torch.testing.assert_close(y.double(), rms_norm_ref(r_out, w, EPS), rtol=RTOL[dtype], atol=1e-6)
    # inputs are not modified
    assert torch.equal(x, randn(shape, dtype, 5)) and torch.equal(r, randn(shape, dtype, 6, scale=2.0))


@pytest.mark.parametrize("dtype", MODEL_DTYPES + [torch.float32])
@pytest.mark.parametrize("shape", SILU_SHAPES)
def test_silu_and_mul_matches_float64(dtype, shape):
    x = randn(shape, dtype, 8, scale=2.0)
    y = fx.silu_and_mul(x)
    assert y.dtype == dtype and y.shape == (*shape[:-1], shape[-1] // 2)
    torch.testing.assert_close(y.double(), silu_and_mul_ref(x), rtol=RTOL[dtype], atol=1e-6)


def test_e4m3fn_reference_is_sane():
    # Spot values of the format: max, min normal, min subnormal, and round-half-even ties.
    v = torch.tensor([448.0, 2.0**-6, 2.0**-9, 2.0**-10, 3 * 2.0**-10, 1.0625, 1.1875, 0.0, -17.0],
                     dtype=torch.float64)
    expect = torch.tensor([448.0, 2.0**-6, 2.0**-9, 0.0, 2 * 2.0**-9, 1.0, 1.25, 0.0, -16.0],
                          dtype=torch.float64)
    assert torch.equal(e4m3fn_round_ref(v), expect)


QUANT_REGIMES = {
    # name: (x magnitude, static scale)
    "normal": (3.0, 4.0 / 448.0),
    "saturating": (1000.0, 1e-3),  # almost everything clamps to +-448
    "tiny": (1e-3, 0.5),  # fp8 subnormals and zeros
}


@pytest.mark.parametrize("dtype", MODEL_DTYPES + [torch.float32])
@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("regime", sorted(QUANT_REGIMES))
@pytest.mark.parametrize("scale_shape", [(), (1,)])
def test_static_quant_exact(dtype, shape, regime, scale_shape):
    mag, s = QUANT_REGIMES[regime]
    x = randn(shape, dtype, 9, scale=mag)
    scale = f32_scalar(s, scale_shape)
    q = fx.static_scaled_fp8_quant(x, scale)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape
    ref = quant_ref(x, scale.reshape(()))
    assert torch.equal(q.double(), ref)
    if regime == "saturating":
        assert (q.float().abs() == FP8_MAX).float().mean() > 0.9
    if regime == "tiny":
        qa = q.float().abs()
        assert ((qa > 0) & (qa < 2.0**-6)).any(), "expected fp8 subnormals"


def test_static_quant_uses_fp32_reciprocal():
    # x * fp32(1/scale) and x / scale round differently next to fp8 rounding ties; build
    # inputs a few fp32 ulps around (tie * scale) and check the op follows the contract.
    scale = f32_scalar(0.0731)
    ties = torch.tensor([1 + (2 * i + 1) / 16 for i in range(8)])  # midpoints between e4m3 values in [1, 2)
    base = ((ties * torch.tensor([1.0, 2, 4, 8, 16, 32]).reshape(-1, 1)).reshape(-1) * scale).float()
    xs = [base]
    up, down = base, base
    for _ in range(3):
        up = torch.nextafter(up, torch.tensor(float("inf")))
        down = torch.nextafter(down, torch.tensor(float("-inf")))
        xs += [up, down]
    x = torch.cat(xs)
    by_recip = (x * (1.0 / scale)).clamp(-448, 448).to(FP8_DTYPE)
    by_div = (x / scale).clamp(-448, 448).to(FP8_DTYPE)
    assert not torch.equal(fp8_bits(by_recip), fp8_bits(by_div)), "test input does not discriminate"
    q = fx.static_scaled_fp8_quant(x, scale)
    assert_fp8_equal(q, by_recip)
    assert torch.equal(q.double(), quant_ref(x, scale))


@pytest.mark.parametrize("dtype", MODEL_DTYPES + [torch.float32])
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_dynamic_quant_exact(dtype, shape):
    x = randn(shape, dtype, 11, scale=5.0)
    q, scales = fx.dynamic_per_token_fp8_quant(x)
    assert q.shape == x.shape and q.dtype == FP8_DTYPE
    assert scales.shape == (*shape[:-1], 1) and scales.dtype == torch.float32
    ref_q, ref_s = dynamic_quant_ref(x)
    assert torch.equal(scales, ref_s)
    assert torch.equal(q.double(), ref_q)
    # every row uses its full range: its amax maps to +-448 (or just below, by rounding of 1/s)
    assert (q.float().abs().amax(-1) >= 416).all()


@pytest.mark.parametrize("dtype", MODEL_DTYPES)
def test_dynamic_quant_scale_floor(dtype):
    x = randn((7, 40), dtype, 12)
    x[3] = randn((40,), dtype, 13, scale=1e-4)  # amax / 448 ~ 1e-6 < 1 / (448 * 512)
    q, scales = fx.dynamic_per_token_fp8_quant(x)
    assert torch.equal(scales[3], MIN_SCALE_F32.reshape(1))
    assert (scales[torch.arange(7) != 3] > MIN_SCALE_F32).all()
    ref_q, ref_s = dynamic_quant_ref(x)
    assert torch.equal(scales, ref_s) and torch.equal(q.double(), ref_q)
    # the floored row does not reach the top of the fp8 range
    assert q[3].float().abs().max() < 448


@pytest.mark.parametrize("dtype", MODEL_DTYPES)
@pytest.mark.parametrize("ub_shape", [(), (1,)])
def test_dynamic_quant_scale_ub_caps_amax(dtype, ub_shape):
    x = randn((33, 40), dtype, 14, scale=4.0)
    amax = x.float().abs().amax(-1, keepdim=True)
    ub_value = amax.median().item()
    ub = f32_scalar(ub_value, ub_shape)
    q, scales = fx.dynamic_per_token_fp8_quant(x, ub)
    capped = amax > ub_value
    assert capped.any() and (~capped).any()
    assert torch.equal(scales[capped], f32_div(ub.reshape(()), 448.0).expand(int(capped.sum())))
    assert torch.equal(scales[~capped], f32_div(amax[~capped], 448.0))
    # capped rows saturate at their max
    assert (q.float().abs().amax(-1, keepdim=True)[capped] == 448).all()
    ref_q, ref_s = dynamic_quant_ref(x, ub)
    assert torch.equal(scales, ref_s) and torch.equal(q.double(), ref_q)
    # a cap above every amax changes nothing
    q2, s2 = fx.dynamic_per_token_fp8_quant(x, f32_scalar(1e6, ub_shape))
    q3, s3 = fx.dynamic_per_token_fp8_quant(x)
    assert_fp8_equal(q2, q3)
    assert torch.equal(s2, s3)


# --------------------------------------------------------------------------- fused == unfused chain, bit for bit

FUSED_REGIMES = {
    # name: (x magnitude, weight magnitude, static scale, scale_ub or None)
    "normal": (1.0, 1.0, 4.0 / 448.0, None),
    "saturating": (1000.0, 1.0, 1e-3, 0.05),  # static: clamps; dynamic: scale_ub caps every row
    "tiny": (1e-3, 1e-4, 0.5, None),  # tiny norm outputs: fp8 subnormals, dynamic scale floor
}


def _norm_inputs(shape, dtype, regime, seed):
    xm, wm, s, ub = FUSED_REGIMES[regime]
    x = randn(shape, dtype, seed, scale=xm)
    r = randn(shape, dtype, seed + 1, scale=xm)
    w = rand_weight(shape[-1], dtype, seed + 2, scale=wm)
    scale = f32_scalar(s)
    scale_ub = None if ub is None else f32_scalar(ub)
    return x, r, w, scale, scale_ub


@pytest.mark.parametrize("dtype", MODEL_DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("regime", sorted(FUSED_REGIMES))
def test_rms_norm_static_fp8_quant_equals_chain(dtype, shape, regime):
    x, _, w, scale, _ = _norm_inputs(shape, dtype, regime, 20)
    fused = fx.rms_norm_static_fp8_quant(x, w, scale, EPS)
    chain = fx.static_scaled_fp8_quant(fx.rms_norm(x, w, EPS), scale)
    assert_fp8_equal(fused, chain)
    if regime == "saturating":
        assert (fused.float().abs() == 448).float().mean() > 0.5


@pytest.mark.parametrize("dtype", MODEL_DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("regime", sorted(FUSED_REGIMES))
def test_fused_add_rms_norm_static_fp8_quant_equals_chain(dtype, shape, regime):
    x, r, w, scale, _ = _norm_inputs(shape, dtype, regime, 30)
    q, r_out = fx.fused_add_rms_norm_static_fp8_quant(x, r, w, scale, EPS)
    y, r_ref = fx.fused_add_rms_norm(x, r, w, EPS)
    assert_fp8_equal(q, fx.static_scaled_fp8_quant(y, scale))
    assert torch.equal(r_out, r_ref)
    # and the unfused fused_add_rms_norm is itself add + rms_norm
    assert torch.equal(r_ref, x + r) and torch.equal(y, fx.rms_norm(x + r, w, EPS))


@pytest.mark.parametrize("dtype", MODEL_DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("regime", sorted(FUSED_REGIMES))
def test_rms_norm_dynamic_per_token_fp8_quant_equals_chain(dtype, shape, regime):
    x, _, w, _, ub = _norm_inputs(shape, dtype, regime, 40)
    q, scales = fx.rms_norm_dynamic_per_token_fp8_quant(x, w, EPS, ub)
    q_ref, s_ref = fx.dynamic_per_token_fp8_quant(fx.rms_norm(x, w, EPS), ub)
    assert_fp8_equal(q, q_ref)
    assert torch.equal(scales, s_ref)
    if regime == "tiny":
        assert torch.equal(scales, MIN_SCALE_F32.expand_as(scales))
    if regime == "saturating":
        assert torch.equal(scales, f32_div(ub.reshape(()), 448.0).expand_as(scales))


@pytest.mark.parametrize("dtype", MODEL_DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("regime", sorted(FUSED_REGIMES))
def test_fused_add_rms_norm_dynamic_per_token_fp8_quant_equals_chain(dtype, shape, regime):
    x, r, w, _, ub = _norm_inputs(shape, dtype, regime, 50)
    q, scales, r_out = fx.fused_add_rms_norm_dynamic_per_token_fp8_quant(x, r, w, EPS, ub)
    y, r_ref = fx.fused_add_rms_norm(x, r, w, EPS)
    q_ref, s_ref = fx.dynamic_per_token_fp8_quant(y, ub)
    assert_fp8_equal(q, q_ref)
    assert torch.equal(scales, s_ref)
    assert torch.equal(r_out, r_ref)


@pytest.mark.parametrize("dtype", MODEL_DTYPES)
@pytest.mark.parametrize("shape", SILU_SHAPES)
@pytest.mark.parametrize("regime", ["normal", "saturating", "tiny"])
def test_silu_and_mul_static_fp8_quant_equals_chain(dtype, shape, regime):
    mag, s = {"normal": (2.0, 4.0 / 448.0), "saturating": (10.0, 1e-3), "tiny": (0.03, 0.5)}[regime]
    x = randn(shape, dtype, 60, scale=mag)
    scale = f32_scalar(s)
    q = fx.silu_and_mul_static_fp8_quant(x, scale)
    assert q.shape == (*shape[:-1], shape[-1] // 2)
    assert_fp8_equal(q, fx.static_scaled_fp8_quant(fx.silu_and_mul(x), scale))
    if regime == "saturating":
        assert (q.float().abs() == 448).any()


def test_fused_differs_from_unrounded_producer():
    # Guards the design rule: quantizing the fp32 norm output (skipping the bf16
    # rounding) gives different bytes, so the equality tests above can fail.
    x, _, w, _, _ = _norm_inputs((33, 129), torch.bfloat16, "normal", 70)
    scale = f32_scalar(0.5 / 448.0)
    xf = x.float()
    y32 = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS) * w.float()
    skipped = (y32 * (1.0 / scale)).clamp(-448, 448).to(FP8_DTYPE)
    fused = fx.rms_norm_static_fp8_quant(x, w, scale, EPS)
    assert not torch.equal(fp8_bits(fused), fp8_bits(skipped))


def test_ops_dispatch_to_native():
    x, r, w, scale, _ = _norm_inputs((7, 40), torch.bfloat16, "normal", 80)
    assert torch.equal(fx.rms_norm(x, w, EPS), rms_norm_native(x, w, EPS))
    for a, b in zip(fx.fused_add_rms_norm(x, r, w, EPS), fused_add_rms_norm_native(x, r, w, EPS)):
        assert torch.equal(a, b)
    assert_fp8_equal(fx.static_scaled_fp8_quant(x, scale), static_scaled_fp8_quant_native(x, scale))
    q, s = fx.dynamic_per_token_fp8_quant(x)
    q2, s2 = dynamic_per_token_fp8_quant_native(x)
    assert_fp8_equal(q, q2)
    assert torch.equal(s, s2)
    assert torch.equal(fx.silu_and_mul(x), silu_and_mul_native(x))


# --------------------------------------------------------------------------- fp8_linear


def _linear_inputs(x_shape, n, per_token, with_bias, out_dtype, seed, scale_shape=(1,)):
    k = x_shape[-1]
    x = randn(x_shape, torch.bfloat16, seed, scale=2.0)
    w = randn((n, k), torch.bfloat16, seed + 1, scale=0.1)
    w_scale = f32_scalar(w.float().abs().max().item() / 448.0, scale_shape)
    w_q = fx.static_scaled_fp8_quant(w, w_scale)
    if per_token:
        x_q, x_scale = fx.dynamic_per_token_fp8_quant(x)
    else:
        x_scale = f32_scalar(x.float().abs().max().item() / 448.0, scale_shape)
        x_q = fx.static_scaled_fp8_quant(x, x_scale)
    bias = randn((n,), out_dtype, seed + 2) if with_bias else None
    return x_q, w_q, x_scale, w_scale, bias


def fp8_linear_ref(x_q, w_q, x_scale, w_scale, bias):
    x = x_q.double() * x_scale.double()
    w = w_q.double() * w_scale.double().reshape(())
    out = torch.einsum("...k,nk->...n", x, w)
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("x_shape", [(1, 16), (7, 40), (33, 48), (2, 3, 32)])
@pytest.mark.parametrize("n", [24, 48])
@pytest.mark.parametrize("per_token", [False, True], ids=["per_tensor", "per_token"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_linear_matches_float_reference(x_shape, n, per_token, with_bias, out_dtype):
    x_q, w_q, x_scale, w_scale, bias = _linear_inputs(x_shape, n, per_token, with_bias, out_dtype, 90)
    if per_token:
        assert x_scale.shape == (*x_shape[:-1], 1)
    out = fx.fp8_linear(x_q, w_q, x_scale, w_scale, bias, out_dtype)
    assert out.dtype == out_dtype and out.shape == (*x_shape[:-1], n)
    ref = fp8_linear_ref(x_q, w_q, x_scale, w_scale, bias)
    torch.testing.assert_close(out.double(), ref, rtol=RTOL[out_dtype], atol=1e-4)


@pytest.mark.parametrize("scale_shape", [(), (1,)])
def test_fp8_linear_scalar_scale_shapes_and_default_dtype(scale_shape):
    x_q, w_q, x_scale, w_scale, _ = _linear_inputs((7, 32), 16, False, False, torch.bfloat16, 91, scale_shape)
    out = fx.fp8_linear(x_q, w_q, x_scale, w_scale)
    assert out.dtype == torch.bfloat16
    ref = fp8_linear_ref(x_q, w_q, x_scale, w_scale, None)
    torch.testing.assert_close(out.double(), ref, rtol=RTOL[torch.bfloat16], atol=1e-4)
    assert torch.equal(out, fp8_linear_native(x_q, w_q, x_scale, w_scale))


def test_fp8_linear_per_token_scales_rows():
    # Rows with different per-token scales must be scaled separately (not by scale[0]).
    x_q, w_q, x_scale, w_scale, _ = _linear_inputs((5, 32), 16, True, False, torch.float32, 92)
    x_scale = x_scale * torch.arange(1, 6, dtype=torch.float32).reshape(5, 1)
    out = fx.fp8_linear(x_q, w_q, x_scale, w_scale, None, torch.float32)
    ref = fp8_linear_ref(x_q, w_q, x_scale, w_scale, None)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m,k,n", [(1, 64, 32), (33, 128, 96), (7, 40, 24)])
@pytest.mark.parametrize("per_token", [False, True], ids=["per_tensor", "per_token"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_linear_cuda_matches_reference(m, k, n, per_token, with_bias, out_dtype):
    from fxfuse.ops.linear import _scaled_mm_applies

    args = _linear_inputs((m, k), n, per_token, with_bias, out_dtype, 93)
    cuda_args = [a.cuda() if a is not None else None for a in args]
    if torch.cuda.get_device_capability() >= (9, 0):
        # aligned shapes take the FP8 tensor-core path, the unaligned one the float reference
        assert _scaled_mm_applies(cuda_args[0], cuda_args[1], cuda_args[2], out_dtype) == (k % 16 == 0)
    out = fx.fp8_linear(*cuda_args, out_dtype)
    assert out.device.type == "cuda" and out.dtype == out_dtype and out.shape == (m, n)
    ref = fp8_linear_ref(*args)
    # FP8 tensor cores accumulate with less than fp32 precision (seen: ~3e-4 relative on H100).
    torch.testing.assert_close(out.cpu().double(), ref, rtol=max(RTOL[out_dtype], 2e-3), atol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_equals_chain_cuda():
    x, r, w, scale, _ = _norm_inputs((33, 128), torch.bfloat16, "normal", 94)
    x, r, w, scale = x.cuda(), r.cuda(), w.cuda(), scale.cuda()
    q, r_out = fx.fused_add_rms_norm_static_fp8_quant(x, r, w, scale, EPS)
    y, r_ref = fx.fused_add_rms_norm(x, r, w, EPS)
    assert_fp8_equal(q, fx.static_scaled_fp8_quant(y, scale))
    assert torch.equal(r_out, r_ref)
    q, s = fx.rms_norm_dynamic_per_token_fp8_quant(x, w, EPS)
    q2, s2 = fx.dynamic_per_token_fp8_quant(fx.rms_norm(x, w, EPS))
    assert_fp8_equal(q, q2)
    assert torch.equal(s, s2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("per_token", [False, True], ids=["per_tensor", "per_token"])
def test_fp8_linear_cuda_fake_matches_real(per_token):
    args = _linear_inputs((2, 3, 64), 32, per_token, True, torch.bfloat16, 95)
    args = [a.cuda() for a in args]
    real = fx.fp8_linear(*args, torch.bfloat16)
    with FakeTensorMode() as mode:
        fake = fx.fp8_linear(*[mode.from_tensor(a) for a in args], torch.bfloat16)
    assert (fake.shape, fake.dtype, fake.device, fake.stride()) == (real.shape, real.dtype, real.device, real.stride())
    utils = ["test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"]
    torch.library.opcheck(fx.fp8_linear.default, (*args, torch.bfloat16), test_utils=utils)


# --------------------------------------------------------------------------- fake impls


def _all_op_cases():
    """(name, args) for every op, with small real CPU inputs."""
    dt = torch.bfloat16
    x = randn((7, 40), dt, 100)
    r = randn((7, 40), dt, 101)
    w = rand_weight(40, dt, 102)
    s = f32_scalar(0.02)
    ub = f32_scalar(1.0)
    xs = randn((7, 2 * 37), dt, 103)
    x_q, w_q, xsc, wsc, bias = _linear_inputs((7, 32), 16, True, True, torch.bfloat16, 104)
    x3_q, w3_q, x3sc, w3sc, _ = _linear_inputs((2, 3, 32), 16, False, False, torch.float32, 105)
    return [
        ("rms_norm", (x, w, EPS)),
        ("rms_norm", (randn((2, 3, 40), dt, 106), w, EPS)),
        ("fused_add_rms_norm", (x, r, w, EPS)),
        ("static_scaled_fp8_quant", (x, s)),
        ("dynamic_per_token_fp8_quant", (x,)),
        ("dynamic_per_token_fp8_quant", (randn((2, 3, 40), dt, 107), ub)),
        ("silu_and_mul", (xs,)),
        ("fp8_linear", (x_q, w_q, xsc, wsc, bias, torch.bfloat16)),
        ("fp8_linear", (x3_q, w3_q, x3sc, w3sc, None, torch.float32)),
        ("rms_norm_static_fp8_quant", (x, w, s, EPS)),
        ("fused_add_rms_norm_static_fp8_quant", (x, r, w, s, EPS)),
        ("rms_norm_dynamic_per_token_fp8_quant", (x, w, EPS, ub)),
        ("fused_add_rms_norm_dynamic_per_token_fp8_quant", (x, r, w, EPS, None)),
        ("silu_and_mul_static_fp8_quant", (xs, s)),
    ]


ALL_OPS = sorted({name for name, _ in _all_op_cases()})


def test_every_op_is_covered():
    expected = {
        "rms_norm", "fused_add_rms_norm", "static_scaled_fp8_quant", "dynamic_per_token_fp8_quant",
        "silu_and_mul", "fp8_linear", "rms_norm_static_fp8_quant", "fused_add_rms_norm_static_fp8_quant",
        "rms_norm_dynamic_per_token_fp8_quant", "fused_add_rms_norm_dynamic_per_token_fp8_quant",
        "silu_and_mul_static_fp8_quant",
    }
    assert set(ALL_OPS) == expected
    for name in expected:
        assert hasattr(torch.ops.fxfuse, name)
    assert FP8_DTYPE is torch.float8_e4m3fn and FP8_MAX == 448.0


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("case", range(len(_all_op_cases())))
def test_fake_impl_matches_real(case):
    name, args = _all_op_cases()[case]
    op = getattr(fx, name)
    real = _as_tuple(op(*args))
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = _as_tuple(op(*fake_args))
    assert len(fake) == len(real)
    for f, r in zip(fake, real):
        assert f.shape == r.shape, name
        assert f.dtype == r.dtype, name
        assert f.device == r.device, name
        assert f.stride() == r.stride(), name


@pytest.mark.parametrize("case", [0, 5, 8, 12, 13])
def test_symbolic_trace(case):
    from torch.fx.experimental.proxy_tensor import make_fx

    name, args = _all_op_cases()[case]
    op = getattr(fx, name)
    tensor_pos = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

    def fn(*tensors):
        full = list(args)
        for i, t in zip(tensor_pos, tensors):
            full[i] = t
        return op(*full)

    gm = make_fx(fn, tracing_mode="symbolic")(*[args[i] for i in tensor_pos])
    assert any(n.target == op.default for n in gm.graph.nodes)
    for a, b in zip(_as_tuple(gm(*[args[i] for i in tensor_pos])), _as_tuple(op(*args))):
        assert torch.equal(a.view(torch.uint8) if a.dtype == FP8_DTYPE else a,
                           b.view(torch.uint8) if b.dtype == FP8_DTYPE else b)


@pytest.mark.parametrize("case", [0, 5, 7, 12])
def test_opcheck(case):
    name, args = _all_op_cases()[case]
    utils = ["test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"]
    if any(isinstance(a, torch.Tensor) and a.dtype == FP8_DTYPE for a in args):
        # torch's schema-check mode compares inputs with allclose, which has no fp8 CPU kernel.
        utils.remove("test_schema")
    torch.library.opcheck(getattr(fx, name).default, args, test_utils=utils)


# --------------------------------------------------------------------------- validation


def _bf(shape, seed=200):
    return randn(shape, torch.bfloat16, seed)


def _valid():
    x = _bf((7, 40))
    return dict(
        x=x, r=_bf((7, 40), 201), w=rand_weight(40, torch.bfloat16, 202), s=f32_scalar(0.02),
        xs=_bf((7, 74), 203),
    )


_V = _valid()
_LIN = _linear_inputs((7, 32), 16, True, True, torch.bfloat16, 210)


def _noncontig(t):
    wide = torch.cat([t, t], dim=-1)
    out = wide[..., ::2]
    assert not out.is_contiguous() and out.shape == t.shape
    return out


BAD_CASES = {
    # id: (callable, exception, regex the message must match)
    "rms_norm-weight-dtype": (
        lambda: fx.rms_norm(_V["x"], _V["w"].float(), EPS), ValueError, r"fxfuse\.rms_norm: `weight`.*dtype"),
    "rms_norm-weight-shape": (
        lambda: fx.rms_norm(_V["x"], rand_weight(41, torch.bfloat16, 1), EPS), ValueError,
        r"fxfuse\.rms_norm: `weight`.*shape"),
    "rms_norm-weight-2d": (
        lambda: fx.rms_norm(_V["x"], _V["w"].reshape(1, 40), EPS), ValueError, r"fxfuse\.rms_norm: `weight`.*shape"),
    "rms_norm-x-noncontig": (
        lambda: fx.rms_norm(_noncontig(_V["x"]), _V["w"], EPS), ValueError, r"fxfuse\.rms_norm: `x`.*contiguous"),
    "rms_norm-x-transposed": (
        lambda: fx.rms_norm(_bf((40, 40)).t(), _V["w"], EPS), ValueError, r"fxfuse\.rms_norm: `x`.*contiguous"),
    "rms_norm-x-int": (
        lambda: fx.rms_norm(torch.ones(7, 40, dtype=torch.int32), _V["w"], EPS), ValueError,
        r"fxfuse\.rms_norm: `x`.*dtype"),
    "rms_norm-x-0d": (
        lambda: fx.rms_norm(torch.tensor(1.0, dtype=torch.bfloat16), _V["w"], EPS), ValueError,
        r"fxfuse\.rms_norm: `x`.*dimension"),
    "rms_norm-eps-negative": (
        lambda: fx.rms_norm(_V["x"], _V["w"], -1.0), ValueError, r"fxfuse\.rms_norm: `eps`"),
    "fused_add_rms_norm-residual-shape": (
        lambda: fx.fused_add_rms_norm(_V["x"], _bf((6, 40)), _V["w"], EPS), ValueError,
        r"fxfuse\.fused_add_rms_norm: `residual`.*shape"),
    "fused_add_rms_norm-residual-dtype": (
        lambda: fx.fused_add_rms_norm(_V["x"], _V["r"].half(), _V["w"], EPS), ValueError,
        r"fxfuse\.fused_add_rms_norm: `residual`.*dtype"),
    "fused_add_rms_norm-residual-noncontig": (
        lambda: fx.fused_add_rms_norm(_V["x"], _noncontig(_V["r"]), _V["w"], EPS), ValueError,
        r"fxfuse\.fused_add_rms_norm: `residual`.*contiguous"),
    "static_quant-scale-dtype": (
        lambda: fx.static_scaled_fp8_quant(_V["x"], _V["s"].double()), ValueError,
        r"fxfuse\.static_scaled_fp8_quant: `scale`.*float32"),
    "static_quant-scale-numel": (
        lambda: fx.static_scaled_fp8_quant(_V["x"], f32_scalar(0.1, (2,))), ValueError,
        r"fxfuse\.static_scaled_fp8_quant: `scale`.*one element"),
    "static_quant-scale-2d": (
        lambda: fx.static_scaled_fp8_quant(_V["x"], f32_scalar(0.1, (1, 1))), ValueError,
        r"fxfuse\.static_scaled_fp8_quant: `scale`.*one element"),
    "static_quant-x-noncontig": (
        lambda: fx.static_scaled_fp8_quant(_noncontig(_V["x"]), _V["s"]), ValueError,
        r"fxfuse\.static_scaled_fp8_quant: `x`.*contiguous"),
    "static_quant-x-fp8": (
        lambda: fx.static_scaled_fp8_quant(_V["x"].to(FP8_DTYPE), _V["s"]), ValueError,
        r"fxfuse\.static_scaled_fp8_quant: `x`.*dtype"),
    "dynamic_quant-scale_ub-dtype": (
        lambda: fx.dynamic_per_token_fp8_quant(_V["x"], _V["s"].half()), ValueError,
        r"fxfuse\.dynamic_per_token_fp8_quant: `scale_ub`.*float32"),
    "dynamic_quant-scale_ub-numel": (
        lambda: fx.dynamic_per_token_fp8_quant(_V["x"], f32_scalar(1.0, (7, 1))), ValueError,
        r"fxfuse\.dynamic_per_token_fp8_quant: `scale_ub`.*one element"),
    "dynamic_quant-x-empty-hidden": (
        lambda: fx.dynamic_per_token_fp8_quant(torch.empty(3, 0, dtype=torch.bfloat16)), ValueError,
        r"fxfuse\.dynamic_per_token_fp8_quant: `x`.*non-empty"),
    "silu_and_mul-odd": (
        lambda: fx.silu_and_mul(_bf((7, 75))), ValueError, r"fxfuse\.silu_and_mul: `x`.*even"),
    "silu_and_mul-noncontig": (
        lambda: fx.silu_and_mul(_noncontig(_V["xs"])), ValueError, r"fxfuse\.silu_and_mul: `x`.*contiguous"),
    "fp8_linear-x_q-not-fp8": (
        lambda: fx.fp8_linear(_bf((7, 32)), *_LIN[1:]), ValueError, r"fxfuse\.fp8_linear: `x_q`.*float8_e4m3fn"),
    "fp8_linear-w_q-not-fp8": (
        lambda: fx.fp8_linear(_LIN[0], _bf((16, 32)), *_LIN[2:]), ValueError,
        r"fxfuse\.fp8_linear: `w_q`.*float8_e4m3fn"),
    "fp8_linear-w_q-e5m2": (
        lambda: fx.fp8_linear(_LIN[0], _LIN[1].float().to(torch.float8_e5m2), *_LIN[2:]), ValueError,
        r"fxfuse\.fp8_linear: `w_q`.*float8_e4m3fn"),
    "fp8_linear-inner-dims": (
        lambda: fx.fp8_linear(_LIN[0], _bf((16, 48)).to(FP8_DTYPE), *_LIN[2:]), ValueError,
        r"fxfuse\.fp8_linear: inner dims.*`x_q`.*`w_q`"),
    "fp8_linear-w_q-transposed": (
        lambda: fx.fp8_linear(_LIN[0], _bf((32, 32)).to(FP8_DTYPE).t(), *_LIN[2:]), ValueError,
        r"fxfuse\.fp8_linear: `w_q`.*contiguous"),
    "fp8_linear-x_scale-shape": (
        lambda: fx.fp8_linear(_LIN[0], _LIN[1], f32_scalar(0.1, (7,)), *_LIN[3:]), ValueError,
        r"fxfuse\.fp8_linear: `x_scale`.*shape"),
    "fp8_linear-x_scale-dtype": (
        lambda: fx.fp8_linear(_LIN[0], _LIN[1], _LIN[2].bfloat16(), *_LIN[3:]), ValueError,
        r"fxfuse\.fp8_linear: `x_scale`.*float32"),
    "fp8_linear-w_scale-numel": (
        lambda: fx.fp8_linear(*_LIN[:3], f32_scalar(0.1, (16,)), _LIN[4]), ValueError,
        r"fxfuse\.fp8_linear: `w_scale`.*one element"),
    "fp8_linear-w_scale-dtype": (
        lambda: fx.fp8_linear(*_LIN[:3], _LIN[3].half(), _LIN[4]), ValueError,
        r"fxfuse\.fp8_linear: `w_scale`.*float32"),
    "fp8_linear-bias-dtype": (
        lambda: fx.fp8_linear(*_LIN[:4], _LIN[4].float(), torch.bfloat16), ValueError,
        r"fxfuse\.fp8_linear: `bias`.*dtype"),
    "fp8_linear-bias-shape": (
        lambda: fx.fp8_linear(*_LIN[:4], _bf((17,)), torch.bfloat16), ValueError,
        r"fxfuse\.fp8_linear: `bias`.*shape"),
    "fp8_linear-out_dtype": (
        lambda: fx.fp8_linear(*_LIN[:4], None, torch.int32), ValueError, r"fxfuse\.fp8_linear: `out_dtype`"),
    "rms_norm_static_fp8_quant-scale-dtype": (
        lambda: fx.rms_norm_static_fp8_quant(_V["x"], _V["w"], _V["s"].bfloat16(), EPS), ValueError,
        r"fxfuse\.rms_norm_static_fp8_quant: `scale`.*float32"),
    "rms_norm_static_fp8_quant-weight-dtype": (
        lambda: fx.rms_norm_static_fp8_quant(_V["x"], _V["w"].half(), _V["s"], EPS), ValueError,
        r"fxfuse\.rms_norm_static_fp8_quant: `weight`.*dtype"),
    "fused_add_rms_norm_static_fp8_quant-scale-numel": (
        lambda: fx.fused_add_rms_norm_static_fp8_quant(_V["x"], _V["r"], _V["w"], f32_scalar(1.0, (2,)), EPS),
        ValueError, r"fxfuse\.fused_add_rms_norm_static_fp8_quant: `scale`.*one element"),
    "fused_add_rms_norm_static_fp8_quant-residual-shape": (
        lambda: fx.fused_add_rms_norm_static_fp8_quant(_V["x"], _bf((7, 41)), _V["w"], _V["s"], EPS),
        ValueError, r"fxfuse\.fused_add_rms_norm_static_fp8_quant: `residual`.*shape"),
    "rms_norm_dynamic_per_token_fp8_quant-scale_ub-dtype": (
        lambda: fx.rms_norm_dynamic_per_token_fp8_quant(_V["x"], _V["w"], EPS, _V["s"].double()), ValueError,
        r"fxfuse\.rms_norm_dynamic_per_token_fp8_quant: `scale_ub`.*float32"),
    "rms_norm_dynamic_per_token_fp8_quant-x-noncontig": (
        lambda: fx.rms_norm_dynamic_per_token_fp8_quant(_noncontig(_V["x"]), _V["w"], EPS), ValueError,
        r"fxfuse\.rms_norm_dynamic_per_token_fp8_quant: `x`.*contiguous"),
    "fused_add_rms_norm_dynamic_per_token_fp8_quant-weight-shape": (
        lambda: fx.fused_add_rms_norm_dynamic_per_token_fp8_quant(_V["x"], _V["r"], _V["w"][:39], EPS),
        ValueError, r"fxfuse\.fused_add_rms_norm_dynamic_per_token_fp8_quant: `weight`.*shape"),
    "silu_and_mul_static_fp8_quant-odd": (
        lambda: fx.silu_and_mul_static_fp8_quant(_bf((7, 75)), _V["s"]), ValueError,
        r"fxfuse\.silu_and_mul_static_fp8_quant: `x`.*even"),
    "silu_and_mul_static_fp8_quant-scale-dtype": (
        lambda: fx.silu_and_mul_static_fp8_quant(_V["xs"], _V["s"].half()), ValueError,
        r"fxfuse\.silu_and_mul_static_fp8_quant: `scale`.*float32"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_validation_eager(case):
    fn, exc, pattern = BAD_CASES[case]
    with pytest.raises(exc, match=pattern):
        fn()


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_validation_under_fake_mode(case):
    # The same checks run in the fake impl: bad input fails at trace/compile time.
    fn, exc, pattern = BAD_CASES[case]
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(exc, match=pattern):
            fn()


def test_validators_raise_type_error_for_non_tensors():
    from fxfuse.ops.linear import validate_fp8_linear
    from fxfuse.ops.norm import validate_rms_norm
    from fxfuse.ops.quant import validate_static_scaled_fp8_quant

    with pytest.raises(TypeError, match=r"fxfuse\.rms_norm: `x`.*torch\.Tensor"):
        validate_rms_norm([1.0, 2.0], _V["w"], EPS)
    with pytest.raises(TypeError, match=r"fxfuse\.rms_norm: `weight`.*torch\.Tensor"):
        validate_rms_norm(_V["x"], None, EPS)
    with pytest.raises(TypeError, match=r"fxfuse\.rms_norm: `eps`.*float"):
        validate_rms_norm(_V["x"], _V["w"], "1e-6")
    with pytest.raises(TypeError, match=r"fxfuse\.static_scaled_fp8_quant: `scale`.*torch\.Tensor"):
        validate_static_scaled_fp8_quant(_V["x"], 0.5)
    with pytest.raises(TypeError, match=r"fxfuse\.fp8_linear: `out_dtype`.*torch\.dtype"):
        validate_fp8_linear(*_LIN, "bfloat16")


def test_valid_inputs_pass_validation():
    # The bad cases above differ from these valid calls in one argument only.
    fx.rms_norm(_V["x"], _V["w"], EPS)
    fx.fused_add_rms_norm(_V["x"], _V["r"], _V["w"], EPS)
    fx.static_scaled_fp8_quant(_V["x"], _V["s"])
    fx.dynamic_per_token_fp8_quant(_V["x"], _V["s"])
    fx.silu_and_mul(_V["xs"])
    fx.fp8_linear(*_LIN, torch.bfloat16)
    fx.rms_norm_static_fp8_quant(_V["x"], _V["w"], _V["s"], EPS)
    fx.fused_add_rms_norm_static_fp8_quant(_V["x"], _V["r"], _V["w"], _V["s"], EPS)
    fx.rms_norm_dynamic_per_token_fp8_quant(_V["x"], _V["w"], EPS, _V["s"])
    fx.fused_add_rms_norm_dynamic_per_token_fp8_quant(_V["x"], _V["r"], _V["w"], EPS)
    fx.silu_and_mul_static_fp8_quant(_V["xs"], _V["s"])
