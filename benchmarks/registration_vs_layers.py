"""Registration cost of the built-in passes does not grow with the number of layers.

For each layer count, in a fresh process (so no tracing cache is warm): time
`default_passes()` (registration), count the registered search patterns, then apply the
passes to the reference model's functionalized graph and count the matches.

Usage: python benchmarks/registration_vs_layers.py [--layers 1 32] [--device cpu]
"""

import argparse
import json
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time, torch
t0 = time.perf_counter()
import fxfuse
from fxfuse import compat
from fxfuse.models import LlamaForCausalLM, ModelConfig, ModelRunner, random_prompts
import_s = time.perf_counter() - t0
layers, device = int(sys.argv[1]), sys.argv[2]
t0 = time.perf_counter(); passes = fxfuse.default_passes(); register_s = time.perf_counter() - t0
patterns = sum(len(t.variants) for p in passes for t in p.traced)
cfg = ModelConfig.preset("tiny", num_layers=layers)
model = LlamaForCausalLM(cfg, device=device)
prompts = random_prompts(cfg, lengths=[8, 5, 2], seed=0)
names, bufs = zip(*model.named_buffers())
# Weights as graph inputs, as in the post-grad graph Inductor hands to custom passes.
fn = lambda ids, pos, *b: torch.func.functional_call(model, dict(zip(names, b)), (ids, pos))
with torch.no_grad(), ModelRunner(model).prefill_context(prompts) as (ids, pos):
    with compat.fake_mode() as mode:
        gm = compat.trace_functional(fn, [mode.from_tensor(t) for t in (ids, pos, *bufs)], v2=True)
fxfuse.reset_match_table()
t0 = time.perf_counter(); fxfuse.PassManager(passes)(gm.graph); apply_s = time.perf_counter() - t0
table = {k: sum(v.values()) for k, v in fxfuse.match_table().items()}
print(json.dumps(dict(layers=layers, register_ms=register_s * 1e3, patterns=patterns, apply_ms=apply_s * 1e3,
                      nodes=len(gm.graph.nodes), matches=table, torch=torch.__version__)))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for n in args.layers:
        runs = [json.loads(subprocess.run([sys.executable, "-c", CHILD, str(n), args.device], capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]) for _ in range(args.repeats)]
        med = lambda key: sorted(r[key] for r in runs)[len(runs) // 2]  # noqa: E731
        rows.append({**runs[0], "register_ms": med("register_ms"), "apply_ms": med("apply_ms")})
    print(f"torch {rows[0]['torch']}, median of {args.repeats} fresh processes")
    print(f"{'layers':>6} {'register ms':>12} {'patterns':>9} {'graph nodes':>12} {'apply ms':>9}  matches")
    for r in rows:
        print(f"{r['layers']:>6} {r['register_ms']:>12.1f} {r['patterns']:>9} {r['nodes']:>12} {r['apply_ms']:>9.1f}  {r['matches']}")


if __name__ == "__main__":
    main()
