"""The ``gemm_fusion`` pass, the fused linear ops and the small-batch GEMM's fused forms.

- **Kernels** (Triton's interpreter on the CPU, small odd shapes, token/row/K tails,
  split and unsplit, swapped and unswapped): each fused form equals the chain of the
  unfused kernels it replaces, run with the same GEMM config, bit for bit; and stays
  within the GEMM's summation bound of the native chain.
- **Ops**: off CUDA a fused op runs the chain it stands for, so it equals the chain of
  native functions bit for bit; bad arguments are named.
- **Pass**: with a table that names the CPU, every chain of the reference model is fused
  (fp8 and fp8-block; 3 per layer) and the compiled model's logits are those of the
  unfused compile; with the shipped table (no entry for any device) nothing is fused and
  no near miss is counted, so the demo's counts are unchanged.
"""

import dataclasses

import pytest
import torch

import fxfuse
from fxfuse.kernels import small_gemm_config as C
from fxfuse.kernels.small_gemm_config import SmallGemmConfig as Cfg
from fxfuse.ops import fused_linear as FL
from fxfuse.ops.block_linear import block_fp8_linear_native, quantize_weight_blocks
from fxfuse.ops.group_quant import group_fp8_quant_native
from fxfuse.ops.linear import fp8_linear_native
from conftest import covering

fx = torch.ops.fxfuse
FP8 = torch.float8_e4m3fn
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _kernels():
    pytest.importorskip("triton", reason="Triton is part of the test extras")
    from fxfuse.kernels import activation, group_quant, norm_quant, quant, small_gemm

    return small_gemm, quant, activation, norm_quant, group_quant


def _rand(*shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _same(a, b):
    """Bit-identical (FP8 compared as bytes: NaN codes too)."""
    if a.dtype == FP8:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def _normed(a, b):
    """A normalized output against the unfused norm kernel's: bit for bit under the
    interpreter; compiled, the row's sum of squares may be reduced in another order, so
    (DESIGN §2) a bf16 element may be one unit in the last place off, an FP8 one a code
    step, on rare elements."""
    if DEVICE == "cpu":
        return _same(a, b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype == FP8:
        steps = (a.view(torch.uint8).to(torch.int16) - b.view(torch.uint8).to(torch.int16)).abs()
    else:
        steps = (a.view(torch.int16).to(torch.int32) - b.view(torch.int16).to(torch.int32)).abs()
    return bool(steps.max() <= 1) and steps.float().mean().item() <= 1e-3


def _per_tensor_weight(n, k, seed):
    w = _rand(n, k, seed=seed, scale=0.1) * torch.logspace(-1, 1, n)[:, None]
    w_scale = torch.tensor([w.abs().max().item() / 448.0])
    return (w / w_scale).to(FP8).to(DEVICE), w_scale.to(DEVICE)


def _model_inputs(m, n, seed, dtype=torch.bfloat16):
    residual = _rand(m, n, seed=seed).to(dtype).to(DEVICE)
    norm_w = (1.0 + _rand(n, seed=seed + 1, scale=0.1)).to(dtype).to(DEVICE)
    return residual, norm_w


# Configs that cover the kernel's branches: unsplit swapped, split unswapped with a K
# tail and an uneven split, split swapped; the norm epilogue in the GEMM's last program
# (row_tail) unsplit and split.
# On the GPU, where each config compiles per variant: the measured kind (unsplit) and a split.
if DEVICE == "cpu":
    CONFIGS = [Cfg(32, 64, 1, 4, 2, True), Cfg(16, 32, 3, 4, 2, False), Cfg(64, 32, 2, 4, 2, True)]
    TAIL_CONFIGS = [Cfg(32, 64, 1, 4, 2, True, True)]  # split and unswapped: the block test's tail config
else:
    CONFIGS = [Cfg(64, 256, 1, 4, 4, True), Cfg(64, 256, 2, 4, 4, True)]
    TAIL_CONFIGS = [Cfg(64, 256, 1, 4, 4, True, True)]
# (tokens, gate/up or output rows, K): a token tail of the 16- and 32-row tiles, rows and K off the tiles.
SHAPES = [(1, 80, 96), (5, 72, 160), (17, 48, 64)] if DEVICE == "cpu" else [(1, 28672, 4096), (13, 8192, 4096)]


# --------------------------------------------------------------------------- per-tensor FP8: kernels


@pytest.mark.parametrize("m, n, k, cfg", [tuple(v0) + (v1,) for v0, v1 in covering(
    SHAPES,
    CONFIGS,
)])
def test_prologues_equal_quant_kernel_then_gemm(m, n, k, cfg):
    sg, kq, _, _, _ = _kernels()
    x = _rand(m, k, seed=m + k, scale=3.0).to(torch.bfloat16).to(DEVICE)
    w_q, w_s = _per_tensor_weight(n, k, seed=n)
    s = torch.tensor([x.float().abs().max().item() / 300.0], device=DEVICE)  # some elements saturate
    ref = sg.small_fp8_linear(kq.static_fp8(x, s), w_q, s, w_s, None, torch.bfloat16, cfg)
    assert _same(sg.small_fp8_linear_fused(x, s, w_q, w_s, None, torch.bfloat16, config=cfg)[0], ref)
    for ub in (None, torch.tensor([0.5], device=DEVICE)):
        q, scales = kq.dynamic_fp8(x, ub)
        ref = sg.small_fp8_linear(q, w_q, scales, w_s, None, torch.float32, cfg)
        got = sg.small_fp8_linear_fused(x, None, w_q, w_s, None, torch.float32, scale_ub=ub, config=cfg)[0]
        assert _same(got, ref), f"dynamic, ub={ub}"


@pytest.mark.parametrize("m, n, k, cfg, quantized", [tuple(v0) + (v1,) + (v2,) for v0, v1, v2 in covering(
    SHAPES,
    CONFIGS + TAIL_CONFIGS,
    [False, True],
)])
def test_epilogues_equal_gemm_then_their_kernels(m, n, k, cfg, quantized):
    sg, kq, ka, kn, _ = _kernels()
    x = _rand(m, k, seed=k, scale=2.0).to(torch.bfloat16).to(DEVICE)
    s_in = torch.tensor([x.float().abs().max().item() / 448.0], device=DEVICE)
    x_q = kq.static_fp8(x, s_in)
    w_q, w_s = _per_tensor_weight(n, k, seed=n + 1)
    out_scale = torch.tensor([0.004], device=DEVICE) if quantized else None
    mid = sg.small_fp8_linear(x_q, w_q, s_in, w_s, None, torch.bfloat16, cfg)
    # SiLU-and-mul: the gate rows [0, n/2) and the up rows [n/2, n) of one weight.
    ref = ka.silu_and_mul(mid, ka.OUT_FP8, out_scale) if quantized else ka.silu_and_mul(mid)
    got, = sg.small_fp8_linear_fused(x_q, s_in, w_q, w_s, None, torch.bfloat16, epilogue="silu_and_mul",
                                     out_scale=out_scale, config=cfg)
    assert _same(got, ref)
    # Residual add + RMSNorm (+ FP8), also with the static quant in front (o_proj after unfused attention).
    residual, norm_w = _model_inputs(m, n, seed=m)
    y, q, _, r_out = kn.rms_norm_quant(mid, norm_w, 1e-5, residual=residual,
                                       quant=kn.QUANT_STATIC if quantized else kn.QUANT_NONE, scale=out_scale)
    for x_in in (x_q, x):
        got = sg.small_fp8_linear_fused(x_in, s_in, w_q, w_s, None, torch.bfloat16, epilogue="fused_add_rms_norm",
                                        residual=residual, norm_weight=norm_w, eps=1e-5, out_scale=out_scale,
                                        config=cfg)
        assert len(got) == 2 and _normed(got[0], q if quantized else y) and _same(got[1], r_out)


def test_fused_kernels_stay_near_the_native_chain():
    """Against the native functions the GEMM sums in another order: the fp32 output is
    within the summation bound, and the model-dtype output of an epilogue within a step."""
    sg, *_ = _kernels()
    m, n, k = 5, 80, 160
    x = _rand(m, k, seed=3).to(torch.bfloat16).to(DEVICE)
    w_q, w_s = _per_tensor_weight(n, k, seed=4)
    s = torch.tensor([x.float().abs().max().item() / 448.0], device=DEVICE)
    out = sg.small_fp8_linear_fused(x, s, w_q, w_s, None, torch.float32)[0]
    ref, = FL.fp8_linear_fused_native(x, s, w_q, w_s, None, torch.float32)
    x_q = (x.float() / s).clamp(-448, 448).to(FP8)
    mag = (x_q.float().abs() * s) @ (w_q.float().abs() * w_s).t()
    # FP8 tensor cores add with fewer bits than fp32 inside an MMA (test_small_gemm's bound).
    bound = 2**-10 * mag if DEVICE == "cuda" else 2 * (2 * k + 16) * 2.0**-24 * mag
    assert bool(((out - ref).abs() <= bound).all())
    residual, norm_w = _model_inputs(m, n, seed=5)
    y, r_out = sg.small_fp8_linear_fused(x, s, w_q, w_s, None, torch.bfloat16, epilogue="fused_add_rms_norm",
                                         residual=residual, norm_weight=norm_w, eps=1e-5)
    y_ref, r_ref = FL.fp8_linear_fused_native(x, s, w_q, w_s, None, torch.bfloat16, epilogue="fused_add_rms_norm",
                                              residual=residual, norm_weight=norm_w, eps=1e-5)
    # A GEMM output a bf16 step off moves the residual sum by that step, whatever the sum's
    # own size (it may cancel), and the normalized row by about as much of its scale.
    step = 2**-7 * (r_ref.float().abs().max() + residual.float().abs().max())
    torch.testing.assert_close(r_out.float(), r_ref.float(), atol=step.item(), rtol=2**-7)
    torch.testing.assert_close(y.float(), y_ref.float(), atol=2**-6 * y_ref.float().abs().max().item(), rtol=2**-6)


# --------------------------------------------------------------------------- block-scaled FP8: kernels

BLOCK_SHAPES = [(3, 2 * 128, 256, 128, True), (5, 2 * 192, 192, 64, False)] if DEVICE == "cpu" else \
    [(1, 28672, 4096, 128, True), (16, 28672, 4096, 128, True)]
BLOCK_CONFIGS = [Cfg(128, 128, 1, 4, 2, True), Cfg(128, 128, 2, 4, 2, False), Cfg(128, 128, 2, 4, 2, True, True)]


@pytest.mark.parametrize("m, n, k, group, column_major, cfg", [tuple(v0) + (v1,) for v0, v1 in covering(
    BLOCK_SHAPES,
    BLOCK_CONFIGS,
)])
def test_block_forms_equal_their_unfused_kernels(m, n, k, group, column_major, cfg):
    sg, _, _, _, kg = _kernels()
    x = _rand(m, k, seed=m * k).to(torch.bfloat16).to(DEVICE)
    w_q, w_s = (t.to(DEVICE) for t in quantize_weight_blocks(_rand(n, k, seed=n, scale=0.05)))
    x_q, x_s = kg.group_fp8(x, group, column_major)
    mid = sg.small_block_fp8_linear(x_q, x_s, w_q, w_s, None, torch.bfloat16, cfg)
    got, = sg.small_block_fp8_linear_fused(x, None, w_q, w_s, None, torch.bfloat16, group_size=group, config=cfg)
    assert _same(got, mid)
    q, s = kg.silu_and_mul_group_fp8(mid, group, column_major)
    got = sg.small_block_fp8_linear_fused(x_q, x_s, w_q, w_s, None, torch.bfloat16, group_size=group,
                                          epilogue="silu_and_mul", out_group_size=group,
                                          column_major_scales=column_major, config=cfg)
    assert _same(got[0], q) and _same(got[1], s) and got[1].stride() == s.stride()
    residual, norm_w = _model_inputs(m, n, seed=k)
    q, s, r_out = kg.rms_norm_group_fp8(mid, norm_w, 1e-5, group, column_major, residual=residual)
    for x_in, x_sc in ((x_q, x_s), (x, None)):  # the group quant in front too: fp8-block's o_proj
        got = sg.small_block_fp8_linear_fused(x_in, x_sc, w_q, w_s, None, torch.bfloat16, group_size=group,
                                              epilogue="fused_add_rms_norm", residual=residual, norm_weight=norm_w,
                                              eps=1e-5, out_group_size=group, column_major_scales=column_major,
                                              config=cfg)
        # A normalized row's group scale follows its maximum: a step there moves the scale a little.
        assert _normed(got[0], q) and _same(got[2], r_out)
        assert torch.allclose(got[1], s, rtol=0 if DEVICE == "cpu" else 2**-7, atol=0)


def test_a_silu_group_epilogue_needs_whole_groups_per_program():
    sg, *_ = _kernels()
    x_q = torch.zeros(2, 128, dtype=FP8, device=DEVICE)
    x_s = torch.ones(2, 1, device=DEVICE)
    w_q, w_s = (t.to(DEVICE) for t in quantize_weight_blocks(torch.ones(256, 128)))
    with pytest.raises(ValueError, match=r"groups of 128 needs block_n a multiple of the group, got 64"):
        sg.small_block_fp8_linear_fused(x_q, x_s, w_q, w_s, None, torch.bfloat16, group_size=128,
                                        epilogue="silu_and_mul", out_group_size=128, config=Cfg(64, 128))


# --------------------------------------------------------------------------- ops


def _op_problem(seed=0, m=3, n=64, k=96):
    x = _rand(m, k, seed=seed).to(torch.bfloat16)
    w_q, w_s = (t.cpu() for t in _per_tensor_weight(n, k, seed=seed + 1))
    s = torch.tensor([x.float().abs().max().item() / 448.0])
    residual, norm_w = (t.cpu() for t in _model_inputs(m, n, seed=seed + 2))
    return x, w_q, w_s, s, residual, norm_w


def test_ops_off_cuda_are_their_native_chains_bit_for_bit():
    x, w_q, w_s, s, residual, norm_w = _op_problem()
    s2 = torch.tensor([0.01])
    x_q = fx.static_scaled_fp8_quant(x, s)
    xd_q, xd_s = fx.dynamic_per_token_fp8_quant(x)
    cases = [
        (dict(x=x, x_scale=s), [fx.fp8_linear(x_q, w_q, s, w_s)]),
        (dict(x=x, x_scale=None), [fx.fp8_linear(xd_q, w_q, xd_s, w_s)]),
        (dict(x=x_q, x_scale=s, epilogue="silu_and_mul", out_scale=s2),
         [fx.silu_and_mul_static_fp8_quant(fx.fp8_linear(x_q, w_q, s, w_s), s2)]),
        (dict(x=x_q, x_scale=s, epilogue="fused_add_rms_norm", residual=residual, norm_weight=norm_w, eps=1e-5),
         list(fx.fused_add_rms_norm(fx.fp8_linear(x_q, w_q, s, w_s), residual, norm_w, 1e-5))),
        (dict(x=x, x_scale=s, epilogue="fused_add_rms_norm", residual=residual, norm_weight=norm_w, eps=1e-5,
              out_scale=s2),
         list(fx.fused_add_rms_norm_static_fp8_quant(fx.fp8_linear(x_q, w_q, s, w_s), residual, norm_w, s2, 1e-5))),
    ]
    for kwargs, want in cases:
        x_in, xs = kwargs.pop("x"), kwargs.pop("x_scale")
        got = fx.fp8_linear_fused(x_in, xs, w_q, w_s, **kwargs)
        native = FL.fp8_linear_fused_native(x_in, xs, w_q, w_s, **kwargs)
        assert [_same(a, b) for a, b in zip(got, want)] == [True] * len(want), kwargs
        assert [_same(a, b) for a, b in zip(native, want)] == [True] * len(want), kwargs


def test_block_op_off_cuda_is_its_native_chain():
    m, n, k = 3, 256, 256
    x = _rand(m, k, seed=7).to(torch.bfloat16)
    w_q, w_s = quantize_weight_blocks(_rand(n, k, seed=8, scale=0.05))
    residual, norm_w = (t.cpu() for t in _model_inputs(m, n, seed=9))
    x_q, x_s = group_fp8_quant_native(x, 128, True)
    mid = block_fp8_linear_native(x_q, x_s, w_q, w_s)
    want = fx.fused_add_rms_norm_group_fp8_quant(mid, residual, norm_w, 1e-5, 64, True)
    got = fx.block_fp8_linear_fused(x, None, w_q, w_s, group_size=128, epilogue="fused_add_rms_norm",
                                    residual=residual, norm_weight=norm_w, eps=1e-5, out_group_size=64,
                                    column_major_scales=True)
    assert [_same(a, b) for a, b in zip(got, want)] == [True] * 3 and got[1].stride() == want[1].stride()
    q, s = fx.block_fp8_linear_fused(x_q, x_s, w_q, w_s, epilogue="silu_and_mul", out_group_size=64)
    q_want, s_want = group_fp8_quant_native(fx.silu_and_mul(mid), 64)
    assert _same(q, q_want) and _same(s, s_want)
    assert fx.block_fp8_linear_fused(x_q, x_s, w_q, w_s)[0].equal(mid)


@pytest.mark.parametrize("kwargs, msg", [
    (dict(epilogue="gelu"), r"`epilogue` must be one of \['none', 'silu_and_mul', 'fused_add_rms_norm'\], got 'gelu'"),
    (dict(epilogue="fused_add_rms_norm"), r"`residual` must be a torch.Tensor, got NoneType"),
    (dict(residual="r"), r"`residual`, `norm_weight` and an output quant need an epilogue"),
    (dict(epilogue="silu_and_mul", bias=True), r"`bias` is not taken with an epilogue \('silu_and_mul'\)"),
    (dict(scale_ub=True), r"`scale_ub` caps the dynamic quant \(no `x_scale`\)"),
    (dict(fp8=True, x_scale=None), r"an FP8 `x` needs its `x_scale`"),
    (dict(epilogue="fused_add_rms_norm", residual="r", norm_weight="w", eps=1e-5, residual_dtype=torch.float16),
     r"`residual` must have the output's shape \[3, 64\] and dtype torch.bfloat16, got \(3, 64\) torch.float16"),
])
def test_bad_arguments_are_named(kwargs, msg):
    x, w_q, w_s, s, residual, norm_w = _op_problem()
    kwargs = dict(kwargs)
    if kwargs.pop("fp8", False):
        x = fx.static_scaled_fp8_quant(x, s)
    x_scale = kwargs.pop("x_scale", s)
    if kwargs.get("bias") is True:
        kwargs["bias"] = torch.zeros(64, dtype=torch.bfloat16)
    if kwargs.get("scale_ub") is True:
        kwargs["scale_ub"] = torch.tensor([1.0])
    dtype = kwargs.pop("residual_dtype", torch.bfloat16)
    if kwargs.get("residual") == "r":
        kwargs["residual"] = residual.to(dtype)
    if kwargs.get("norm_weight") == "w":
        kwargs["norm_weight"] = norm_w
    with pytest.raises((ValueError, TypeError), match=r"fxfuse\.fp8_linear_fused: " + msg):
        fx.fp8_linear_fused(x, x_scale, w_q, w_s, **kwargs)


def test_block_op_bad_group_sizes_are_named():
    x = torch.zeros(2, 256, dtype=torch.bfloat16)
    w_q, w_s = quantize_weight_blocks(torch.ones(384, 256))
    with pytest.raises(ValueError, match=r"`group_size` must be one of \[64, 128\] and divide .* got 96"):
        fx.block_fp8_linear_fused(x, None, w_q, w_s, group_size=96)
    with pytest.raises(ValueError, match=r"`out_group_size` must be 0 or one of \[64, 128\] dividing the epilogue's "
                                         r"width \(192\), got 128"):
        fx.block_fp8_linear_fused(x, None, w_q, w_s, epilogue="silu_and_mul", out_group_size=128)


# --------------------------------------------------------------------------- the table


def test_fused_keys_and_their_table_entries(monkeypatch):
    monkeypatch.delenv(C.MAX_TOKENS_ENV, raising=False)
    key = C.fused_key("static_scaled_fp8_quant", "fp8_linear", "fused_add_rms_norm_static_fp8_quant")
    assert key == "static_scaled_fp8_quant>fp8_linear>fused_add_rms_norm_static_fp8_quant"
    assert C.is_table_op(key) and C.is_table_op("fp8_linear") and not C.is_table_op("group_fp8_quant>fp8_linear")
    with pytest.raises(ValueError, match=r"fp8_linear has no epilogue 'silu_and_mul_group_fp8_quant'"):
        C.fused_key("", "fp8_linear", "silu_and_mul_group_fp8_quant")
    with pytest.raises(ValueError, match=r"needs a prologue or an epilogue"):
        C.fused_key("", "block_fp8_linear", "")
    table = {"devices": {"GPU": {key: {"max_tokens": 8, "by_shape": {"4096x4096": 16},
                                       "configs": {"4096x4096": {"16": Cfg(64, 128, 4).as_dict()}}}}}}
    C.check_choices(table)
    with pytest.raises(ValueError, match=r"unknown op 'fp8_linear>relu'"):
        C.check_choices({"devices": {"GPU": {"fp8_linear>relu": {"max_tokens": 8}}}})
    assert C.token_limit(table, "GPU", key, 6144, 4096) == 8 and C.token_limit(table, "GPU", key, 4096, 4096) == 16
    assert C.token_limit(table, "Other", key, 4096, 4096) == 0
    silu = lambda: C.default_fused_config("silu", 9, 4096, 4096)  # noqa: E731
    assert C.choose(table, "GPU", key, 9, 4096, 4096, default=silu) == Cfg(64, 128, 4)  # measured
    assert C.choose(table, "GPU", key, 2, 6144, 4096, default=silu) == silu()  # unmeasured: the fused default
    monkeypatch.setenv(C.MAX_TOKENS_ENV, "32")
    assert C.token_limit(table, "Other", key, 4096, 4096) == 32


def test_fused_defaults_fit_the_epilogues():
    for m in (1, 16, 33, 64):
        cfg = C.default_fused_config("silu", m, 28672, 4096, 128, 128)
        assert cfg.block_n % 128 == 0 and cfg.block_k % 128 == 0 and cfg.swap_ab
        # Two fp32 accumulators of block_n x block_m: at most 64 values a thread.
        assert 2 * cfg.block_n * C.block_m_for(m) <= 64 * 32 * cfg.num_warps
    assert C.default_fused_config("silu", 1, 28672, 4096).split_k == 1  # the gate_up weight fills the GPU
    # The norm epilogue: the plain product's config, the epilogue in its last program at a token or two.
    assert C.default_fused_config("rows", 1, 4096, 14336) == dataclasses.replace(C.default_config(1, 4096, 14336),
                                                                                 row_tail=True)
    assert not C.default_fused_config("rows", 16, 4096, 14336).row_tail
    assert "row_tail" not in Cfg(64, 256).as_dict() and Cfg.from_dict(Cfg(64, 256, row_tail=True).as_dict()).row_tail
    with pytest.raises(ValueError, match=r"kind must be 'silu' or 'rows', got 'gelu'"):
        C.default_fused_config("gelu", 1, 64, 64)


# --------------------------------------------------------------------------- the pass on the reference model


def _every_form_on_cpu() -> dict:
    from fxfuse.passes.gemm_fusion import REWRITES

    return {"devices": {"cpu": {C.fused_key(c.PROLOGUE, c.OP, c.EPILOGUE): {"max_tokens": 64} for c in REWRITES}}}


def _passes(table):
    from fxfuse.passes.gemm_fusion import gemm_fusion

    passes = fxfuse.default_passes(fxfuse.FusionConfig(gemm_fusion=False))
    return passes[:-1] + [gemm_fusion(table), passes[-1]]


@pytest.mark.parametrize("quant, fused", [
    ("fp8", {"LinearAddRmsNormStaticQuant": 1, "LinearSiluMulStaticQuant": 1, "LinearAddRmsNormLast": 1}),
    ("fp8-block", {"GroupQuantBlockLinearAddRmsNormGroupQuant": 1, "BlockLinearSiluMulGroupQuant": 1,
                   "BlockLinearAddRmsNormLast": 1}),
])
def test_the_reference_model_is_fused_where_the_table_says_and_computes_the_same(quant, fused):
    """One layer: o_proj + the post-attention norm, gate_up + SiLU-and-mul, down_proj + the
    final norm (fp8-block: o_proj with the group quant in front too). Prefill and decode
    give the unfused compile's logits and tokens."""
    from fxfuse.models import LlamaForCausalLM, ModelConfig, ModelRunner

    if DEVICE == "cuda":
        pytest.skip("the CPU table entry is the CPU's; the GPU's choice is measured")
    model = LlamaForCausalLM(ModelConfig.preset("tiny", quant=quant, num_layers=1))
    torch._dynamo.reset()
    unfused = ModelRunner(model, torch.compile(model, fullgraph=True)).run([[1, 2, 3], [4, 5]], 2)
    fxfuse.reset_match_table()
    compiled = fxfuse.compile(model, passes=_passes(_every_form_on_cpu()), fullgraph=True)
    got = ModelRunner(model, compiled).run([[1, 2, 3], [4, 5]], 2)
    table = fxfuse.match_table()
    compiles = sum(table["rms_quant_fusion"].values())  # 2 per compile at one layer
    assert compiles % 2 == 0 and compiles >= 2
    assert table["gemm_fusion"] == {name: n * compiles // 2 for name, n in fused.items()}
    assert "gemm_fusion" not in fxfuse.miss_table()
    assert torch.equal(got.logits, unfused.logits) and torch.equal(got.tokens, unfused.tokens)
    model.close()


def test_without_a_table_entry_nothing_is_fused_and_nothing_is_missed():
    """The shipped table names no device, so on the CPU (and on any unmeasured GPU) the pass
    declines every chain as a choice: no match, no near miss, the demo's counts unchanged."""
    from fxfuse.models import LlamaForCausalLM, ModelConfig
    from fxfuse.passes.gemm_fusion import gemm_fusion

    model = LlamaForCausalLM(ModelConfig.preset("tiny", num_layers=1))
    gm = _decode_graph(model)
    p = gemm_fusion({"devices": {}})
    assert all(not r.table for r in p.rewrites)
    assert p(gm.graph) == 0 and not p.last_misses
    cpu = gemm_fusion(_every_form_on_cpu())
    assert cpu(gm.graph) == 3
    model.close()


def _decode_graph(model):
    from fxfuse.attention import AttentionMetadata, ForwardContext, KVCache, set_forward_context

    cfg = model.config
    meta = AttentionMetadata.from_lens([1], [4], torch.zeros(1, 1, dtype=torch.int32), 16, device="cpu")
    caches = {n: KVCache.allocate(1, 16, cfg.num_kv_heads, cfg.head_dim, cfg.dtype, "cpu")
              for n in model.attention_layer_names}
    with set_forward_context(ForwardContext(meta, caches)):
        gm = fxfuse.capture_post_grad_graph(model, torch.tensor([3]), torch.tensor([3]))
    for p in fxfuse.default_passes(fxfuse.FusionConfig(gemm_fusion=False, native_lowering=False)):
        p(gm.graph)
    return gm
