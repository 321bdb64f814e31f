"""``fxfuse bench --only decode-profile`` and the e2e floor, on the CPU: kernels read from
made-up kineto events (the profiler's raw records), attributed to families, layers and
GEMM calls; the e2e plumbing at a tiny preset with a fake timer and profiler. The real
profile needs a GPU and runs on the device machine (benchmarks/decode_round.py)."""

import dataclasses
import json

import pytest
import torch
from torch.autograd import DeviceType

from fxfuse.bench import decode_profile as dp
from fxfuse.bench import e2e
from fxfuse.cli import build_parser

K = dp.KernelRecord


@dataclasses.dataclass
class FakeEvent:
    """What `kernel_records` reads of a kineto event."""

    _name: str
    _device: DeviceType
    _start: int
    _end: int
    _corr: int = 0
    _linked: int = 0
    _shapes: tuple = ()
    _thread: int = 1

    def name(self): return self._name  # noqa: E704
    def device_type(self): return self._device  # noqa: E704
    def start_ns(self): return self._start  # noqa: E704
    def end_ns(self): return self._end  # noqa: E704
    def correlation_id(self): return self._corr  # noqa: E704
    def linked_correlation_id(self): return self._linked  # noqa: E704
    def shapes(self): return [list(s) for s in self._shapes]  # noqa: E704
    def start_thread_id(self): return self._thread  # noqa: E704


def _cpu(name, start, end, corr, shapes=()):
    return FakeEvent(name, DeviceType.CPU, start, end, corr, 0, shapes)


def _gpu(name, start, end, linked):
    return FakeEvent(name, DeviceType.CUDA, start, end, 0, linked)


def test_kernels_are_linked_to_the_outermost_linear_and_its_weight_shape():
    events = [
        # fp8_linear launching cuBLAS through aten::_scaled_mm (the kernel links to the inner op)
        _cpu("fxfuse::fp8_linear", 0, 100, 1, [(1, 4096), (6144, 4096), (1,), (1,)]),
        _cpu("aten::_scaled_mm", 10, 90, 2, [(1, 4096), (4096, 6144)]),
        # the runtime call launching it: a CPU event linked to the op, whose own id may be an op's
        FakeEvent("cudaLaunchKernel", DeviceType.CPU, 20, 30, 4, 2),
        _gpu("nvjet_tst_64x8_64x16_4x1_v_bz_TNT", 1000, 13000, 2),
        # a fused linear launching the small GEMM and its row epilogue itself
        _cpu("fxfuse::fp8_linear_fused", 200, 300, 3, [(1, 4096), (), (4096, 14336), (1,)]),
        _gpu("_small_fp8_gemm_kernel", 14000, 30000, 3),
        _gpu("_rows_kernel", 30500, 32500, 3),
        _cpu("fxfuse::attention", 400, 500, 4),
        _gpu("_paged_attention_kernel", 33000, 40000, 4),
        # an Inductor kernel: no op around its launch
        _gpu("triton_poi_fused_add_cat_cos_mul_neg_sin_0", 41000, 42000, 0),
        # the LM head: x @ w.t() as aten::mm, the weight second and transposed
        _cpu("aten::mm", 600, 700, 5, [(1, 4096), (4096, 128256)]),
        _gpu("sm90_xmma_gemm_bf16bf16_bf16f32", 43000, 53000, 5),
    ]
    recs = dp.kernel_records(events)
    assert [r.name for r in recs][:2] == ["nvjet_tst_64x8_64x16_4x1_v_bz_TNT", "_small_fp8_gemm_kernel"]
    assert recs[0].ops == ("aten::_scaled_mm", "fxfuse::fp8_linear") and recs[0].gemm == (1, 6144, 4096)
    assert recs[1].gemm == recs[2].gemm == (3, 4096, 14336) and recs[2].us == 2.0
    assert recs[-1].gemm == (5, 128256, 4096)
    assert [dp.family(r) for r in recs] == ["gemm", "gemm", "gemm", "attention", "other", "gemm"]
    assert recs[0].start_us == 0.0 and recs[1].start_us == 13.0


def _layer(fused: bool, call: int) -> list:
    """One layer's kernels at decode, unfused (10 kernels) or with gemm_fusion (8)."""
    g = lambda name, us, n, k, c: K(name, us, 0.0, ("fxfuse::fp8_linear",), (c, n, k))  # noqa: E731
    out = [] if fused else [K("_rms_norm_quant_kernel", 2.0, 0.0, ("fxfuse::fused_add_rms_norm_static_fp8_quant",))]
    out += [g("_small_fp8_gemm_kernel", 10.0, 6144, 4096, call), K("triton_poi_fused_cat_0", 2.0, 0.0),
            K("_paged_attention_kernel", 8.0, 0.0, ("fxfuse::attention",)),
            g("_small_fp8_gemm_kernel", 6.0, 4096, 4096, call + 1)]
    out += [g("_rows_kernel", 1.0, 4096, 4096, call + 1)] if fused else \
        [K("_rms_norm_quant_kernel", 2.0, 0.0, ("fxfuse::fused_add_rms_norm_static_fp8_quant",))]
    out += [g("_small_fp8_gemm_kernel", 40.0, 28672, 4096, call + 2)]
    if not fused:
        out += [K("_silu_and_mul_kernel", 2.0, 0.0, ("fxfuse::silu_and_mul_static_fp8_quant",))]
    out += [g("_small_fp8_gemm_kernel", 20.0, 4096, 14336, call + 3), g("_split_k_reduce_kernel", 1.0, 4096, 14336,
                                                                         call + 3)]
    return out


WEIGHTS = {(6144, 4096): ("qkv_proj", 6144 * 4096 + 4), (4096, 4096): ("o_proj", 4096 * 4096 + 4),
           (28672, 4096): ("gate_up_proj", 28672 * 4096 + 4), (4096, 14336): ("down_proj", 4096 * 14336 + 4)}


def test_a_step_is_cut_into_layers_at_down_proj_and_summed_by_family():
    head = [K("triton_poi_fused_embedding_0", 1.0, 0.0)]
    tail = [K("_rms_norm_quant_kernel", 2.0, 0.0, ("fxfuse::fused_add_rms_norm",)), K("gemm_bf16", 30.0, 0.0)]
    for fused, kernels in ((False, 10), (True, 8)):
        recs = head + [r for i in range(3) for r in _layer(fused, 10 * i)] + tail
        p = dp.analyze(recs, (4096, 14336), WEIGHTS, bandwidth=2e12)
        assert p["layers"] == 3 and p["per_layer"]["kernels"] == kernels
        assert p["layer0"]["kernels"] == kernels + 1 and p["tail"]["kernels"] == 2  # layer 0 has the embedding too
        fams = p["per_layer"]["families"]
        assert fams["norm_quant"]["kernels"] == (0 if fused else 3) and fams["attention"]["kernels"] == 1
        assert p["step"]["kernels"] == 3 * kernels + 3
        down = next(g for g in p["gemms"] if g["linear"] == "down_proj")
        assert down["calls"] == 3 and down["kernels_per_call"] == 2 and down["us"] == 21.0
        assert down["pct_copy_bw"] == pytest.approx(100 * (4096 * 14336 + 4) / 2e12 / 21e-6)
    before = dp.analyze(head + _layer(False, 0) + _layer(False, 10), (4096, 14336), WEIGHTS, 2e12)
    after = dp.analyze(head + _layer(True, 0) + _layer(True, 10), (4096, 14336), WEIGHTS, 2e12)
    assert dp.compare(before, after)["kernels"] == dict(before=10, after=8, change=-2)
    lines = dp.format_profile("fused", after)
    assert any("down_proj" in line and "% of copy BW" in line for line in lines)


def test_the_weights_of_a_model_by_shape():
    from fxfuse.models import ModelConfig, build_model

    # Every weight shape distinct (the tiny preset's LM head is gate_up's shape).
    model = build_model(ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_layers=1,
                                    num_heads=4, num_kv_heads=2, head_dim=16))
    w = dp.model_weights(model)
    c = model.config
    assert w[(c.intermediate_size * 2, c.hidden_size)][0] == "gate_up_proj"
    assert w[(c.hidden_size, c.intermediate_size)] == ("down_proj", c.hidden_size * c.intermediate_size + 4)
    assert w[(c.vocab_size, c.hidden_size)] == ("lm_head", c.vocab_size * c.hidden_size * 2)
    assert dp.down_shape(w) == (c.hidden_size, c.intermediate_size)
    # The floor's bytes: every buffer once, of the embedding and the rotary table only the looked-up rows.
    tables = {n: b for n, b in model.named_buffers() if n in ("embed_tokens", "cos_sin_cache")}
    assert set(tables) == {"embed_tokens", "cos_sin_cache"}
    total = sum(b.numel() * b.element_size() for b in model.buffers())
    looked_up = sum(3 * b.shape[1] * b.element_size() - b.numel() * b.element_size() for b in tables.values())
    assert e2e.weight_read_bytes(model, 3) == total + looked_up
    assert e2e.kv_read_bytes(c, seqs=2, context=10) == 1 * 2 * 10 * 2 * c.num_kv_heads * c.head_dim * 2
    model.close()


def test_e2e_reports_the_floor_and_profiles_decode(monkeypatch):
    """The section's plumbing at the tiny preset on the CPU: every variant compiled and
    timed (fake timer), each row against the floor, decode rows profiled (fake profiler)."""
    monkeypatch.setattr(e2e, "DEVICE", "cpu")
    monkeypatch.setattr(e2e, "BACKEND", "native")
    monkeypatch.setattr(e2e, "block_size", lambda: 16)
    timed = []

    def fake_graph_us(fn, warmup=3):
        fn()
        timed.append(1)
        return 100.0 * len(timed)

    from fxfuse.models import ModelConfig

    tiny = ModelConfig.preset("tiny")
    down = (tiny.hidden_size, tiny.intermediate_size)

    def fake_profile(fn):
        fn()
        return [K("_small_fp8_gemm_kernel", 5.0, 0.0, (), (1, *down)), K("_paged_attention_kernel", 1.0, 0.0)]

    monkeypatch.setattr(e2e, "graph_us", fake_graph_us)
    monkeypatch.setattr(dp, "profile", fake_profile)
    logs = []
    rows = e2e.run(layers=1, quants=("fp8",), log=logs.append, presets=("tiny",), bandwidth=1e9,
                   variants=("unfused", "fused", "baseline"), decode=((2, 8),), prefill=((1, 6),), profile=True)
    assert [r["phase"] for r in rows] == ["decode", "prefill"]
    dec, pre = rows
    assert dec["model"] == "tiny" and set(dec["pct_floor"]) == {"baseline", "unfused", "fused"}
    assert dec["floor_us"] == pytest.approx((dec["weight_bytes"] + dec["kv_bytes"]) / 1e9 * 1e6)
    assert dec["pct_floor"]["fused"] == pytest.approx(100 * dec["floor_us"] / dec["fused_us"])
    assert dec["speedup"] == dec["unfused_us"] / dec["fused_us"]
    assert set(dec["profile"]) == {"baseline", "unfused", "fused"} and "profile" not in pre
    assert dec["profile"]["fused"]["layers"] == 1 and dec["profile"]["fused"]["gemms"][0]["linear"] == "down_proj"
    assert any("% of floor" in line for line in logs) and any("per layer" in line for line in logs)
    json.dumps(rows)  # what --json writes


def test_bench_knows_the_section_and_its_options():
    args = build_parser().parse_args(["bench", "--only", "decode-profile", "--e2e-variants", "baseline,fused",
                                      "--profile-seqs", "1"])
    assert args.only == "decode-profile" and args.e2e_variants == "baseline,fused" and args.profile_seqs == "1"
    with pytest.raises(ValueError, match=r"unknown variants \['cublas'\]"):
        e2e.run(variants=("cublas",), bandwidth=1.0)
