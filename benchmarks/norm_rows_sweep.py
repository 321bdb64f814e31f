"""Sweep rows per program x num_warps of the RMSNorm(+FP8) kernels (H100 tuning of
kernels/norm_quant.py:norm_launch, which group_quant's norm kernel shares).

Usage: python benchmarks/norm_rows_sweep.py [--json out.json] [--rows 4096 32768] [--widths 4096 8192]
                                            [--all-configs] [--dry-run]

For each variant (RMSNorm + static FP8, + dynamic per-token FP8, fused-add RMSNorm +
static FP8, RMSNorm + group FP8 with groups of 128 and column-major scales, as the
block-FP8 models run it), each (rows, width) and each (ROWS, num_warps) in
(1, 2, 4, 8) x (2, 4, 8, 16): the median CUDA-graph time with a cold L2 (the graph
rotates through input copies past twice the L2, `fxfuse.bench.timing`), as a share of
copy bandwidth (bytes the op must move / the measured copy bandwidth, as
`fxfuse.bench.ops`). Prints a table per case with the best config (``*``) and the one
`norm_launch` picks today (``d``), then a summary; ``--json`` writes every timing.

Configs that put more than 128 tile elements in a thread are skipped unless
``--all-configs``: ptxas for sm_90 reports hundreds of bytes of register spills for
them (e.g. ROWS=4 x 4096 columns on 2 warps). Kernels are compiled first by worker
processes in parallel (Triton's on-disk cache), so the sweep stays within ~90 s.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from fxfuse.kernels import group_quant as G
from fxfuse.kernels import norm_quant as K

EPS = 1e-6
GROUP = 128
PER_PROGRAM = (1, 2, 4, 8)
WARPS = (2, 4, 8, 16)
MAX_PER_THREAD = 128  # tile elements per thread; above, sm_90 spills registers
DEVICE = "cuda"


def _static(a, per_program, warps):
    return K.rms_norm_quant(a["x"], a["w"], EPS, quant=K.QUANT_STATIC, scale=a["s"],
                            rows_per_program=per_program, num_warps=warps)[1]


def _dynamic(a, per_program, warps):
    return K.rms_norm_quant(a["x"], a["w"], EPS, quant=K.QUANT_DYNAMIC,
                            rows_per_program=per_program, num_warps=warps)[1:3]


def _fused_add_static(a, per_program, warps):
    _, q, _, r_out = K.rms_norm_quant(a["x"], a["w"], EPS, residual=a["r"], quant=K.QUANT_STATIC, scale=a["s"],
                                      rows_per_program=per_program, num_warps=warps)
    return q, r_out


def _group(a, per_program, warps):
    return G.rms_norm_group_fp8(a["x"], a["w"], EPS, GROUP, True, rows_per_program=per_program, num_warps=warps)[:2]


# name -> (launch, reads the residual)
VARIANTS = {
    "rms_norm_static_fp8": (_static, False),
    "rms_norm_dynamic_fp8": (_dynamic, False),
    "fused_add_rms_norm_static_fp8": (_fused_add_static, True),
    f"rms_norm_group_fp8_{GROUP}": (_group, False),
}


def configs(width: int, all_configs: bool = False) -> list[tuple[int, int]]:
    """The (ROWS, num_warps) pairs to time at ``width``."""
    block = 1 << (width - 1).bit_length()
    return [(r, w) for r in PER_PROGRAM for w in WARPS if all_configs or r * block // (32 * w) <= MAX_PER_THREAD]


def _inputs(rows: int, width: int, residual: bool) -> dict:
    a = dict(x=torch.randn(rows, width, device=DEVICE, dtype=torch.bfloat16),
             w=(1 + 0.1 * torch.randn(width, device=DEVICE)).bfloat16(),
             s=torch.tensor([0.05], device=DEVICE))
    if residual:
        a["r"] = torch.randn(rows, width, device=DEVICE, dtype=torch.bfloat16)
    return a


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(o) for o in obj.values())
    return 0


def _compile_chunk(tasks: list[tuple[str, int, int, int]]) -> int:
    """Compile (variant, width, ROWS, warps) kernels into Triton's on-disk cache by
    launching them on 16 rows (same specialization as the timed shapes: every size a
    multiple of 16)."""
    for name, width, per_program, warps in tasks:
        launch, residual = VARIANTS[name]
        launch(_inputs(16, width, residual), per_program, warps)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return len(tasks)


def precompile(tasks: list, jobs: int) -> None:
    if jobs <= 1:
        _compile_chunk(tasks)
        return
    chunks = [tasks[i::jobs] for i in range(jobs)]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_compile_chunk, [c for c in chunks if c]))


def sweep(args) -> list[dict]:
    from fxfuse.bench.timing import cold_copies, graph_us

    results = []
    for rows in args.rows:
        for width in args.widths:
            need_res = any(VARIANTS[n][1] for n in args.variants)
            probe = _inputs(rows, width, need_res)
            # Copies sized by the smallest traffic (x and its FP8 codes): enough for every variant.
            copies = cold_copies(lambda: _inputs(rows, width, need_res), 3 * rows * width)
            for name in args.variants:
                launch, residual = VARIANTS[name]
                used = {k: v for k, v in probe.items() if k != "r" or residual}
                nbytes = _nbytes(used) + _nbytes(launch(probe, None, None))  # inputs read + outputs written
                for per_program, warps in configs(width, args.all_configs):
                    t = time.perf_counter()
                    launch(probe, per_program, warps)  # a compile here means the precompile missed it
                    if DEVICE == "cuda":
                        torch.cuda.synchronize()
                    args.first_launch_s += time.perf_counter() - t
                    us = graph_us([lambda a=a, r=per_program, w=warps: launch(a, r, w) for a in copies], reps=args.reps)
                    floor_us = nbytes / args.bandwidth * 1e6
                    results.append(dict(variant=name, rows=rows, width=width, rows_per_program=per_program,
                                        num_warps=warps, us=us, bytes=nbytes, floor_us=floor_us,
                                        pct_bw=100 * floor_us / us, cold_copies=len(copies)))
            del probe, copies
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    return results


def _default(rows: int, width: int) -> tuple[int, int]:
    _, per_program, warps = K.norm_launch(rows, width)
    return per_program, warps


def report(results: list[dict]) -> list[dict]:
    """Print a grid per case and a summary; returns the summary rows."""
    summary = []
    cases = sorted({(r["variant"], r["rows"], r["width"]) for r in results}, key=lambda c: (c[1], c[2], c[0]))
    for variant, rows, width in cases:
        mine = [r for r in results if (r["variant"], r["rows"], r["width"]) == (variant, rows, width)]
        best = max(mine, key=lambda r: r["pct_bw"])
        default = _default(rows, width)
        pct = {(r["rows_per_program"], r["num_warps"]): r["pct_bw"] for r in mine}
        print(f"\n{variant}  rows={rows} width={width}  (% of copy bandwidth, cold L2; * best, d norm_launch's pick)")
        print("  ROWS \\ warps " + "".join(f"{w:>9d}" for w in WARPS))
        for per_program in PER_PROGRAM:
            cells = []
            for w in WARPS:
                v = pct.get((per_program, w))
                mark = ("*" if (per_program, w) == (best["rows_per_program"], best["num_warps"]) else "") + \
                       ("d" if (per_program, w) == default else "")
                cells.append(f"{'-' if v is None else f'{v:.1f}':>7s}{mark:<2s}")
            print(f"  {per_program:>13d} " + "".join(cells))
        one_row = max((r for r in mine if r["rows_per_program"] == 1), key=lambda r: r["pct_bw"], default=None)
        summary.append(dict(variant=variant, rows=rows, width=width,
                            best=dict(rows_per_program=best["rows_per_program"], num_warps=best["num_warps"],
                                      us=best["us"], pct_bw=best["pct_bw"]),
                            default=dict(rows_per_program=default[0], num_warps=default[1], pct_bw=pct.get(default)),
                            best_one_row_pct_bw=one_row["pct_bw"] if one_row else None))
    print("\nbest per case:")
    print(f"  {'variant':32s} {'rows':>6s} {'width':>6s}  {'best (ROWS, warps)':>18s} {'%bw':>6s}  "
          f"{'default':>9s} {'%bw':>6s}  {'ROWS=1 best %bw':>15s}")
    for s in summary:
        b, d = s["best"], s["default"]
        dflt = f"{d['pct_bw']:6.1f}" if d["pct_bw"] is not None else "     -"
        one = f"{s['best_one_row_pct_bw']:.1f}" if s["best_one_row_pct_bw"] is not None else "-"
        best_cfg, default_cfg = str((b["rows_per_program"], b["num_warps"])), str((d["rows_per_program"], d["num_warps"]))
        print(f"  {s['variant']:32s} {s['rows']:>6d} {s['width']:>6d}  {best_cfg:>18s} "
              f"{b['pct_bw']:6.1f}  {default_cfg:>9s} {dflt}  {one:>15s}")
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write every timing and the summary here")
    p.add_argument("--rows", type=int, nargs="+", default=[4096, 32768])
    p.add_argument("--widths", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--reps", type=int, default=25, help="graph replays per timing (median)")
    p.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1), help="parallel compile processes")
    p.add_argument("--all-configs", action="store_true", help="also time configs that spill registers")
    p.add_argument("--dry-run", action="store_true", help="list the configs and norm_launch's picks, time nothing")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    tasks = [(n, w, r, k) for n in args.variants for w in args.widths for r, k in configs(w, args.all_configs)]
    if args.dry_run:
        for w in args.widths:
            print(f"width {w}: (ROWS, warps) {configs(w, args.all_configs)}")
        for rows in args.rows:
            for w in args.widths:
                print(f"norm_launch picks for rows={rows} width={w}: (ROWS, warps) {_default(rows, w)}")
        print(f"{len(tasks)} kernels to compile, {len(tasks) * len(args.rows)} timings")
        return 0
    if not torch.cuda.is_available():
        print("norm_rows_sweep: needs a CUDA device (try --dry-run)", file=sys.stderr)
        return 1
    from fxfuse.bench.timing import copy_bandwidth

    t0 = time.perf_counter()
    precompile(tasks, args.jobs)
    t1 = time.perf_counter()
    print(f"compiled {len(tasks)} kernels in {t1 - t0:.1f} s ({args.jobs} processes)", flush=True)
    args.bandwidth = copy_bandwidth()
    print(f"copy bandwidth {args.bandwidth / 1e9:.0f} GB/s on {torch.cuda.get_device_name()}", flush=True)
    args.first_launch_s = 0.0
    results = sweep(args)
    t2 = time.perf_counter()
    summary = report(results)
    print(f"\ntimed {len(results)} configs in {t2 - t1:.1f} s (first launches {args.first_launch_s:.1f} s: "
          f"large means the parallel compile missed); total {t2 - t0:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_bandwidth=args.bandwidth, reps=args.reps,
                           results=results, summary=summary), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
