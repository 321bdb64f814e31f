"""Sweep SiLU-and-mul launch configs against Inductor at the MLP widths (H100 tuning of
fxfuse/kernels/activation.py:_tiles).

Usage: python benchmarks/silu_sweep.py [--json silu_sweep.json] [--tokens 16,256,4096,32768]
                                       [--widths 14336,28672] [--out none,fp8] [--reps 25]

For OUT in (none, fp8), d in the widths and each token count: Inductor's kernel for the
native chain (``torch.compile`` with the token dim dynamic, as `fxfuse bench --only ops`
builds it; + the static FP8 quant for fp8) and fxfuse's kernel at every config of
``CONFIGS`` plus the default (``_tiles``), each checked to give the default launch's bits.
Times are cold-L2 medians of CUDA-graph replays (the graph's calls rotate through input
copies past twice the L2, `fxfuse.bench.timing.cold_copies`), with the share of copy
bandwidth (bytes read + written over `copy_bandwidth`). Prints a line per config, the
best config per shape, and the one config nearest the best everywhere; about a minute on
an H100. Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from fxfuse.bench import environment
from fxfuse.bench.ops import _compiled
from fxfuse.bench.timing import cold_copies, copy_bandwidth, graph_us
from fxfuse.kernels import activation as A
from fxfuse.ops.activation import silu_and_mul_native
from fxfuse.ops.fused import silu_and_mul_static_fp8_quant_native

#: (BLOCK_R, BLOCK_D, num_warps); BLOCK_R = A.FLAT: the flat kernel with XBLOCK = BLOCK_D
#: (one row per program where d % XBLOCK == 0; 14336 % 4096 != 0 runs its per-element
#: division path, as Inductor's kernel does).
#: Eight, so the compiles (one per config, OUT and alignment) keep the run near a minute;
#: (1, 1024, 4) and (FLAT, 1024, 4) are Inductor's CTA shape in the two program orders.
CONFIGS = [
    (4, 1024, 8), (2, 1024, 4), (1, 1024, 4), (1, 2048, 8),
    (A.FLAT, 1024, 4), (A.FLAT, 2048, 4), (A.FLAT, 2048, 8), (A.FLAT, 4096, 8),
]
OUTS = {"none": A.OUT_NONE, "fp8": A.OUT_FP8}
NATIVE = {"none": lambda x, s: silu_and_mul_native(x), "fp8": silu_and_mul_static_fp8_quant_native}


def label(cfg) -> str:
    r, b, w = cfg
    return f"flat {b} w{w}" if r == A.FLAT else f"tile {r}x{b} w{w}"


def shape_rows(out: str, d: int, t: int, inductor, bandwidth: float, reps: int, log) -> list[dict]:
    """Inductor and every config at one shape; one row each (``config`` None for Inductor)."""
    scale = torch.tensor([0.05], device="cuda")
    make = lambda: torch.randn(t, 2 * d, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    copies = cold_copies(make, t * 2 * d * 2)
    x = copies[0]
    ref = A.silu_and_mul(x, OUTS[out], scale)
    nbytes = x.numel() * x.element_size() + ref.numel() * ref.element_size()
    floor = nbytes / bandwidth * 1e6
    inductor(x, scale)  # compile (once per width: the token dim is dynamic) outside the timing
    rows = [dict(out=out, d=d, tokens=t, config=None, label="inductor", cold_copies=len(copies), floor_us=floor,
                 us=graph_us([lambda a=a: inductor(a, scale) for a in copies], reps=reps))]
    default = A._tiles(t, d, OUTS[out])
    for cfg in dict.fromkeys([default, *CONFIGS]):  # the default first, once
        try:
            same = torch.equal(A.silu_and_mul(x, OUTS[out], scale, config=cfg).view(torch.uint8), ref.view(torch.uint8))
            us = graph_us([lambda a=a: A.silu_and_mul(a, OUTS[out], scale, config=cfg) for a in copies], reps=reps)
        except Exception as e:  # noqa: BLE001 - a config that does not launch is reported, not fatal
            log(f"  {out:4s} d={d:<6d} T={t:<6d} {label(cfg):18s} failed: {type(e).__name__}: {str(e)[:80]}")
            continue
        rows.append(dict(out=out, d=d, tokens=t, config=list(cfg), label=label(cfg), default=cfg == default,
                         same_bits_as_default=same, cold_copies=len(copies), floor_us=floor, us=us))
    ind = rows[0]["us"]
    for r in rows:
        r["pct_bw"] = 100 * floor / r["us"]
        r["inductor_over"] = ind / r["us"]
        log(f"  {out:4s} d={d:<6d} T={t:<6d} {r['label']:18s} {r['us']:9.2f} us {r['pct_bw']:5.1f}% bw  "
            f"x{r['inductor_over']:.3f} vs inductor"
            + (" (default)" if r.get("default") else "")
            + ("  BITS DIFFER FROM THE DEFAULT" if r.get("same_bits_as_default") is False else ""))
    del copies, x, ref
    return rows


def summarize(rows: list[dict], log) -> dict:
    """The best config per shape, and per OUT the config whose worst ratio to the best is
    smallest (one config for every shape: the simplest `_tiles`)."""
    shapes = dict.fromkeys((r["out"], r["d"], r["tokens"]) for r in rows)
    best, ratios = [], {}
    log("\nbest per shape (cold L2):")
    for out, d, t in shapes:
        sel = [r for r in rows if (r["out"], r["d"], r["tokens"]) == (out, d, t)]
        ours = [r for r in sel if r["config"] is not None and r["same_bits_as_default"]]
        if not ours:
            continue
        ind = next(r for r in sel if r["config"] is None)
        top = min(ours, key=lambda r: r["us"])
        dflt = next((r for r in ours if r["default"]), top)
        best.append(dict(out=out, d=d, tokens=t, config=top["config"], label=top["label"], us=top["us"],
                         default_us=dflt["us"], inductor_us=ind["us"], pct_bw=top["pct_bw"],
                         inductor_over_best=ind["us"] / top["us"]))
        log(f"  {out:4s} d={d:<6d} T={t:<6d} {top['label']:18s} {top['us']:9.2f} us {top['pct_bw']:5.1f}% bw | "
            f"default {dflt['us']:9.2f} | inductor {ind['us']:9.2f} -> best x{ind['us'] / top['us']:.3f} vs inductor")
        for r in ours:
            ratios.setdefault(out, {}).setdefault(r["label"], []).append(r["us"] / top["us"])
        ratios[out].setdefault("default (_tiles)", []).append(dflt["us"] / top["us"])  # today's rule as a whole
    robust = {}
    for out, per in ratios.items():
        n = max(len(v) for v in per.values())
        full = {k: v for k, v in per.items() if len(v) == n}  # configs that ran at every shape
        name = min(full, key=lambda k: (max(full[k]), sum(full[k])))
        robust[out] = dict(label=name, worst_over_best=max(full[name]), mean_over_best=sum(full[name]) / n)
        dflt = per["default (_tiles)"]
        log(f"one config for every shape, OUT={out}: {name} (worst x{max(full[name]):.3f} of the best, "
            f"mean x{robust[out]['mean_over_best']:.3f}); today's _tiles: worst x{max(dflt):.3f}, "
            f"mean x{sum(dflt) / len(dflt):.3f}")
    return dict(best=best, robust=robust)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="16,256,4096,32768")
    p.add_argument("--widths", default="14336,28672", help="d: the output width (the input is 2d)")
    p.add_argument("--out", default="none,fp8", help="epilogues: none,fp8")
    p.add_argument("--reps", type=int, default=25, help="graph replays per median")
    p.add_argument("--configs", help="semicolon-separated BLOCK_R,BLOCK_D,WARPS triples instead of CONFIGS "
                                     "(BLOCK_R 0: flat), e.g. '0,1024,4;1,1024,4'")
    p.add_argument("--json", help="write the rows and the summary here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("silu_sweep: needs a CUDA device; nothing to do on this machine")
        return 0
    if args.configs:
        CONFIGS[:] = [tuple(int(v) for v in c.split(",")) for c in args.configs.split(";")]
    start = time.time()
    torch._dynamo.config.recompile_limit = 64
    bandwidth = copy_bandwidth()
    env = dict(environment(), copy_bandwidth_GBps=bandwidth / 1e9)
    print(f"silu_sweep on {env['device']}, torch {env['torch']}, triton {env['triton']}; copy bandwidth "
          f"{env['copy_bandwidth_GBps']:.0f} GB/s; cold-L2 medians of CUDA-graph replays", flush=True)
    rows = []
    for out in args.out.split(","):
        inductor = _compiled(NATIVE[out])
        for d in (int(w) for w in args.widths.split(",")):
            for t in (int(t) for t in args.tokens.split(",")):
                rows += shape_rows(out, d, t, inductor, bandwidth, args.reps, lambda s: print(s, flush=True))
                torch.cuda.empty_cache()
    summary = summarize(rows, print)
    differ = [r for r in rows if r.get("same_bits_as_default") is False]
    print(f"\n{len(differ)} config(s) differ from the default launch's bits; {time.time() - start:.0f} s in all")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env, rows=rows, **summary, seconds=time.time() - start), f, indent=1)
        print(f"written to {args.json}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
