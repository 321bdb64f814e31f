"""RMSNorm(+residual)+static FP8 quant on CUDA: fxfuse's Triton kernel vs Inductor vs eager vs the floor.

Each variant is captured in a CUDA graph and timed as graph replays (median, via
triton.testing.do_bench_cudagraph), so launch overhead does not hide the kernel at
small token counts. The floor is bytes moved / measured device-to-device copy bandwidth.

Usage: python benchmarks/norm_quant.py [--json PATH]
"""

import argparse
import json

import torch
import triton.testing

from fxfuse.kernels import norm_quant as K
from fxfuse.ops.fused import fused_add_rms_norm_static_fp8_quant_native, rms_norm_static_fp8_quant_native

TOKENS = (1, 16, 256, 4096, 32768)
HIDDEN = (4096, 8192)


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def bench(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, return_mode="median") * 1e3  # microseconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    torch._dynamo.config.recompile_limit = 64  # one static-shape Inductor graph per shape
    bw = copy_bandwidth()
    rows = []
    for residual in (False, True):
        native = fused_add_rms_norm_static_fp8_quant_native if residual else rms_norm_static_fp8_quant_native
        inductor = torch.compile(native, dynamic=False)
        for hidden in HIDDEN:
            for tokens in TOKENS:
                x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
                r = torch.randn_like(x)
                w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
                s = torch.tensor([0.05], device="cuda")
                call = (lambda f: (lambda: f(x, r, w, s, 1e-6))) if residual else (lambda f: (lambda: f(x, w, s, 1e-6)))
                kernel = lambda: K.rms_norm_quant(x, w, 1e-6, residual=r if residual else None, quant=K.QUANT_STATIC, scale=s)  # noqa: E731
                # bytes: read x (+ residual) and w, write fp8 (+ residual out)
                nbytes = tokens * hidden * (2 + 1 + (2 + 2 if residual else 0)) + hidden * 2
                call(inductor)()  # compile outside the timed region
                t = {"eager": bench(call(native)), "inductor": bench(call(inductor)), "fxfuse": bench(kernel)}
                floor = nbytes / bw * 1e6
                rows.append(dict(op="fused_add_rms_norm_static_fp8_quant" if residual else "rms_norm_static_fp8_quant",
                                 tokens=tokens, hidden=hidden, floor_us=floor, **{f"{k}_us": v for k, v in t.items()},
                                 fxfuse_pct_bw=100 * floor / t["fxfuse"], inductor_over_fxfuse=t["inductor"] / t["fxfuse"]))
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, copy bandwidth {bw / 1e12:.2f} TB/s")
    print(f"{'op':<38}{'tokens':>7}{'hidden':>7}{'eager us':>10}{'inductor':>10}{'fxfuse':>9}{'floor':>8}{'%bw':>6}{'ind/fx':>8}")
    for r in rows:
        print(f"{r['op']:<38}{r['tokens']:>7}{r['hidden']:>7}{r['eager_us']:>10.1f}{r['inductor_us']:>10.1f}{r['fxfuse_us']:>9.1f}"
              f"{r['floor_us']:>8.1f}{r['fxfuse_pct_bw']:>6.0f}{r['inductor_over_fxfuse']:>8.2f}")
    if args.json:
        json.dump({"copy_bandwidth_Bps": bw, "rows": rows}, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
