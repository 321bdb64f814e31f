"""The ``fxfuse`` command: ``demo``, ``bench``, ``patterns``, ``explain``."""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from typing import Any, Sequence

import torch

import fxfuse

from . import compat


def _model(args: argparse.Namespace):
    from .models import LlamaForCausalLM, ModelConfig, random_prompts

    overrides = {"num_layers": args.layers} if args.layers is not None else {}
    cfg = ModelConfig.preset(args.preset, quant=args.quant, **overrides)
    model = LlamaForCausalLM(cfg, device=args.device, attention_backend=args.attention_backend)
    # Ragged on purpose: one batch mixes sequences of different lengths.
    lengths = [max(1, args.prompt_len - 3 * i) for i in range(args.batch)]
    prompts = random_prompts(cfg, lengths=lengths, seed=args.seed)
    return cfg, model, prompts


def expected_matches(num_layers: int) -> dict[str, int]:
    """What DESIGN §6 promises for a reference model of ``num_layers`` layers (fp8 and nvfp4)."""
    return {"rms_quant_fusion": 2 * num_layers, "act_quant_fusion": num_layers, "attn_quant_fusion": num_layers}


def demo(args: argparse.Namespace) -> int:
    from .models import run

    if args.device == "cuda" and not torch.cuda.is_available():
        print("fxfuse demo: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    cfg, model, prompts = _model(args)
    t0 = time.perf_counter()
    passes = fxfuse.default_passes()
    register_s = time.perf_counter() - t0
    manager = fxfuse.PassManager(passes)

    print(f"fxfuse demo: {args.preset} Llama, {cfg.num_layers} layers, {args.quant}, {args.device}, "
          f"torch {torch.__version__}; prompts of {[len(p) for p in prompts]} tokens, {args.new_tokens} new each")
    print(f"\npipeline (registered in {register_s * 1e3:.0f} ms):")
    for i, line in enumerate(manager.describe(), 1):
        print(f"  {i}. {line}")

    torch._dynamo.reset()
    unfused = run(model, torch.compile(model, fullgraph=True), prompts, args.new_tokens)
    torch._dynamo.reset()
    fxfuse.reset_match_table()
    fused = run(model, fxfuse.compile(model, passes=manager, fullgraph=True), prompts, args.new_tokens)
    table = fxfuse.match_table()

    want = expected_matches(cfg.num_layers)
    got = {name: sum(table.get(name, {}).values()) for name in want}
    print("\nmatches:")
    for pass_name, rewrites in sorted(table.items()):
        for rewrite, n in sorted(rewrites.items()):
            print(f"  {pass_name:<18} {rewrite:<34} {n:>4}")
    for name, n in want.items():
        print(f"  {name:<18} {'total (expected ' + str(n) + ')':<34} {got[name]:>4}  {'ok' if got[name] == n else 'MISMATCH'}")

    diff = (fused.logits.float() - unfused.logits.float()).abs().max().item()
    same_tokens = torch.equal(fused.tokens, unfused.tokens)
    print(f"\nmax |fused - unfused| of prefill logits: {diff:.3g}")
    print(f"greedy tokens identical: {'yes' if same_tokens else 'NO'}")
    print(f"\n{'':<10}{'compile+prefill s':>18}{'decode s':>10}")
    print(f"{'unfused':<10}{unfused.compile_s:>18.2f}{unfused.run_s:>10.2f}")
    print(f"{'fused':<10}{fused.compile_s:>18.2f}{fused.run_s:>10.2f}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "match_table": table,
                    "expected_matches": want,
                    "max_abs_diff": diff,
                    "tokens_fused": fused.tokens.tolist(),
                    "tokens_unfused": unfused.tokens.tolist(),
                    "tokens_equal": same_tokens,
                    "layers": cfg.num_layers,
                    "device": args.device,
                    "quant": args.quant,
                    "torch": torch.__version__,
                    "register_s": register_s,
                    "compile_s": {"fused": fused.compile_s, "unfused": unfused.compile_s},
                    "run_s": {"fused": fused.run_s, "unfused": unfused.run_s},
                },
                f,
                indent=2,
            )
    ok = same_tokens and got == want
    if not ok:
        print("\nfxfuse demo: FAILED (see MISMATCH/NO above)", file=sys.stderr)
    return 0 if ok else 1


def patterns(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    passes = fxfuse.default_passes()
    total = time.perf_counter() - t0
    for p in passes:
        print(f"# pass {p.name}")
        if not p.traced:
            print(f"#   (graph walk, no patterns: {type(p).__doc__.strip().splitlines()[0]})\n")
        for traced in p.traced:
            for v in traced.variants:
                args_desc = ", ".join(f"{a.name}: {getattr(a.kind, '__name__', a.kind)}" for a in traced.args)
                print(f"# {traced.name} [{v.form}] ({args_desc})")
                print(compat.pattern_source(v.pattern, traced.name))
                print()
    if args.timing:
        print(f"registration of all built-in passes: {total * 1e3:.1f} ms")
        for p in passes:
            t0 = time.perf_counter()
            # Copies, not fresh instances: rewrites may take parameters (native_lowering's do).
            type(p)() if type(p) is not fxfuse.FusionPass else fxfuse.FusionPass(p.name, [copy.copy(r) for r in p.rewrites])
            print(f"  {p.name:<18} {len(p.rewrites):>2} rewrites  {(time.perf_counter() - t0) * 1e3:8.1f} ms")
    return 0


def explain_cmd(args: argparse.Namespace) -> int:
    from .models import ModelRunner

    _, model, prompts = _model(args)
    passes = fxfuse.default_passes()
    with torch.no_grad(), ModelRunner(model).prefill_context(prompts) as (input_ids, positions):
        gm = fxfuse.capture_post_grad_graph(model, input_ids, positions)
    print(fxfuse.explain(gm, passes, rewrite=args.rewrite))
    return 0


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=int, default=None, help="number of decoder layers (default: the preset's)")
    p.add_argument("--preset", default="tiny", help="model preset: tiny (CPU, seconds) or llama3-8b")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quant", choices=["fp8", "nvfp4", "fp8-block"], default="fp8", help="activations into o_proj/down_proj: fp8 or nvfp4")
    p.add_argument("--attention-backend", default="auto",
                   help="attention backend of every layer: native, native-noquant, triton, or auto "
                        "(triton on cuda, native on cpu)")
    p.add_argument("--batch", type=int, default=3, help="number of prompts (ragged lengths)")
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxfuse", description="fusion passes for torch.compile")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="compile the reference model with and without fusions and compare")
    _model_flags(d)
    d.add_argument("--new-tokens", type=int, default=8)
    d.add_argument("--json", metavar="PATH", help="write the results as JSON")
    d.set_defaults(fn=demo)
    pt = sub.add_parser("patterns", help="print the registered patterns as readable Python")
    pt.add_argument("--timing", action="store_true", help="also time the registration of each pass")
    pt.set_defaults(fn=patterns)
    e = sub.add_parser("explain", help="why each rewrite did or did not match in the reference model")
    _model_flags(e)
    e.add_argument("--rewrite", help="only this rewrite")
    e.set_defaults(fn=explain_cmd)
    b = sub.add_parser("bench", help="kernel, attention and end-to-end benchmarks on CUDA (table, JSON, plot)")
    from .bench import add_arguments

    add_arguments(b)
    b.set_defaults(fn=bench_cmd)
    return parser


def bench_cmd(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(args)


def main(argv: Sequence[str] | None = None) -> Any:
    """Entry point of the ``fxfuse`` command.

    Example:
        >>> main(["demo", "--layers", "2", "--json", "out.json"])
    """
    args = build_parser().parse_args(argv)
    if getattr(args, "attention_backend", None) == "auto":
        args.attention_backend = "triton" if args.device == "cuda" else "native"
    if getattr(args, "layers", None) is not None and args.layers < 1:
        build_parser().error("--layers must be at least 1")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
