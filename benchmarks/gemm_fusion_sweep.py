"""Measure the small-batch GEMM's fused forms (``gemm_fusion``) against the unfused chains
they replace, at decode token counts, and write the table entries the pass and the fused
ops read (fxfuse/kernels/small_gemm_choices.json, one entry per fused form).

Usage: python benchmarks/gemm_fusion_sweep.py --out DIR [--write-choices PATH]
           [--tokens 1,4,16,32,64] [--forms KEY,...] [--budget-s 150] [--reps 20]

Run it after ``benchmarks/small_gemm_sweep.py --write-choices PATH`` with
``FXFUSE_SMALL_GEMM_CHOICES=PATH``: the unfused chain is the fxfuse ops as they dispatch
(the activation or norm kernel, and the GEMM where the device's table puts it: the
small-batch kernel or cuBLAS), so a form is chosen only where it beats what would run
instead. For each form (`FORMS`, the reference model's chains first), the Llama-3-8B
weights it occurs at, and each token count: the chain, and the fused kernel at its
default config (`default_fused_config`) and at the plain GEMM's measured config for that
shape (where the table has one and it fits); cold-L2 medians of CUDA-graph replays
(copies of the weight and activations rotated past twice the L2); each fused output
checked against the chain's (another GEMM summation order: values within one FP8 step or
two bf16 steps on all but 1% of elements, no element further than two FP8 steps).

Writes ``DIR/gemm_fusion_sweep.json`` (rows, best per shape, entries); ``--write-choices
PATH`` merges this device's entries into the table at PATH (other ops and devices kept):
per form and weight shape, the token counts up to which the fused form beats the chain by
more than 3% at every measured count (`choices_from_rows`). The ``unfused`` numbers are
kernels: where ``native_lowering`` hands an epilogue op to Inductor in a compiled model,
the chain there is what Inductor makes of it, which this sweep does not time.
Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time
from typing import Callable

import torch

from fxfuse.bench import environment
from fxfuse.bench.timing import cold_copies, graph_us
from fxfuse.kernels import num_sms
from fxfuse.kernels.small_gemm_config import (
    SmallGemmConfig, choices_from_rows, default_config, default_fused_config, load_choices, write_choices,
)

FP8 = torch.float8_e4m3fn
BF16 = torch.bfloat16
DEVICE = "cuda"
#: Llama-3-8B's linears (N, K).
LINEARS = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096),
           "down_proj": (4096, 14336)}
TOKENS = (1, 4, 16, 32, 64)


@dataclasses.dataclass(frozen=True)
class Form:
    """A fused form: its table key, the linears it occurs at, its scheme (``fp8``:
    per-tensor FP8, ``fp8-block``), its epilogue (``none``, ``silu`` or ``rows``, for
    the default config), and how to call it fused (with a config) and unfused."""

    key: str
    linears: tuple[str, ...]
    scheme: str
    kind: str
    fused: Callable
    chain: Callable


fx = torch.ops.fxfuse


def _sg():
    from fxfuse.kernels import small_gemm

    return small_gemm


# A call's inputs are a dict: x (bf16) and its quantized forms (x_q/s per tensor, xb_q/xb_s
# per group), the weight w (FP8) with its scales ws (per tensor) and wbs (128x128 blocks),
# the residual r and norm weight nw of a norm epilogue, the output's static scale s2.
def _fp8_fused(x_in: str, epilogue: str = "none", out_scale: bool = False, norm: bool = False):
    def call(a, cfg):
        extra = dict(epilogue=epilogue, out_scale=a["s2"] if out_scale else None)
        if norm:
            extra.update(residual=a["r"], norm_weight=a["nw"], eps=1e-5)
        x = a["x"] if x_in in ("static", "dynamic") else a["x_q"]
        return _sg().small_fp8_linear_fused(x, None if x_in == "dynamic" else a["s"], a["w"], a["ws"], None, BF16,
                                            config=cfg, **extra)
    return call


def _block_fused(x_in: str, epilogue: str = "none", out_group: bool = False, norm: bool = False):
    def call(a, cfg):
        extra = dict(epilogue=epilogue, out_group_size=128 if out_group else 0, column_major_scales=True)
        if norm:
            extra.update(residual=a["r"], norm_weight=a["nw"], eps=1e-5)
        if x_in == "group":
            return _sg().small_block_fp8_linear_fused(a["x"], None, a["w"], a["wbs"], None, BF16, group_size=128,
                                                      config=cfg, **extra)
        return _sg().small_block_fp8_linear_fused(a["xb_q"], a["xb_s"], a["w"], a["wbs"], None, BF16, group_size=128,
                                                  config=cfg, **extra)
    return call


FORMS = (
    # The reference model's chains (fp8: o_proj and down_proj into the next norm, gate_up into SiLU-and-mul,
    # the last down_proj into the final norm), then fp8-block's, then the rest.
    Form("fp8_linear>fused_add_rms_norm_static_fp8_quant", ("o_proj", "down_proj"), "fp8", "rows",
         _fp8_fused("fp8", "fused_add_rms_norm", True, True),
         lambda a: list(fx.fused_add_rms_norm_static_fp8_quant(fx.fp8_linear(a["x_q"], a["w"], a["s"], a["ws"]),
                                                               a["r"], a["nw"], a["s2"], 1e-5))),
    Form("fp8_linear>silu_and_mul_static_fp8_quant", ("gate_up_proj",), "fp8", "silu",
         _fp8_fused("fp8", "silu_and_mul", True),
         lambda a: [fx.silu_and_mul_static_fp8_quant(fx.fp8_linear(a["x_q"], a["w"], a["s"], a["ws"]), a["s2"])]),
    Form("fp8_linear>fused_add_rms_norm", ("down_proj",), "fp8", "rows", _fp8_fused("fp8", "fused_add_rms_norm",
                                                                                    False, True),
         lambda a: list(fx.fused_add_rms_norm(fx.fp8_linear(a["x_q"], a["w"], a["s"], a["ws"]), a["r"], a["nw"],
                                              1e-5))),
    Form("group_fp8_quant>block_fp8_linear>fused_add_rms_norm_group_fp8_quant", ("o_proj",), "fp8-block", "rows",
         _block_fused("group", "fused_add_rms_norm", True, True),
         lambda a: list(fx.fused_add_rms_norm_group_fp8_quant(
             fx.block_fp8_linear(*fx.group_fp8_quant(a["x"], 128, True), a["w"], a["wbs"]), a["r"], a["nw"], 1e-5,
             128, True))),
    Form("block_fp8_linear>silu_and_mul_group_fp8_quant", ("gate_up_proj",), "fp8-block", "silu",
         _block_fused("fp8", "silu_and_mul", True),
         lambda a: list(fx.silu_and_mul_group_fp8_quant(fx.block_fp8_linear(a["xb_q"], a["xb_s"], a["w"], a["wbs"]),
                                                        128, True))),
    Form("block_fp8_linear>fused_add_rms_norm_group_fp8_quant", ("down_proj",), "fp8-block", "rows",
         _block_fused("fp8", "fused_add_rms_norm", True, True),
         lambda a: list(fx.fused_add_rms_norm_group_fp8_quant(fx.block_fp8_linear(a["xb_q"], a["xb_s"], a["w"],
                                                                                  a["wbs"]), a["r"], a["nw"], 1e-5,
                                                              128, True))),
    Form("block_fp8_linear>fused_add_rms_norm", ("down_proj",), "fp8-block", "rows",
         _block_fused("fp8", "fused_add_rms_norm", False, True),
         lambda a: list(fx.fused_add_rms_norm(fx.block_fp8_linear(a["xb_q"], a["xb_s"], a["w"], a["wbs"]), a["r"],
                                              a["nw"], 1e-5))),
    Form("static_scaled_fp8_quant>fp8_linear>fused_add_rms_norm_static_fp8_quant", ("o_proj",), "fp8", "rows",
         _fp8_fused("static", "fused_add_rms_norm", True, True),
         lambda a: list(fx.fused_add_rms_norm_static_fp8_quant(
             fx.fp8_linear(fx.static_scaled_fp8_quant(a["x"], a["s"]), a["w"], a["s"], a["ws"]), a["r"], a["nw"],
             a["s2"], 1e-5))),
    Form("static_scaled_fp8_quant>fp8_linear", ("o_proj", "qkv_proj"), "fp8", "none", _fp8_fused("static"),
         lambda a: [fx.fp8_linear(fx.static_scaled_fp8_quant(a["x"], a["s"]), a["w"], a["s"], a["ws"])]),
    Form("group_fp8_quant>block_fp8_linear", ("o_proj",), "fp8-block", "none", _block_fused("group"),
         lambda a: [fx.block_fp8_linear(*fx.group_fp8_quant(a["x"], 128, True), a["w"], a["wbs"])]),
    Form("dynamic_per_token_fp8_quant>fp8_linear", ("qkv_proj", "o_proj"), "fp8", "none", _fp8_fused("dynamic"),
         lambda a: [fx.fp8_linear(*_swap(fx.dynamic_per_token_fp8_quant(a["x"]), a["w"]), a["ws"])]),
    Form("fp8_linear>silu_and_mul", ("gate_up_proj",), "fp8", "silu", _fp8_fused("fp8", "silu_and_mul"),
         lambda a: [fx.silu_and_mul(fx.fp8_linear(a["x_q"], a["w"], a["s"], a["ws"]))]),
)


def _swap(qs, w):
    q, s = qs
    return q, w, s


def _make(m: int, n: int, k: int):
    """One set of inputs at ``m`` tokens through an ``n x k`` weight (fresh weights: a
    cold-L2 copy)."""
    from fxfuse.ops.block_linear import quantize_weight_blocks

    x = torch.randn(m, k, device=DEVICE, dtype=BF16)
    s = torch.tensor([float(x.float().abs().max()) / 448.0], device=DEVICE)
    w = torch.randn(n, k, device=DEVICE) * k**-0.5
    ws = torch.tensor([float(w.abs().max()) / 448.0], device=DEVICE)
    x_q = fx.static_scaled_fp8_quant(x, s)
    xb_q, xb_s = fx.group_fp8_quant(x, 128, True)
    w_q = (w / ws).to(FP8)
    _, wbs = quantize_weight_blocks(w)
    width = n  # the residual and norm weight of a norm epilogue: the output width
    return dict(x=x, s=s, x_q=x_q, xb_q=xb_q, xb_s=xb_s, w=w_q, ws=ws, wbs=wbs,
                r=torch.randn(m, width, device=DEVICE, dtype=BF16),
                nw=(1 + 0.1 * torch.randn(width, device=DEVICE)).to(BF16),
                s2=torch.tensor([0.02], device=DEVICE))


def _close(got: list, want: list) -> bool:
    """Fused outputs against the chain's: another GEMM summation order can move a bf16
    output one step and so a quantized one an FP8 step (module docstring)."""
    for g, w in zip(got, want):
        if g.shape != w.shape or g.dtype != w.dtype:
            return False
        gf, wf = g.float(), w.float()
        rel = 0.126 if g.dtype == FP8 else 2.0**-7
        scale = wf.abs().max().clamp(min=1e-30)
        bad = (gf - wf).abs() > rel * wf.abs() + 2**-9 * scale
        far = (gf - wf).abs() > 2.1 * rel * wf.abs() + 2**-8 * scale
        if bool(far.any()) or bad.float().mean().item() > 0.01:
            return False
    return True


def configs_for(form: Form, m: int, n: int, k: int, table: dict, device: str, sms: int) -> list[SmallGemmConfig]:
    """The fused default, and the plain GEMM's measured config for this shape at the
    smallest measured count >= ``m`` with the same row tile (where it fits the form); for
    a norm epilogue each with the epilogue in the GEMM's last program and in a second
    kernel (``row_tail``)."""
    from fxfuse.kernels.small_gemm_config import block_m_for, shape_key

    group_k = 128 if form.scheme == "fp8-block" else None
    out_group = 128 if form.key.endswith("group_fp8_quant") else None
    if form.kind == "none":
        out = [default_config(m, n, k, group_k, sms)]
    else:
        out = [default_fused_config(form.kind, m, n, k, group_k, out_group, sms)]
    op = "fp8_linear" if form.scheme == "fp8" else "block_fp8_linear"
    per_m = table.get("devices", {}).get(device, {}).get(op, {}).get("configs", {}).get(shape_key(n, k), {})
    counts = sorted(int(t) for t in per_m if int(t) >= m and block_m_for(int(t)) == block_m_for(m))
    if counts:
        cfg = SmallGemmConfig.from_dict(per_m[str(counts[0])])
        fits = (group_k is None or cfg.block_k % group_k == 0) and (out_group is None or cfg.block_n % out_group == 0)
        if fits and cfg not in out:
            out.append(cfg)
    if form.kind == "rows":  # the norm in the GEMM's last program, and in a second kernel, for each
        out += [c for c in (dataclasses.replace(c, row_tail=not c.row_tail) for c in list(out)) if c not in out]
    return out


def form_rows(form: Form, linear: str, m: int, table: dict, device: str, sms: int, reps: int, log) -> list[dict]:
    """The chain and the fused form at every config, at one shape; one row each."""
    n, k = LINEARS[linear]
    sets = cold_copies(lambda: _make(m, n, k), n * k)
    first = sets[0]
    want = form.chain(first)
    rows = []
    chain_us = graph_us([lambda a=a: form.chain(a) for a in sets], reps=reps)
    rows.append(dict(op=form.key, linear=linear, n=n, k=k, tokens=m, kind="chain", label="chain", config=None,
                     us=chain_us, matches_chain=None))
    log(f"  {form.key:70s} {linear:12s} M={m:<3d} chain                    {chain_us:8.2f} us")
    for cfg in configs_for(form, m, n, k, table, device, sms):
        try:
            ok = _close(form.fused(first, cfg), want)
            us = graph_us([lambda a=a: form.fused(a, cfg) for a in sets], reps=reps)
        except Exception as e:  # noqa: BLE001 - a config that does not launch is reported, not fatal
            log(f"  {form.key:70s} {linear:12s} M={m:<3d} {cfg.label():24s} failed: {type(e).__name__}: {str(e)[:90]}")
            continue
        rows.append(dict(op=form.key, linear=linear, n=n, k=k, tokens=m, kind="fused", label=cfg.label(),
                         config=cfg.as_dict(), us=us, matches_chain=ok))
        log(f"  {form.key:70s} {linear:12s} M={m:<3d} {cfg.label():24s} {us:8.2f} us  x{chain_us / us:.2f}"
            + ("" if ok else "  DIFFERS FROM THE CHAIN"))
    del sets, first, want
    return rows


def best_rows(rows: list[dict]) -> list[dict]:
    """Per form, shape and token count: the fastest fused config that matches the chain,
    with the chain's time as the baseline (`choices_from_rows`' rows)."""
    out = []
    keys = dict.fromkeys((r["op"], r["n"], r["k"], r["tokens"]) for r in rows)
    for op, n, k, m in keys:
        sel = [r for r in rows if (r["op"], r["n"], r["k"], r["tokens"]) == (op, n, k, m)]
        chain = next((r for r in sel if r["kind"] == "chain"), None)
        fused = [r for r in sel if r["kind"] == "fused" and r["matches_chain"]]
        if chain is None or not fused:
            continue
        top = min(fused, key=lambda r: r["us"])
        out.append(dict(op=op, linear=top["linear"], n=n, k=k, tokens=m, us=top["us"], baseline_us=chain["us"],
                        config=top["config"], label=top["label"], speedup=chain["us"] / top["us"]))
    return out


def have_cuda() -> bool:
    return torch.cuda.is_available()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gemm_fusion_sweep", help="directory for gemm_fusion_sweep.json")
    p.add_argument("--write-choices", metavar="PATH", help="merge this device's fused-form entries into PATH")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    p.add_argument("--forms", help="comma-separated form keys (default: all, the reference model's first)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--budget-s", type=float, default=150.0, help="start no new form and shape past this many seconds")
    args = p.parse_args(argv)
    if not have_cuda():
        print("gemm_fusion_sweep: needs a CUDA device; nothing to do on this machine")
        return 0
    forms = list(FORMS)
    if args.forms:
        known = {f.key: f for f in FORMS}
        unknown = [key for key in args.forms.split(",") if key not in known]
        if unknown:
            print(f"gemm_fusion_sweep: unknown forms {unknown}; known: {list(known)}", file=sys.stderr)
            return 2
        forms = [known[key] for key in args.forms.split(",")]
    start = time.time()
    env = environment()
    table = load_choices()
    sms = num_sms(torch.device(DEVICE))
    print(f"gemm_fusion_sweep on {env['device']}, torch {env['torch']}, triton {env['triton']}; small-GEMM table "
          f"{os.environ.get('FXFUSE_SMALL_GEMM_CHOICES', '(shipped)')}: ops measured here "
          f"{sorted(table.get('devices', {}).get(env['device'], {}))}", flush=True)
    log = lambda s: print(s, flush=True)  # noqa: E731
    tokens = [int(t) for t in args.tokens.split(",")]
    rows, skipped = [], []
    for form in forms:
        for linear in form.linears:
            if time.time() - start > args.budget_s:
                skipped.append(f"{form.key} {linear}")
                continue
            for m in tokens:
                rows += form_rows(form, linear, m, table, env["device"], sms, args.reps, log)
            torch.cuda.empty_cache()
    best = best_rows(rows)
    entry = choices_from_rows(best) if best else {}
    print("\nfused form: largest token count up to which it beats the chain by > 3% at every measured count:")
    for key, e in entry.items():
        print(f"  {key:70s} max_tokens {e['max_tokens']:<3d} by_shape {e['by_shape']}")
    differ = [r for r in rows if r["matches_chain"] is False]
    if skipped:
        print(f"out of time (--budget-s {args.budget_s:.0f}): skipped {', '.join(skipped)}")
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gemm_fusion_sweep.json").write_text(json.dumps(dict(env, rows=rows, best=best, choices=entry,
                                                                    skipped=skipped, seconds=time.time() - start),
                                                               indent=1))
    print(f"{len(differ)} row(s) differ from their chain; written to {out_dir / 'gemm_fusion_sweep.json'} "
          f"({time.time() - start:.0f} s)")
    if args.write_choices and entry:
        stamp = f"{env['date']}, torch {env['torch']}, triton {env['triton']}, `benchmarks/gemm_fusion_sweep.py`"
        write_choices(args.write_choices, env["device"], entry, stamp, merge=True)
        print(f"fused-form entries of {env['device']} merged into {args.write_choices}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
