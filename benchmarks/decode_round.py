"""Issue 20's GPU round in one command: tests, measured tables, decode profile, end to end.

Usage (repository root, one GPU):

    python benchmarks/decode_round.py --out $OUT [--sections tests,small-gemm,fusion,block-gemm,e2e]
        [--layers 32] [--budget-s 560] [--quant fp8] [--variants baseline,unfused,fused]
        [--small-gemm-choices PATH] [--block-gemm-choices PATH]

Sections, in order, each a subprocess with its own time limit (what is left of
``--budget-s``, at most its cap), its output appended to ``$OUT/decode_round.log``:

- ``tests``: the GPU tests of this issue's kernels (the fused GEMM forms against their
  unfused kernels, the block-FP8 launches against native; `tests/test_gemm_fusion.py`,
  `tests/test_block_linear.py`);
- ``small-gemm``: ``benchmarks/small_gemm_sweep.py`` at Llama-3-8B shapes, 1/4/16/32/64
  tokens, for the ``--quant`` schemes: the small-batch GEMM's % of copy bandwidth on the
  weight bytes (targets >= 85% at 1 token, >= 80% at 16-64), and the measured dispatch
  table; skipped where the shipped table has this GPU's entry already (``--remeasure``);
- ``fusion``: ``benchmarks/gemm_fusion_sweep.py`` on the reference model's chains: each
  fused form against the unfused chain under that table; their entries join it;
- ``block-gemm``: ``benchmarks/block_gemm_sweep.py`` at 4096 tokens: the block-FP8 GEMM's
  launches against per-tensor ``_scaled_mm`` (target: within 15%), the best one's table;
- ``e2e``: ``fxfuse bench --only e2e --e2e-profile`` under the measured tables: decode at 1
  and 32 sequences (context 1024) and a 1x2048 prefill of ``--layers`` Llama-3-8B
  layers, each variant (``baseline``: before issue 20; ``unfused``; ``fused``) against the
  weight-read floor, every decode step profiled (kernels per layer by family, each GEMM's
  share of copy bandwidth; ``baseline`` is the "before" profile).

Files back under ``$OUT`` (the device tool returns at most 8): ``decode_round.json`` (every
section's results, the targets and their verdicts; rewritten after each section, so a run
cut short keeps what finished), ``decode_round.log``, ``small_gemm_choices.json`` and
``block_gemm_choices.json`` (the shipped tables with this run's measurements merged in:
copy them to src/fxfuse/kernels/ to ship them). ``--small-gemm-choices`` /
``--block-gemm-choices`` start from tables of an earlier round instead (for a second call
that only runs ``e2e``: ``--sections e2e``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
SECTIONS = ("tests", "small-gemm", "fusion", "block-gemm", "e2e")
#: Each section's cap in seconds (the e2e section takes what is left).
CAPS = {"tests": 150, "small-gemm": 120, "fusion": 80, "block-gemm": 75, "e2e": 600}
#: The fused forms of the reference model's chains, per quant scheme (what e2e runs).
MODEL_FORMS = {
    "fp8": ("fp8_linear>fused_add_rms_norm_static_fp8_quant", "fp8_linear>silu_and_mul_static_fp8_quant",
            "fp8_linear>fused_add_rms_norm"),
    "fp8-block": ("group_fp8_quant>block_fp8_linear>fused_add_rms_norm_group_fp8_quant",
                  "block_fp8_linear>silu_and_mul_group_fp8_quant",
                  "block_fp8_linear>fused_add_rms_norm_group_fp8_quant", "block_fp8_linear>fused_add_rms_norm"),
}


def _commands(args, work: pathlib.Path, small: pathlib.Path, block: pathlib.Path) -> dict[str, list[str]]:
    py = sys.executable
    quants = args.quant.split(",")
    schemes = ",".join(quants)
    forms = ",".join(f for q in quants for f in MODEL_FORMS.get(q, ()))
    return {
        "tests": [py, "-m", "pytest", "-q", "--maxfail=10", "-p", "no:cacheprovider", "tests/test_gemm_fusion.py",
                  "tests/test_block_linear.py", "-k", "prologues or epilogues or near_the_native or block_forms or "
                  "whole_groups or large_launch or cuda_op", f"--junitxml={work / 'tests.xml'}"],
        "small-gemm": [py, "benchmarks/small_gemm_sweep.py", "--out", str(work), "--models", "8b",
                       "--tokens", "1,4,16,32,64", "--schemes", schemes, "--write-choices", str(small),
                       "--budget-s", str(CAPS["small-gemm"] - 25)],
        "fusion": [py, "benchmarks/gemm_fusion_sweep.py", "--out", str(work), "--forms", forms,
                   "--write-choices", str(small), "--budget-s", str(CAPS["fusion"] - 20)],
        "block-gemm": [py, "benchmarks/block_gemm_sweep.py", "--out", str(work), "--tokens", "4096",
                       "--write", str(block), "--budget-s", str(CAPS["block-gemm"] - 20)],
        "e2e": [py, "-m", "fxfuse", "bench", "--only", "e2e", "--e2e-profile", "--e2e-models", args.models,
                "--e2e-quant", args.quant,
                "--e2e-variants", args.variants, "--e2e-decode", args.decode, "--e2e-prefill", args.prefill,
                "--layers", str(args.layers), "--json", str(work / "e2e.json")],
    }


#: Where each section leaves its results in the work directory.
RESULTS = {"tests": None, "small-gemm": "small_gemm_sweep.json", "fusion": "gemm_fusion_sweep.json",
           "block-gemm": "block_gemm_sweep.json", "e2e": "e2e.json"}


def targets(results: dict) -> dict:
    """Issue 20's targets from the sections' results: ``{name: {goal, measured, met}}``.

    >>> targets({})
    {}
    """
    out = {}
    sweep = results.get("small-gemm") or {}
    for name, t in (sweep.get("targets") or {}).items():
        out[f"small GEMM % of copy BW, {name}"] = dict(goal=f">= {t['goal_pct']:.0f}%", measured=t["worst_pct"],
                                                       where=t["worst"], met=t["met"])
    block = results.get("block-gemm") or {}
    if block.get("target"):
        t = block["target"]
        out["block-FP8 GEMM over per-tensor _scaled_mm at 4096 tokens"] = dict(
            goal=f"<= {t['target']:.2f}x", measured=t["worst"], where=t["best"], met=t["met"])
    e2e = (results.get("e2e") or {}).get("e2e") or []
    for row in e2e:
        if row["phase"] != "decode" or "fused" not in row.get("pct_floor", {}):
            continue
        pct = row["pct_floor"]["fused"]
        out[f"{row['quant']} decode batch {row['seqs']}: % of the weight + KV read floor"] = dict(
            goal=">= 80%", measured=pct, before=row["pct_floor"].get("baseline"), met=pct >= 80.0)
        prof = row.get("profile") or {}
        if "fused" in prof and ("baseline" in prof or "unfused" in prof):
            ref = "baseline" if "baseline" in prof else "unfused"
            before, after = prof[ref]["per_layer"]["kernels"], prof["fused"]["per_layer"]["kernels"]
            out[f"{row['quant']} decode batch {row['seqs']}: kernels per layer ({ref} -> fused)"] = dict(
                goal="fewer", measured=after, before=before, met=after < before)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="where the files to bring back go ($OUT)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    p.add_argument("--layers", type=int, default=32,
                   help="decoder layers of the e2e models (0: each preset's own; default: %(default)s)")
    p.add_argument("--budget-s", type=float, default=560.0, help="the whole round's seconds (default: %(default)s)")
    p.add_argument("--quant", default="fp8", help="e2e and sweep schemes: fp8, fp8-block or both (default: fp8)")
    p.add_argument("--models", default="llama3-8b", help="e2e presets (default: %(default)s)")
    p.add_argument("--variants", default="baseline,unfused,fused", help="e2e compiles (default: %(default)s)")
    p.add_argument("--decode", default="1x1024,32x1024", help="e2e decode shapes, SEQSxCONTEXT (default: %(default)s)")
    p.add_argument("--prefill", default="1x2048", help="e2e prefill shapes ('' for none; default: %(default)s)")
    p.add_argument("--small-gemm-choices", metavar="PATH", help="use this table instead of measuring one")
    p.add_argument("--block-gemm-choices", metavar="PATH", help="use this table instead of measuring one")
    p.add_argument("--remeasure", action="store_true",
                   help="run the small-GEMM sweep even where the table has this GPU's entry already")
    args = p.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        print(f"decode_round: unknown sections {unknown}; known: {list(SECTIONS)}", file=sys.stderr)
        return 2
    start = time.time()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix="decode_round_"))
    small, block = out / "small_gemm_choices.json", out / "block_gemm_choices.json"
    # The round's tables start from the given ones, else the shipped ones: what this run
    # measures is merged in, every other device's (and op's) entry kept.
    shipped = ROOT / "src" / "fxfuse" / "kernels"
    for given, path, name in ((args.small_gemm_choices, small, "small_gemm_choices.json"),
                              (args.block_gemm_choices, block, "block_gemm_choices.json")):
        source = pathlib.Path(given) if given else shipped / name
        if source.exists():
            shutil.copyfile(source, path)
    if "small-gemm" in sections and not args.remeasure and _measured(small, args.quant):
        sections.remove("small-gemm")
        print("small-gemm: this GPU's entry is in the table already (--remeasure measures again)", flush=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for path in (small, block):
        if not path.exists():
            path.write_text(json.dumps({"devices": {}, "measured": {}}))  # the sweeps merge into it
    env["FXFUSE_SMALL_GEMM_CHOICES"], env["FXFUSE_BLOCK_GEMM_CHOICES"] = str(small), str(block)
    log_path = out / "decode_round.log"
    results: dict = {"sections": {}, "args": vars(args)}
    commands = _commands(args, work, small, block)
    for section in (s for s in SECTIONS if s in sections):
        left = args.budget_s - (time.time() - start)
        limit = min(CAPS[section], left - 5)
        if limit < 20:
            results["sections"][section] = dict(status="skipped: out of time", seconds=0)
            continue
        t0 = time.time()
        with open(log_path, "a") as log:
            log.write(f"\n===== {section}: {' '.join(commands[section])} (limit {limit:.0f} s)\n")
            log.flush()
            try:
                rc = subprocess.run(commands[section], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=limit).returncode
                status = "ok" if rc == 0 else f"exit {rc}"
            except subprocess.TimeoutExpired:
                status = f"timed out after {limit:.0f} s"
        results["sections"][section] = dict(status=status, seconds=round(time.time() - t0, 1))
        if RESULTS[section] and (work / RESULTS[section]).exists():
            results[section] = json.loads((work / RESULTS[section]).read_text())
        if section == "tests" and (work / "tests.xml").exists():
            results["tests"] = _junit_summary(work / "tests.xml")
        results["targets"] = targets(results)
        (out / "decode_round.json").write_text(json.dumps(results, indent=1))
        print(f"{section}: {status} in {time.time() - t0:.0f} s", flush=True)
    print("\ntargets:")
    for name, t in results.get("targets", {}).items():
        measured = t["measured"]
        shown = f"{measured:.1f}" if isinstance(measured, float) else str(measured)
        before = f" (before {t['before']:.1f})" if isinstance(t.get("before"), float) else ""
        print(f"  {name}: {shown}{before} vs {t['goal']} -> {'MET' if t['met'] else 'MISSED'}")
    print(f"\n{time.time() - start:.0f} s in all; results in {out / 'decode_round.json'}, log {log_path}")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if all(v["status"] == "ok" for v in results["sections"].values()) else 1


def _measured(table: pathlib.Path, quant: str) -> bool:
    """Whether ``table`` has this GPU's small-GEMM entry for every op of ``quant``'s schemes
    (asked of a subprocess: this script imports no torch)."""
    if not table.exists():
        return False
    ops = {"fp8": "fp8_linear", "fp8-block": "block_fp8_linear"}
    want = [ops[q] for q in quant.split(",") if q in ops]
    try:
        name = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name())"],
                              capture_output=True, text=True, timeout=60).stdout.strip()
    except subprocess.TimeoutExpired:
        return False
    entry = json.loads(table.read_text()).get("devices", {}).get(name, {})
    return bool(name) and all(op in entry for op in want)


def _junit_summary(path: pathlib.Path) -> dict:
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failed = [f"{c.get('classname')}.{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return dict(tests=int(suite.get("tests", 0)), failures=int(suite.get("failures", 0)),
                errors=int(suite.get("errors", 0)), skipped=int(suite.get("skipped", 0)), failed=failed[:20])


if __name__ == "__main__":
    sys.exit(main())
