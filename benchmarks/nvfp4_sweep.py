"""Sweep the NVFP4 word kernels' tiles at the benchmark shapes (H100 tuning).

Usage: python benchmarks/nvfp4_sweep.py [--json nvfp4_sweep.json] [--reps 30] [--budget 85]

For ``nvfp4_quant`` (bf16, tokens 4096 and 32768 x hidden 4096 and 8192) and
``silu_and_mul_nvfp4_quant`` (bf16, tokens 4096 and 32768 x output width 14336 and 28672):
each ``(ROWS, BLOCKS, num_warps)`` config of the word kernel (``kernels/quant.py``
``_nvfp4_words_kernel``, ``kernels/activation.py`` ``_silu_and_mul_nvfp4_kernel``) and the
element-tile kernel it replaces, timed as ``fxfuse bench`` times ops with a cold L2
(CUDA-graph replays rotating through input copies past twice the L2, `fxfuse.bench.timing`).
Each time is reported as % of copy bandwidth for the op's bytes (inputs read + outputs
written, padded scales included, as ``fxfuse bench`` counts them: the floor). Every config
is first checked to give the default launch's bits at 257 rows. Prints each config, the
best per shape and the defaults (``_NVFP4_TILE``, ``_NVFP4_BLOCKS``, ``_NVFP4_WARPS`` in
both modules); ``--json`` writes every row. Sized for under 90 s on an H100 (13 configs,
8 shapes, 26 compiles); past ``--budget`` seconds the rest is skipped and reported.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import triton

TOKENS = (4096, 32768)
QUANT_WIDTHS = (4096, 8192)
SILU_WIDTHS = (14336, 28672)  # SiLU-and-mul output width (its input is twice as wide)
CHECK_ROWS = 257  # the bit check's rows: partial row tiles
# (ROWS, BLOCKS, num_warps): one, two or four 16-element blocks per thread.
CONFIGS = tuple(
    (rows, blocks, warps)
    for warps in (4, 8)
    for rows in (1, 2, 4)
    for blocks in (64, 128, 256)
    if rows * blocks in (32 * warps, 64 * warps, 128 * warps)
)


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _ops():
    """(name, widths, make input, call(x, gs, config) -> (q, sf), baseline(x, gs) -> (q, sf), default config)."""
    from fxfuse.kernels import activation as A
    from fxfuse.kernels import quant as Q

    def quant_input(t, w):
        return torch.randn(t, w, device="cuda", dtype=torch.bfloat16)

    def quant_elements(x, gs):
        m, k = x.shape
        q, sf = Q.nvfp4_outputs(m, k, x.device)
        Q._launch_nvfp4_elements(x, gs, q, sf, m, k)
        return q, sf

    def silu_input(t, w):
        return torch.randn(t, 2 * w, device="cuda", dtype=torch.bfloat16)

    def silu_elements(x, gs):
        # the tile kernel's NVFP4 epilogue at its default tiles (the launch before the word kernel)
        rows, d = x.shape[0], x.shape[1] // 2
        y, sf = Q.nvfp4_outputs(rows, d, x.device)
        block_r, block_d, warps = A._tiles(rows, d, A.OUT_NVFP4)
        A._silu_and_mul_kernel[(triton.cdiv(rows, block_r), triton.cdiv(d, block_d))](
            x, gs, y, sf, rows, d, sf.shape[1],
            OUT=A.OUT_NVFP4, BLOCK_R=block_r, BLOCK_D=block_d, EXACT_CASTS=False, num_warps=warps,
        )
        return y, sf

    return (
        ("nvfp4_quant", QUANT_WIDTHS, quant_input, Q.nvfp4, quant_elements, lambda t, w: Q.nvfp4_tiles(t, w // 16)),
        ("silu_and_mul_nvfp4_quant", SILU_WIDTHS, silu_input, A.silu_and_mul_nvfp4, silu_elements,
         lambda t, w: A.nvfp4_tiles(t, w // 16)),
    )


def _same_bits(a, b) -> bool:
    """Whether two ``(q, block_scales)`` are equal byte for byte."""
    return all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write every timed row here")
    parser.add_argument("--reps", type=int, default=30, help="CUDA-graph replays per median")
    parser.add_argument("--budget", type=float, default=85.0, help="seconds; configs left after it are skipped")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("nvfp4_sweep: needs a CUDA device (nothing to time here)")
        return
    from fxfuse.bench.timing import cold_copies, copy_bandwidth, graph_us

    start = time.perf_counter()
    bw = copy_bandwidth()
    device = torch.cuda.get_device_name()
    print(f"{device}: copy bandwidth {bw / 1e9:.0f} GB/s; {len(CONFIGS)} configs: {CONFIGS}", flush=True)
    rows_out, timed, skipped, defaults, mismatches = [], {}, [], {}, []
    for name, widths, make, call, baseline, default in _ops():
        for width in widths:
            if time.perf_counter() - start > args.budget:
                skipped.append(f"{name} W={width} (check and every timing)")
                continue
            # every config gives the default launch's bits, and so does the element kernel
            x = make(CHECK_ROWS, width)
            gs = torch.tensor([448.0 * 6 / 4], device="cuda")
            ref = call(x, gs)
            for config in (None, *CONFIGS):
                if not _same_bits(baseline(x, gs) if config is None else call(x, gs, config), ref):
                    mismatches.append(f"{name} W={width} {config or 'element kernel'}")
                    print(f"  MISMATCH: {mismatches[-1]} differs from the default launch", flush=True)
            for tokens in TOKENS:
                key = f"{name} T={tokens} W={width}"
                x = make(tokens, width)
                q, sf = call(x, gs)
                nbytes = _nbytes(x, gs, q, sf)
                floor_us = nbytes / bw * 1e6
                copies = cold_copies(lambda: make(tokens, width), _nbytes(x, gs))
                defaults[key] = default(tokens, width)
                for config in (None, *CONFIGS):
                    label = str(config) if config else "element"
                    if time.perf_counter() - start > args.budget:
                        skipped.append(f"{key} {label}")
                        continue
                    if config is None:
                        fns = [lambda a=a: baseline(a, gs) for a in copies]
                    else:
                        fns = [lambda a=a, c=config: call(a, gs, c) for a in copies]
                    us = graph_us(fns, reps=args.reps)
                    row = dict(op=name, tokens=tokens, width=width, config=list(config) if config else "element",
                               us=us, floor_us=floor_us, pct_bw=100 * floor_us / us, bytes=nbytes,
                               cold_copies=len(copies))
                    rows_out.append(row)
                    timed[key, config] = row
                    print(f"  {name:26s} T={tokens:<6d} W={width:<6d} {label:16s} {us:9.1f} us  "
                          f"floor {floor_us:8.1f}  {row['pct_bw']:5.1f}% bw", flush=True)
                del x, copies
    print("\nbest per shape [the default config] (the element kernel it replaces):")
    best = {}
    for key, dflt in defaults.items():
        rows = [r for (k, c), r in timed.items() if k == key and c is not None]
        if not rows:
            continue
        best[key] = min(rows, key=lambda r: r["us"])
        b = best[key]
        line = f"  {key:48s} {str(tuple(b['config'])):16s} {b['us']:8.1f} us {b['pct_bw']:5.1f}% bw"
        if (key, dflt) in timed:
            line += f"  [{dflt}: {timed[key, dflt]['pct_bw']:5.1f}%]"
        if (key, None) in timed:
            line += f"  (element {timed[key, None]['pct_bw']:5.1f}%)"
        print(line)
    if skipped:
        print(f"\nskipped past the {args.budget:.0f} s budget: {len(skipped)} timings, from {skipped[0]}")
    if mismatches:
        print(f"\nMISMATCHES (bits differ from the default launch): {mismatches}")
    print(f"\n{time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, copy_bandwidth=bw, configs=[list(c) for c in CONFIGS], rows=rows_out,
                           best=best, defaults={k: list(v) for k, v in defaults.items()}, skipped=skipped,
                           mismatches=mismatches), f, indent=1)
    if mismatches:
        raise SystemExit(1)

if __name__ == "__main__":
    main()
