"""Block-scaled FP8 linear (``block_fp8_linear``) and 128x128 weight quantization.

- the weight quantizer against an independent per-block loop (partial blocks included),
  and its scale layout (rows padded to 4, as torch._scaled_mm's 128x128 recipe reads);
- the native op against an independent block-by-block float64 product;
- bad input: clear errors naming the argument, eagerly and at trace time;
- the Triton kernel against the native op (CUDA, else Triton's interpreter at small odd
  shapes), both group sizes and scale layouts, bias, every output dtype;
- on CUDA: the op against the native reference through whichever path it takes
  (torch._scaled_mm's blockwise recipe where the probe in ``fxfuse.compat`` accepts it,
  the Triton kernel otherwise).
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fxfuse.ops  # noqa: F401  (registers torch.ops.fxfuse.*)
from conftest import trace_graph
from fxfuse import compat
from fxfuse.ops.block_linear import (
    block_fp8_linear_native,
    block_fp8_linear_path,
    dequantize_weight_blocks,
    quantize_weight_blocks,
    weight_scales_shape,
)
from fxfuse.ops.group_quant import group_fp8_quant_native

fx = torch.ops.fxfuse
FP8 = torch.float8_e4m3fn
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rand(*shape, scale=1.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _problem(lead, n, k, group_size, column_major, seed, device="cpu"):
    """Quantized activations ``[*lead, k]`` and a block-quantized weight ``[n, k]``."""
    x = _rand(*lead, k, seed=seed, dtype=torch.bfloat16).to(device)
    x_q, x_s = group_fp8_quant_native(x, group_size, column_major)
    # Weight blocks of different magnitudes, so every block scale matters.
    w = _rand(n, k, scale=0.05, seed=seed + 1) * torch.logspace(-1, 1, n)[:, None]
    w_q, w_s = quantize_weight_blocks(w.to(device))
    return x_q, x_s, w_q, w_s


# --------------------------------------------------------------------------- weight quantization


@pytest.mark.parametrize("n, k", [(128, 128), (300, 256), (64, 200), (257, 520)])
def test_weight_blocks_match_a_per_block_loop(n, k):
    w = _rand(n, k, scale=0.1, seed=n + k) * torch.linspace(0.1, 10, k)
    w_q, w_s = quantize_weight_blocks(w)
    assert w_q.shape == (n, k) and w_q.dtype == FP8 and w_q.is_contiguous()
    assert tuple(w_s.shape) == weight_scales_shape(n, k) == (-(-n // 128), -(-k // 128))
    for i in range(w_s.shape[0]):
        for j in range(w_s.shape[1]):
            block = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            s = torch.clamp(block.abs().amax() / torch.tensor(448.0), min=1.0 / (448 * 512))
            assert w_s[i, j] == s
            want = (block * (1.0 / s)).clamp(-448, 448).to(FP8)
            assert torch.equal(w_q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].view(torch.uint8), want.view(torch.uint8))
    # At most half an E4M3 step (2**-4 relative) plus the subnormal step, per element.
    err = (dequantize_weight_blocks(w_q, w_s) - w).abs()
    step = dequantize_weight_blocks(torch.ones_like(w_q.float()).to(FP8), w_s)
    assert bool((err <= w.abs() * 2**-4 + step * 2**-9).all())


def test_weight_scale_rows_are_padded_for_scaled_mm():
    _, w_s = quantize_weight_blocks(_rand(256, 640))  # 5 K blocks -> rows of 8
    assert w_s.stride() == (8, 1) and w_s.shape == (2, 5)


# --------------------------------------------------------------------------- the native op


def _float64_reference(x_q, x_s, w_q, w_s, bias):
    """Block by block: sum over K groups of (x group . w group) * x scale * w block scale."""
    k = x_q.shape[-1]
    g = k // x_s.shape[-1]
    x2 = x_q.reshape(-1, k).double()
    s2 = x_s.reshape(-1, x_s.shape[-1]).double()
    n = w_q.shape[0]
    out = torch.zeros(x2.shape[0], n, dtype=torch.float64)
    for j in range(k // g):
        cols = slice(j * g, (j + 1) * g)
        w_scale = w_s.double()[:, (j * g) // 128].repeat_interleave(128)[:n]
        out += (x2[:, cols] @ w_q[:, cols].double().t()) * s2[:, j:j + 1] * w_scale[None, :]
    if bias is not None:
        out += bias.double()
    return out.reshape(*x_q.shape[:-1], n)


@pytest.mark.parametrize("lead, n, k, group_size, column_major", [
    ((5,), 200, 256, 128, True), ((1,), 64, 64, 64, False), ((17,), 130, 192, 64, True), ((2, 3), 384, 384, 128, False),
])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_native_matches_blockwise_float64(lead, n, k, group_size, column_major, out_dtype, with_bias):
    x_q, x_s, w_q, w_s = _problem(lead, n, k, group_size, column_major, seed=n + k)
    bias = _rand(n, seed=3, dtype=out_dtype) if with_bias else None
    out = fx.block_fp8_linear(x_q, x_s, w_q, w_s, bias, out_dtype)
    assert out.shape == (*lead, n) and out.dtype == out_dtype
    ref = _float64_reference(x_q, x_s, w_q, w_s, bias)
    tol = 1e-5 if out_dtype == torch.float32 else 2**-8
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    assert torch.equal(out, block_fp8_linear_native(x_q, x_s, w_q, w_s, bias, out_dtype))


def test_row_and_column_major_scales_give_the_same_product():
    x_q, x_s, w_q, w_s = _problem((9,), 256, 256, 64, False, seed=5)
    cm = x_s.t().contiguous().t()
    assert torch.equal(fx.block_fp8_linear(x_q, x_s, w_q, w_s), fx.block_fp8_linear(x_q, cm, w_q, w_s))


def test_fake_impl_matches_real():
    x_q, x_s, w_q, w_s = _problem((2, 3), 200, 128, 64, True, seed=6)
    real = fx.block_fp8_linear(x_q, x_s, w_q, w_s, None, torch.float16)
    with FakeTensorMode() as mode:
        fake = fx.block_fp8_linear(*(mode.from_tensor(t) for t in (x_q, x_s, w_q, w_s)), None, torch.float16)
    assert (fake.shape, fake.dtype, fake.stride()) == (real.shape, real.dtype, real.stride())


# --------------------------------------------------------------------------- bad input


def _bad_cases():
    x_q, x_s, w_q, w_s = _problem((4,), 256, 256, 128, False, seed=7)
    x_s64 = group_fp8_quant_native(_rand(4, 256, dtype=torch.bfloat16), 64)[1]
    return [
        ((x_q, x_s, w_q, w_s[:1]), r"`w_scales` must have shape \[2, 2\] .* got \(1, 2\)"),
        ((x_q, x_s, w_q, w_s.t()), r"`w_scales` must have shape \[2, 2\]|`w_scales` must be row-major"),
        ((x_q, x_s, w_q, w_s.double()), r"`w_scales` must have dtype torch.float32"),
        ((x_q, x_s[:, :1], w_q, w_s), r"`x_scales` must have shape \[4, 'K // group_size'\] .* got \(4, 1\)"),
        ((x_q, torch.ones(4, 8), w_q, w_s), r"`x_scales` must have shape .* group_size in \(64, 128\) .* got \(4, 8\)"),
        ((x_q, x_s64[:3], w_q, w_s), r"`x_scales` must have shape \[4, 'K // group_size'\] .* got \(3, 4\)"),
        ((x_q, x_s.half(), w_q, w_s), r"`x_scales` must have dtype torch.float32"),
        ((x_q.float(), x_s, w_q, w_s), r"`x_q` must have dtype torch.float8_e4m3fn"),
        ((x_q, x_s, w_q[:, :128].contiguous(), w_s), r"inner dims disagree"),
        ((x_q, x_s, w_q, w_s, torch.ones(3, dtype=torch.bfloat16)), r"`bias` must have shape \[256\]"),
        ((x_q, x_s, w_q, w_s, torch.ones(256)), r"`bias` must have dtype torch.bfloat16"),
    ]


@pytest.mark.parametrize("case", range(11))
def test_bad_input_is_named(case):
    args, msg = _bad_cases()[case]
    with pytest.raises(ValueError, match=msg):
        fx.block_fp8_linear(*args)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -0.25])
def test_a_nan_or_nonpositive_weight_block_scale_is_named(bad):
    # The same rule as every other static scale (fp8_linear's, the quant ops'): checked
    # where reading it is free, the block named by its element.
    x_q, x_s, w_q, w_s = _problem((3,), 256, 384, 128, False, seed=9)
    w_s = w_s.clone()
    w_s[1, 2] = bad
    with pytest.raises(ValueError, match=rf"`w_scales` must be a positive finite number, got {bad} \(element 5 of 6\)"):
        fx.block_fp8_linear(x_q, x_s, w_q, w_s)


def test_bad_weight_scales_fail_at_trace_time():
    x_q, x_s, w_q, w_s = _problem((4,), 256, 256, 128, False, seed=8)
    with pytest.raises(ValueError, match=r"`w_scales` must have shape \[2, 2\]"):
        trace_graph(lambda a, b, c, d: fx.block_fp8_linear(a, b, c, d), x_q, x_s, w_q, w_s[:, :1])


def test_cpu_runs_the_native_reference():
    assert not compat.blockwise_fp8_scaled_mm_supported(torch.device("cpu"))
    x_q, x_s, w_q, _ = _problem((3,), 128, 128, 128, True, seed=10)
    assert block_fp8_linear_path(x_q, x_s, w_q) == "native"


def test_scaled_mm_path_hands_torch_the_layouts_it_reads(monkeypatch):
    """The torch._scaled_mm path runs only on CUDA; here its preparation is checked on CPU:
    whatever the caller's scale layouts, torch gets [M, K/128] column-major activation
    scales and the transpose of row-padded [N/128, K/128] weight scales (the layouts of
    the probe in compat), and the product is the op's."""
    from fxfuse.ops import block_linear as B

    def blockwise(a, b, scale_a, scale_b, out_dtype):
        (m, k), n = a.shape, b.shape[1]
        kb = k // 128
        assert b.stride() == (1, k) and scale_a.shape == (m, kb) and scale_a.stride() == (1, m)
        assert scale_b.shape == (kb, -(-n // 128)) and scale_b.stride() == (1, -(-kb // 4) * 4)
        a_f = a.float() * scale_a.repeat_interleave(128, 1)
        b_f = b.float() * scale_b.repeat_interleave(128, 0).repeat_interleave(128, 1)[:, :n]
        return (a_f @ b_f).to(out_dtype)

    monkeypatch.setattr(compat, "blockwise_fp8_scaled_mm", blockwise)
    for column_major in (False, True):
        x_q, x_s, w_q, w_s = _problem((2, 3), 256, 640, 128, column_major, seed=11)
        for w_scales in (w_s, w_s.contiguous()):  # rows padded to 8, and not padded (5 columns)
            bias = _rand(256, seed=12, dtype=torch.bfloat16)
            out = B._block_fp8_linear_scaled_mm(x_q, x_s, w_q, w_scales, bias, torch.bfloat16)
            ref = block_fp8_linear_native(x_q, x_s, w_q, w_s, bias, torch.bfloat16)
            assert out.shape == ref.shape == (2, 3, 256)
            torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=2**-7 * ref.float().abs().max().item())


# --------------------------------------------------------------------------- the Triton kernel

KERNEL_CASES = [((5,), 200, 256, 128, True), ((1,), 64, 64, 64, False), ((17,), 130, 192, 64, True),
                ((2, 35), 144, 128, 128, False)] if DEVICE == "cpu" else \
               [((1,), 4096, 4096, 128, True), ((77,), 6144, 4096, 128, True), ((300,), 4096, 14336, 128, False),
                ((33,), 1000, 576, 64, True)]


def _magnitude(x_q, x_s, w_q, w_s):
    """``|x| @ |w|`` of the dequantized operands: the scale of the accumulation's error."""
    abs8 = lambda t: (t.view(torch.uint8) & 0x7F).view(t.dtype)  # noqa: E731 - clear the sign bit
    return block_fp8_linear_native(abs8(x_q), x_s, abs8(w_q), w_s, None, torch.float32)


def _assert_close_to_native(out, ref, magnitude):
    """Another summation order than the fp32 reference. Hopper's FP8 tensor cores keep
    fewer accumulator bits than fp32 (DeepSeek-V3 measured ~14), so an element's error is
    bounded by the magnitude of its terms, ``|x| @ |w|``, not by its own value (which
    cancellation can make tiny); plus one rounding step of the output dtype."""
    step = torch.finfo(out.dtype).eps * ref.float().abs() if out.dtype != torch.float32 else 0
    diff = (out.float() - ref.float()).abs()
    bound = 2**-10 * magnitude + step
    assert bool((diff <= bound).all()), f"max diff {diff.max().item()}, at bound {bound.flatten()[diff.argmax()].item()}"


@pytest.mark.parametrize("lead, n, k, group_size, column_major", KERNEL_CASES)
@pytest.mark.parametrize("out_dtype, with_bias", [(torch.bfloat16, False), (torch.float16, True), (torch.float32, True)])
def test_triton_kernel_matches_native(lead, n, k, group_size, column_major, out_dtype, with_bias):
    pytest.importorskip("triton", reason="Triton is part of the test extras")
    from fxfuse.kernels.block_linear import block_fp8_matmul

    x_q, x_s, w_q, w_s = _problem(lead, n, k, group_size, column_major, seed=n * k, device=DEVICE)
    bias = _rand(n, seed=9, dtype=out_dtype).to(DEVICE) if with_bias else None
    out = block_fp8_matmul(x_q, x_s, w_q, w_s, bias, out_dtype)
    assert out.shape == (*lead, n) and out.dtype == out_dtype
    ref = block_fp8_linear_native(x_q, x_s, w_q, w_s, bias, out_dtype)
    _assert_close_to_native(out, ref, _magnitude(x_q, x_s, w_q, w_s))


@pytest.mark.gpu
@pytest.mark.parametrize("m, n, k, group_size", [(1, 4096, 4096, 128), (37, 6144, 4096, 128), (256, 4096, 14336, 128),
                                                 (19, 4096, 4096, 64)])
def test_cuda_op_matches_native(m, n, k, group_size):
    x_q, x_s, w_q, w_s = _problem((m,), n, k, group_size, True, seed=m + n, device="cuda")
    out = fx.block_fp8_linear(x_q, x_s, w_q, w_s, None, torch.bfloat16)
    ref = block_fp8_linear_native(x_q, x_s, w_q, w_s, None, torch.bfloat16)
    # torch._scaled_mm (blockwise) or the Triton kernel: another summation order, and
    # cuBLAS may scale per block before rounding; a bf16 step on rare elements at most.
    diff = (out.float() - ref.float()).abs()
    step = 2**-7 * ref.float().abs() + 1e-3 * ref.float().abs().max()
    assert bool((diff <= step).all()), f"max diff {diff.max().item()}"
    path = block_fp8_linear_path(x_q, x_s, w_q)
    from fxfuse.ops.block_linear import _small_gemm_config

    # The small-batch kernel where this device's measured table (or the environment) says so.
    assert path == ("small_gemm" if _small_gemm_config(x_q, x_s, w_q) is not None else
                    "scaled_mm" if group_size == 128 and compat.blockwise_fp8_scaled_mm_supported(x_q.device)
                    else "triton")
    print(f"block_fp8_linear path: {path}")


@pytest.mark.parametrize("m, n, k, group_size", [(70, 200, 256, 128), (130, 136, 384, 64)] if DEVICE == "cpu" else
                         [(4096, 6144, 4096, 128), (2048, 4096, 14336, 128), (300, 28672, 4096, 128)])
def test_every_large_launch_matches_native(m, n, k, group_size):
    """The launches the prefill sweep compares (64- and 128-row tiles, 3 and 4 stages,
    pointer and tensor-descriptor loads; a weight-block scale per tile or per column)."""
    pytest.importorskip("triton", reason="Triton is part of the test extras")
    from fxfuse.kernels.block_linear import LARGE_CANDIDATES, block_fp8_matmul, tma_available

    x_q, x_s, w_q, w_s = _problem((m,), n, k, group_size, True, seed=m, device=DEVICE)
    ref = block_fp8_linear_native(x_q, x_s, w_q, w_s, None, torch.float32)
    mag = _magnitude(x_q, x_s, w_q, w_s)
    for cfg in LARGE_CANDIDATES:
        if cfg.tma and not tma_available():
            continue
        _assert_close_to_native(block_fp8_matmul(x_q, x_s, w_q, w_s, None, torch.float32, cfg), ref, mag)


def test_the_large_launch_follows_the_measured_table(tmp_path, monkeypatch):
    import json

    from fxfuse.kernels import block_linear as BK

    monkeypatch.delenv(BK.CHOICES_ENV, raising=False)
    assert BK.default_config(4096, "GPU A") == BK.BlockGemmConfig(128, 128, 8, 3)  # nothing measured ships
    assert BK.default_config(16) == BK.BlockGemmConfig(16, 64, 4, 4)
    path = tmp_path / "block.json"
    path.write_text(json.dumps({"devices": {"GPU A": {"large": dict(block_m=64, block_n=128, num_warps=4,
                                                                    num_stages=4, tma=False)}}}))
    monkeypatch.setenv(BK.CHOICES_ENV, str(path))
    assert BK.default_config(4096, "GPU A") == BK.BlockGemmConfig(64, 128, 4, 4)
    assert BK.default_config(4096, "GPU B") == BK.BlockGemmConfig(128, 128, 8, 3)
    assert BK.default_config(64, "GPU A") == BK.BlockGemmConfig(64, 128, 4, 4)  # the table is for > 64 tokens
    path.write_text(json.dumps({"devices": {"GPU C": {"big": {}}}}))
    BK._choices.cache_clear()
    with pytest.raises(ValueError, match=r"devices\['GPU C'\] needs 'large'"):
        BK.default_config(4096, "GPU C")
    BK._choices.cache_clear()
