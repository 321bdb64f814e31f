"""Check and time the RMSNorm(+FP8) kernel per num_warps (H100 tuning of kernels/norm_quant.py:_block).

Usage: python benchmarks/norm_warps.py
For each width, dtype and warp count: whether y is within one ulp of the native norm (and
what fraction differs), whether the FP8 epilogue equals the quant of y, and the median
CUDA-graph time at 4096 and 32768 tokens with its share of copy bandwidth.
"""

import torch

from fxfuse.bench.timing import copy_bandwidth, graph_us
from fxfuse.kernels import norm_quant as K
from fxfuse.ops.norm import rms_norm_native
from fxfuse.ops.quant import static_scaled_fp8_quant_native


def main():
    bw = copy_bandwidth()
    s = torch.tensor([0.01], device="cuda")
    for width in (4096, 8192):
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.randn(257, width, device="cuda").to(dtype)
            w = (1 + 0.1 * torch.randn(width, device="cuda")).to(dtype)
            ref = rms_norm_native(x, w, 1e-6).float()
            for warps in (2, 4, 8, 16):
                y = K.rms_norm_quant(x, w, 1e-6, num_warps=warps)[0]
                q = K.rms_norm_quant(x, w, 1e-6, quant=K.QUANT_STATIC, scale=s, num_warps=warps)[1]
                yf = y.float()
                step = torch.finfo(dtype).eps * torch.maximum(yf.abs(), ref.abs())
                within = bool(((yf - ref).abs() <= step).all())
                frac = float((yf != ref).float().mean())
                exact = torch.equal(q.view(torch.uint8), static_scaled_fp8_quant_native(y, s).view(torch.uint8))
                times = []
                for t in (4096, 32768):
                    xt = torch.randn(t, width, device="cuda").to(dtype)
                    us = graph_us(lambda: K.rms_norm_quant(xt, w, 1e-6, quant=K.QUANT_STATIC, scale=s, num_warps=warps))
                    times.append(f"T={t}: {us:7.1f} us {100 * t * width * 3 / bw / (us * 1e-6):5.1f}%")
                print(f"W={width} {str(dtype)[6:]:8s} warps={warps:2d}: within 1 ulp {within} ({frac:.2%} differ), "
                      f"fp8 epilogue exact {exact} | {' | '.join(times)}", flush=True)


if __name__ == "__main__":
    main()
