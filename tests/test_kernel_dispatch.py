"""On CUDA the ops run their Triton kernels, and fused ops still equal their unfused chains."""

import pytest
import torch

from test_kernels_norm_quant import assert_fp8_matches

from fxfuse.ops._dispatch import use_kernels

ops = torch.ops.fxfuse


def test_cpu_tensors_never_dispatch_to_kernels():
    assert not use_kernels(torch.zeros(2))


@pytest.mark.gpu
def test_kernels_can_be_turned_off(monkeypatch):
    x = torch.zeros(2, device="cuda")
    assert use_kernels(x)
    monkeypatch.setenv("FXFUSE_KERNELS", "0")
    assert not use_kernels(x)


def _b(t):
    return t.view(torch.uint8)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 37, 300])
def test_ops_run_kernels_and_fused_equals_unfused(tokens, monkeypatch):
    from fxfuse.kernels import activation as A
    from fxfuse.kernels import norm_quant as N

    g = torch.Generator(device="cuda").manual_seed(tokens)
    h, i = 4096, 2 * 1792
    x = torch.randn(tokens, h, device="cuda", generator=g).bfloat16()
    r = torch.randn(tokens, h, device="cuda", generator=g).bfloat16()
    w = (1 + 0.1 * torch.randn(h, device="cuda", generator=g)).bfloat16()
    a = (3 * torch.randn(tokens, i, device="cuda", generator=g)).bfloat16()
    s = torch.tensor([0.02], device="cuda")

    # Dispatch: each op returns exactly its kernel's output.
    assert torch.equal(ops.rms_norm(x, w, 1e-6), N.rms_norm_quant(x, w, 1e-6)[0])
    assert torch.equal(ops.silu_and_mul(a), A.silu_and_mul(a))

    # Fused == unfused, through the ops: norm-based ones up to DESIGN §2's one FP8 step on
    # rare elements (a row sum's order), the SiLU-and-mul ones bit for bit.
    y = ops.rms_norm(x, w, 1e-6)
    assert_fp8_matches(ops.rms_norm_static_fp8_quant(x, w, s, 1e-6), ops.static_scaled_fp8_quant(y, s))
    y2, r2 = ops.fused_add_rms_norm(x, r, w, 1e-6)
    q, r3 = ops.fused_add_rms_norm_static_fp8_quant(x, r, w, s, 1e-6)
    assert_fp8_matches(q, ops.static_scaled_fp8_quant(y2, s))
    assert torch.equal(r2, r3)
    for fused, ref in ((ops.rms_norm_dynamic_per_token_fp8_quant(x, w, 1e-6), ops.dynamic_per_token_fp8_quant(y)),
                       (ops.fused_add_rms_norm_dynamic_per_token_fp8_quant(x, r, w, 1e-6)[:2],
                        ops.dynamic_per_token_fp8_quant(y2))):
        (qd, sd), (rq, rs) = fused, ref
        torch.testing.assert_close(sd, rs, rtol=2 ** -7, atol=0)
        same = (sd == rs).squeeze(-1)
        assert_fp8_matches(qd[same], rq[same])
    m = ops.silu_and_mul(a)
    assert torch.equal(_b(ops.silu_and_mul_static_fp8_quant(a, s)), _b(ops.static_scaled_fp8_quant(m, s)))
    gs = (448.0 * 6 / m.float().abs().amax()).reshape(1)
    q4, sf4 = ops.silu_and_mul_nvfp4_quant(a, gs)
    rq4, rsf4 = ops.nvfp4_quant(m, gs)
    assert torch.equal(q4, rq4) and torch.equal(_b(sf4), _b(rsf4))

    # With kernels off, the native reference runs (within one ulp of the kernel's norm).
    monkeypatch.setenv("FXFUSE_KERNELS", "0")
    from fxfuse.ops.norm import rms_norm_native

    assert torch.equal(ops.rms_norm(x, w, 1e-6), rms_norm_native(x, w, 1e-6))
