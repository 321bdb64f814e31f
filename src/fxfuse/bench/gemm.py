"""Block-scaled FP8 GEMM benchmark: ``block_fp8_linear`` at Llama-3-8B's linear shapes.

Per shape and token count: the op as dispatched (torch's blockwise ``_scaled_mm`` where
the installed torch and GPU take it, else fxfuse's Triton kernel), the Triton kernel on
its own, torch's blockwise ``_scaled_mm`` on its own where supported, and the yardstick:
``torch._scaled_mm`` with per-tensor scales on the same FP8 operands (the fastest FP8
GEMM torch has; block scaling should cost little on top of it). TFLOP/s count
``2 * M * N * K``. Activations come from ``group_fp8_quant(x, 128, column_major=True)``,
as the reference model's do.

Times are cold-L2 (the graph cycles through copies of the operands whose bytes exceed
twice the L2: at small M a 25 MB FP8 weight would otherwise be served from the H100's
50 MB L2); one-copy times go under ``warm`` in each row.
"""

from __future__ import annotations

import torch

from .. import compat
from ..kernels.block_linear import block_fp8_matmul
from ..ops.block_linear import block_fp8_linear_path, quantize_weight_blocks
from .timing import cold_copies, graph_us

fx = torch.ops.fxfuse
#: (name, N, K) of Llama-3-8B's linears.
SHAPES = (("qkv_proj", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up_proj", 28672, 4096), ("down_proj", 4096, 14336))
TOKENS = (1, 16, 256, 4096, 16384)


def run(tokens=TOKENS, log=print) -> list[dict]:
    """Time every shape at every token count; one row per (linear, tokens)."""
    blockwise = compat.blockwise_fp8_scaled_mm_supported(torch.device("cuda"))
    log(f"  torch blockwise _scaled_mm available: {blockwise}")
    rows = []
    for name, n, k in SHAPES:
        w_q, w_s = quantize_weight_blocks(torch.randn(n, k, device="cuda") * k**-0.5)
        one = torch.ones((), device="cuda")
        for m in tokens:
            x_q, x_s = fx.group_fp8_quant(torch.randn(m, k, device="cuda", dtype=torch.bfloat16), 128, True)
            nbytes = sum(t.numel() * t.element_size() for t in (x_q, x_s, w_q, w_s))
            sets = cold_copies(lambda: (x_q.clone(), x_s.t().contiguous().t(), w_q.clone(), w_s.clone()), nbytes)
            calls = {
                "op": lambda xq, xs, wq, ws: fx.block_fp8_linear(xq, xs, wq, ws, None, torch.bfloat16),
                "triton": lambda xq, xs, wq, ws: block_fp8_matmul(xq, xs, wq, ws, None, torch.bfloat16),
                "per_tensor": lambda xq, xs, wq, ws: torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one,
                                                                      out_dtype=torch.bfloat16),
            }
            if blockwise:
                calls["blockwise"] = lambda xq, xs, wq, ws: compat.blockwise_fp8_scaled_mm(xq, wq.t(), xs, ws.t(),
                                                                                         torch.bfloat16)
            cold = {key: graph_us([(lambda f=f, a=a: f(*a)) for a in sets]) for key, f in calls.items()}
            warm = {key: graph_us(lambda f=f: f(x_q, x_s, w_q, w_s)) for key, f in calls.items()}
            op, tri, per_tensor, bw = cold["op"], cold["triton"], cold["per_tensor"], cold.get("blockwise")
            tflops = lambda us: 2 * m * n * k / (us * 1e-6) / 1e12  # noqa: E731
            row = dict(linear=name, tokens=m, n=n, k=k, path=block_fp8_linear_path(x_q, x_s, w_q),
                       op_us=op, triton_us=tri, scaled_mm_blockwise_us=bw, scaled_mm_per_tensor_us=per_tensor,
                       op_tflops=tflops(op), triton_tflops=tflops(tri), per_tensor_tflops=tflops(per_tensor),
                       op_over_per_tensor=op / per_tensor, cold_copies=len(sets), warm=warm)
            rows.append(row)
            log(f"  {name:13s} T={m:<6d} N={n:<6d} K={k:<6d} op ({row['path']}) {op:9.1f} us "
                f"{row['op_tflops']:6.1f} TF/s  triton {tri:9.1f} us {row['triton_tflops']:6.1f} TF/s"
                + (f"  blockwise _scaled_mm {bw:9.1f} us" if bw is not None else "")
                + f"  per-tensor _scaled_mm {per_tensor:9.1f} us {row['per_tensor_tflops']:6.1f} TF/s"
                f"  op x{row['op_over_per_tensor']:.2f} of per-tensor")
            del x_q, x_s, sets
    return rows
