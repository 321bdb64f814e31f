"""The reference model under `torch.compile` modes, with and without the built-in passes.

For each mode: compile the model without passes (`torch.compile`) and with them
(`fxfuse.compile(..., mode=M)`), and run one ragged prefill step repeatedly inside one
forward context (the model reads its batch layout and KV caches from the context, so
CUDA-graph replays need the same context tensors on every call): three calls warm up,
record and replay, then ``--reps`` timed calls. Reports the match and miss tables,
whether the logits of fused and unfused agree (and their greedy tokens), and the median
step time of each variant.

Usage: python benchmarks/compile_modes.py [--device cuda] [--preset tiny] [--layers 2]
       [--modes default reduce-overhead] [--json PATH]
"""

import argparse
import json
import statistics
import time

import torch

import fxfuse
from fxfuse.models import LlamaForCausalLM, ModelConfig, ModelRunner, random_prompts


def one(model, prompts, mode, fused, reps):
    torch._dynamo.reset()
    fxfuse.reset_match_table()
    kwargs = {"fullgraph": True} if mode == "default" else {"fullgraph": True, "mode": mode}
    if fused:
        fwd = fxfuse.compile(model, passes=fxfuse.default_passes(), **kwargs)
    else:
        fwd = torch.compile(model, **kwargs)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    times = []
    with torch.no_grad(), ModelRunner(model).prefill_context(prompts) as (ids, pos):
        for i in range(3 + reps):
            torch.compiler.cudagraph_mark_step_begin()
            sync()
            t0 = time.perf_counter()
            logits = fwd(ids, pos).clone()
            sync()
            if i >= 3:
                times.append(time.perf_counter() - t0)
    return logits, statistics.median(times) * 1e3, fxfuse.match_table(), fxfuse.miss_table()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--quant", default="fp8")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--modes", nargs="+", default=["default", "reduce-overhead"])
    ap.add_argument("--json")
    args = ap.parse_args()

    backend = "triton" if args.device == "cuda" else "native"
    cfg = ModelConfig.preset(args.preset, num_layers=args.layers, quant=args.quant)
    model = LlamaForCausalLM(cfg, device=args.device, attention_backend=backend)
    prompts = random_prompts(cfg, lengths=[32, 17, 5, 9], seed=0)
    rows = []
    for mode in args.modes:
        base, base_ms, _, _ = one(model, prompts, mode, False, args.reps)
        logits, ms, matches, misses = one(model, prompts, mode, True, args.reps)
        rows.append(dict(
            mode=mode, matches={k: sum(v.values()) for k, v in matches.items()}, misses=misses,
            max_abs_diff=(logits.float() - base.float()).abs().max().item(),
            greedy_equal=bool(torch.equal(logits.argmax(-1), base.argmax(-1))),
            step_ms={"unfused": base_ms, "fused": ms},
        ))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.preset}, {cfg.num_layers} layers, {args.quant}, {args.device} "
          f"({torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}), torch {torch.__version__}")
    print(f"{'mode':<18}{'matches':<70}{'max |diff|':>11}{'greedy equal':>13}{'step ms unfused':>16}{'fused':>8}")
    for r in rows:
        d = r["step_ms"]
        print(f"{r['mode']:<18}{str(r['matches']):<70}{r['max_abs_diff']:>11.3g}{str(r['greedy_equal']):>13}"
              f"{d['unfused']:>16.3f}{d['fused']:>8.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, torch=torch.__version__, preset=args.preset, layers=cfg.num_layers), f, indent=2)
    model.close()


if __name__ == "__main__":
    main()
