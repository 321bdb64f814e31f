"""Sweep the small-batch FP8 GEMM (fxfuse/kernels/small_gemm.py) against cuBLAS at decode
token counts, on the Llama-3-8B and -70B linear shapes, and measure the per-device
dispatch table the ops read (fxfuse/kernels/small_gemm_choices.json).

Usage: python benchmarks/small_gemm_sweep.py --out DIR [--write-choices PATH]
           [--models 8b,70b] [--tokens 1,2,4,8,16,32,64] [--schemes fp8,fp8-block]
           [--x-scale per-tensor|per-token] [--reps 20] [--budget-s 220] [--configs ...]

For each scheme, layer shape (N x K) and token count M: the kernel at every config of
`candidates` (the default of `default_config` first), and the path the op takes without
the kernel: ``torch._scaled_mm`` for ``fp8`` (``fp8_linear``: per-tensor weight scale, a
static per-tensor activation scale as the reference model uses, or ``--x-scale
per-token``), and for ``fp8-block`` (``block_fp8_linear``: 1x128 activation groups, 128x128
weight blocks) torch's blockwise ``_scaled_mm`` where this torch/GPU takes it, else
fxfuse's general block GEMM; per-tensor ``_scaled_mm`` on the same operands is timed
too, as the yardstick. Every time is the cold-L2 median of CUDA-graph replays (the
graph's calls rotate through copies of the weight whose bytes exceed twice the L2,
`fxfuse.bench.timing`); ``pct_bw`` is the weight's bytes (N*K FP8 + its scales) over the
copy bandwidth (`copy_bandwidth`, reads + writes of a device copy), over the time.
Every config's output is checked against the baseline's (another summation order: within
``2**-9 * |x| @ |w|`` plus two bf16 steps); a config that differs is reported and never
chosen.

Writes ``DIR/small_gemm_sweep.json`` (rows, the best config per shape, the table entry).
``--write-choices PATH`` puts this device's entry into the table at PATH (other devices,
and the ops of this device's entry not measured here, kept): per op and weight shape, the token counts up to which the kernel's best config
beats the baseline by more than 3% at every measured count, and the best configs; copy
it to src/fxfuse/kernels/small_gemm_choices.json to ship it. Targets (issue 20): >= 85% of
copy bandwidth at 1 token, >= 80% at 16-64 tokens.

About 3-4 minutes on one H100 with the defaults (about half of it Triton compiles);
``--budget-s`` stops starting new shapes past that many seconds (the table is then built
from the shapes measured). Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import torch

from fxfuse.bench import environment
from fxfuse.bench.timing import cold_copies, copy_bandwidth, graph_us
from fxfuse.kernels import num_sms
from fxfuse.kernels.small_gemm_config import (
    SmallGemmConfig, choices_from_rows, default_config, shared_memory_bytes, split_k_for, write_choices,
)

FP8 = torch.float8_e4m3fn
#: Where the operands live (tests run the sweep's plumbing on the CPU, in Triton's interpreter).
DEVICE = "cuda"
#: (model, linear, N, K): the fused QKV, o, fused gate/up and down projections.
SHAPES = (
    ("8b", "qkv_proj", 6144, 4096), ("8b", "o_proj", 4096, 4096),
    ("8b", "gate_up_proj", 28672, 4096), ("8b", "down_proj", 4096, 14336),
    ("70b", "qkv_proj", 10240, 8192), ("70b", "o_proj", 8192, 8192),
    ("70b", "gate_up_proj", 57344, 8192), ("70b", "down_proj", 8192, 28672),
)
TOKENS = (1, 2, 4, 8, 16, 32, 64)
OPS = {"fp8": "fp8_linear", "fp8-block": "block_fp8_linear"}
#: Shared memory a config may take (Hopper: 227 KiB a multiprocessor).
SMEM_LIMIT = 200 * 1024
#: Variants around the default, as (block_n, block_k, split_k or None for `split_k_for`,
#: num_warps, num_stages, swap_ab), or ("split", factor): the default with its split
#: scaled (the same compiled kernel, so only timing costs). Few tilings, so the compiles
#: (one per tiling and token tile) keep the run within minutes: narrower K steps with more
#: stages, wider ones, wider weight tiles, no split, and the unswapped MMA (fp16
#: mma.sync below 64 tokens on Hopper: the comparison that chose swapping). The split
#: factors ask whether about one program per multiprocessor (fewer partials, no second
#: wave) beats two.
VARIANTS = [
    (64, 128, None, 4, 6, True), (64, 512, None, 4, 3, True), (128, 256, None, 4, 3, True),
    (64, 256, 1, 4, 4, True), ("split", 0.25), ("split", 0.5), ("split", 2), (64, 256, None, 4, 4, False),
]


def candidates(m: int, n: int, k: int, group_k, device: torch.device, variants=None,
               sms=None) -> list[SmallGemmConfig]:
    """The configs swept at one shape: the default first, then `VARIANTS` (those that fit
    the group size and shared memory), without repeats; ``sms``: the device's
    multiprocessors (default: asked of ``device``).

    Example:
        >>> [c.label() for c in candidates(1, 4096, 4096, None, torch.device("cuda"))][:2]  # doctest: +SKIP
        ['n64 k256 s8 w4 st4 swap', 'n64 k128 s8 w4 st6 swap']
    """
    sms = sms or num_sms(device)
    base = default_config(m, n, k, group_k, sms)
    out = [base]
    for variant in variants if variants is not None else VARIANTS:
        if variant[0] == "split":
            split = max(1, int(base.split_k * variant[1]))
            cfg = SmallGemmConfig(base.block_n, base.block_k, split, base.num_warps, base.num_stages, base.swap_ab)
        else:
            bn, bk, split, warps, stages, swap = variant
            if group_k is not None and bk % group_k:
                continue
            cfg = SmallGemmConfig(bn, bk, split if split is not None else split_k_for(m, n, k, bn, bk, sms),
                                  warps, stages, swap)
        if shared_memory_bytes(m, cfg) <= SMEM_LIMIT and cfg not in out:
            out.append(cfg)
    return out


def _weights(n: int, k: int, copies_of):
    """Copies of an FP8 weight ``[n, k]`` with a per-tensor scale and 128x128 block scales
    (in the layout torch's blockwise recipe reads), enough of them for a cold L2."""
    from fxfuse.ops.block_linear import weight_scales_empty

    def make():
        w_q = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16).mul_(0.5).to(FP8)
        w_s = weight_scales_empty(n, k, torch.device(DEVICE))
        w_s.copy_(torch.rand(w_s.shape, device=DEVICE).mul_(0.01).add_(0.001))
        return w_q, torch.full((1,), 0.01, device=DEVICE), w_s

    return copies_of(make, n * k)


def _activations(m: int, k: int, per_token: bool):
    x_q = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16).mul_(100).clamp_(-448, 448).to(FP8)
    x_s = (torch.rand(m, 1, device=DEVICE) * 0.01 + 0.001) if per_token else torch.full((), 0.02, device=DEVICE)
    # Block scales column-major ([k/128, m] transposed), as group_fp8_quant(column_major=True) writes them.
    xb_s = (torch.rand(k // 128, m, device=DEVICE) * 0.01 + 0.001).t()
    return x_q, x_s, xb_s


def _calls(scheme: str, cfg_or_path):
    """``f(x_q, x_s, xb_s, w_q, ws, wb_s)`` for a kernel config or a baseline path name."""
    from fxfuse.kernels.block_linear import block_fp8_matmul
    from fxfuse.kernels.small_gemm import small_block_fp8_linear, small_fp8_linear
    from fxfuse.ops import block_linear as BL
    from fxfuse.ops import linear as L

    bf16 = torch.bfloat16
    if isinstance(cfg_or_path, SmallGemmConfig):
        if scheme == "fp8":
            return lambda xq, xs, xbs, wq, ws, wbs: small_fp8_linear(xq, wq, xs, ws, None, bf16, cfg_or_path)
        return lambda xq, xs, xbs, wq, ws, wbs: small_block_fp8_linear(xq, xbs, wq, wbs, None, bf16, cfg_or_path)
    return {
        "scaled_mm": lambda xq, xs, xbs, wq, ws, wbs: L._fp8_linear_scaled_mm(xq, wq, xs, ws, None, bf16),
        "scaled_mm_blockwise": lambda xq, xs, xbs, wq, ws, wbs: BL._block_fp8_linear_scaled_mm(xq, xbs, wq, wbs,
                                                                                              None, bf16),
        "triton_block": lambda xq, xs, xbs, wq, ws, wbs: block_fp8_matmul(xq, xbs, wq, wbs, None, bf16),
        "scaled_mm_per_tensor": lambda xq, xs, xbs, wq, ws, wbs: torch._scaled_mm(
            xq, wq.t(), scale_a=ws.reshape(()), scale_b=ws.reshape(()), out_dtype=bf16),
    }[cfg_or_path]


def _baselines(scheme: str, x_q, xb_s, w_q) -> list[str]:
    """The op's path without the kernel (first), then the yardstick."""
    if scheme == "fp8":
        return ["scaled_mm"]
    from fxfuse.ops import block_linear as BL

    op_path = "scaled_mm_blockwise" if BL._scaled_mm_applies(x_q, xb_s, w_q, torch.bfloat16) else "triton_block"
    return [op_path, "scaled_mm_per_tensor"]


def _magnitude(scheme, x_q, x_s, xb_s, w_q, ws, wb_s):
    """``|x| @ |w|`` of the dequantized operands, in fp32: the scale of the summation error."""
    from fxfuse.ops.block_linear import expand_weight_scales

    n, k = w_q.shape
    if scheme == "fp8":
        return (x_q.float().abs() * x_s.float()) @ (w_q.float().abs() * ws.float()).t()
    x = x_q.float().abs() * xb_s.float().repeat_interleave(128, dim=-1)
    return x @ (w_q.float().abs() * expand_weight_scales(wb_s, n, k)).t()


def shape_rows(scheme, model, linear, n, k, weights, m, bandwidth, reps, per_token, variants, log) -> list[dict]:
    """The kernel at every candidate config and the baselines at one shape; one row each."""
    xs = [_activations(m, k, per_token) for _ in weights]
    sets = [(x[0], x[1], x[2], *w) for x, w in zip(xs, weights)]
    first = sets[0]
    nb, kb = -(-n // 128), -(-k // 128)
    weight_bytes = n * k + (4 * nb * kb if scheme == "fp8-block" else 4)
    floor_us = weight_bytes / bandwidth * 1e6
    base_paths = _baselines(scheme, first[0], first[2], first[3])
    ref = _calls(scheme, base_paths[0])(*first).float()
    mag = _magnitude(scheme, *first)
    tol = 2**-9 * mag + 2 * 2**-8 * ref.abs()
    rows = []
    group_k = 128 if scheme == "fp8-block" else None
    configs = candidates(m, n, k, group_k, first[0].device, variants)
    for what in [*base_paths, *configs]:
        label = what if isinstance(what, str) else what.label()
        f = _calls(scheme, what)
        try:
            out = f(*first).float()
            # The yardstick multiplies other scales: a time, not a result to check.
            ok = None if what == "scaled_mm_per_tensor" else bool(((out - ref).abs() <= tol).all())
            us = graph_us([lambda a=a: f(*a) for a in sets], reps=reps)
        except Exception as e:  # noqa: BLE001 - a config that does not launch is reported, not fatal
            log(f"  {scheme:9s} {model:3s} {linear:12s} M={m:<3d} {label:24s} failed: {type(e).__name__}: "
                f"{str(e)[:100]}")
            continue
        row = dict(scheme=scheme, op=OPS[scheme], model=model, linear=linear, n=n, k=k, tokens=m, label=label,
                   kind="baseline" if isinstance(what, str) else "kernel",
                   config=None if isinstance(what, str) else what.as_dict(),
                   default=what is configs[0],
                   us=us, floor_us=floor_us, pct_bw=100 * floor_us / us, matches_baseline=ok,
                   cold_copies=len(sets), weight_bytes=weight_bytes)
        rows.append(row)
        log(f"  {scheme:9s} {model:3s} {linear:12s} M={m:<3d} {label:24s} {us:8.2f} us {row['pct_bw']:5.1f}% bw"
            + (" (default)" if row["default"] else "") + ("  DIFFERS FROM THE BASELINE" if ok is False else ""))
    del sets, xs, ref, mag, tol
    return rows


def summarize(rows: list[dict], log) -> list[dict]:
    """Per scheme, shape and token count: the best config that matches the baseline, the
    default's time and the op's baseline path's, with shares of copy bandwidth."""
    best = []
    keys = dict.fromkeys((r["scheme"], r["model"], r["linear"], r["n"], r["k"], r["tokens"]) for r in rows)
    log("\nbest per shape (cold L2; % of copy bandwidth on the weight's bytes):")
    for scheme, model, linear, n, k, m in keys:
        sel = [r for r in rows if (r["scheme"], r["model"], r["linear"], r["n"], r["k"], r["tokens"]) ==
               (scheme, model, linear, n, k, m)]
        ours = [r for r in sel if r["kind"] == "kernel" and r["matches_baseline"]]
        bases = [r for r in sel if r["kind"] == "baseline"]
        if not ours or not bases:
            continue
        top = min(ours, key=lambda r: r["us"])
        dflt = next((r for r in ours if r["default"]), None)
        base = bases[0]
        best.append(dict(scheme=scheme, op=OPS[scheme], model=model, linear=linear, n=n, k=k, tokens=m,
                         config=top["config"], label=top["label"], us=top["us"], pct_bw=top["pct_bw"],
                         default_us=dflt["us"] if dflt else None, baseline=base["label"], baseline_us=base["us"],
                         baseline_pct_bw=base["pct_bw"], speedup=base["us"] / top["us"]))
        log(f"  {scheme:9s} {model:3s} {linear:12s} M={m:<3d} best {top['label']:24s} {top['us']:8.2f} us "
            f"{top['pct_bw']:5.1f}% | default " + (f"{dflt['us']:8.2f}" if dflt else "   (n/a)")
            + f" | {base['label']} {base['us']:8.2f} us {base['pct_bw']:5.1f}% -> x{base['us'] / top['us']:.2f}")
    return best


def targets(best: list[dict], log) -> dict:
    """Issue 20's targets on the best configs: >= 85% of copy bandwidth at 1 token, >= 80%
    at 16-64 tokens."""
    out = {}
    for name, sel, goal in (("1 token", [b for b in best if b["tokens"] == 1], 85.0),
                            ("16-64 tokens", [b for b in best if 16 <= b["tokens"] <= 64], 80.0)):
        if not sel:
            continue
        worst = min(sel, key=lambda b: b["pct_bw"])
        out[name] = dict(goal_pct=goal, worst_pct=worst["pct_bw"], worst=f"{worst['scheme']} {worst['model']} "
                         f"{worst['linear']} M={worst['tokens']}", met=worst["pct_bw"] >= goal,
                         mean_pct=sum(b["pct_bw"] for b in sel) / len(sel))
        log(f"target {name}: >= {goal:.0f}% of copy bandwidth: worst {worst['pct_bw']:.1f}% "
            f"({out[name]['worst']}), mean {out[name]['mean_pct']:.1f}% -> {'MET' if out[name]['met'] else 'MISSED'}")
    return out


def have_cuda() -> bool:
    return torch.cuda.is_available()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="small_gemm_sweep", help="directory for small_gemm_sweep.json")
    p.add_argument("--write-choices", metavar="PATH", help="put this device's dispatch table entry into PATH")
    p.add_argument("--models", default="8b,70b")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    p.add_argument("--schemes", default="fp8,fp8-block", help="fp8 (fp8_linear), fp8-block (block_fp8_linear)")
    p.add_argument("--x-scale", choices=("per-tensor", "per-token"), default="per-tensor",
                   help="fp8's activation scale (default: per-tensor, the reference model's static scale)")
    p.add_argument("--reps", type=int, default=20, help="graph replays per median")
    p.add_argument("--budget-s", type=float, default=220.0, help="start no new shape after this many seconds")
    p.add_argument("--configs", help="semicolon-separated block_n,block_k,split_k,warps,stages,swap variants "
                                     "instead of VARIANTS (split_k 0: split_k_for), e.g. '64,256,0,4,4,1'")
    args = p.parse_args(argv)
    if not have_cuda():
        print("small_gemm_sweep: needs a CUDA device; nothing to do on this machine")
        return 0
    variants = None
    if args.configs:
        variants = []
        for c in args.configs.split(";"):
            bn, bk, split, warps, stages, swap = (int(v) for v in c.split(","))
            variants.append((bn, bk, split or None, warps, stages, bool(swap)))
    start = time.time()
    bandwidth = copy_bandwidth()
    env = dict(environment(), copy_bandwidth_GBps=bandwidth / 1e9, sms=num_sms(torch.device(DEVICE)))
    print(f"small_gemm_sweep on {env['device']} ({env['sms']} SMs), torch {env['torch']}, triton {env['triton']}; "
          f"copy bandwidth {env['copy_bandwidth_GBps']:.0f} GB/s; cold-L2 medians of CUDA-graph replays", flush=True)
    log = lambda s: print(s, flush=True)  # noqa: E731
    models = args.models.split(",")
    tokens = [int(t) for t in args.tokens.split(",")]
    schemes = args.schemes.split(",")
    rows, skipped = [], []
    for model, linear, n, k in (s for s in SHAPES if s[0] in models):
        if time.time() - start > args.budget_s:
            skipped.append(f"{model} {linear}")
            continue
        weights = _weights(n, k, cold_copies)
        for scheme in schemes:
            for m in tokens:
                rows += shape_rows(scheme, model, linear, n, k, weights, m, bandwidth, args.reps,
                                   args.x_scale == "per-token", variants, log)
        del weights
        torch.cuda.empty_cache()
    if skipped:
        print(f"\nout of time (--budget-s {args.budget_s:.0f}): skipped {', '.join(skipped)}")
    best = summarize(rows, log)
    goals = targets(best, log)
    entry = choices_from_rows(best) if best else {}
    differ = [r for r in rows if r["matches_baseline"] is False]
    print(f"\ntable entry for {env['device']}: " + json.dumps(
        {op: dict(max_tokens=e["max_tokens"], by_shape=e["by_shape"]) for op, e in entry.items()}))
    print(f"{len(differ)} row(s) differ from their baseline; {time.time() - start:.0f} s in all")
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = dict(env, rows=rows, best=best, targets=goals, choices=entry, skipped=skipped,
                  x_scale=args.x_scale, seconds=time.time() - start)
    (out_dir / "small_gemm_sweep.json").write_text(json.dumps(result, indent=1))
    print(f"written to {out_dir / 'small_gemm_sweep.json'}")
    if args.write_choices and entry:
        stamp = (f"{env['date']}, torch {env['torch']}, triton {env['triton']}, "
                 f"`benchmarks/small_gemm_sweep.py --models {args.models} --x-scale {args.x_scale}`")
        # Merged: the ops of the device's entry this run did not measure (another scheme, the
        # fused forms of gemm_fusion_sweep.py) stay.
        write_choices(args.write_choices, env["device"], entry, stamp, merge=True)
        print(f"dispatch table entry of {env['device']} written to {args.write_choices}")
    return 1 if differ else 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_PRINT_AUTOTUNING", "0")
    sys.exit(main())
