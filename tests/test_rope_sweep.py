"""benchmarks/rope_sweep.py's plumbing on the CPU: every variant runs and matches eager,
the launch-config sweep keeps the default's bits, the summary states issue 21's targets.
Timing is left out (``--check``'s timer) and the kernel runs in Triton's interpreter at a tiny head shape; the
measurements themselves need a GPU."""

import importlib.util
import pathlib
import sys

import pytest
import torch

pytest.importorskip("triton", reason="Triton is part of the test extras")

PATH = pathlib.Path(__file__).parent.parent / "benchmarks" / "rope_sweep.py"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("rope_sweep", PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


@pytest.mark.parametrize("gemma", [False, True])
def test_qk_section_runs_every_variant_and_the_sweep(sweep, monkeypatch, gemma):
    monkeypatch.setattr(sweep, "_compiled", lambda fn, dynamic: fn)  # no Inductor compile on the CPU here
    monkeypatch.setattr(sweep, "CONFIGS", [(1, 1), (2, 2)])
    m = sweep.Model("tiny", 3, 1, 32, 16, True, gemma, 96)
    logs = []
    rows = sweep.run_heads("qk", m, sweep.qk_variants(m), [1, 5], sweep.Timer(True, 1), 1e12, DEVICE, True,
                           logs.append)
    variants = [r["variant"] for r in rows if r["tokens"] == 5]
    assert variants == ["fxfuse", "fxfuse_unfused", "eager", "inductor", "config hb=1 w=1", "config hb=2 w=2"]
    assert all(r.get("matches_eager", True) and r.get("same_bits_as_default", True) for r in rows)
    assert rows[0]["bytes"] == 2 * (3 + 1) * 32 * 2 + 8 + 16 * 4 + 2 * 32 * (4 if gemma else 2)


def test_summary_states_the_targets(sweep):
    rows = []
    for t, (ours, ind, pct) in {16: (3.0, 4.0, 10.0), 4096: (50.0, 45.0, 80.0), 16384: (150.0, 200.0, 90.0)}.items():
        rows += [dict(section="qk", model="qwen3-8b", tokens=t, variant="fxfuse", us=ours, pct_bw=pct),
                 dict(section="qk", model="qwen3-8b", tokens=t, variant="inductor", us=ind, pct_bw=pct * ours / ind),
                 dict(section="qk", model="qwen3-8b", tokens=t, variant="config hb=8 w=4", us=ours * 0.9,
                      pct_bw=pct / 0.9, same_bits_as_default=True)]
    out = sweep.summarize(rows, lambda s: None)
    got = {(tg["tokens"], tg["target"]): tg["ok"] for tg in out["targets"]}
    assert got == {(16, "faster than Inductor"): True, (4096, ">= 85% of copy bandwidth"): False,
                   (4096, "faster than Inductor"): False, (16384, ">= 85% of copy bandwidth"): True,
                   (16384, "faster than Inductor"): True}
    assert all(b["best"] == "config hb=8 w=4" for b in out["best"])


def test_check_mode_on_the_cpu_writes_its_json(sweep, monkeypatch, tmp_path):
    monkeypatch.setattr(sweep, "_compiled", lambda fn, dynamic: fn)
    monkeypatch.setitem(sweep.MODELS, "tiny", sweep.Model("tiny", 2, 1, 16, 16, True, False, 32))
    rc = sweep.main(["--check", "--only", "qk,gemma", "--tokens", "3", "--models", "tiny", "--gemma-widths", "32",
                     "--no-sweep", "--out", str(tmp_path)])
    assert rc == 0
    import json

    rows = json.loads((tmp_path / "rope_sweep.json").read_text())["rows"]
    assert {r["section"] for r in rows} == {"qk", "gemma"} and len(rows) == 4 + 6 * 3
