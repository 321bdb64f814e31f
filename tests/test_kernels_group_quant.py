"""Group-quant Triton kernels (alone, after RMSNorm, after SiLU-and-mul) against the native ops.

CUDA when present, else Triton's CPU interpreter at small odd shapes. The standalone
quant is bit exact against the native op. The fused kernels must quantize exactly what
the unfused kernels produce: their FP8 codes and scales equal the native group quant of
the unfused kernel's output (RMSNorm: ``norm_quant``; SiLU-and-mul: ``activation``), bit
for bit in the interpreter, and on the GPU up to DESIGN §2's one FP8 step on rare
elements where a compiled row sum's order differs. The fused norm kernel runs with the
heuristic's rows per program and with tiles of 2 and 8 rows (over row counts that are
not multiples of them), against the unfused kernel's default launch.
"""

import pytest
import torch

pytest.importorskip("triton", reason="Triton is part of the test extras")

from test_kernels_norm_quant import assert_fp8_matches  # noqa: E402

from fxfuse.kernels import activation as A  # noqa: E402
from fxfuse.kernels import group_quant as G  # noqa: E402
from fxfuse.kernels import norm_quant as N  # noqa: E402
from fxfuse.ops.group_quant import group_fp8_quant_native  # noqa: E402
from conftest import covering

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (shape, group size): odd row counts, one group and several, 1-D and 3-D.
SHAPES = [((1, 64), 64), ((5, 192), 64), ((33, 256), 128), ((2, 3, 128), 64), ((128,), 128)] if DEVICE == "cpu" else \
         [((1, 4096), 128), ((7, 5120), 128), ((257, 8192), 128), ((4096, 4096), 128), ((33, 7168), 64)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _x(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    # Groups of different magnitudes, so each needs its own scale.
    ramp = torch.logspace(-1, 1, shape[-1] // 64).repeat_interleave(64)
    return (torch.randn(*shape, generator=g) * scale * ramp).to(dtype).to(DEVICE)


def _bytes(t):
    return t.view(torch.uint8)


def _assert_same_layout(s, ref_s):
    assert s.shape == ref_s.shape and s.stride() == ref_s.stride()


@pytest.mark.parametrize("shape, group_size, dtype, column_major", [tuple(v0) + (v1,) + (v2,) for v0, v1, v2 in covering(
    SHAPES,
    DTYPES,
    [False, True],
)])
def test_group_quant_is_bit_exact(shape, group_size, dtype, column_major):
    x = _x(shape, dtype, seed=sum(shape))
    x.view(-1, shape[-1])[0, :group_size] *= 1e-9  # a group at the scale floor
    if x.dim() > 1 and x.shape[0] > 2:
        x[2, -group_size:] = 0  # an all-zero group
    q, s = G.group_fp8(x, group_size, column_major)
    ref_q, ref_s = group_fp8_quant_native(x, group_size, column_major)
    _assert_same_layout(s, ref_s)
    assert torch.equal(s, ref_s)
    assert torch.equal(_bytes(q), _bytes(ref_q))


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_maximum_lands_on_the_fp8_limit(dtype):
    # Values at the FP8 limit and the row's absolute maximum landing on 448 exactly.
    x = _x((3, 128), dtype, seed=1, scale=300.0)
    q, s = G.group_fp8(x, 64)
    ref_q, ref_s = group_fp8_quant_native(x, 64)
    assert torch.equal(s, ref_s) and torch.equal(_bytes(q), _bytes(ref_q))
    assert (q.float().abs().amax(-1) == 448).all()


@pytest.mark.parametrize("shape, group_size, dtype, residual, column_major, per_program", [tuple(v0) + (v1,) + (v2,) + (v3,) + (v4,) for v0, v1, v2, v3, v4 in covering(
    SHAPES,
    [torch.bfloat16, torch.float16],
    [False, True],
    [False, True],
    [None, 2, 8],
)])
def test_rms_norm_group_quant_quantizes_the_norm_kernels_output(shape, group_size, dtype, residual, column_major,
                                                                 per_program):
    x = _x(shape, dtype, seed=3 * sum(shape), scale=3.0)
    g = torch.Generator().manual_seed(sum(shape))
    r = torch.randn(*shape, generator=g).to(dtype).to(DEVICE) if residual else None
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype).to(DEVICE)
    if x.dim() > 1 and x.shape[0] > 2:
        x[1, :group_size] *= 1e-9  # a group at the scale floor, in a tile with other rows
    q, s, r_out = G.rms_norm_group_fp8(x, w, 1e-6, group_size, column_major, residual=r, rows_per_program=per_program)
    y, _, _, ref_r_out = N.rms_norm_quant(x, w, 1e-6, residual=r)  # the unfused kernel
    ref_q, ref_s = group_fp8_quant_native(y, group_size, column_major)
    _assert_same_layout(s, ref_s)
    if residual:
        assert torch.equal(r_out, ref_r_out)
    else:
        assert r_out is None
    if DEVICE == "cpu":
        assert torch.equal(s, ref_s)
    else:  # a scale from a row summed in another order: one bf16/fp16 step of the group max
        torch.testing.assert_close(s, ref_s, rtol=2 ** -7, atol=0)
    same = (s == ref_s).repeat_interleave(group_size, -1)
    # Masked as bytes: torch 2.9 cannot index float8 tensors on the CPU.
    assert_fp8_matches(q.view(torch.uint8)[same], ref_q.view(torch.uint8)[same])


@pytest.mark.parametrize("shape, group_size, dtype, column_major", [tuple(v0) + (v1,) + (v2,) for v0, v1, v2 in covering(
    SHAPES,
    DTYPES,
    [False, True],
)])
def test_silu_and_mul_group_quant_quantizes_the_activation_kernels_output(shape, group_size, dtype, column_major):
    x = torch.cat([_x(shape, dtype, seed=5 * sum(shape), scale=3.0), _x(shape, dtype, seed=7, scale=2.0)], dim=-1)
    q, s = G.silu_and_mul_group_fp8(x, group_size, column_major)
    ref_q, ref_s = group_fp8_quant_native(A.silu_and_mul(x), group_size, column_major)  # the unfused kernel
    _assert_same_layout(s, ref_s)
    assert torch.equal(s, ref_s)
    assert torch.equal(_bytes(q), _bytes(ref_q))


def test_empty_inputs_launch_nothing():
    x = torch.empty(0, 128, dtype=torch.bfloat16, device=DEVICE)
    q, s = G.group_fp8(x, 64, True)
    assert q.shape == (0, 128) and s.shape == (0, 2)
    q, s = G.silu_and_mul_group_fp8(torch.empty(0, 256, dtype=torch.bfloat16, device=DEVICE), 128)
    assert q.shape == (0, 128) and s.shape == (0, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 37, 4096])
def test_ops_run_kernels_and_fused_equals_unfused(tokens):
    from fxfuse.ops._dispatch import use_kernels

    ops = torch.ops.fxfuse
    g = torch.Generator(device="cuda").manual_seed(tokens)
    h, i = 4096, 14336
    x = torch.randn(tokens, h, device="cuda", generator=g).bfloat16()
    r = torch.randn(tokens, h, device="cuda", generator=g).bfloat16()
    w = (1 + 0.1 * torch.randn(h, device="cuda", generator=g)).bfloat16()
    a = (3 * torch.randn(tokens, 2 * i, device="cuda", generator=g)).bfloat16()
    assert use_kernels(x)
    # Dispatch: the op returns its kernel's output.
    q, s = ops.group_fp8_quant(x, 128, True)
    kq, ks = G.group_fp8(x, 128, True)
    assert torch.equal(_bytes(q), _bytes(kq)) and torch.equal(s, ks) and s.stride() == (1, tokens)
    # Fused == unfused through the ops.
    for fused, (y, cm) in ((ops.rms_norm_group_fp8_quant(x, w, 1e-6, 128, True), (ops.rms_norm(x, w, 1e-6), True)),
                           (ops.fused_add_rms_norm_group_fp8_quant(x, r, w, 1e-6, 128)[:2],
                            (ops.fused_add_rms_norm(x, r, w, 1e-6)[0], False))):
        fq, fs = fused
        rq, rs = ops.group_fp8_quant(y, 128, cm)
        torch.testing.assert_close(fs, rs, rtol=2 ** -7, atol=0)
        same = (fs == rs).repeat_interleave(128, -1)
        assert_fp8_matches(fq[same], rq[same])
    fq, fs = ops.silu_and_mul_group_fp8_quant(a, 128)
    rq, rs = ops.group_fp8_quant(ops.silu_and_mul(a), 128)
    assert torch.equal(fs, rs) and torch.equal(_bytes(fq), _bytes(rq))
