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
