"""The ``fxfuse`` command's entry point: its arguments, parsed before anything imports torch.

``import fxfuse`` imports torch (it registers ``torch.ops.fxfuse.*``), which alone takes a
second or two; ``fxfuse --help``, ``fxfuse <verb> --help``, a usage error and ``fxfuse
bench`` on a machine without a GPU need none of it. So the parser lives here, outside the
package, and the package is imported only for a command that does work
(`fxfuse.cli.run`).

Example:
    >>> main(["demo", "--layers", "2"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from typing import Any, Sequence

#: The end-to-end benchmark's default depth: all of Llama-3-8B's layers (`fxfuse.bench.e2e.LAYERS`).
E2E_LAYERS = 32
#: The end-to-end benchmark's default presets, one per model family (`fxfuse.bench.e2e.PRESETS`).
E2E_PRESETS = ("llama3-8b", "qwen3-8b", "gemma3-12b")
#: ``--model``: the model families (`fxfuse.models.FAMILIES`; each one's presets: `fxfuse.cli.MODEL_PRESETS`).
MODELS = ("gemma3", "llama", "qwen3")


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=MODELS, default=None,
                   help="model family: llama (default), qwen3 (per-head q/k norm) or gemma3 ((1+w) norms, q/k norm, "
                        "sandwich norms, GeGLU)")
    p.add_argument("--layers", type=int, default=None, help="number of decoder layers (default: the preset's)")
    p.add_argument("--preset", default="tiny",
                   help="model preset: tiny (the family's CPU preset, seconds), llama3-8b, qwen3-8b or gemma3-12b")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quant", choices=["fp8", "nvfp4", "fp8-block"], default="fp8",
                   help="linear-layer quantization: fp8 (per-tensor static), nvfp4, or fp8-block (128x128 weight "
                        "blocks, per-token-group activations)")
    p.add_argument("--attention-backend", default="auto",
                   help="attention backend of every layer: native, native-noquant, triton, or auto "
                        "(triton on cuda, native on cpu)")
    p.add_argument("--batch", type=int, default=3, help="number of prompts (ragged lengths)")
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``fxfuse bench`` (also `fxfuse.bench.add_arguments`)."""
    p.add_argument("--only", help="comma-separated sections: ops,gemm,attention,e2e,decode-profile,tp "
                                  "(default: ops,gemm,attention,e2e; tp needs --tp GPUs)")
    p.add_argument("--ops", help="comma-separated op names to benchmark (default: all)")
    p.add_argument("--tokens", help="comma-separated token counts for the op, GEMM and tp benchmarks "
                                    "(default: 1,16,256,4096,32768; 1,16,256,4096,16384; 1,16,256,2048,8192)")
    p.add_argument("--layers", type=int, default=E2E_LAYERS,
                   help="layers of each end-to-end model (default: all of Llama-3-8B's, %(default)s, for every preset; "
                        "0: each preset's own, 36 for qwen3-8b)")
    p.add_argument("--e2e-models", default=",".join(E2E_PRESETS),
                   help="comma-separated model presets of the end-to-end rows (default: %(default)s)")
    p.add_argument("--e2e-quant", default="fp8,fp8-block",
                   help="comma-separated quant schemes of the end-to-end model (default: fp8,fp8-block)")
    p.add_argument("--e2e-variants", default="unfused,fused",
                   help="comma-separated compiles of the e2e and decode-profile sections: baseline (before issue 20: "
                        "no gemm_fusion, no small-batch GEMM), unfused (no passes), fused (default_passes()) "
                        "(default: %(default)s)")
    p.add_argument("--e2e-decode", metavar="SEQSxCONTEXT,...",
                   help="decode shapes of the e2e section (default: 1x1024,32x1024,256x1024; '' for none)")
    p.add_argument("--e2e-prefill", metavar="SEQSxTOKENS,...",
                   help="prefill shapes of the e2e section (default: 1x2048,32x256,256x32; '' for none)")
    p.add_argument("--e2e-profile", action="store_true",
                   help="also profile each e2e decode step (what the decode-profile section reports)")
    p.add_argument("--profile-seqs", default="1,32",
                   help="decode batch sizes the decode-profile section profiles (default: %(default)s)")
    p.add_argument("--profile-context", type=int, default=1024,
                   help="context of each sequence in the decode profile (default: %(default)s)")
    p.add_argument("--tp", type=int, default=2, metavar="N",
                   help="GPUs (ranks) of the tp section, one process each (default: %(default)s)")
    p.add_argument("--json", help="write all results to this JSON file")
    p.add_argument("--png", help="write the plot here (default: next to --json)")
    p.add_argument("--write-choices", metavar="PATH",
                   help="write this device's measured kernel-vs-Inductor table for native_lowering into PATH "
                        "(other devices' entries of an existing table are kept)")
    p.add_argument("--plot-from", metavar="JSON", help="only draw the plot of saved results")


def build_parser() -> argparse.ArgumentParser:
    """The ``fxfuse`` command line: ``demo``, ``patterns``, ``explain``, ``bench``."""
    parser = argparse.ArgumentParser(prog="fxfuse", description="fusion passes for torch.compile")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="compile the reference model with and without fusions and compare")
    _model_flags(d)
    d.add_argument("--new-tokens", type=int, default=8)
    d.add_argument("--json", metavar="PATH", help="write the results as JSON")
    d.add_argument("--no-timing", action="store_true",
                   help="check counts and tokens only: no untimed warm-up, compile caches on (timings meaningless)")
    d.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks: N processes (gloo on cpu, NCCL on cuda, one GPU each); rank 0 reports")
    pt = sub.add_parser("patterns", help="print the registered patterns as readable Python")
    pt.add_argument("--timing", action="store_true", help="also time the registration of each pass")
    e = sub.add_parser("explain", help="why each rewrite did or did not match in the reference model")
    _model_flags(e)
    e.add_argument("--rewrite", help="only this rewrite")
    e.add_argument("--all", action="store_true", help="list every rewrite, also those without any chain in the graphs")
    b = sub.add_parser("bench", help="kernel, attention and end-to-end benchmarks on CUDA (table, JSON, plot)")
    add_bench_arguments(b)
    return parser


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check ``argv``; usage errors exit 2 with argparse's message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "attention_backend", None) == "auto":
        args.attention_backend = "triton" if args.device == "cuda" else "native"
    if args.command in ("demo", "explain") and args.layers is not None and args.layers < 1:
        parser.error("--layers must be at least 1")
    if getattr(args, "tp", 1) < 1:
        parser.error("--tp must be at least 1")
    return args


def no_gpu_here() -> bool:
    """True where no GPU can be there at all: no NVIDIA or AMD device files, or none made
    visible. False means "maybe": torch is asked then."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return True
    return not (glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd") or os.path.exists("/dev/dxg"))


def main(argv: Sequence[str] | None = None) -> Any:
    """Entry point of the ``fxfuse`` command."""
    args = parse(argv)
    if args.command == "bench" and not args.plot_from and no_gpu_here():
        print("fxfuse bench: needs a CUDA device, and this machine has none (use --plot-from to draw saved "
              "results)", file=sys.stderr)
        return 2
    from fxfuse import cli

    return cli.run(args)


if __name__ == "__main__":
    sys.exit(main())
