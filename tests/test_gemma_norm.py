"""Gemma's RMSNorm ops (``gemma_rms_norm`` and its residual-add and FP8 forms) and their
kernel (``fxfuse.kernels.norm_quant`` with ``gemma=True``).

What is checked:
- the native reference against HF ``Gemma3RMSNorm.forward`` written out (bit for bit) and
  against float64 (one rounding);
- that Gemma's numerics are not Llama's: the same weight run as ``rms_norm(x, 1 + w)``
  gives other values, and an fp32 weight is not rounded to the model dtype;
- the residual-add and quant forms against their unfused chains, bit for bit (the norm's
  output rounded to the model dtype before it is quantized);
- the kernel against the native ops (interpreter on CPU, or the GPU): the norm within
  the RMSNorm kernel's tolerance, its residual sum exact, its FP8 epilogue the native
  quant of its own normalized row bit for bit;
- fake implementations, ``opcheck``, validation messages.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fxfuse.ops  # noqa: F401  (registers torch.ops.fxfuse.*)
from fxfuse.ops.gemma_norm import (
    fused_add_gemma_rms_norm_dynamic_per_token_fp8_quant_native,
    fused_add_gemma_rms_norm_native,
    fused_add_gemma_rms_norm_static_fp8_quant_native,
    gemma_rms_norm_dynamic_per_token_fp8_quant_native,
    gemma_rms_norm_native,
    gemma_rms_norm_static_fp8_quant_native,
)
from fxfuse.ops.norm import rms_norm_native
from fxfuse.ops.quant import dynamic_per_token_fp8_quant_native, static_scaled_fp8_quant_native
from conftest import covering

fx = torch.ops.fxfuse
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# [..., hidden]: odd token counts, odd and even widths, 1-D and 3-D; Gemma 3 1B's 1152.
SHAPES = [(1, 16), (7, 40), (33, 129), (2, 3, 40), (40,), (5, 1152)]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(shape, dtype, seed, scale=1.0, device="cpu"):
    """Random normal values (never zeros), scaled in fp32, then cast."""
    return (torch.randn(shape, generator=_gen(seed)) * scale).to(dtype).to(device)


def gemma_weight(hidden, dtype, seed, device="cpu"):
    """Gemma's weights are offsets from 1 (zeros-initialized): spread them around 0, some below -1."""
    return (0.6 * torch.randn(hidden, generator=_gen(seed))).to(dtype).to(device)


def hf_gemma3_rms_norm(x, weight, eps):
    """transformers' ``Gemma3RMSNorm.forward``, written out."""

    def _norm(v):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)

    output = _norm(x.float())
    # Llama does x.to(float16) * w whilst Gemma3 is (x * w).to(float16)
    output = output * (1.0 + weight.float())
    return output.type_as(x)


def _bits(t):
    return t.view(torch.uint8)


# --------------------------------------------------------------------------- native vs references


@pytest.mark.parametrize("shape, dtype, weight_f32", [(v0,) + (v1,) + (v2,) for v0, v1, v2 in covering(
    SHAPES,
    DTYPES,
    [True, False],
)])
def test_native_matches_hf_and_float64(shape, dtype, weight_f32):
    x = randn(shape, dtype, 1, scale=3.0)
    w = gemma_weight(shape[-1], torch.float32 if weight_f32 else dtype, 2)
    y = fx.gemma_rms_norm(x, w, EPS)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, gemma_rms_norm_native(x, w, EPS))
    assert torch.equal(y, hf_gemma3_rms_norm(x, w, EPS))
    x64 = x.double()
    ref = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS) * (1 + w.double())
    # fp32 arithmetic, then one rounding: within one step of the output dtype (fp32: a few ulps).
    fi = torch.finfo(dtype)
    steps = 1 if dtype != torch.float32 else 8
    bound = steps * fi.eps * ref.abs().clamp_min(fi.tiny) + 1e-6 * ref.abs().amax() * (dtype == torch.float32)
    assert bool(((y.double() - ref).abs() <= bound).all())


def test_gemma_is_not_llama_with_one_plus_w():
    # Llama-style rounds the normalized row to bf16 before the weight multiply; Gemma rounds
    # once. Folding 1 + w into a bf16 weight for rms_norm changes values: the reason for the op.
    x = randn((64, 256), torch.bfloat16, 3, scale=3.0)
    w = gemma_weight(256, torch.float32, 4)
    gemma = fx.gemma_rms_norm(x, w, EPS)
    llama = rms_norm_native(x, (1.0 + w).to(torch.bfloat16), EPS)
    assert float((gemma != llama).float().mean()) > 0.05


def test_fp32_weight_is_not_rounded_to_the_model_dtype():
    x = randn((16, 64), torch.bfloat16, 5)
    w = gemma_weight(64, torch.float32, 6)
    w16 = w.to(torch.bfloat16).float()
    assert not torch.equal(w, w16)
    assert not torch.equal(fx.gemma_rms_norm(x, w, EPS), fx.gemma_rms_norm(x, w16, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_is_the_add_then_the_norm(dtype):
    x, r = randn((7, 40), dtype, 7), randn((7, 40), dtype, 8)
    w = gemma_weight(40, torch.float32, 9)
    y, r_out = fx.fused_add_gemma_rms_norm(x, r, w, EPS)
    assert torch.equal(r_out, x + r)
    assert torch.equal(y, fx.gemma_rms_norm(x + r, w, EPS))


@pytest.mark.parametrize("dtype, shape", [(v0,) + (v1,) for v0, v1 in covering(
    [torch.bfloat16, torch.float16],
    [(7, 40), (2, 3, 40), (5, 1152)],
)])
def test_quant_forms_equal_their_unfused_chains(dtype, shape):
    x, r = randn(shape, dtype, 10, scale=2.0), randn(shape, dtype, 11)
    w = gemma_weight(shape[-1], torch.float32, 12)
    s, ub = torch.tensor([0.02]), torch.tensor([1.5])
    y = fx.gemma_rms_norm(x, w, EPS)
    y_add, r_out = fx.fused_add_gemma_rms_norm(x, r, w, EPS)

    q = fx.gemma_rms_norm_static_fp8_quant(x, w, s, EPS)
    assert torch.equal(_bits(q), _bits(fx.static_scaled_fp8_quant(y, s)))
    assert torch.equal(_bits(q), _bits(gemma_rms_norm_static_fp8_quant_native(x, w, s, EPS)))

    q, r2 = fx.fused_add_gemma_rms_norm_static_fp8_quant(x, r, w, s, EPS)
    assert torch.equal(_bits(q), _bits(fx.static_scaled_fp8_quant(y_add, s))) and torch.equal(r2, r_out)
    q_n, r_n = fused_add_gemma_rms_norm_static_fp8_quant_native(x, r, w, s, EPS)
    assert torch.equal(_bits(q), _bits(q_n)) and torch.equal(r2, r_n)

    for cap in (None, ub):
        q, sc = fx.gemma_rms_norm_dynamic_per_token_fp8_quant(x, w, EPS, cap)
        q_ref, sc_ref = fx.dynamic_per_token_fp8_quant(y, cap)
        assert torch.equal(_bits(q), _bits(q_ref)) and torch.equal(sc, sc_ref)
        q_n, sc_n = gemma_rms_norm_dynamic_per_token_fp8_quant_native(x, w, EPS, cap)
        assert torch.equal(_bits(q), _bits(q_n)) and torch.equal(sc, sc_n)

        q, sc, r2 = fx.fused_add_gemma_rms_norm_dynamic_per_token_fp8_quant(x, r, w, EPS, cap)
        q_ref, sc_ref = fx.dynamic_per_token_fp8_quant(y_add, cap)
        assert torch.equal(_bits(q), _bits(q_ref)) and torch.equal(sc, sc_ref) and torch.equal(r2, r_out)
        q_n, sc_n, r_n = fused_add_gemma_rms_norm_dynamic_per_token_fp8_quant_native(x, r, w, EPS, cap)
        assert torch.equal(_bits(q), _bits(q_n)) and torch.equal(sc, sc_n) and torch.equal(r2, r_n)


def test_default_scale_ub_can_be_left_out_or_named():
    x, w = randn((7, 40), torch.bfloat16, 13), gemma_weight(40, torch.float32, 14)
    a = fx.gemma_rms_norm_dynamic_per_token_fp8_quant(x, w, EPS)
    b = fx.gemma_rms_norm_dynamic_per_token_fp8_quant(x, w, eps=EPS, scale_ub=None)
    assert all(torch.equal(_bits(u) if u.dtype == torch.float8_e4m3fn else u,
                           _bits(v) if v.dtype == torch.float8_e4m3fn else v) for u, v in zip(a, b))


# --------------------------------------------------------------------------- kernel vs native


def _kernel():
    pytest.importorskip("triton", reason="Triton is part of the test extras")
    from fxfuse.kernels import norm_quant as K

    return K


def _within_ulps(a, b, ulps):
    a32, b32 = a.float(), b.float()
    step = ulps * torch.finfo(a.dtype).eps * torch.maximum(a32.abs(), b32.abs()).clamp_min(torch.finfo(a.dtype).tiny)
    return bool(((a32 - b32).abs() <= step).all()), float((a32 != b32).float().mean())


def assert_fp8_matches(q, ref):
    """Bit for bit under the interpreter. Compiled, the norm kernel's variants may sum a row
    in different orders (kernels/norm_quant.py): one FP8 step on <= 0.1% of elements."""
    a, b = _bits(q).to(torch.int16), _bits(ref).to(torch.int16)
    if DEVICE == "cpu":
        assert torch.equal(a, b)
        return
    diff = a != b
    assert float(diff.float().mean()) <= 1e-3
    assert bool(((a - b).abs()[diff] == 1).all()) and bool(((a >> 7) == (b >> 7)).all())


KERNEL_SHAPES = [(1, 16), (7, 40), (33, 129)] if DEVICE == "cpu" else [(1, 2560), (7, 3840), (257, 5376), (33, 129)]


@pytest.mark.parametrize("rows, cols, dtype, weight_f32, residual", [tuple(v0) + (v1,) + (v2,) + (v3,) for v0, v1, v2, v3 in covering(
    KERNEL_SHAPES,
    DTYPES,
    [True, False],
    [False, True],
)])
def test_kernel_norm_matches_native(rows, cols, dtype, weight_f32, residual):
    K = _kernel()
    x, r = randn((rows, cols), dtype, rows, 2.0, DEVICE), randn((rows, cols), dtype, rows + 1, 1.0, DEVICE)
    w = gemma_weight(cols, torch.float32 if weight_f32 else dtype, cols, DEVICE)
    y, _, _, r_out = K.rms_norm_quant(x, w, EPS, residual=r if residual else None, gemma=True)
    if residual:
        ref, ref_r = fused_add_gemma_rms_norm_native(x, r, w, EPS)
        assert torch.equal(r_out, ref_r)
    else:
        ref = gemma_rms_norm_native(x, w, EPS)
    # One rounding of a value whose rstd may be an ulp or so off (another summation order):
    # one step of a 16-bit output, rarely; a few ulps of an fp32 one.
    ok, frac = _within_ulps(y, ref, 1 if dtype != torch.float32 else 8)
    assert ok and (frac < 0.02 or dtype == torch.float32), f"{frac:.3%} of elements differ"


@pytest.mark.parametrize("rows, cols, dtype, residual", [tuple(v0) + (v1,) + (v2,) for v0, v1, v2 in covering(
    KERNEL_SHAPES,
    [torch.bfloat16, torch.float16],
    [False, True],
)])
def test_kernel_fp8_epilogues_quantize_the_kernels_own_norm(rows, cols, dtype, residual):
    K = _kernel()
    x, r = randn((rows, cols), dtype, 3 * rows, 2.0, DEVICE), randn((rows, cols), dtype, 3 * rows + 1, 1.0, DEVICE)
    w = gemma_weight(cols, torch.float32, 2 * cols, DEVICE)
    res = r if residual else None
    y, _, _, _ = K.rms_norm_quant(x, w, EPS, residual=res, gemma=True)
    s, ub = torch.tensor([0.02], device=DEVICE), torch.tensor([1.5], device=DEVICE)
    _, q, _, r_out = K.rms_norm_quant(x, w, EPS, residual=res, quant=K.QUANT_STATIC, scale=s, gemma=True)
    assert_fp8_matches(q, static_scaled_fp8_quant_native(y, s))
    if residual:
        assert torch.equal(r_out, x + r)
    for cap in (None, ub):
        _, q, scales, _ = K.rms_norm_quant(x, w, EPS, residual=res, quant=K.QUANT_DYNAMIC, scale_ub=cap, gemma=True)
        q_ref, s_ref = dynamic_per_token_fp8_quant_native(y, cap)
        assert_fp8_matches(q, q_ref)
        if DEVICE == "cpu":
            assert torch.equal(scales, s_ref)


def test_kernel_llama_path_is_unchanged_by_the_gemma_flag():
    # The flag's default keeps every existing norm kernel's arithmetic.
    K = _kernel()
    x, w = randn((7, 40), torch.bfloat16, 15, device=DEVICE), gemma_weight(40, torch.bfloat16, 16, DEVICE)
    assert torch.equal(K.rms_norm_quant(x, w, EPS)[0], K.rms_norm_quant(x, w, EPS, gemma=False)[0])
    assert not torch.equal(K.rms_norm_quant(x, w, EPS)[0], K.rms_norm_quant(x, w, EPS, gemma=True)[0])


# --------------------------------------------------------------------------- fake impls, opcheck


def _op_cases():
    x, r = randn((7, 40), torch.bfloat16, 20), randn((7, 40), torch.bfloat16, 21)
    w, w16 = gemma_weight(40, torch.float32, 22), gemma_weight(40, torch.bfloat16, 23)
    s, ub = torch.tensor([0.02]), torch.tensor([1.5])
    x3 = randn((2, 3, 40), torch.float16, 24)
    return [
        ("gemma_rms_norm", (x, w, EPS)),
        ("gemma_rms_norm", (x3, w, EPS)),
        ("fused_add_gemma_rms_norm", (x, r, w16, EPS)),
        ("gemma_rms_norm_static_fp8_quant", (x, w, s, EPS)),
        ("fused_add_gemma_rms_norm_static_fp8_quant", (x, r, w, s, EPS)),
        ("gemma_rms_norm_dynamic_per_token_fp8_quant", (x3, w, EPS, ub)),
        ("fused_add_gemma_rms_norm_dynamic_per_token_fp8_quant", (x, r, w, EPS, None)),
    ]


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("case", range(len(_op_cases())))
def test_fake_impl_matches_real(case):
    name, args = _op_cases()[case]
    op = getattr(fx, name)
    real = _as_tuple(op(*args))
    with FakeTensorMode() as mode:
        fake = _as_tuple(op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]))
    assert len(fake) == len(real)
    for f, r in zip(fake, real):
        assert (f.shape, f.dtype, f.device, f.stride()) == (r.shape, r.dtype, r.device, r.stride()), name


@pytest.mark.parametrize("case", [0, 2])
def test_opcheck(case):
    name, args = _op_cases()[case]
    torch.library.opcheck(getattr(fx, name).default, args)


# --------------------------------------------------------------------------- validation


_X, _R = randn((7, 40), torch.bfloat16, 30), randn((7, 40), torch.bfloat16, 31)
_W, _S = gemma_weight(40, torch.float32, 32), torch.tensor([0.02])

BAD_CASES = {
    "weight-fp16-on-bf16": (lambda: fx.gemma_rms_norm(_X, _W.half(), EPS), "gemma_rms_norm",
                            r"`weight` must have dtype torch.float32 or torch.bfloat16 \(the dtype of `x`\), got torch.float16"),
    "weight-shape": (lambda: fx.gemma_rms_norm(_X, _W[:39], EPS), "gemma_rms_norm", r"`weight` must have shape \[40\]"),
    "weight-2d": (lambda: fx.gemma_rms_norm(_X, _W.reshape(1, 40), EPS), "gemma_rms_norm", r"`weight` must have shape"),
    "x-noncontig": (lambda: fx.gemma_rms_norm(torch.cat((_X, _X), -1)[:, ::2], _W, EPS), "gemma_rms_norm",
                    r"`x` must be contiguous"),
    "x-int": (lambda: fx.gemma_rms_norm(_X.int(), _W, EPS), "gemma_rms_norm", r"`x` must have dtype in"),
    "eps": (lambda: fx.gemma_rms_norm(_X, _W, -1.0), "gemma_rms_norm", r"`eps` must be >= 0"),
    "residual-shape": (lambda: fx.fused_add_gemma_rms_norm(_X, _R[:6], _W, EPS), "fused_add_gemma_rms_norm",
                       r"`residual` must have shape"),
    "residual-dtype": (lambda: fx.fused_add_gemma_rms_norm(_X, _R.float(), _W, EPS), "fused_add_gemma_rms_norm",
                       r"`residual` must have dtype torch.bfloat16"),
    "static-scale-dtype": (lambda: fx.gemma_rms_norm_static_fp8_quant(_X, _W, _S.half(), EPS),
                           "gemma_rms_norm_static_fp8_quant", r"`scale` must have dtype torch.float32"),
    "static-scale-value": (lambda: fx.fused_add_gemma_rms_norm_static_fp8_quant(_X, _R, _W, -_S, EPS),
                           "fused_add_gemma_rms_norm_static_fp8_quant", r"`scale` must be a positive finite number"),
    "static-weight": (lambda: fx.fused_add_gemma_rms_norm_static_fp8_quant(_X, _R, _W.double(), _S, EPS),
                      "fused_add_gemma_rms_norm_static_fp8_quant", r"`weight` must have dtype"),
    "dynamic-ub-numel": (lambda: fx.gemma_rms_norm_dynamic_per_token_fp8_quant(_X, _W, EPS, torch.ones(2)),
                         "gemma_rms_norm_dynamic_per_token_fp8_quant", r"`scale_ub` must have exactly one element"),
    "dynamic-residual": (lambda: fx.fused_add_gemma_rms_norm_dynamic_per_token_fp8_quant(_X, _R.t(), _W, EPS),
                         "fused_add_gemma_rms_norm_dynamic_per_token_fp8_quant", r"`residual` must have shape"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_validation_eager(case):
    fn, op, what = BAD_CASES[case]
    with pytest.raises(ValueError, match=rf"^fxfuse\.{op}: {what}"):
        fn()


@pytest.mark.parametrize("case", sorted(c for c in BAD_CASES if c != "static-scale-value"))
def test_validation_under_fake_mode(case):
    # Metadata checks run in the fake impl too (a scale's value cannot be read there).
    fn, op, what = BAD_CASES[case]
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(ValueError, match=rf"^fxfuse\.{op}: {what}"):
            fn()


# --------------------------------------------------------------------------- GPU: the ops dispatch to the kernel


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, hidden", [(v0,) + (v1,) for v0, v1 in covering(
    [1, 37, 4096],
    [2560, 3840, 5376],
)])
def test_ops_on_cuda_run_the_kernel(tokens, hidden, monkeypatch):
    from fxfuse.ops._dispatch import use_kernels

    x = randn((tokens, hidden), torch.bfloat16, tokens, 2.0, "cuda")
    r = randn((tokens, hidden), torch.bfloat16, tokens + 1, 1.0, "cuda")
    w = gemma_weight(hidden, torch.float32, hidden, "cuda")
    s = torch.tensor([0.02], device="cuda")
    assert use_kernels(x)
    y, r_out = fx.fused_add_gemma_rms_norm(x, r, w, EPS)
    q, r_q = fx.fused_add_gemma_rms_norm_static_fp8_quant(x, r, w, s, EPS)
    qd, sd = fx.gemma_rms_norm_dynamic_per_token_fp8_quant(x, w, EPS)
    assert torch.equal(r_out, x + r) and torch.equal(r_q, r_out)
    # Fused == unfused on the GPU: the FP8 of the kernel's own model-dtype output.
    assert_fp8_matches(q, fx.static_scaled_fp8_quant(y, s))
    assert_fp8_matches(qd, fx.dynamic_per_token_fp8_quant(fx.gemma_rms_norm(x, w, EPS))[0])
    monkeypatch.setenv("FXFUSE_KERNELS", "0")
    y_ref, _ = fx.fused_add_gemma_rms_norm(x, r, w, EPS)
    ok, frac = _within_ulps(y, y_ref, 1)
    assert ok and frac < 0.02, f"{frac:.3%} of elements differ"
