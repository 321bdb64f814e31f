"""Sweep the block-scaled FP8 GEMM's prefill launches (fxfuse/kernels/block_linear.py)
against torch's FP8 GEMMs, and measure the launch the kernel takes above 64 tokens.

Usage: python benchmarks/block_gemm_sweep.py --out DIR [--write PATH] [--tokens 2048,8192]
           [--budget-s 150] [--reps 20]

For each Llama-3-8B linear (QKV, o, gate/up, down) at each token count: every launch of
`LARGE_CANDIDATES` (128- and 64-row tiles, 3 and 4 stages, pointer and tensor-descriptor
loads), torch's blockwise ``_scaled_mm`` where this torch and GPU take it
(`fxfuse.compat.blockwise_fp8_scaled_mm_supported`), and the yardstick, per-tensor
``torch._scaled_mm`` on the same FP8 operands (issue 20's target: the block-scaled GEMM
within 15% of it). Times are cold-L2 medians of CUDA-graph replays (copies of the
operands rotated past twice the L2), in TFLOP/s (``2*M*N*K``); every launch's output is
checked against the native reference within the FP8 tensor cores' bound.

The best launch is the one with the smallest geometric mean of its time over
per-tensor ``_scaled_mm``'s across the measured shapes; ``--write PATH`` puts it into the
table `block_fp8_matmul` reads for this device (copy it to
src/fxfuse/kernels/block_gemm_choices.json to ship it). Writes ``DIR/block_gemm_sweep.json``
(rows, per-launch means, the best, the target's verdict). About 1-2 minutes on one GPU
(mostly Triton compiles); ``--budget-s`` stops starting new shapes past that many seconds.
Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import torch

from fxfuse.bench import environment
from fxfuse.bench.timing import cold_copies, graph_us

DEVICE = "cuda"
#: (name, N, K) of Llama-3-8B's linears.
SHAPES = (("qkv_proj", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up_proj", 28672, 4096), ("down_proj", 4096, 14336))
TOKENS = (2048, 8192)
#: Issue 20's target: the block-scaled GEMM within this factor of per-tensor _scaled_mm.
TARGET = 1.15


def _operands(m: int, n: int, k: int):
    import fxfuse.ops  # noqa: F401
    from fxfuse.ops.block_linear import quantize_weight_blocks

    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    x_q, x_s = torch.ops.fxfuse.group_fp8_quant(x, 128, True)
    w_q, w_s = quantize_weight_blocks(torch.randn(n, k, device=DEVICE) * k**-0.5)
    return x_q, x_s, w_q, w_s


def _calls(blockwise: bool):
    from fxfuse import compat
    from fxfuse.kernels.block_linear import LARGE_CANDIDATES, block_fp8_matmul, tma_available

    one = torch.ones((), device=DEVICE)
    calls = {"per_tensor_scaled_mm": lambda xq, xs, wq, ws: torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one,
                                                                              out_dtype=torch.bfloat16)}
    if blockwise:
        calls["blockwise_scaled_mm"] = lambda xq, xs, wq, ws: compat.blockwise_fp8_scaled_mm(xq, wq.t(), xs, ws.t(),
                                                                                           torch.bfloat16)
    for cfg in LARGE_CANDIDATES:
        if cfg.tma and not tma_available():
            continue
        calls[cfg.label()] = (lambda c: lambda xq, xs, wq, ws: block_fp8_matmul(xq, xs, wq, ws, None, torch.bfloat16,
                                                                                c))(cfg)
    return calls


def shape_rows(name: str, n: int, k: int, m: int, calls: dict, reps: int, log) -> list[dict]:
    """Every call at one shape: one row each, with its time over per-tensor ``_scaled_mm``'s."""
    from fxfuse.ops.block_linear import block_fp8_linear_native

    first = _operands(m, n, k)
    nbytes = sum(t.numel() * t.element_size() for t in first)
    # Copies with the originals' strides: column-major activation scales, padded weight-scale rows.
    copy = lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)  # noqa: E731
    sets = cold_copies(lambda: tuple(copy(t) for t in first), nbytes)
    ref = block_fp8_linear_native(*first, None, torch.float32)
    abs8 = lambda t: (t.view(torch.uint8) & 0x7F).view(t.dtype)  # noqa: E731
    mag = block_fp8_linear_native(abs8(first[0]), first[1], abs8(first[2]), first[3], None, torch.float32)
    tol = 2**-10 * mag + 2**-7 * ref.abs()
    rows = []
    for label, f in calls.items():
        try:
            out = f(*first).float()
            ok = None if label == "per_tensor_scaled_mm" else bool(((out - ref).abs() <= tol).all())
            us = graph_us([lambda a=a: f(*a) for a in sets], reps=reps)
        except Exception as e:  # noqa: BLE001 - a launch that does not compile here is reported, not fatal
            log(f"  {name:13s} M={m:<6d} {label:22s} failed: {type(e).__name__}: {str(e)[:120]}")
            continue
        rows.append(dict(linear=name, n=n, k=k, tokens=m, label=label, us=us, tflops=2 * m * n * k / (us * 1e-6) / 1e12,
                         matches_native=ok, cold_copies=len(sets)))
    base = next((r["us"] for r in rows if r["label"] == "per_tensor_scaled_mm"), None)
    for r in rows:
        r["over_per_tensor"] = r["us"] / base if base else None
        log(f"  {name:13s} M={m:<6d} {r['label']:22s} {r['us']:9.1f} us {r['tflops']:7.1f} TF/s"
            + (f"  x{r['over_per_tensor']:.2f} of per-tensor" if base else "")
            + ("  DIFFERS FROM NATIVE" if r["matches_native"] is False else ""))
    del sets, first, ref, mag, tol
    return rows


def best_launch(rows: list[dict]) -> tuple[str, dict[str, float]]:
    """The launch with the smallest geometric mean of its time over per-tensor
    ``_scaled_mm``'s, among those measured at every shape and matching native; and every
    launch's mean.

    >>> best_launch([dict(label="a", linear="q", tokens=1, over_per_tensor=1.5, matches_native=True),
    ...              dict(label="b", linear="q", tokens=1, over_per_tensor=1.2, matches_native=True)])[0]
    'b'
    """
    shapes = {(r["linear"], r["tokens"]) for r in rows}
    means = {}
    for label in {r["label"] for r in rows if r["label"] not in ("per_tensor_scaled_mm", "blockwise_scaled_mm")}:
        sel = [r for r in rows if r["label"] == label and r["over_per_tensor"]]
        if len(sel) == len(shapes) and all(r["matches_native"] for r in sel):
            means[label] = math.exp(sum(math.log(r["over_per_tensor"]) for r in sel) / len(sel))
    return (min(means, key=means.get) if means else ""), means


def write_table(path: str, device: str, config, stamp: str) -> dict:
    """Put ``device``'s measured launch into the table at ``path`` (other devices kept)."""
    import dataclasses

    p = pathlib.Path(path)
    table = json.loads(p.read_text()) if p.exists() else {"devices": {}, "measured": {}}
    table.setdefault("devices", {})[device] = {"large": dataclasses.asdict(config)}
    table.setdefault("measured", {})[device] = stamp
    p.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return table


def have_cuda() -> bool:
    return torch.cuda.is_available()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="block_gemm_sweep", help="directory for block_gemm_sweep.json")
    p.add_argument("--write", metavar="PATH", help="put this device's best launch into the table at PATH")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--budget-s", type=float, default=150.0)
    args = p.parse_args(argv)
    if not have_cuda():
        print("block_gemm_sweep: needs a CUDA device; nothing to do on this machine")
        return 0
    from fxfuse import compat
    from fxfuse.kernels.block_linear import LARGE_CANDIDATES

    start = time.time()
    env = environment()
    blockwise = compat.blockwise_fp8_scaled_mm_supported(torch.device(DEVICE))
    print(f"block_gemm_sweep on {env['device']}, torch {env['torch']}, triton {env['triton']}; torch blockwise "
          f"_scaled_mm: {blockwise}; cold-L2 medians of CUDA-graph replays", flush=True)
    log = lambda s: print(s, flush=True)  # noqa: E731
    calls = _calls(blockwise)
    rows, skipped = [], []
    for name, n, k in SHAPES:
        for m in (int(t) for t in args.tokens.split(",")):
            if time.time() - start > args.budget_s:
                skipped.append(f"{name} M={m}")
                continue
            rows += shape_rows(name, n, k, m, calls, args.reps, log)
            torch.cuda.empty_cache()
    best, means = best_launch(rows)
    print("\nlaunches, geometric mean of time over per-tensor _scaled_mm (lower is better):")
    for label, v in sorted(means.items(), key=lambda kv: kv[1]):
        print(f"  {label:22s} x{v:.3f}" + ("   <- best" if label == best else ""))
    blockwise_rows = [r for r in rows if r["label"] == "blockwise_scaled_mm"]
    bw_mean = math.exp(sum(math.log(r["over_per_tensor"]) for r in blockwise_rows) / len(blockwise_rows)) \
        if blockwise_rows else None
    if bw_mean is not None:
        print(f"  {'blockwise_scaled_mm':22s} x{bw_mean:.3f}  (what block_fp8_linear runs where supported)")
    verdict = None
    if best:
        worst = max(r["over_per_tensor"] for r in rows if r["label"] == best)
        verdict = dict(target=TARGET, best=best, mean=means[best], worst=worst, met=worst <= TARGET)
        print(f"target: within {TARGET:.2f}x of per-tensor _scaled_mm at every shape: {best} worst x{worst:.2f} "
              f"-> {'MET' if verdict['met'] else 'MISSED'}")
    if skipped:
        print(f"out of time (--budget-s {args.budget_s:.0f}): skipped {', '.join(skipped)}")
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "block_gemm_sweep.json").write_text(json.dumps(dict(env, blockwise_scaled_mm=blockwise, rows=rows,
                                                                   means=means, best=best, target=verdict,
                                                                   blockwise_mean=bw_mean, skipped=skipped,
                                                                   seconds=time.time() - start), indent=1))
    print(f"written to {out_dir / 'block_gemm_sweep.json'} ({time.time() - start:.0f} s)")
    if args.write and best:
        cfg = next(c for c in LARGE_CANDIDATES if c.label() == best)
        write_table(args.write, env["device"], cfg, f"{env['date']}, torch {env['torch']}, triton {env['triton']}, "
                                                    "`benchmarks/block_gemm_sweep.py`")
        print(f"launch {best} of {env['device']} written to {args.write}")
    return 1 if any(r["matches_native"] is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
