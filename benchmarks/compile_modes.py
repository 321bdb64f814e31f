"""The reference model under every `torch.compile` mode, with and without the built-in passes.

For each mode: compile the model without passes (`torch.compile`) and with them
(`fxfuse.compile(..., mode=M)`), run one ragged prefill and greedy decode, and report
the match and miss tables, whether the greedy tokens agree, and the times (prefill
includes compilation; decode is wall-clock per step, after a synchronize). With
`reduce-overhead` the decode steps replay CUDA graphs.

Usage: python benchmarks/compile_modes.py [--device cuda] [--preset llama3-8b] [--layers 4]
       [--modes default reduce-overhead] [--json PATH]
"""

import argparse
import json
import time

import torch

import fxfuse
from fxfuse.models import LlamaForCausalLM, ModelConfig, random_prompts, run


def one(model, prompts, new_tokens, mode, fused):
    torch._dynamo.reset()
    fxfuse.reset_match_table()
    kwargs = {"fullgraph": True} if mode == "default" else {"fullgraph": True, "mode": mode}
    if fused:
        compiled = fxfuse.compile(model, passes=fxfuse.default_passes(), **kwargs)
    else:
        compiled = torch.compile(model, **kwargs)
    result = run(model, compiled, prompts, new_tokens)
    return result, fxfuse.match_table(), fxfuse.miss_table()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--quant", default="fp8")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--modes", nargs="+", default=["default", "reduce-overhead"])
    ap.add_argument("--json")
    args = ap.parse_args()

    backend = "triton" if args.device == "cuda" else "native"
    cfg = ModelConfig.preset(args.preset, num_layers=args.layers, quant=args.quant)
    model = LlamaForCausalLM(cfg, device=args.device, attention_backend=backend)
    prompts = random_prompts(cfg, lengths=[32, 17, 5, 9], seed=0)
    rows = []
    for mode in args.modes:
        unfused, _, _ = one(model, prompts, args.new_tokens, mode, fused=False)
        fused, matches, misses = one(model, prompts, args.new_tokens, mode, fused=True)
        rows.append(dict(
            mode=mode, matches={k: sum(v.values()) for k, v in matches.items()}, misses=misses,
            tokens_equal=bool(torch.equal(fused.tokens, unfused.tokens)),
            max_abs_diff=(fused.logits.float() - unfused.logits.float()).abs().max().item(),
            prefill_s={"unfused": unfused.compile_s, "fused": fused.compile_s},
            decode_ms_per_step={"unfused": unfused.run_s / args.new_tokens * 1e3,
                                "fused": fused.run_s / args.new_tokens * 1e3},
        ))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.preset}, {cfg.num_layers} layers, {args.quant}, {args.device} "
          f"({torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}), torch {torch.__version__}")
    print(f"{'mode':<28}{'matches':<44}{'tokens equal':>13}{'decode ms/step unfused':>24}{'fused':>8}")
    for r in rows:
        d = r["decode_ms_per_step"]
        print(f"{r['mode']:<28}{str(r['matches']):<44}{str(r['tokens_equal']):>13}{d['unfused']:>24.2f}{d['fused']:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, torch=torch.__version__, preset=args.preset, layers=cfg.num_layers), f, indent=2)
    model.close()


if __name__ == "__main__":
    main()
