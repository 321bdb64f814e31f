"""What fxfuse costs at start-up, and that it does not grow with the number of layers.

For each layer count, in fresh processes: ``import fxfuse`` over ``import torch``;
``default_passes()`` (registration) with the trace cache warm, and cold (an empty cache
directory: every rewrite traced); the patterns registered; the passes applied to the
reference model's functionalized graph (the pipeline's first application in the process,
as a compile's is); and with ``--compile``, fxfuse's share of the model's first
``torch.compile``: the time spent in its two stages (`PassManager.seconds`: the pre-stage
observation, the passes, the cleanup) next to the whole compile with and without the
passes (compile caches off).

Usage: python benchmarks/registration_vs_layers.py [--layers 1 32] [--device cpu] [--repeats 3] [--compile] [--no-cold]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, sys, time
t0 = time.perf_counter()
import torch
torch_s = time.perf_counter() - t0
t0 = time.perf_counter()
import fxfuse
import_s = time.perf_counter() - t0
from fxfuse import compat
from fxfuse.models import LlamaForCausalLM, ModelConfig, ModelRunner, random_prompts
layers, device, compile_too = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
t0 = time.perf_counter(); passes = fxfuse.default_passes(); register_s = time.perf_counter() - t0
cached = sum(t.cached for p in passes for t in p.traced)
cfg = ModelConfig.preset("tiny", num_layers=layers)
model = LlamaForCausalLM(cfg, device=device)
prompts = random_prompts(cfg, lengths=[8, 5, 2], seed=0)
out = dict(layers=layers, torch_ms=torch_s * 1e3, import_ms=import_s * 1e3, register_ms=register_s * 1e3,
           cached=cached, rewrites=sum(len(p.traced) for p in passes), torch=torch.__version__)
if not compile_too:
    names, bufs = zip(*model.named_buffers())
    # Weights as graph inputs, as in the post-grad graph Inductor hands to custom passes.
    fn = lambda ids, pos, *b: torch.func.functional_call(model, dict(zip(names, b)), (ids, pos))
    with torch.no_grad(), ModelRunner(model).prefill_context(prompts) as (ids, pos):
        with compat.fake_mode() as mode:
            gm = compat.trace_functional(fn, [mode.from_tensor(t) for t in (ids, pos, *bufs)], v2=True)
    fxfuse.reset_match_table()
    # Built first: its first construction imports Inductor's pass base class, which any
    # compile has imported already; what is timed is the application.
    manager = fxfuse.PassManager(passes)
    t0 = time.perf_counter(); manager(gm.graph); apply_s = time.perf_counter() - t0
    out.update(apply_ms=apply_s * 1e3, nodes=len(gm.graph.nodes), patterns=sum(len(t.variants) for p in passes for t in p.traced),
               matches={k: sum(v.values()) for k, v in fxfuse.match_table().items()})
else:
    from fxfuse.models import run
    seconds = {}
    with compat.compile_caches_disabled():
        for name in ("unfused", "fused"):
            torch._dynamo.reset()
            manager = fxfuse.PassManager(passes)
            fwd = torch.compile(model, fullgraph=True) if name == "unfused" else fxfuse.compile(model, passes=manager, fullgraph=True)
            t0 = time.perf_counter(); run(model, fwd, prompts, 1); seconds[name] = time.perf_counter() - t0
    out.update(compile_s=seconds, stage_ms={k: v * 1e3 for k, v in manager.seconds.items()},
               matches={k: sum(v.values()) for k, v in fxfuse.match_table().items()})
print(json.dumps(out))
"""


def _child(layers: int, device: str, compile_too: bool, cache_dir: str) -> dict:
    env = {**os.environ, "FXFUSE_CACHE_DIR": cache_dir}
    out = subprocess.run([sys.executable, "-c", CHILD, str(layers), device, "1" if compile_too else "0"],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-4000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time fxfuse's share of the first compile")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold registration (an empty trace cache)")
    args = ap.parse_args()
    med = lambda runs, key: sorted(r[key] for r in runs)[len(runs) // 2]  # noqa: E731
    warm_dir = tempfile.mkdtemp(prefix="fxfuse-bench-cache-")
    cold = None
    if not args.no_cold:  # the first child fills the cache: registration with every rewrite traced
        cold = _child(args.layers[0], args.device, False, warm_dir)
    rows = []
    for n in args.layers:
        runs = [_child(n, args.device, False, warm_dir) for _ in range(args.repeats)]
        row = {**runs[0], **{k: med(runs, k) for k in ("import_ms", "register_ms", "apply_ms", "torch_ms")}}
        if args.compile:
            c = _child(n, args.device, True, warm_dir)
            row.update(compile_s=c["compile_s"], stage_ms=c["stage_ms"], compile_matches=c["matches"])
        rows.append(row)
    print(f"torch {rows[0]['torch']}, {args.device}, median of {args.repeats} fresh processes"
          + (f"; cold registration (empty trace cache, {cold['rewrites']} rewrites traced): {cold['register_ms']:.0f} ms"
             if cold else ""))
    print(f"{'layers':>6} {'import torch ms':>15} {'import fxfuse ms':>16} {'register ms':>12} {'from cache':>10} "
          f"{'patterns':>9} {'graph nodes':>12} {'apply ms':>9}  matches")
    for r in rows:
        print(f"{r['layers']:>6} {r['torch_ms']:>15.0f} {r['import_ms']:>16.0f} {r['register_ms']:>12.1f} "
              f"{r['cached']:>5}/{r['rewrites']:<4} {r['patterns']:>9} {r['nodes']:>12} {r['apply_ms']:>9.1f}  {r['matches']}")
    if args.compile:
        print(f"\n{'layers':>6} {'compile unfused s':>18} {'compile fused s':>16} {'fxfuse pre ms':>14} {'fxfuse post ms':>15} "
              f"{'fxfuse share ms':>16}")
        for r in rows:
            share = r["register_ms"] + sum(r["stage_ms"].values())
            print(f"{r['layers']:>6} {r['compile_s']['unfused']:>18.1f} {r['compile_s']['fused']:>16.1f} "
                  f"{r['stage_ms']['pre']:>14.1f} {r['stage_ms']['post']:>15.1f} {share:>16.1f}")
        print("(fxfuse share = registration + the time the compile spent in fxfuse's two stages; the two whole "
              "compiles differ by more than that, from run to run, on a loaded machine)")


if __name__ == "__main__":
    main()
