"""The ``fxfuse`` command: ``demo``, ``bench``, ``patterns``, ``explain``."""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import json
import sys
import textwrap
import time
from typing import Any, Sequence

import torch

import fxfuse

from . import compat


#: ``--model``: each family's CPU preset (what ``--preset tiny`` means for it) and real one.
MODEL_PRESETS: dict[str, tuple[str, str]] = {
    "llama": ("tiny", "llama3-8b"),
    "qwen3": ("qwen3-tiny", "qwen3-8b"),
    "gemma3": ("gemma3-tiny", "gemma3-12b"),
}


#: How the demo names each family.
MODEL_NAMES: dict[str, str] = {"llama": "Llama", "qwen3": "Qwen3", "gemma3": "Gemma 3"}


def resolve_model(model: str | None, preset: str) -> tuple[str, str]:
    """``(family, preset name)`` of ``--model``/``--preset``: ``tiny`` is the family's CPU
    preset (``--model`` defaults to ``llama``); another preset names its family, which
    ``--model`` must then agree with. Raises ``ValueError`` naming the mismatch.

    Example:
        >>> resolve_model("qwen3", "tiny"), resolve_model(None, "gemma3-12b")
        (('qwen3', 'qwen3-tiny'), ('gemma3', 'gemma3-12b'))
    """
    from .models import PRESETS

    if preset == "tiny":
        family = model or "llama"
        return family, MODEL_PRESETS[family][0]
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; valid presets: {', '.join(sorted(PRESETS))}")
    family = PRESETS[preset].family
    if model is not None and model != family:
        raise ValueError(f"--preset {preset} is a {family} model, not {model}; its family's presets: "
                         f"{', '.join(MODEL_PRESETS[model])} (or --preset tiny)")
    return family, preset


def _config(args: argparse.Namespace, tp_size: int | None = None):
    from .models import ModelConfig

    overrides = {"num_layers": args.layers} if args.layers is not None else {}
    tp_size = getattr(args, "tp", 1) if tp_size is None else tp_size
    return ModelConfig.preset(args.preset, quant=args.quant, tp_size=tp_size, **overrides)


def _model(args: argparse.Namespace, tp_size: int | None = None):
    from .models import build_model, random_prompts

    cfg = _config(args, tp_size)
    model = build_model(cfg, device=args.device, attention_backend=args.attention_backend)
    # Ragged on purpose: one batch mixes sequences of different lengths.
    lengths = [max(1, args.prompt_len - 3 * i) for i in range(args.batch)]
    prompts = random_prompts(cfg, lengths=lengths, seed=args.seed)
    return cfg, model, prompts


#: The attention output quant scheme each model quant mode feeds its output projection:
#: an attention-quant fusion exists only where the model quantizes attention's output
#: per tensor (FP8) or as NVFP4; block-scaled FP8 quantizes it per token group, which no
#: attention backend writes itself.
ATTENTION_OUTPUT_SCHEME: dict[str, str | None] = {"fp8": "fp8_static", "nvfp4": "nvfp4", "fp8-block": None}


def _spec(cfg: Any) -> Any:
    """The model family of ``cfg`` (a config without one, as tests build them, is a Llama)."""
    from .models.config import FAMILIES

    return FAMILIES[getattr(cfg, "family", "llama")]


def expected_matches(model: Any) -> dict[str, int]:
    """What DESIGN §6 and the model families promise for the reference ``model`` of ``n`` layers:

    - ``rms_quant_fusion``: ``2n`` (the norms before QKV and gate/up; Gemma's ``(1 + w)``
      norms too, except with ``fp8-block``, for which no fused Gemma norm + group quant op
      exists);
    - ``act_quant_fusion``: ``n`` where the MLP's activation is ``silu_and_mul`` (Llama,
      Qwen3; Gemma 3's GeGLU is plain PyTorch: 0);
    - ``attn_quant_fusion``: one per layer whose attention backend declares it can write
      the model's output quant scheme itself;
    - ``qk_norm_rope_fusion``: ``n`` in the families with a per-head q/k norm (Qwen3,
      Gemma 3), which takes their rotation;
    - ``rope_kv_cache_fusion``: in the others (Llama), one per layer whose backend applies
      the rotary embedding itself (`AttentionBackend.fuses_rope`).

    Under tensor parallelism (``tp_size > 1``; counts per rank) each of the ``2n``
    all-reduces feeds a residual norm and ``allreduce_rms_fusion`` fuses all of them, with
    the norm-quant chains they carry: ``rms_quant_fusion`` keeps layer 0's input norm only.

    Example:
        >>> expected_matches(LlamaForCausalLM(ModelConfig.preset("tiny"), attention_backend="native-noquant"))
        {'rms_quant_fusion': 4, 'act_quant_fusion': 2, 'attn_quant_fusion': 0, 'qk_norm_rope_fusion': 0, 'rope_kv_cache_fusion': 2}
    """
    from .attention import get_layer

    cfg = model.config
    spec = _spec(cfg)
    n = cfg.num_layers
    if cfg.quant not in ATTENTION_OUTPUT_SCHEME:
        raise ValueError(f"expected_matches: no attention output scheme known for quant {cfg.quant!r}; "
                         f"known: {sorted(ATTENTION_OUTPUT_SCHEME)}")
    scheme = ATTENTION_OUTPUT_SCHEME[cfg.quant]
    layers = [get_layer(name) for name in model.attention_layer_names]
    attn = 0 if scheme is None else sum(layer.backend.supports_output_quant(scheme) for layer in layers)
    norm_quant = 0 if spec.norm == "gemma" and cfg.quant == "fp8-block" else 2 * n
    want = {
        "rms_quant_fusion": norm_quant,
        "act_quant_fusion": n if spec.activation == "silu" else 0,
        "attn_quant_fusion": attn,
        "qk_norm_rope_fusion": n if spec.qk_norm else 0,
        "rope_kv_cache_fusion": 0 if spec.qk_norm else sum(layer.backend.fuses_rope for layer in layers),
    }
    if getattr(cfg, "tp_size", 1) > 1:
        want = {"allreduce_rms_fusion": 2 * n, **want, "rms_quant_fusion": 1}
    return want


def expected_misses(model: Any, passes: Sequence[fxfuse.FusionPass]) -> dict[str, dict[str, int]]:
    """The near misses (`fxfuse.miss_table`) the reference ``model`` is known to have, per
    pass and rewrite, for one compiled graph:

    - the final norm: a fused add + norm whose output feeds the unquantized LM head; one
      miss of every ``rms_quant_fusion`` rewrite whose chain starts at that norm's op
      (``fused_add_rms_norm``, or ``fused_add_gemma_rms_norm`` in Gemma 3; not under tensor
      parallelism: ``allreduce_rms_fusion`` fuses it with the all-reduce before it, and no
      all-reduce is left unfused, so that pass has no misses either);
    - Gemma 3's sandwich norms (``gemma_rms_norm`` of the attention and of the MLP output,
      feeding the residual add, not a quant): ``2n``, for every rewrite starting at
      ``gemma_rms_norm``; with ``fp8-block`` every Gemma norm is a miss (no fused Gemma
      norm + group quant op): ``2n + 1`` at ``gemma_rms_norm`` (layer 0's input norm too),
      ``2n`` at ``fused_add_gemma_rms_norm`` (the other input norms, the pre-MLP norms,
      the final norm);
    - attention on a layer whose backend does not write the model's output quant scheme
      itself (``native-noquant``; or ``fp8-block``, whose per-group quant no backend
      writes): one miss of each ``attn_quant_fusion`` rewrite per such layer;
    - the rotation of a layer whose backend does not apply it itself (no built-in one):
      one miss of each ``rope_kv_cache_fusion`` rewrite per such layer (Llama; the q/k
      norm families' rotation goes into ``qk_norm_rope``).

    Anything else is a fusion that stopped matching.

    Example:
        >>> expected_misses(model, fxfuse.default_passes())["rms_quant_fusion"]
        {'FusedAddRmsNormStaticFp8Quant': 1, 'FusedAddRmsNormDynamicFp8Quant': 1, ...}
    """
    fx = torch.ops.fxfuse
    cfg = model.config
    spec = _spec(cfg)
    n = cfg.num_layers
    want = expected_matches(model)
    unfused_attention = n - want["attn_quant_fusion"]
    unfused_rope = 0 if spec.qk_norm else n - want["rope_kv_cache_fusion"]
    final_norm_fused = getattr(cfg, "tp_size", 1) > 1
    gemma = spec.norm == "gemma"
    block = cfg.quant == "fp8-block"
    # rms_quant_fusion: misses per anchor op of a rewrite.
    norm_misses = {
        fx.fused_add_rms_norm.default: 0 if gemma or final_norm_fused else 1,
        fx.fused_add_gemma_rms_norm.default: (2 * n if block else 1) if gemma else 0,
        fx.gemma_rms_norm.default: (2 * n + 1 if block else 2 * n) if gemma else 0,
    }
    table: dict[str, dict[str, int]] = {}
    for p in passes:
        for t in p.traced:
            if not t.rewrite.report_misses:
                continue
            if p.name == "rms_quant_fusion":
                count = norm_misses.get(t.anchors[0].target, 0)
            elif p.name == "attn_quant_fusion":
                count = unfused_attention
            elif p.name == "rope_kv_cache_fusion":
                count = unfused_rope
            else:
                count = 0
            if count:
                table.setdefault(p.name, {})[t.name] = count
    return table


# What the demo's compile timings mean; printed under them and written to the JSON.
TIMING_NOTE = (
    "compile+prefill is the first call, compilation included. Both variants are timed in the same "
    "state: after an untimed warm-up that compiles a 1-layer model in both variants (so one-time "
    "start-up costs land in neither), with Inductor's compile caches off (each variant compiles "
    "from scratch; neither is served from an earlier run's cache)."
)


def demo(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("fxfuse demo: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.tp > 1:
        return _demo_tensor_parallel(args)
    return _demo(args)


def _demo_tensor_parallel(args: argparse.Namespace) -> int:
    """``--tp N``: the same model at ``tp_size=1`` runs here first (eagerly: the reference
    tokens and logits), then N processes run the demo, one rank each, and rank 0 reports."""
    from .models import run

    if args.device == "cuda" and torch.cuda.device_count() < args.tp:
        print(f"fxfuse demo: --tp {args.tp} on cuda needs {args.tp} GPUs, {torch.cuda.device_count()} visible",
              file=sys.stderr)
        return 2
    try:
        _config(args)  # a model that does not split into tp ranks fails here, once, not in every rank
    except ValueError as e:
        print(f"fxfuse demo: --tp {args.tp}: {e}", file=sys.stderr)
        return 2
    _, model, prompts = _model(args, tp_size=1)
    try:
        reference = run(model, None, prompts, args.new_tokens)
    finally:
        model.close()
    tp1 = (reference.tokens.cpu(), reference.logits.cpu())
    return fxfuse.distributed.spawn(_demo, args.tp, (args, tp1), device=args.device)


def _demo(args: argparse.Namespace, tp1: tuple[torch.Tensor, torch.Tensor] | None = None) -> int:
    """The demo in this process: all of it at ``--tp 1``; at ``--tp N`` this rank's part,
    with ``tp1`` the reference ``(tokens, prefill logits)`` of the model at ``tp_size=1``.
    Only rank 0 prints; the match and miss tables are summed over the ranks."""
    rank = torch.distributed.get_rank() if args.tp > 1 else 0
    with contextlib.redirect_stdout(sys.stdout if rank == 0 else io.StringIO()):
        return _demo_report(args, tp1, rank)


def _demo_report(args: argparse.Namespace, tp1: tuple[torch.Tensor, torch.Tensor] | None, rank: int) -> int:
    cfg, model, prompts = _model(args)
    t0 = time.perf_counter()
    manager = fxfuse.PassManager(fxfuse.default_passes())
    register_s = time.perf_counter() - t0

    tp = f", tensor parallel over {args.tp} ranks (counts: all ranks)" if args.tp > 1 else ""
    print(f"fxfuse demo: {args.preset} {MODEL_NAMES[cfg.family]}, {cfg.num_layers} layers, {args.quant}, {args.device}{tp}, "
          f"attention backend {args.attention_backend}, torch {torch.__version__}; "
          f"prompts of {[len(p) for p in prompts]} tokens, {args.new_tokens} new each")
    print(f"\npipeline (registered in {register_s * 1e3:.0f} ms):")
    for i, line in enumerate(manager.describe(), 1):
        print(f"  {i}. {line}")

    if args.no_timing:  # counts and tokens only: no warm-up, and compile caches may serve
        warm_up_s = None
        unfused, fused, table, misses = _run_variants(model, manager, prompts, args.new_tokens)
    else:
        with compat.compile_caches_disabled():
            warm_up_s = _warm_up(args, manager)
            unfused, fused, table, misses = _run_variants(model, manager, prompts, args.new_tokens)
    want = expected_matches(model)
    want_misses = expected_misses(model, manager.passes)
    if args.tp > 1:  # every rank's tables, summed (the expected counts are per rank)
        table, misses = fxfuse.distributed.gather_match_table(), fxfuse.distributed.gather_tables(misses)
        want = {name: args.tp * n for name, n in want.items()}
        want_misses = {p: {r: args.tp * n for r, n in rows.items()} for p, rows in want_misses.items()}
    got = {name: sum(table.get(name, {}).values()) for name in want}
    _print_matches(table, want, got)
    _print_misses(misses, want_misses)
    diff = (fused.logits.float() - unfused.logits.float()).abs().max().item()
    same_tokens = torch.equal(fused.tokens, unfused.tokens)
    print(f"\nmax |fused - unfused| of prefill logits: {diff:.3g}")
    print(f"greedy tokens identical: {'yes' if same_tokens else 'NO'}")
    tp1_equal, tp1_diff = True, None
    if tp1 is not None:
        tp1_equal = torch.equal(fused.tokens.cpu(), tp1[0].cpu())
        tp1_diff = (fused.logits.float().cpu() - tp1[1].float()).abs().max().item()
        print(f"max |fused at tp {args.tp} - eager at tp 1| of prefill logits: {tp1_diff:.3g}")
        print(f"greedy tokens identical to tp 1: {'yes' if tp1_equal else 'NO'}")
    _print_timings(unfused, fused, warm_up_s)

    if args.json and rank == 0:
        _write_json(args.json, {
            "match_table": table,
            "expected_matches": want,
            "miss_table": misses,
            "expected_misses": want_misses,
            "max_abs_diff": diff,
            "tokens_fused": fused.tokens.tolist(),
            "tokens_unfused": unfused.tokens.tolist(),
            "tokens_equal": same_tokens,
            "tp": args.tp,
            **({"tokens_tp1": tp1[0].tolist(), "tokens_equal_tp1": tp1_equal, "max_abs_diff_tp1": tp1_diff}
               if tp1 is not None else {}),
            "layers": cfg.num_layers,
            "model": cfg.family,
            "preset": args.preset,
            "device": args.device,
            "quant": args.quant,
            "attention_backend": args.attention_backend,
            "torch": torch.__version__,
            "register_s": register_s,
            "warm_up_s": warm_up_s,
            "compile_s": {"fused": fused.compile_s, "unfused": unfused.compile_s},
            "run_s": {"fused": fused.run_s, "unfused": unfused.run_s},
            "timing_note": TIMING_NOTE,
        })
    ok = same_tokens and tp1_equal and got == want and misses == want_misses
    if not ok and rank == 0:
        print("\nfxfuse demo: FAILED (see MISMATCH/NO above)", file=sys.stderr)
    return 0 if ok else 1


def _variants(model: Any, manager: fxfuse.PassManager) -> dict[str, Any]:
    """The demo's two compiles of ``model``, in the order they run."""
    return {
        "unfused": torch.compile(model, fullgraph=True),
        "fused": fxfuse.compile(model, passes=manager, fullgraph=True),
    }


def _warm_up(args: argparse.Namespace, manager: fxfuse.PassManager) -> float:
    """Compile and run a 1-layer tiny model of the demo's family in both variants, untimed;
    returns its seconds.

    The first compile in a process pays for imports, compiler start-up and first uses
    that later compiles do not; without this, whichever variant runs first looks slower.
    Run with compile caches off, like the timed runs, so nothing it compiles serves them.
    """
    from .models import ModelConfig, build_model, random_prompts, run

    t0 = time.perf_counter()
    try:
        cfg = ModelConfig.preset(MODEL_PRESETS[args.model][0], quant=args.quant, num_layers=1, tp_size=args.tp)
    except ValueError:  # the tiny model does not split into that many ranks: the run's model, 1 layer
        cfg = dataclasses.replace(_config(args), num_layers=1)
    model = build_model(cfg, device=args.device, attention_backend=args.attention_backend)
    try:
        prompts = random_prompts(cfg, lengths=[3, 2], seed=args.seed + 1)
        for forward in _variants(model, manager).values():
            torch._dynamo.reset()
            run(model, forward, prompts, 2)  # a prefill and a decode step, as the timed runs do
    finally:
        model.close()
    fxfuse.reset_match_table()
    return time.perf_counter() - t0


def _run_variants(model: Any, manager: fxfuse.PassManager, prompts: Any, new_tokens: int) -> tuple[Any, Any, dict, dict]:
    """Run ``prompts`` through each variant; returns (unfused, fused, and the fused
    compile's match and miss tables)."""
    from .models import run

    results = {}
    for name, forward in _variants(model, manager).items():
        torch._dynamo.reset()
        fxfuse.reset_match_table()
        results[name] = run(model, forward, prompts, new_tokens)
    return results["unfused"], results["fused"], fxfuse.match_table(), fxfuse.miss_table()


def _print_matches(table: dict[str, dict[str, int]], want: dict[str, int], got: dict[str, int]) -> None:
    print("\nmatches:")
    width = max([34, *(len(r) for rows in table.values() for r in rows)])
    for pass_name, rewrites in sorted(table.items()):
        for rewrite, n in sorted(rewrites.items()):
            print(f"  {pass_name:<20} {rewrite:<{width}} {n:>4}")
    for name, n in want.items():
        verdict = "ok" if got[name] == n else "MISMATCH"
        print(f"  {name:<20} {'total (expected ' + str(n) + ')':<{width}} {got[name]:>4}  {verdict}")


def _print_misses(misses: dict[str, dict[str, int]], want: dict[str, dict[str, int]]) -> None:
    print("\nnear misses (sites where a chain starts but was not fused; `fxfuse explain` says why):")
    width = max([34, *(len(r) for table in (misses, want) for rows in table.values() for r in rows)])
    for pass_name in sorted(set(misses) | set(want)):
        for rewrite in sorted(set(misses.get(pass_name, {})) | set(want.get(pass_name, {}))):
            n, w = misses.get(pass_name, {}).get(rewrite, 0), want.get(pass_name, {}).get(rewrite, 0)
            verdict = "expected" if n == w else f"MISMATCH (expected {w})"
            print(f"  {pass_name:<20} {rewrite:<{width}} {n:>4}  {verdict}")
    if not misses and not want:
        print("  none")


def _print_timings(unfused: Any, fused: Any, warm_up_s: float | None) -> None:
    if warm_up_s is None:
        print("\ntimings: not measured (--no-timing: no warm-up, compile caches on)")
        return
    print(f"\n{'':<10}{'compile+prefill s':>18}{'decode s':>10}")
    print(f"{'unfused':<10}{unfused.compile_s:>18.2f}{unfused.run_s:>10.2f}")
    print(f"{'fused':<10}{fused.compile_s:>18.2f}{fused.run_s:>10.2f}")
    print(textwrap.fill(f"{TIMING_NOTE} The warm-up took {warm_up_s:.1f} s.", width=100))


def _write_json(path: str, result: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def patterns(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    passes = fxfuse.default_passes()
    total = time.perf_counter() - t0
    for p in passes:
        print(f"# pass {p.name}")
        if not p.traced:
            print(f"#   ({_without_patterns(p)})\n")
        for traced in p.traced:
            kinds = ", ".join(f"{a.name}: {'Tensor' if a.kind is torch.Tensor else a.kind.__name__}"
                              f"{' | None' if a.optional else ''}" for a in traced.args)
            print(f"# {traced.name} ({kinds}); found from {traced.anchors[0]}")
            for v in traced.variants:
                if v.swaps:
                    continue  # commuted variants: the same pattern with operands swapped
                print(f"# [{v.label}]")
                print(v.pattern.source(traced.name, [a.name for a in traced.args]))
                print()
    if args.timing:
        _print_timing(passes, total)
    return 0


def _print_timing(passes: Sequence[fxfuse.FusionPass], total: float) -> None:
    """Registration time per pass: as it happened in this process (rewrites traced, or read
    from the trace cache), then again from the cache this process holds."""
    traced = [t for p in passes for t in p.traced]
    cached = sum(t.cached for t in traced)
    print(f"registration of all built-in passes: {total * 1e3:.1f} ms "
          f"({cached} of {len(traced)} rewrites from the trace cache, {len(traced) - cached} traced)")
    rows = []
    for p in passes:
        t0 = time.perf_counter()
        # Copies, not fresh instances: rewrites may take parameters (native_lowering's do);
        # and the pass's own canonicalizations, which its patterns are traced under.
        if type(p) is not fxfuse.FusionPass:
            type(p)()
        else:
            fxfuse.FusionPass(p.name, [copy.copy(r) for r in p.rewrites], canonicalize=p.canonicalizations)
        again = (time.perf_counter() - t0) * 1e3
        patterns = sum(len(t.variants) for t in p.traced)
        rows.append((p.name, str(len(p.rewrites)), str(patterns), f"{sum(t.cached for t in p.traced)}/{len(p.traced)}",
                     f"{again:.1f}"))
    header = ("pass", "rewrites", "patterns", "from cache", "again ms")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def _without_patterns(p: fxfuse.FusionPass) -> str:
    """What a pass without registered patterns does, for `patterns`."""
    if type(p) is not fxfuse.FusionPass:  # a subclass that walks the graph itself says what it does
        return f"graph walk, no patterns: {(type(p).__doc__ or '').strip().splitlines()[0]}"
    if p.name == "native_lowering":
        from .passes.native_lowering import present_devices

        return (f"no rewrites in this process: its kernel-choices table lowers no op on the devices present "
                f"({', '.join(present_devices())}); `fxfuse bench --write-choices PATH` measures a device's table")
    return "no rewrites registered"


def explain_cmd(args: argparse.Namespace) -> int:
    from .models import ModelRunner

    passes = fxfuse.default_passes()
    known = [r.name for p in passes for r in p.rewrites]
    if args.rewrite is not None and args.rewrite not in known:  # before building and compiling a model
        print(f"fxfuse explain: no rewrite named {args.rewrite!r}; known: {', '.join(known)}", file=sys.stderr)
        return 2
    _, model, prompts = _model(args)
    # The model itself, not its captured graphs: explain then sees each graph as Inductor
    # received it too, and reports the chains Inductor rewrote before a pass ran.
    with torch.no_grad(), ModelRunner(model).prefill_context(prompts) as (input_ids, positions):
        report = fxfuse.explain(model, passes, input_ids, positions, rewrite=args.rewrite, verbose=args.all)
    print(report)
    return 0


def bench_cmd(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(args)


COMMANDS = {"demo": "demo", "patterns": "patterns", "explain": "explain_cmd", "bench": "bench_cmd"}


def run(args: argparse.Namespace) -> Any:
    """Run a parsed command (`fxfuse_cli.parse`): ``--model``/``--preset`` are resolved here
    (the presets are `fxfuse.models`'), a disagreement exits 2."""
    if args.command in ("demo", "explain"):
        try:
            args.model, args.preset = resolve_model(args.model, args.preset)
        except ValueError as e:
            print(f"fxfuse {args.command}: {e}", file=sys.stderr)
            return 2
    return globals()[COMMANDS[args.command]](args)


def main(argv: Sequence[str] | None = None) -> Any:
    """Entry point of the ``fxfuse`` command (see `fxfuse_cli.main`, which parses before
    importing fxfuse).

    Example:
        >>> main(["demo", "--layers", "2", "--json", "out.json"])
    """
    import fxfuse_cli

    return fxfuse_cli.main(argv)


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (defined in `fxfuse_cli`, which imports no torch)."""
    import fxfuse_cli

    return fxfuse_cli.build_parser()


if __name__ == "__main__":
    sys.exit(main())
