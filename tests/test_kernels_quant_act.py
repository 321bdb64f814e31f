"""Quant and SiLU-and-mul Triton kernels against the native reference.

CUDA when present, else Triton's CPU interpreter at small shapes. Quantizers are bit
exact against the native op on the same input; SiLU-and-mul's model-dtype output may be
one unit in the last place off the native one (another ``exp``), and its quantized
epilogues must equal the native quant of the kernel's own output bit for bit.
"""

import pytest
import torch

pytest.importorskip("triton", reason="Triton is part of the test extras")

from fxfuse.kernels import activation as A  # noqa: E402
from fxfuse.kernels import quant as Q  # noqa: E402
from fxfuse.ops.activation import silu_and_mul_native  # noqa: E402
from fxfuse.ops.nvfp4 import nvfp4_quant_native  # noqa: E402
from fxfuse.ops.quant import dynamic_per_token_fp8_quant_native, static_scaled_fp8_quant_native  # noqa: E402
from conftest import covering

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Odd row counts, and columns that are not multiples of the block sizes.
SHAPES = [(1, 16), (5, 48), (33, 80)] if DEVICE == "cpu" else [(1, 4096), (7, 5120), (257, 8192), (33, 80)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _x(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def _bytes(t):
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("shape, dtype, x_scale, s", [(v0,) + (v1,) + tuple(v2) for v0, v1, v2 in covering(
    SHAPES,
    DTYPES,
    [(1.0, 0.01), (300.0, 0.001)],
)])
def test_static_fp8_is_bit_exact(shape, dtype, x_scale, s):
    x = _x(shape, dtype, seed=sum(shape), scale=x_scale)
    scale = torch.tensor([s], device=DEVICE)
    assert torch.equal(_bytes(Q.static_fp8(x, scale)), _bytes(static_scaled_fp8_quant_native(x, scale)))


@pytest.mark.parametrize("shape, dtype, ub", [(v0,) + (v1,) + (v2,) for v0, v1, v2 in covering(
    SHAPES + [(3, 5, 24)],
    DTYPES,
    [None, 0.5],
)])
def test_dynamic_fp8_is_bit_exact(shape, dtype, ub):
    x = _x(shape, dtype, seed=7 * sum(shape))
    x.view(-1, shape[-1])[0] *= 1e-6  # the scale floor
    scale_ub = torch.tensor([ub], device=DEVICE) if ub is not None else None
    q, s = Q.dynamic_fp8(x, scale_ub)
    ref_q, ref_s = dynamic_per_token_fp8_quant_native(x, scale_ub)
    assert s.shape == ref_s.shape and torch.equal(s, ref_s)
    assert torch.equal(_bytes(q), _bytes(ref_q))


def test_dynamic_fp8_long_rows_take_the_chunked_path():
    cols = 2 * 8192 + 48 if DEVICE == "cuda" else 80
    x = _x((3, cols), torch.bfloat16, seed=11)
    limit = 8192 if DEVICE == "cuda" else 32  # force several chunks in the interpreter too
    block, chunks, warps = Q.row_block(cols, limit)
    assert chunks > 1
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=DEVICE)
    s = torch.empty((3, 1), device=DEVICE)
    Q._dynamic_fp8_kernel[(3,)](x, x, q, s, cols, HAS_UB=False, BLOCK=block, CHUNKS=chunks,
                                EXACT_CASTS=Q.exact_casts(), num_warps=warps)
    ref_q, ref_s = dynamic_per_token_fp8_quant_native(x)
    assert torch.equal(s, ref_s) and torch.equal(_bytes(q), _bytes(ref_q))


NVFP4_SHAPES = [(1, 32), (5, 48), (130, 80)] if DEVICE == "cpu" else [(1, 4096), (130, 80), (257, 14336)]


@pytest.mark.parametrize("shape, dtype", [(v0,) + (v1,) for v0, v1 in covering(
    NVFP4_SHAPES,
    DTYPES,
)])
def test_nvfp4_is_bit_exact(shape, dtype):
    x = _x(shape, dtype, seed=3 * sum(shape))
    x[0, :16] = 0  # an all-zero block (scale 0)
    x.view(-1)[-1] = 1e4  # its block saturates the scale at 448
    gs = (448.0 * 6.0 / x.float().abs().amax()).reshape(1) * 4  # some blocks saturate the scale
    q, sf = Q.nvfp4(x, gs)
    ref_q, ref_sf = nvfp4_quant_native(x, gs)
    assert torch.equal(q, ref_q)
    assert torch.equal(_bytes(sf), _bytes(ref_sf))  # padding included


def test_nvfp4_rounding_of_every_tie():
    # Each E2M1 midpoint, just off it, both signs, with block scale 1 (gs = 448 * 6 / 6... per block max 6).
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    vals = torch.cat([mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1), torch.tensor([0.0, 6.0, 7.0])])
    vals = torch.cat([vals, -vals])
    x = vals[: (vals.numel() // 16) * 16].reshape(-1, 16).float().to(DEVICE)
    x[:, 0] = 6.0  # block max 6 -> sf = e4m3(gs) with gs = 1, inv = 1
    gs = torch.tensor([1.0], device=DEVICE)
    q, sf = Q.nvfp4(x, gs)
    ref_q, ref_sf = nvfp4_quant_native(x, gs)
    assert torch.equal(q, ref_q) and torch.equal(_bytes(sf), _bytes(ref_sf))


def _within_ulps(a, b, ulps):
    a32, b32 = a.float(), b.float()
    step = ulps * torch.finfo(a.dtype).eps * torch.maximum(a32.abs(), b32.abs()).clamp_min(torch.finfo(a.dtype).tiny)
    return bool(((a32 - b32).abs() <= step).all())


SILU_SHAPES = [(1, 32), (5, 96), (33, 160)] if DEVICE == "cpu" else [(1, 2 * 14336), (7, 2 * 4096), (257, 2 * 14336), (33, 160)]


@pytest.mark.parametrize("shape, dtype", [(v0,) + (v1,) for v0, v1 in covering(
    SILU_SHAPES,
    DTYPES,
)])
def test_silu_and_mul_and_its_quant_epilogues(shape, dtype):
    x = _x(shape, dtype, seed=5 * sum(shape), scale=3.0)
    y = A.silu_and_mul(x)
    # One step of bf16/fp16; in fp32 the exp and the two roundings show as a few ulps.
    assert y.dtype == dtype and _within_ulps(y, silu_and_mul_native(x), 1 if dtype != torch.float32 else 8)
    scale = torch.tensor([0.02], device=DEVICE)
    q = A.silu_and_mul(x, A.OUT_FP8, scale)
    assert torch.equal(_bytes(q), _bytes(static_scaled_fp8_quant_native(y, scale)))
    gs = (448.0 * 6.0 / y.float().abs().amax()).reshape(1)
    q4, sf = A.silu_and_mul(x, A.OUT_NVFP4, gs)
    ref_q4, ref_sf = nvfp4_quant_native(y, gs)
    assert torch.equal(q4, ref_q4) and torch.equal(_bytes(sf), _bytes(ref_sf))


# --------------------------------------------------------------------------- NVFP4 word kernels
#
# bf16/fp16 NVFP4 kernels read int32 words and tile [rows, blocks, words]; widths that are
# multiples of 16 but not of a tile's blocks, odd row counts, and small tiles (several
# programs per row and per row group) check the masks and the offsets.

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fxfuse.kernels._nvfp4 import e2m1_code, word_kind  # noqa: E402
from fxfuse.ops.nvfp4 import _e2m1_codes  # noqa: E402

WORD_DTYPES = [torch.bfloat16, torch.float16]
# (shape, configs (ROWS, BLOCKS, num_warps)); None is the default launch
WORD_QUANT_CASES = [((1, 16), [None, (1, 1, 1)]), ((5, 48), [None, (2, 2, 1), (1, 4, 2)]),
                    ((7, 144), [None, (4, 4, 2)]), ((33, 80), [None, (8, 2, 1)])]
WORD_SILU_CASES = [((1, 32), [None, (1, 1, 1)]), ((5, 96), [None, (2, 2, 1)]),
                   ((3, 2 * 144), [None, (2, 4, 2)]), ((33, 160), [None, (16, 2, 1)])]
if DEVICE == "cuda":
    WORD_QUANT_CASES += [((257, 4096), [None, (1, 256, 4), (4, 64, 8)]), ((3, 14336), [None, (2, 128, 4)])]
    WORD_SILU_CASES += [((257, 2 * 14336), [None, (1, 256, 4), (2, 64, 4)]), ((7, 2 * 4096), [None])]


@triton.jit
def _e2m1_probe(x_ptr, inv_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    tl.store(out_ptr + offs, e2m1_code(x, tl.load(inv_ptr + offs, mask=m, other=0.0)), mask=m)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # signalling NaNs among the bf16 values
def test_e2m1_code_equals_the_native_rounding():
    # every bf16 value (inf, NaN, subnormals, -0 included) times 1; every E2M1 midpoint and
    # grid value and a few fp32 ulps around each, both signs, times 1 and times powers of 2;
    # random magnitudes times random multipliers
    every_bf16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    points = torch.tensor([0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0])
    bits = points.view(torch.int32)[:, None] + torch.arange(-3, 4, dtype=torch.int32)
    near = bits.view(torch.float32).flatten()
    near = torch.cat([near, -near])
    g = torch.Generator().manual_seed(0)
    rand_x = torch.randn(2**14, generator=g) * torch.exp2(torch.randint(-10, 10, (2**14,), generator=g).float())
    rand_inv = torch.exp2(torch.rand(2**14, generator=g) * 40 - 20)
    x = torch.cat([every_bf16, near, near * 0.5, rand_x])
    inv = torch.cat([torch.ones(every_bf16.numel() + near.numel()), torch.full((near.numel(),), 2.0), rand_inv])
    x, inv = x.to(DEVICE), inv.to(DEVICE)
    out = torch.empty(x.shape, dtype=torch.int32, device=DEVICE)
    _e2m1_probe[(triton.cdiv(x.numel(), 4096),)](x, inv, out, x.numel(), BLOCK=4096)
    assert torch.equal(out.to(torch.uint8), _e2m1_codes(x * inv))


def _word_input(shape, dtype, seed):
    x = _x(shape, dtype, seed=seed, scale=3.0)
    rows = x.view(-1, shape[-1])
    rows[0, :16] = 0  # an all-zero block (scale 0)
    if shape[-1] >= 32:
        rows[:, 16:32] *= 1e-5  # blocks whose scale is an fp8 subnormal or underflows to 0 ...
    rows[-1, -1] = 1e4  # ... and one whose scale saturates at 448
    return x


@pytest.mark.parametrize("case, dtype", [(v0,) + (v1,) for v0, v1 in covering(
    range(len(WORD_QUANT_CASES)),
    WORD_DTYPES,
)])
def test_nvfp4_word_kernel_is_bit_exact(case, dtype):
    shape, configs = WORD_QUANT_CASES[case]
    x = _word_input(shape, dtype, seed=11 * sum(shape))
    assert word_kind(x) is not None  # the word kernel runs, not the element fallback
    for gs_factor in (1.0, 8.0):  # 8: more blocks saturate their scale
        gs = (448.0 * 6.0 / x.float().abs().amax()).reshape(1) * gs_factor * 1e4
        ref_q, ref_sf = nvfp4_quant_native(x, gs)
        for config in configs:
            q, sf = Q.nvfp4(x, gs, config)
            assert torch.equal(q, ref_q), config
            assert torch.equal(_bytes(sf), _bytes(ref_sf)), config  # padding included


@pytest.mark.parametrize("dtype", WORD_DTYPES)
def test_nvfp4_unaligned_16_bit_input_takes_the_element_kernel(dtype):
    base = _x((3 * 48 + 1,), dtype, seed=12)
    x = base[1:].view(3, 48)  # contiguous, but 2 bytes past a 4-byte boundary
    assert word_kind(x) is None and word_kind(base[:-1].view(3, 48)) is not None
    gs = (448.0 * 6.0 / x.float().abs().amax()).reshape(1)
    q, sf = Q.nvfp4(x, gs)
    ref_q, ref_sf = nvfp4_quant_native(x, gs)
    assert torch.equal(q, ref_q) and torch.equal(_bytes(sf), _bytes(ref_sf))


@pytest.mark.parametrize("case, dtype", [(v0,) + (v1,) for v0, v1 in covering(
    range(len(WORD_SILU_CASES)),
    WORD_DTYPES,
)])
def test_silu_and_mul_nvfp4_word_kernel_is_bit_exact(case, dtype):
    shape, configs = WORD_SILU_CASES[case]
    x = _x(shape, dtype, seed=13 * sum(shape), scale=3.0)
    if shape[-1] >= 64:
        x[0, :16] = 0  # a zero block of the output (gate 0)
    y = A.silu_and_mul(x)  # the kernel's own model-dtype output (its exp is not torch's)
    gs = (448.0 * 6.0 / y.float().abs().amax()).reshape(1) * 4  # some blocks saturate their scale
    ref_q, ref_sf = nvfp4_quant_native(y, gs)
    for config in configs:
        q, sf = A.silu_and_mul_nvfp4(x, gs, config) if config else A.silu_and_mul(x, A.OUT_NVFP4, gs)
        assert torch.equal(q, ref_q), config
        assert torch.equal(_bytes(sf), _bytes(ref_sf)), config


def test_nvfp4_word_configs_are_checked():
    x = _x((2, 32), torch.bfloat16, seed=14)
    gs = torch.tensor([1.0], device=DEVICE)
    for bad in [(3, 2, 1), (1, 0, 4), (1, 2)]:
        with pytest.raises(ValueError, match="powers of two"):
            Q.nvfp4(x, gs, bad)
        with pytest.raises(ValueError, match="powers of two"):
            A.silu_and_mul_nvfp4(torch.cat([x, x], dim=-1), gs, bad)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        A.silu_and_mul_nvfp4(x.float(), gs)
    with pytest.raises(ValueError, match="multiple of 16"):
        A.silu_and_mul_nvfp4(x[:, :24].contiguous(), gs)
