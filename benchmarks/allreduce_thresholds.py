"""Where the fused all-reduce kernels beat NCCL: sets fxfuse.ops._symm_mem's size limits.

Usage (a machine with at least 2 NVLink-connected GPUs): python benchmarks/allreduce_thresholds.py [--tp 2 4 8]

Per group size and message size (tokens x 4096 bf16, fp32 partial sums as the reference
model reduces, and bf16 as engines do), the time of one all-reduce + residual add +
RMSNorm + static FP8 quant:

- nccl: the functional all-reduce, then the fused norm-quant kernel (the unfused path);
- one-shot / two-shot: ``allreduce_fused_add_rms_norm_static_fp8_quant`` with the size
  limits opened so that each kernel runs at every size.

Each number is the slowest rank's mean over 200 calls after a warm-up, CUDA events
around the loop. ``ONE_SHOT_MAX_BYTES`` should be where two-shot starts winning, and
``TWO_SHOT_MAX_BYTES`` where nccl does (docs/distributed.md, "Limits").
"""

from __future__ import annotations

import argparse
import os

import torch

TOKENS = (1, 8, 32, 128, 512, 2048)
HIDDEN = 4096
ITERS = 200
# Workspace regions large enough for every message here (read by the rank processes at import).
REGION = 64 << 20


def _time_ms(fn) -> float:
    import torch.distributed as dist

    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(ITERS):
        fn()
    end.record()
    torch.cuda.synchronize()
    mean = torch.tensor([start.elapsed_time(end) / ITERS], device="cuda")
    dist.all_reduce(mean, op=dist.ReduceOp.MAX)
    return float(mean.item())


def rank_main() -> list[tuple]:
    import torch.distributed as dist

    import fxfuse  # noqa: F401
    from fxfuse.ops import _symm_mem
    from fxfuse.ops.allreduce import all_reduce_native

    fx = torch.ops.fxfuse
    g = dist.group.WORLD.group_name
    rows = []
    for partials in (torch.float32, torch.bfloat16):
        for tokens in TOKENS:
            x = torch.randn(tokens, HIDDEN, device="cuda").to(partials)
            r = torch.randn(tokens, HIDDEN, device="cuda").to(torch.bfloat16)
            w = torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)
            s = torch.tensor([0.05], device="cuda")
            times = {"nccl": _time_ms(lambda: fx.fused_add_rms_norm_static_fp8_quant(
                all_reduce_native(x, g).to(torch.bfloat16), r, w, s, 1e-5))}
            for path, (one, two) in {"one-shot": (REGION, REGION), "two-shot": (0, REGION)}.items():
                _symm_mem.ONE_SHOT_MAX_BYTES, _symm_mem.TWO_SHOT_MAX_BYTES = one, two
                assert _symm_mem.kernel_path(x.nbytes) == path.replace("-", "_")
                times[path] = _time_ms(lambda: fx.allreduce_fused_add_rms_norm_static_fp8_quant(x, r, w, s, 1e-5, g))
            rows.append((str(partials).replace("torch.", ""), tokens, x.nbytes, times))
    return rows


def main() -> None:
    import fxfuse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[2])
    args = parser.parse_args()
    os.environ["FXFUSE_ALLREDUCE_TWO_SHOT_MAX_BYTES"] = str(REGION)  # inherited by the ranks
    for tp in args.tp:
        print(f"\n{tp} GPUs: ms per all-reduce + add + RMSNorm + FP8 quant, {HIDDEN} wide")
        print(f"{'partials':>9} {'tokens':>6} {'bytes':>9} {'nccl':>8} {'one-shot':>9} {'two-shot':>9}")
        for partials, tokens, nbytes, t in fxfuse.distributed.spawn(rank_main, tp, device="cuda"):
            ms = f"{t['nccl']:>8.4f} {t['one-shot']:>9.4f} {t['two-shot']:>9.4f}"
            print(f"{partials:>9} {tokens:>6} {nbytes:>9} {ms}")


if __name__ == "__main__":
    main()
