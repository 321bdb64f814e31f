"""``fxfuse bench``: kernel, attention, end-to-end and tensor-parallel benchmarks on CUDA.

Prints tables, writes JSON (and a PNG plot when matplotlib is importable; ``fxfuse
bench --plot-from RESULTS.json`` draws it later on any machine), and can write the
measured kernel-vs-Inductor choices that the ``native_lowering`` pass reads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch

#: What a plain ``fxfuse bench`` runs; ``tp`` needs several GPUs, so only ``--only tp`` runs it.
DEFAULT_SECTIONS = ("ops", "gemm", "attention", "e2e")


def environment() -> dict:
    import triton

    return dict(date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name(),
                torch=torch.__version__, triton=triton.__version__)


def main(args: argparse.Namespace) -> int:
    from .plot import plot

    if args.plot_from:
        with open(args.plot_from) as f:
            results = json.load(f)
        print(plot(results, args.png or args.plot_from.rsplit(".", 1)[0] + ".png"))
        return 0
    sections = args.only.split(",") if args.only else list(DEFAULT_SECTIONS)
    if "tp" in sections and torch.cuda.device_count() < args.tp:
        print(f"fxfuse bench --only tp: needs {args.tp} GPUs, found {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("fxfuse bench: needs a CUDA device (use --plot-from to draw saved results)", file=sys.stderr)
        return 2
    from . import attention, e2e, gemm, ops, tp
    from .timing import copy_bandwidth

    results = dict(environment(), copy_bandwidth_GBps=copy_bandwidth() / 1e9)
    print(f"fxfuse bench on {results['device']}, torch {results['torch']}, triton {results['triton']}; "
          f"copy bandwidth {results['copy_bandwidth_GBps']:.0f} GB/s; times are medians of CUDA-graph replays (us)")
    bw = results["copy_bandwidth_GBps"] * 1e9
    if "ops" in sections:
        print("\nops (eager = plain PyTorch chain, inductor = torch.compile of it, fxfuse = the fused op's kernel):")
        tokens = tuple(int(t) for t in args.tokens.split(",")) if args.tokens else ops.TOKENS
        results["ops"] = ops.run(bw, tokens=tokens, only=tuple(args.ops.split(",")) if args.ops else ())
        if args.write_choices:
            write_choices(args.write_choices, ops.choices(results["ops"], results["device"]), results)
            print(f"kernel choices of {results['device']} written to {args.write_choices}")
    if "gemm" in sections:
        print("\nblock-scaled FP8 GEMM (block_fp8_linear vs torch._scaled_mm with per-tensor scales):")
        results["gemm"] = gemm.run(tokens=tuple(int(t) for t in args.tokens.split(",")) if args.tokens else gemm.TOKENS)
    if "attention" in sections:
        print("\nattention (32 query heads, 8 KV heads, head size 128, bf16):")
        results["attention"] = attention.run(bw)
    variants = tuple(args.e2e_variants.split(","))
    presets = tuple(args.e2e_models.split(","))
    if "e2e" in sections:
        layers = args.layers or "each preset's"
        print(f"\nend to end ({', '.join(presets)} layer shapes, {layers} layers; {args.e2e_quant}; "
              "triton attention, CUDA graphs; floor = weight + KV bytes read / copy bandwidth):")
        results["e2e"] = e2e.run(layers=args.layers, quants=tuple(args.e2e_quant.split(",")), presets=presets,
                                 bandwidth=bw, variants=variants, decode=_shapes(args.e2e_decode, e2e.DECODE),
                                 prefill=_shapes(args.e2e_prefill, e2e.PREFILL), profile=args.e2e_profile)
    if "decode-profile" in sections:
        print("\ndecode profile (one decode step per variant under the torch profiler, no CUDA graphs; per layer: "
              "kernels / us by family; each GEMM's share of copy bandwidth on its weight bytes):")
        decode = tuple((int(s), args.profile_context) for s in args.profile_seqs.split(","))
        rows = e2e.run(layers=args.layers, quants=tuple(args.e2e_quant.split(",")), presets=presets, bandwidth=bw,
                       variants=variants, decode=decode, prefill=(), profile=True)
        results["decode_profile"] = rows
        for row in rows:
            prof = row["profile"]
            if "fused" in prof and "unfused" in prof:
                from .decode_profile import compare

                c = compare(prof["unfused"], prof["fused"])
                print(f"  {row['model']} {row['quant']} {row['seqs']} seq: per layer {c['kernels']['before']:.1f} -> "
                      f"{c['kernels']['after']:.1f} kernels, {c['us']['before']:.1f} -> {c['us']['after']:.1f} us "
                      "(unfused -> fused)")
    if "tp" in sections:
        print(f"\ntensor parallel over {args.tp} GPUs: fused all-reduce + add + RMSNorm (+ FP8) vs NCCL "
              "all-reduce + fxfuse's fused norm, bf16 partial sums (us):")
        tokens = tuple(int(t) for t in args.tokens.split(",")) if args.tokens else tp.TOKENS
        results["tp"] = tp.run(world_size=args.tp, tokens=tokens)
        if not results["tp"]:
            return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nresults written to {args.json}")
    if args.png or args.json:
        print(plot(results, args.png or args.json.rsplit(".", 1)[0] + ".png"))
    return 0


def _shapes(spec: str | None, default):
    """``"1x1024,32x1024"`` -> ``((1, 1024), (32, 1024))``; ``""`` -> none; None -> ``default``."""
    if spec is None:
        return default
    try:
        return tuple(tuple(int(v) for v in item.split("x")) for item in spec.split(",") if item)
    except ValueError:
        raise ValueError(f"fxfuse bench: shapes are SEQSxTOKENS, comma-separated (1x1024,32x1024), "
                         f"got {spec!r}") from None


def write_choices(path: str, devices: dict, env: dict) -> None:
    """Write the measured kernel-vs-Inductor table to ``path``; an existing table there
    keeps its other devices' entries (each device's date and versions under ``measured``).

    Example:
        >>> write_choices("kernel_choices.json", {"NVIDIA H200": {...}}, environment())  # doctest: +SKIP
    """
    import os

    table: dict = {"devices": {}, "measured": {}}
    if os.path.exists(path):
        with open(path) as f:
            table = json.load(f)
        if not isinstance(table.get("measured"), dict):  # one device's string, as first written
            table["measured"] = {name: table.get("measured") for name in table.get("devices", {})}
    stamp = f"{env['date']}, torch {env['torch']}, triton {env['triton']}, `fxfuse bench --only ops --write-choices`"
    for name, entry in devices.items():
        table.setdefault("devices", {})[name] = entry
        table["measured"][name] = stamp
    with open(path, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)


def e2e_layers() -> int:
    """The end-to-end benchmark's default depth (`e2e.LAYERS`); importing `e2e` builds no model."""
    from .e2e import LAYERS

    return LAYERS


def e2e_presets() -> tuple[str, ...]:
    """The end-to-end benchmark's default presets (`e2e.PRESETS`), one per model family."""
    from .e2e import PRESETS

    return PRESETS


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``fxfuse bench``; they live in `fxfuse_cli`, which imports no torch."""
    from fxfuse_cli import add_bench_arguments

    add_bench_arguments(p)
