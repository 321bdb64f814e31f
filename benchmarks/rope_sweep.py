"""Rotary embedding, per-head q/k norm + rotary, and Gemma RMSNorm: fxfuse's kernels
against eager PyTorch, Inductor and the copy-bandwidth floor, with a launch-config sweep of
the rotary kernel (H100/H200 tuning of fxfuse/kernels/rotary.py:rope_launch).

Usage: python benchmarks/rope_sweep.py [--out DIR] [--only qk,rope,gemma] [--tokens 1,16,256,4096,16384]
                                       [--models qwen3-8b,gemma3-27b,gemma3-12b] [--no-sweep] [--reps 25]
       python benchmarks/rope_sweep.py --check      # CPU or GPU: every variant once, outputs compared, no timing

Sections (``--only``):

- ``qk``: the attention prologue of Qwen3 (``qk_norm_rope``: RMSNorm of every q and k head,
  bf16 weights, then NeoX rotary) and Gemma 3 (``qk_gemma_norm_rope``: Gemma's ``(1 + w)``
  norm, fp32 weights), at each model's head shapes (``MODELS``), q and k being slices of one
  packed qkv projection as in the model. Per token count: fxfuse's fused op (as dispatched:
  the kernel), fxfuse's unfused ops (the per-head norm op, then ``rotary_embedding``), the
  native chain eagerly, ``torch.compile`` of the native chain (token dim dynamic, as a
  served model compiles it), and the floor: bytes the op must move (q and k read and
  written, the tokens' cache rows, the positions) over the measured copy bandwidth. Then
  the kernel at every launch config of ``CONFIGS`` (heads per block x warps), each checked
  to give the default launch's bits.
- ``rope``: ``rotary_embedding`` alone, full rotary at Qwen3-8B's shapes and partial
  rotary (64 of 128 features, GPT-J pairs) at the same head counts.
- ``gemma``: the Gemma RMSNorm ops (plain, residual add, + static FP8, + per-token FP8) at
  Gemma 3's hidden sizes, fp32 weights: eager, Inductor, fxfuse, floor.

Every time is a cold-L2 median of CUDA-graph replays (`fxfuse.bench.timing`: the graph's
calls rotate through input copies past twice the L2). Prints one line per measurement,
then the targets of issue 21 for the fused qk op (>= 85% of copy bandwidth at >= 4096
tokens; faster than Inductor at every size >= 16 tokens) as PASS/MISS lines. Writes
``DIR/rope_sweep.json`` (environment, copy bandwidth, every row, the best config per shape,
the target lines). Exit status 1 if a config's bits differ from the default launch's, or
an fxfuse variant's output from eager's by more than the norm's summation order explains
(Inductor's differences are reported, not counted).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable

import torch

import fxfuse.ops  # noqa: F401  (registers the ops)
from fxfuse.ops import gemma_norm as gn
from fxfuse.ops.rotary import qk_gemma_norm_rope_native, qk_norm_rope_native, rotary_cos_sin_cache, rotary_embedding_native

fx = torch.ops.fxfuse
EPS = 1e-6
MAX_POSITION = 32768


@dataclasses.dataclass(frozen=True)
class Model:
    """Attention head shapes of one model: q heads, kv heads, head size, rotary dim, style, norm."""

    name: str
    q_heads: int
    kv_heads: int
    head_size: int
    rotary_dim: int
    neox: bool
    gemma: bool
    hidden: int


MODELS = {
    "qwen3-8b": Model("qwen3-8b", 32, 8, 128, 128, True, False, 4096),
    "gemma3-27b": Model("gemma3-27b", 32, 16, 128, 128, True, True, 5376),
    "gemma3-12b": Model("gemma3-12b", 16, 8, 256, 256, True, True, 3840),
    "gemma3-4b": Model("gemma3-4b", 8, 4, 256, 256, True, True, 2560),
}
#: rotary_embedding alone: Qwen3-8B's heads, full rotary (NeoX) and half the head (GPT-J pairs).
ROPE_SHAPES = {
    "qwen3-8b-full-neox": Model("qwen3-8b-full-neox", 32, 8, 128, 128, True, False, 4096),
    "partial-64of128-gptj": Model("partial-64of128-gptj", 32, 8, 128, 64, False, False, 4096),
}
#: (heads_per_block, num_warps) launches timed besides the default (None, None).
CONFIGS = [(4, 2), (8, 2), (8, 4), (16, 4), (32, 4), (16, 8), (32, 8)]


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    return 0


def _compiled(fn: Callable, dynamic_args: tuple[int, ...]) -> Callable:
    """``torch.compile`` of ``fn`` with the token dim of the arguments ``dynamic_args`` dynamic."""
    compiled = torch.compile(fn, fullgraph=True)

    def call(*args):
        for i in dynamic_args:
            if args[i].shape[0] > 1:
                torch._dynamo.mark_dynamic(args[i], 0)
        return compiled(*args)

    return call


# --------------------------------------------------------------------------- inputs


def qk_inputs(m: Model, tokens: int, device: str) -> dict[str, Any]:
    """q and k as slices of one packed qkv, positions, the cache, norm weights."""
    width = (m.q_heads + 2 * m.kv_heads) * m.head_size
    qkv = torch.randn(tokens, width, device=device, dtype=torch.bfloat16)
    q_end, k_end = m.q_heads * m.head_size, (m.q_heads + m.kv_heads) * m.head_size
    wdt = torch.float32 if m.gemma else torch.bfloat16
    base = 0.0 if m.gemma else 1.0
    return dict(
        positions=torch.randint(0, MAX_POSITION, (tokens,), device=device),
        query=qkv[:, :q_end], key=qkv[:, q_end:k_end],
        q_weight=(base + 0.1 * torch.randn(m.head_size, device=device)).to(wdt),
        k_weight=(base + 0.1 * torch.randn(m.head_size, device=device)).to(wdt),
        cache=rotary_cos_sin_cache(MAX_POSITION, m.rotary_dim, base=1e6, device=device),
    )


def qk_floor_bytes(a: dict) -> int:
    """Bytes the fused op must move: q and k read and written, the positions, one cache row a token."""
    tokens = a["positions"].shape[0]
    return (2 * (_nbytes(a["query"]) + _nbytes(a["key"])) + _nbytes(a["positions"])
            + tokens * a["cache"].shape[1] * a["cache"].element_size()
            + _nbytes(a.get("q_weight")) + _nbytes(a.get("k_weight")))


# --------------------------------------------------------------------------- the variants


def qk_variants(m: Model) -> dict[str, Callable[[dict], Any]]:
    """name -> call on an input dict, for the fused qk norm + rope."""
    hd, neox = m.head_size, m.neox
    op = fx.qk_gemma_norm_rope if m.gemma else fx.qk_norm_rope
    norm_op = fx.gemma_rms_norm if m.gemma else fx.rms_norm
    native = qk_gemma_norm_rope_native if m.gemma else qk_norm_rope_native

    def per_head(x, w):
        # The unfused op needs contiguous heads: a slice of the packed qkv is copied first,
        # as a model calling the norm op on it would.
        t = x.shape[0]
        return norm_op(x.reshape(t, -1, hd).contiguous(), w, EPS).reshape(t, -1)

    def unfused(a):
        return fx.rotary_embedding(a["positions"], per_head(a["query"], a["q_weight"]),
                                   per_head(a["key"], a["k_weight"]), hd, a["cache"], neox)

    def chain(p, q, k, qw, kw, cache):
        return native(p, q, k, qw, kw, EPS, hd, cache, neox)

    inductor = _compiled(chain, (0, 1, 2))
    args = lambda a: (a["positions"], a["query"], a["key"], a["q_weight"], a["k_weight"], a["cache"])  # noqa: E731
    return {
        "fxfuse": lambda a: op(a["positions"], a["query"], a["key"], a["q_weight"], a["k_weight"], EPS, hd,
                               a["cache"], neox),
        "fxfuse_unfused": unfused,
        "eager": lambda a: chain(*args(a)),
        "inductor": lambda a: inductor(*args(a)),
    }


def rope_variants(m: Model) -> dict[str, Callable[[dict], Any]]:
    hd, neox = m.head_size, m.neox

    def chain(p, q, k, cache):
        return rotary_embedding_native(p, q, k, hd, cache, neox)

    inductor = _compiled(chain, (0, 1, 2))
    args = lambda a: (a["positions"], a["query"], a["key"], a["cache"])  # noqa: E731
    return {
        "fxfuse": lambda a: fx.rotary_embedding(*args(a)[:3], hd, a["cache"], neox),
        "eager": lambda a: chain(*args(a)),
        "inductor": lambda a: inductor(*args(a)),
    }


@dataclasses.dataclass(frozen=True)
class NormCase:
    name: str
    inputs: Callable[[int, int, str], tuple]
    native: Callable[..., Any]
    op: Callable[..., Any]


def _x(t, w, device):
    return torch.randn(t, w, device=device, dtype=torch.bfloat16)


def _gw(w, device):
    return 0.1 * torch.randn(w, device=device)  # Gemma's fp32 offsets


def _s(device):
    return torch.tensor([0.05], device=device)


GEMMA_CASES = (
    NormCase("gemma_rms_norm", lambda t, w, d: (_x(t, w, d), _gw(w, d), EPS), gn.gemma_rms_norm_native,
             fx.gemma_rms_norm),
    NormCase("fused_add_gemma_rms_norm", lambda t, w, d: (_x(t, w, d), _x(t, w, d), _gw(w, d), EPS),
             gn.fused_add_gemma_rms_norm_native, fx.fused_add_gemma_rms_norm),
    NormCase("gemma_rms_norm_static_fp8_quant", lambda t, w, d: (_x(t, w, d), _gw(w, d), _s(d), EPS),
             gn.gemma_rms_norm_static_fp8_quant_native, fx.gemma_rms_norm_static_fp8_quant),
    NormCase("fused_add_gemma_rms_norm_static_fp8_quant",
             lambda t, w, d: (_x(t, w, d), _x(t, w, d), _gw(w, d), _s(d), EPS),
             gn.fused_add_gemma_rms_norm_static_fp8_quant_native, fx.fused_add_gemma_rms_norm_static_fp8_quant),
    NormCase("gemma_rms_norm_dynamic_per_token_fp8_quant", lambda t, w, d: (_x(t, w, d), _gw(w, d), EPS),
             gn.gemma_rms_norm_dynamic_per_token_fp8_quant_native, fx.gemma_rms_norm_dynamic_per_token_fp8_quant),
    NormCase("fused_add_gemma_rms_norm_dynamic_per_token_fp8_quant",
             lambda t, w, d: (_x(t, w, d), _x(t, w, d), _gw(w, d), EPS),
             gn.fused_add_gemma_rms_norm_dynamic_per_token_fp8_quant_native,
             fx.fused_add_gemma_rms_norm_dynamic_per_token_fp8_quant),
)


# --------------------------------------------------------------------------- measuring


class Timer:
    """Cold-L2 CUDA-graph medians; with ``check`` (any device) each call runs once, untimed."""

    def __init__(self, check: bool, reps: int):
        self.check, self.reps = check, reps

    def copies(self, make: Callable[[], Any], nbytes: int) -> list:
        if self.check:
            return [make()]
        from fxfuse.bench.timing import cold_copies

        return cold_copies(make, nbytes)

    def us(self, fn: Callable[[Any], Any], copies: list) -> float:
        if self.check:
            fn(copies[0])
            return float("nan")
        from fxfuse.bench.timing import graph_us

        return graph_us([lambda a=a: fn(a) for a in copies], reps=self.reps)


def _same(a, b) -> bool:
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    view = lambda t: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t  # noqa: E731
    return all(torch.equal(view(x), view(y)) for x, y in zip(a, b))


def _close(a, b, ulps: float = 3.0) -> bool:
    """A plumbing check, not a precision test (tests/ do that): at most 0.1% of the elements
    of each output more than ``ulps`` steps of its dtype apart (FP8: codes that differ). The
    kernels' norms sum in another order than torch, which can move a rare element, and a
    per-token FP8 scale with it."""
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    for x, y in zip(a, b):
        if x.dtype == torch.float8_e4m3fn:
            bad = x.view(torch.uint8) != y.view(torch.uint8)
        else:
            x32, y32 = x.float(), y.float()
            step = ulps * torch.finfo(x.dtype).eps * torch.maximum(x32.abs(), y32.abs()).clamp_min(1e-30)
            bad = (x32 - y32).abs() > step
        if float(bad.float().mean()) > 1e-3:
            return False
    return True


def _mismatch(variant: str, ok: bool) -> str:
    if ok:
        return ""
    # Inductor's code for the native chain is not held to eager's bits (it may keep the
    # norm's output in fp32 where eager rounds it, contract multiply-adds, ...): reported only.
    return "  (differs from eager)" if variant == "inductor" else "  DIFFERS FROM EAGER"


def _pct(floor: float, us: float) -> float:
    return 100 * floor / us if us == us and us > 0 else float("nan")


def run_heads(section: str, m: Model, variants: dict, tokens: list[int], timer: Timer, bandwidth: float,
              device: str, sweep: bool, log) -> list[dict]:
    from fxfuse import kernels
    from fxfuse.kernels import rotary as R

    rows = []
    for t in tokens:
        probe = qk_inputs(m, t, device)
        nbytes = qk_floor_bytes(probe if section == "qk" else {k: v for k, v in probe.items() if "weight" not in k})
        floor = nbytes / bandwidth * 1e6
        ref = variants["eager"](probe)
        for name, fn in variants.items():
            fn(probe)  # compiles (Inductor, Triton) outside the timing
        copies = timer.copies(lambda: qk_inputs(m, t, device), nbytes)
        times = {}
        for name, fn in variants.items():
            out = fn(probe)
            ok = _close(out, ref) if section == "qk" else _same(out, ref)
            times[name] = timer.us(fn, copies)
            rows.append(dict(section=section, model=m.name, tokens=t, variant=name, us=times[name], floor_us=floor,
                             bytes=nbytes, pct_bw=_pct(floor, times[name]), matches_eager=ok, cold_copies=len(copies)))
            log(f"  {section:4s} {m.name:22s} T={t:<6d} {name:16s} {times[name]:9.2f} us  "
                f"{_pct(floor, times[name]):5.1f}% bw" + _mismatch(name, ok))
        if sweep and kernels.available(device):
            norm = (R.NORM_GEMMA if m.gemma else R.NORM_RMS) if section == "qk" else R.NORM_NONE

            def launch(a, hb=None, w=None):
                return R.rope(a["positions"], a["query"], a["key"], m.head_size, a["cache"], m.neox, norm=norm,
                              q_weight=a["q_weight"], k_weight=a["k_weight"], eps=EPS, heads_per_block=hb,
                              num_warps=w)

            default = launch(probe)
            for hb, w in CONFIGS:
                try:
                    same = _same(launch(probe, hb, w), default)
                    us = timer.us(lambda a, hb=hb, w=w: launch(a, hb, w), copies)
                except Exception as e:  # noqa: BLE001 - a config that does not launch is reported, not fatal
                    log(f"  {section:4s} {m.name:22s} T={t:<6d} hb={hb} w={w} failed: {type(e).__name__}: {e}"[:160])
                    continue
                rows.append(dict(section=section, model=m.name, tokens=t, variant=f"config hb={hb} w={w}",
                                 config=[hb, w], us=us, floor_us=floor, bytes=nbytes, pct_bw=_pct(floor, us),
                                 same_bits_as_default=same, cold_copies=len(copies)))
                log(f"  {section:4s} {m.name:22s} T={t:<6d} hb={hb:<3d} w={w:<2d}       {us:9.2f} us  "
                    f"{_pct(floor, us):5.1f}% bw" + ("" if same else "  BITS DIFFER FROM THE DEFAULT"))
        del probe, copies
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def run_gemma(tokens: list[int], widths: list[int], timer: Timer, bandwidth: float, device: str, log) -> list[dict]:
    rows = []
    for case in GEMMA_CASES:
        inductor = _compiled(case.native, (0, 1) if case.name.startswith("fused_add") else (0,))
        variants = {"fxfuse": case.op, "eager": case.native, "inductor": inductor}
        for w in widths:
            for t in tokens:
                args = case.inputs(t, w, device)
                nbytes = _nbytes(args) + _nbytes(case.op(*args))
                floor = nbytes / bandwidth * 1e6
                ref = case.native(*args)
                for fn in variants.values():
                    fn(*args)
                copies = timer.copies(lambda: case.inputs(t, w, device), _nbytes(args))
                for name, fn in variants.items():
                    ok = _close(fn(*args), ref, ulps=1.0)
                    us = timer.us(lambda a, fn=fn: fn(*a), copies)
                    rows.append(dict(section="gemma", model=case.name, tokens=t, width=w, variant=name, us=us,
                                     floor_us=floor, bytes=nbytes, pct_bw=_pct(floor, us), matches_eager=ok,
                                     cold_copies=len(copies)))
                    log(f"  gemma {case.name:52s} W={w:<5d} T={t:<6d} {name:9s} {us:9.2f} us  {_pct(floor, us):5.1f}% bw"
                        + _mismatch(name, ok))
                del args, copies
    return rows


def summarize(rows: list[dict], log) -> dict:
    """Best config per qk/rope shape, and issue 21's targets for the fused qk op."""
    best, targets = [], []
    shapes = dict.fromkeys((r["section"], r["model"], r["tokens"]) for r in rows if r["section"] in ("qk", "rope"))
    log("\nper shape (cold L2): fxfuse as dispatched, the best config, Inductor")
    for sec, model, t in shapes:
        sel = {r["variant"]: r for r in rows if (r["section"], r["model"], r["tokens"]) == (sec, model, t)}
        ours = [r for r in sel.values() if r["variant"] == "fxfuse" or r.get("same_bits_as_default")]
        top = min(ours, key=lambda r: r["us"])
        fx_row, ind = sel["fxfuse"], sel["inductor"]
        best.append(dict(section=sec, model=model, tokens=t, best=top["variant"], best_us=top["us"],
                         fxfuse_us=fx_row["us"], inductor_us=ind["us"], pct_bw=fx_row["pct_bw"]))
        log(f"  {sec:4s} {model:22s} T={t:<6d} fxfuse {fx_row['us']:8.2f} us {fx_row['pct_bw']:5.1f}% bw | best "
            f"{top['variant']} {top['us']:8.2f} | inductor {ind['us']:8.2f} (x{ind['us'] / fx_row['us']:.2f})")
        if sec == "qk":
            if t >= 4096:
                ok = fx_row["pct_bw"] >= 85
                targets.append(dict(model=model, tokens=t, target=">= 85% of copy bandwidth", ok=ok,
                                    value=fx_row["pct_bw"]))
            if t >= 16:
                ok = fx_row["us"] < ind["us"]
                targets.append(dict(model=model, tokens=t, target="faster than Inductor", ok=ok,
                                    value=ind["us"] / fx_row["us"]))
    log("\nissue 21 targets (fused qk norm + rope, as dispatched):")
    for tg in targets:
        log(f"  {'PASS' if tg['ok'] else 'MISS'}  {tg['model']:12s} T={tg['tokens']:<6d} {tg['target']:26s} "
            + (f"{tg['value']:.1f}%" if "bandwidth" in tg["target"] else f"x{tg['value']:.2f} vs Inductor"))
    return dict(best=best, targets=targets)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="rope_sweep_out", help="directory for rope_sweep.json")
    p.add_argument("--only", default="qk,rope,gemma")
    p.add_argument("--tokens", default="1,16,256,4096,16384")
    p.add_argument("--models", default="qwen3-8b,gemma3-27b,gemma3-12b", help=f"of {', '.join(MODELS)}")
    p.add_argument("--gemma-widths", default="5376,3840,2560", help="hidden sizes for the Gemma norm ops")
    p.add_argument("--no-sweep", action="store_true", help="skip the launch-config sweep")
    p.add_argument("--reps", type=int, default=25, help="graph replays per median")
    p.add_argument("--check", action="store_true",
                   help="run every variant once at the given tokens and compare outputs; no timing (works on CPU)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.check:
        print("rope_sweep: needs a CUDA device to time (--check runs the variants once on the CPU)")
        return 0
    sections = args.only.split(",")
    tokens = [int(t) for t in args.tokens.split(",")]
    start = time.time()
    torch._dynamo.config.recompile_limit = 64
    timer = Timer(args.check, args.reps)
    if args.check:
        bandwidth, env = 1e12, dict(device=device, torch=torch.__version__)
    else:
        from fxfuse.bench import environment
        from fxfuse.bench.timing import copy_bandwidth

        bandwidth = copy_bandwidth()
        env = dict(environment(), copy_bandwidth_GBps=bandwidth / 1e9)
    print(f"rope_sweep on {env['device']}, torch {env['torch']}"
          + ("" if args.check else f"; copy bandwidth {env['copy_bandwidth_GBps']:.0f} GB/s; cold-L2 medians of "
             "CUDA-graph replays"), flush=True)
    log = lambda s: print(s, flush=True)  # noqa: E731
    rows = []
    if "qk" in sections:
        for name in args.models.split(","):
            m = MODELS[name]
            rows += run_heads("qk", m, qk_variants(m), tokens, timer, bandwidth, device, not args.no_sweep, log)
    if "rope" in sections:
        for m in ROPE_SHAPES.values():
            rows += run_heads("rope", m, rope_variants(m), tokens, timer, bandwidth, device, not args.no_sweep, log)
    if "gemma" in sections:
        rows += run_gemma(tokens, [int(w) for w in args.gemma_widths.split(",")], timer, bandwidth, device, log)
    summary = summarize(rows, log) if not args.check and any(s in sections for s in ("qk", "rope")) else {}
    differ = [r for r in rows if r.get("same_bits_as_default") is False
              or (r.get("matches_eager") is False and r["variant"] != "inductor")]
    print(f"\n{len(differ)} fxfuse row(s) whose output differs (from the default launch, or from eager beyond "
          f"the norm's summation order); {time.time() - start:.0f} s in all")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "rope_sweep.json")
    with open(path, "w") as f:
        json.dump(dict(env, rows=rows, **summary, seconds=time.time() - start), f, indent=1)
    print(f"written to {path}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
