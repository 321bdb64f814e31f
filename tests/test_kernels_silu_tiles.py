"""SiLU-and-mul launch configs (benchmarks/silu_sweep.py's knobs) against the default one.

Every tile config and the flat kernel compute the same expression per element, so their
outputs must equal the default launch's bit for bit (and so stay within the native op's
one ulp); the FP8 epilogue must equal the native quant of that output. CUDA when present,
else Triton's interpreter at small shapes.
"""

import pytest
import torch

pytest.importorskip("triton", reason="Triton is part of the test extras")

from fxfuse.kernels import activation as A  # noqa: E402
from fxfuse.ops.activation import silu_and_mul_native  # noqa: E402
from fxfuse.ops.quant import static_scaled_fp8_quant_native  # noqa: E402
from conftest import covering

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (rows, d): d a multiple of the flat block (one row per program), not one (programs
# straddle rows), and smaller than it; odd row counts.
SHAPES = [(5, 48), (3, 40), (1, 24)] if DEVICE == "cpu" else [(7, 14336), (33, 4000), (1, 24)]
BLOCK = 16 if DEVICE == "cpu" else 1024
CONFIGS = [
    # Flat: one row per program where d % XBLOCK == 0 (48 % 16, 14336 % 1024), else
    # programs straddle rows (40, 4000, and XBLOCK > d).
    (A.FLAT, BLOCK, 4),
    (A.FLAT, 2 * BLOCK, 4),
    (A.FLAT, 4 * BLOCK, 8),
    (1, BLOCK, 4),
    (2, 2 * BLOCK, 8),
]


def _x(rows, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(rows, 2 * d, generator=g)).to(dtype).to(DEVICE)


def _bytes(t):
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("config, shape, dtype", [(v0,) + (v1,) + (v2,) for v0, v1, v2 in covering(
    CONFIGS,
    SHAPES,
    [torch.bfloat16, torch.float16, torch.float32],
)])
def test_every_config_gives_the_default_launch_bits(config, shape, dtype):
    x = _x(*shape, dtype, seed=sum(shape) + config[1])
    ref = A.silu_and_mul(x)
    y = A.silu_and_mul(x, config=config)
    assert y.dtype == dtype and torch.equal(_bytes(y), _bytes(ref))
    native = silu_and_mul_native(x).float()
    step = (1 if dtype != torch.float32 else 8) * torch.finfo(dtype).eps * torch.maximum(y.float().abs(), native.abs())
    assert bool(((y.float() - native).abs() <= step.clamp_min(torch.finfo(dtype).tiny)).all())
    scale = torch.tensor([0.02], device=DEVICE)
    q = A.silu_and_mul(x, A.OUT_FP8, scale, config=config)
    assert torch.equal(_bytes(q), _bytes(static_scaled_fp8_quant_native(y, scale)))


def test_flat_config_of_a_3d_input_covers_every_row():
    x = _x(6, 24, torch.bfloat16, seed=1).view(2, 3, 48)
    assert torch.equal(A.silu_and_mul(x, config=(A.FLAT, 32, 4)), A.silu_and_mul(x))


def test_a_config_is_refused_for_the_nvfp4_epilogue():
    x = _x(2, 32, torch.bfloat16, seed=2)
    with pytest.raises(ValueError, match="OUT_NONE and OUT_FP8"):
        A.silu_and_mul(x, A.OUT_NVFP4, torch.tensor([1.0], device=DEVICE), config=(1, 16, 4))
