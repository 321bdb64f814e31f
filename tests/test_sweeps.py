"""The prefill block-GEMM sweep and the fused-form sweep, run end to end on the CPU:
tiny shapes through Triton's interpreter, a fake timer, outputs checked, the JSON and
the tables written. The measurements themselves need a GPU (benchmarks/decode_round.py)."""

import importlib.util
import json
import pathlib
import sys

import pytest
import torch

from fxfuse.kernels import small_gemm_config as C

ROOT = pathlib.Path(__file__).parent.parent


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _on_cpu(monkeypatch, mod, times):
    pytest.importorskip("triton", reason="Triton is part of the test extras")
    if torch.cuda.is_available():
        pytest.skip("the GPU runs the real sweep")
    monkeypatch.setattr(mod, "DEVICE", "cpu")
    monkeypatch.setattr(mod, "have_cuda", lambda: True)
    monkeypatch.setattr(mod, "environment", lambda: dict(date="today", device="Test GPU", torch="t", triton="tr"))
    monkeypatch.setattr(mod, "cold_copies", lambda make, nbytes: [make() for _ in range(2)])
    monkeypatch.setattr(mod, "graph_us", lambda fns, reps=None: [f() for f in fns] and float(next(times)))


def test_block_gemm_sweep_picks_a_launch_and_writes_it(tmp_path, monkeypatch):
    sweep = _script("block_gemm_sweep")
    from fxfuse.kernels import block_linear as BK

    # Per shape: per-tensor _scaled_mm 10 us, the 64-row launch 11 us, the 128-row one 13 us.
    times = iter([10.0, 11.0, 13.0] * 2)
    _on_cpu(monkeypatch, sweep, times)
    monkeypatch.setattr(sweep, "SHAPES", (("o_proj", 136, 256), ("down_proj", 128, 384)))
    monkeypatch.setattr(BK, "LARGE_CANDIDATES", (BK.BlockGemmConfig(64, 128, 4, 4), BK.BlockGemmConfig(128, 64, 4, 4)))
    rc = sweep.main(["--out", str(tmp_path / "out"), "--tokens", "70", "--write", str(tmp_path / "block.json")])
    assert rc == 0  # every launch matched the native reference
    result = json.loads((tmp_path / "out" / "block_gemm_sweep.json").read_text())
    assert {r["label"] for r in result["rows"]} == {"per_tensor_scaled_mm", "m64 n128 w4 st4", "m128 n64 w4 st4"}
    assert all(r["matches_native"] is (None if r["label"] == "per_tensor_scaled_mm" else True) for r in result["rows"])
    assert result["best"] == "m64 n128 w4 st4" and result["target"]["worst"] == pytest.approx(1.1)
    assert result["target"]["met"] is True
    table = json.loads((tmp_path / "block.json").read_text())
    assert table["devices"]["Test GPU"]["large"] == dict(block_m=64, block_n=128, num_warps=4, num_stages=4, tma=False)


def test_gemm_fusion_sweep_measures_forms_and_merges_their_entries(tmp_path, monkeypatch):
    sweep = _script("gemm_fusion_sweep")
    _on_cpu(monkeypatch, sweep, iter(()))
    monkeypatch.setattr(sweep, "graph_us", lambda fns, reps=None: [f() for f in fns] and 1.0)
    real_rows = sweep.form_rows

    def timed_rows(form, *a, **kw):  # the chain slow, every fused config fast: each form wins everywhere
        rows = real_rows(form, *a, **kw)
        for r in rows:
            r["us"] = 10.0 if r["kind"] == "chain" else 5.0
        return rows

    monkeypatch.setattr(sweep, "form_rows", timed_rows)
    monkeypatch.setattr(sweep, "num_sms", lambda device: 8)
    monkeypatch.setattr(sweep, "LINEARS", {"o_proj": (256, 256), "gate_up_proj": (512, 256), "down_proj": (256, 384),
                                           "qkv_proj": (384, 256)})
    path = tmp_path / "choices.json"
    path.write_text(json.dumps({"devices": {"Test GPU": {"fp8_linear": {"max_tokens": 16}}}, "measured": {}}))
    forms = ["fp8_linear>silu_and_mul_static_fp8_quant", "fp8_linear>fused_add_rms_norm_static_fp8_quant",
             "group_fp8_quant>block_fp8_linear>fused_add_rms_norm_group_fp8_quant"]
    rc = sweep.main(["--out", str(tmp_path / "out"), "--write-choices", str(path), "--tokens", "1,5",
                     "--forms", ",".join(forms)])
    assert rc == 0  # every fused output matched its chain
    result = json.loads((tmp_path / "out" / "gemm_fusion_sweep.json").read_text())
    assert {r["op"] for r in result["rows"]} == set(forms)
    assert all(r["matches_chain"] for r in result["rows"] if r["kind"] == "fused")
    table = C.load_choices(path)
    entry = table["devices"]["Test GPU"]
    assert entry["fp8_linear"] == {"max_tokens": 16}  # the plain op's entry is kept
    assert {k for k in entry if k != "fp8_linear"} == set(forms) and all(entry[f]["max_tokens"] == 5 for f in forms)
    assert sweep.main(["--forms", "fp8_linear>gelu"]) == 2


def test_decode_round_runs_its_sections_and_judges_the_targets(tmp_path, monkeypatch):
    """The round's plumbing with every section faked: each leaves its JSON where the real
    one does; what comes back is at most the device tool's 8 files, with the targets."""
    import subprocess

    round_ = _script("decode_round")
    ran = []

    def fake_run(cmd, cwd, env, stdout, stderr, timeout):
        ran.append((cmd, env.get("FXFUSE_SMALL_GEMM_CHOICES")))
        work = pathlib.Path(next(a for a in cmd if a.startswith("--junitxml=") or "decode_round_" in a)
                            .split("=", 1)[-1])
        work = work if work.is_dir() else work.parent
        if "small_gemm_sweep.py" in " ".join(cmd):
            (work / "small_gemm_sweep.json").write_text(json.dumps({"targets": {
                "1 token": dict(goal_pct=85.0, worst_pct=88.0, worst="fp8 8b o_proj M=1", met=True)}}))
        elif "block_gemm_sweep.py" in " ".join(cmd):
            (work / "block_gemm_sweep.json").write_text(json.dumps({"target": dict(target=1.15, best="m64", mean=1.1,
                                                                                   worst=1.2, met=False)}))
        elif "bench" in cmd:
            prof = lambda k: {"per_layer": {"kernels": k, "us": 100.0}}  # noqa: E731
            (work / "e2e.json").write_text(json.dumps({"e2e": [dict(
                quant="fp8", phase="decode", seqs=1, pct_floor=dict(baseline=57.0, fused=81.0),
                profile=dict(baseline=prof(12), fused=prof(9)))]}))
        elif "--junitxml" in " ".join(cmd):
            (work / "tests.xml").write_text('<testsuite tests="3" failures="0" errors="0" skipped="1">'
                                            '<testcase classname="t" name="a"/></testsuite>')
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(round_.subprocess, "run", fake_run)
    monkeypatch.setattr(round_, "_measured", lambda table, quant: False)  # this GPU is not in the shipped table
    out = tmp_path / "out"
    assert round_.main(["--out", str(out)]) == 0
    assert [c[0][1] if c[0][1] != "-m" else c[0][2] for c in ran] == [
        "pytest", "benchmarks/small_gemm_sweep.py", "benchmarks/gemm_fusion_sweep.py", "benchmarks/block_gemm_sweep.py",
        "fxfuse"]
    assert all(choices == str(out / "small_gemm_choices.json") for _, choices in ran)
    result = json.loads((out / "decode_round.json").read_text())
    assert all(s["status"] == "ok" for s in result["sections"].values()) and result["tests"]["tests"] == 3
    t = result["targets"]
    assert t["small GEMM % of copy BW, 1 token"]["met"] is True
    assert t["fp8 decode batch 1: % of the weight + KV read floor"] == dict(goal=">= 80%", measured=81.0, before=57.0,
                                                                            met=True)
    assert t["fp8 decode batch 1: kernels per layer (baseline -> fused)"]["met"] is True
    assert t["block-FP8 GEMM over per-tensor _scaled_mm at 4096 tokens"]["met"] is False
    assert len(list(out.iterdir())) <= 8
    # The round's table starts from the shipped one: every measured device stays in it.
    shipped = json.loads((ROOT / "src" / "fxfuse" / "kernels" / "small_gemm_choices.json").read_text())
    assert set(json.loads((out / "small_gemm_choices.json").read_text())["devices"]) == set(shipped["devices"])
    monkeypatch.setattr(round_, "_measured", lambda table, quant: True)
    ran.clear()
    assert round_.main(["--out", str(tmp_path / "again"), "--sections", "small-gemm,fusion"]) == 0
    assert [c[0][1] for c in ran] == ["benchmarks/gemm_fusion_sweep.py"]  # measured already: not again
    assert round_.main(["--out", str(out), "--sections", "benchmarks"]) == 2
