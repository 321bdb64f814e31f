"""The RMSNorm(+residual)(+FP8) Triton kernel against the native reference.

Runs on CUDA when present, else in Triton's CPU interpreter (small shapes; conftest.py
sets TRITON_INTERPRET). The kernel's
normalized row may differ from the native one by one unit in the last place (another
reduction order); its FP8 epilogue must equal the native quant of that same row bit for
bit, so fused == unfused on one device. Every check runs with one row per program and
with several (``ROWS`` = 2 and 8, over row counts that are not multiples of it), the
reference always from the default launch: a tile of rows must change no bit.
"""

import pytest
import torch

pytest.importorskip("triton", reason="Triton is part of the test extras")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fxfuse.kernels import norm_quant as K  # noqa: E402
from fxfuse.kernels._rounding import exact_casts, quantize_fp8, round_to  # noqa: E402
from fxfuse.ops.norm import fused_add_rms_norm_native, rms_norm_native  # noqa: E402
from fxfuse.ops.quant import dynamic_per_token_fp8_quant_native, static_scaled_fp8_quant_native  # noqa: E402
from conftest import covering

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 16), (7, 40), (33, 129)] if DEVICE == "cpu" else [(1, 4096), (7, 5120), (257, 8192), (33, 129)]
# Rows per program: the heuristic's choice (one row at these sizes), and tiles of 2 and 8.
PER_PROGRAM = [None, 2, 8]


def _inputs(rows, cols, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, cols, generator=g) * scale).to(dtype).to(DEVICE)
    r = torch.randn(rows, cols, generator=g).to(dtype).to(DEVICE)
    w = (1 + 0.1 * torch.randn(cols, generator=g)).to(dtype).to(DEVICE)
    return x, r, w


def _within_ulps(a, b, ulps):
    """At most ``ulps`` representable steps apart (a different fp32 reduction order)."""
    a32, b32 = a.float(), b.float()
    step = ulps * torch.finfo(a.dtype).eps * torch.maximum(a32.abs(), b32.abs()).clamp_min(torch.finfo(a.dtype).tiny)
    return bool(((a32 - b32).abs() <= step).all()), float((a32 != b32).float().mean())


def _bytes(t):
    return t.view(torch.uint8)


def assert_fp8_matches(q, ref):
    """Bit for bit in the interpreter. Compiled, the kernel's variants may sum a row in
    different orders (see kernels/norm_quant.py), so on rare elements (<= 0.1%) the FP8
    codes may be one step apart: same sign, adjacent codes."""
    a, b = _bytes(q).to(torch.int16), _bytes(ref).to(torch.int16)
    if DEVICE == "cpu":
        assert torch.equal(a, b)
        return
    diff = a != b
    assert float(diff.float().mean()) <= 1e-3, f"{float(diff.float().mean()):.3%} of FP8 codes differ"
    assert bool(((a - b).abs()[diff] == 1).all()) and bool(((a >> 7) == (b >> 7)).all()), "codes more than one step apart"


@pytest.mark.parametrize("rows, cols, dtype, residual, per_program", [tuple(v0) + (v1,) + (v2,) + (v3,) for v0, v1, v2, v3 in covering(
    SHAPES,
    [torch.bfloat16, torch.float16],
    [False, True],
    PER_PROGRAM,
)])
def test_norm_matches_native_within_two_ulps(rows, cols, dtype, residual, per_program):
    x, r, w = _inputs(rows, cols, dtype, seed=rows * cols)
    y, _, _, r_out = K.rms_norm_quant(x, w, 1e-6, residual=r if residual else None, rows_per_program=per_program)
    if residual:
        ref_y, ref_r = fused_add_rms_norm_native(x, r, w, 1e-6)
        assert torch.equal(r_out, ref_r)
    else:
        ref_y = rms_norm_native(x, w, 1e-6)
    # The normalized value may be one ulp off (another summation order); times the weight
    # and rounded again that can become two.
    ok, frac = _within_ulps(y, ref_y, 2)
    assert ok and frac < 0.02, f"{frac:.3%} of elements differ"


@pytest.mark.parametrize("rows, cols, dtype, residual, x_scale, s, per_program", [tuple(v0) + (v1,) + (v2,) + tuple(v3) + (v4,) for v0, v1, v2, v3, v4 in covering(
    SHAPES,
    [torch.bfloat16, torch.float16],
    [False, True],
    [(1.0, 0.01), (300.0, 0.001)],
    PER_PROGRAM,
)])
def test_static_fp8_epilogue_is_bit_exact(rows, cols, dtype, residual, x_scale, s, per_program):
    x, r, w = _inputs(rows, cols, dtype, seed=rows + cols, scale=x_scale)
    scale = torch.tensor([s], device=DEVICE)
    res = r if residual else None
    y, _, _, _ = K.rms_norm_quant(x, w, 1e-5, residual=res)
    _, q, _, r_out = K.rms_norm_quant(x, w, 1e-5, residual=res, quant=K.QUANT_STATIC, scale=scale,
                                      rows_per_program=per_program)
    assert_fp8_matches(q, static_scaled_fp8_quant_native(y, scale))
    if residual:
        assert torch.equal(r_out, x + r)


@pytest.mark.parametrize("rows, cols, dtype, ub, residual, per_program", [tuple(v0) + (v1,) + (v2,) + (v3,) + (v4,) for v0, v1, v2, v3, v4 in covering(
    SHAPES,
    [torch.bfloat16, torch.float16],
    [None, 0.5],
    [False, True],
    PER_PROGRAM,
)])
def test_dynamic_fp8_epilogue_is_bit_exact(rows, cols, dtype, ub, residual, per_program):
    x, r, w = _inputs(rows, cols, dtype, seed=3 * rows + cols)
    x[0] *= 1e-6  # a near-zero row exercises the scale floor
    scale_ub = torch.tensor([ub], device=DEVICE) if ub is not None else None
    res = r if residual else None
    y, _, _, r_ref = K.rms_norm_quant(x, w, 1e-5, residual=res)
    _, q, s, r_out = K.rms_norm_quant(x, w, 1e-5, residual=res, quant=K.QUANT_DYNAMIC, scale_ub=scale_ub,
                                      rows_per_program=per_program)
    assert s.shape == (rows, 1) and (r_out is None) == (not residual)
    if residual:
        assert torch.equal(r_out, r_ref)
    ref_q, ref_s = dynamic_per_token_fp8_quant_native(y, scale_ub)
    same = (s == ref_s).squeeze(-1)
    if DEVICE == "cpu":
        assert bool(same.all())
    else:  # a row whose max element came out one ulp apart gets a scale one ulp apart
        assert float((~same).float().mean()) <= 0.01
        torch.testing.assert_close(s, ref_s, rtol=2 ** -7, atol=0)
    # Rows are picked from the codes as bytes: torch 2.9 cannot index float8 tensors on CPU.
    assert_fp8_matches(_bytes(q)[same], _bytes(ref_q)[same])


@pytest.mark.parametrize("rows, cols, quant, residual", [tuple(v0) + (v1,) + (v2,) for v0, v1, v2 in covering(
    SHAPES,
    [K.QUANT_NONE, K.QUANT_STATIC, K.QUANT_DYNAMIC],
    [False, True],
)])
def test_rows_per_program_changes_no_bit(rows, cols, quant, residual):
    """Every output of a launch with several rows per program (and other warp counts)
    equals the one-row launch's: bit for bit in the interpreter; compiled, each launch's
    row sum follows its own register layout, so within DESIGN §2's tolerance."""
    x, r, w = _inputs(rows, cols, torch.bfloat16, seed=5 * rows + cols)
    kw = dict(residual=r if residual else None, quant=quant, scale=torch.tensor([0.02], device=DEVICE),
              scale_ub=torch.tensor([1.5], device=DEVICE) if quant == K.QUANT_DYNAMIC else None)
    ref_y, ref_q, ref_s, ref_r = K.rms_norm_quant(x, w, 1e-6, rows_per_program=1, num_warps=4, **kw)
    for per_program, warps in ((2, None), (4, 8), (8, 16)):
        y, q, s, r_out = K.rms_norm_quant(x, w, 1e-6, rows_per_program=per_program, num_warps=warps, **kw)
        assert torch.equal(r_out, ref_r) if residual else r_out is None
        if quant == K.QUANT_NONE:
            assert q is None and s is None
            assert torch.equal(y, ref_y) if DEVICE == "cpu" else _within_ulps(y, ref_y, 2)[0]
            continue
        assert y is None
        same = torch.ones(rows, dtype=torch.bool, device=DEVICE)
        if quant == K.QUANT_DYNAMIC:
            same = (s == ref_s).squeeze(-1)
            assert bool(same.all()) if DEVICE == "cpu" else float((~same).float().mean()) <= 0.01
        else:
            assert s is None
        assert_fp8_matches(_bytes(q)[same], _bytes(ref_q)[same])


def test_launch_heuristic():
    # One row per program at any row count; the measured warps rule (~32 elements a thread,
    # half with the dynamic scale, twice with the residual, capped at 16).
    for rows in (1, 4096, 32768):
        assert K.norm_launch(rows, 4096) == (4096, 1, 4)
        assert K.norm_launch(rows, 8192) == (8192, 1, 8)
        assert K.norm_launch(rows, 4096, dynamic=True) == (4096, 1, 2)
        assert K.norm_launch(rows, 4096, residual=True) == (4096, 1, 8)
        assert K.norm_launch(rows, 8192, residual=True) == (8192, 1, 16)
    assert K.norm_launch(1, 5120) == (8192, 1, 8)
    assert K.norm_launch(7, 129) == (256, 1, 1)
    # Overrides win; rows per program must be a power of two.
    assert K.norm_launch(32768, 4096, rows_per_program=4, num_warps=2) == (4096, 4, 2)
    assert K.norm_launch(4096, 4096, rows_per_program=2) == (4096, 2, 8)
    with pytest.raises(ValueError):
        K.norm_launch(4096, 4096, rows_per_program=3)


@triton.jit
def _quantize_kernel(x_ptr, q_ptr, n, BLOCK: tl.constexpr, EXACT: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    m = offs < n
    tl.store(q_ptr + offs, quantize_fp8(tl.load(x_ptr + offs, mask=m), 1.0, EXACT), mask=m)


def test_e4m3_rounding_ties_and_saturation():
    # Every finite fp8 value, the midpoints between neighbours (ties), just off them, and
    # values past the clamp; torch's cast of the clamped value rounds half to even.
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    probes = torch.cat([grid, mids, torch.nextafter(mids, grid[1:]), torch.nextafter(mids, grid[:-1]), torch.tensor([500.0, -1e4])])
    x = probes.to(DEVICE)
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=DEVICE)
    _quantize_kernel[(1,)](x, q, x.numel(), BLOCK=triton.next_power_of_2(x.numel()), EXACT=exact_casts())
    assert torch.equal(_bytes(q), _bytes(x.clamp(-448, 448).to(torch.float8_e4m3fn)))


@triton.jit
def _round_kernel(x_ptr, y_ptr, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr, EXACT: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    m = offs < n
    tl.store(y_ptr + offs, round_to(tl.load(x_ptr + offs, mask=m), DTYPE, EXACT), mask=m)


@pytest.mark.parametrize("dtype, tl_dtype", [(torch.float16, tl.float16), (torch.bfloat16, tl.bfloat16)])
def test_model_dtype_rounding_matches_torch_cast(dtype, tl_dtype):
    # Random values over many binades, the midpoints between neighbours (ties), just off
    # them, subnormals, values past the largest finite, infinities and NaN.
    g = torch.Generator().manual_seed(0)
    rnd = torch.randn(4000, generator=g) * torch.exp2(torch.randint(-30, 20, (4000,), generator=g).float())
    grid = torch.randn(500, generator=g).to(dtype)
    up = torch.nextafter(grid, torch.full_like(grid, float("inf")))
    mids = (grid.float() + up.float()) / 2
    fin = torch.finfo(dtype)
    special = [fin.max, fin.max * 1.001, fin.max * 2, float("inf"), float("-inf"), 0.0, -0.0]
    if dtype == torch.float16:  # fp16 subnormals are real activations; bf16's are fp32's, never seen
        special += [fin.tiny / 3, fin.tiny * 0.75, -fin.tiny / 7, fin.tiny * 2 ** -10]
    special = torch.tensor(special)
    x = torch.cat([rnd, mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1), special]).to(DEVICE)
    y = torch.empty(x.shape, dtype=dtype, device=DEVICE)
    _round_kernel[(1,)](x, y, x.numel(), DTYPE=tl_dtype, BLOCK=triton.next_power_of_2(x.numel()), EXACT=exact_casts())
    assert torch.equal(y.view(torch.int16), x.to(dtype).view(torch.int16))
