"""``fxfuse bench`` on the CPU: its defaults, the plot's panels and titles, and the
attention benchmark's cold-L2 rule (timing faked, kernels in Triton's interpreter at tiny
shapes). The benchmarks themselves need a GPU and are not run here."""

import inspect

import pytest
import torch

from fxfuse.bench import attention, e2e, timing
from fxfuse.cli import build_parser
from fxfuse.models import ModelConfig


def test_e2e_defaults_to_every_layer_of_llama3_8b():
    assert build_parser().parse_args(["bench", "--only", "e2e"]).layers == 32
    assert inspect.signature(e2e.run).parameters["layers"].default == 32
    assert ModelConfig.preset("llama3-8b").num_layers == 32
    assert build_parser().parse_args(["bench", "--layers", "4"]).layers == 4


def _op_rows(op, fused, widths=(4096,), tokens=(16, 4096)):
    return [dict(op=op, fused=fused, tokens=t, width=w, floor_us=1.0 + t / 1000, eager_us=3.0 + t / 500,
                 inductor_us=1.5 + t / 900, fxfuse_us=1.2 + t / 950) for w in widths for t in tokens]


def _e2e_rows(layers=32, quant="fp8"):
    return [dict(quant=quant, phase=phase, seqs=s, new_tokens=n, context=1024, layers=layers, unfused_us=100.0,
                 fused_us=95.0, speedup=100 / 95) for phase, s, n in (("decode", 1, 1), ("prefill", 1, 2048))]


def _figure(results):
    mpl = pytest.importorskip("matplotlib")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    from fxfuse.bench.plot import figure

    fig = figure(results)
    shown = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
    titles = [ax.get_title() for ax in shown]
    plt.close(fig)
    return shown, titles


@pytest.mark.parametrize("results, panels", [
    (dict(ops=_op_rows("silu_and_mul_static_fp8_quant", True)), 1),  # --only ops --ops <one fused op>
    (dict(ops=_op_rows("silu_and_mul", False)), 1),  # one unfused op: drawn, not "nothing to plot"
    (dict(e2e=_e2e_rows()), 1),  # --only e2e
    (dict(ops=_op_rows("a", True) + _op_rows("b", True) + _op_rows("c", False)), 2),  # unfused ones left out
    (dict(ops=[r for op in "abcd" for r in _op_rows(op, True)], e2e=_e2e_rows()), 5),  # 2 x 3 grid, one cell unused
], ids=["one-fused-op", "one-unfused-op", "e2e-only", "fused-and-unfused", "five-panels"])
def test_the_plot_has_one_visible_axes_per_panel(results, panels):
    shown, _ = _figure(results)
    assert len(shown) == panels


def test_the_e2e_title_states_the_layers_that_ran():
    _, titles = _figure(dict(e2e=_e2e_rows(32)))
    assert "32 layers" in titles[0]
    _, titles = _figure(dict(e2e=_e2e_rows(4, "fp8") + _e2e_rows(32, "fp8-block")))
    assert "4, 32 layers" in titles[0]


def test_plot_writes_a_png_or_says_why_not(tmp_path):
    from fxfuse.bench.plot import plot

    path = tmp_path / "bench.png"
    status = plot(dict(e2e=_e2e_rows(), device="cpu"), str(path))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert status.startswith("plot skipped: matplotlib is not installed")
        return
    assert status == f"plot written to {path}" and path.stat().st_size > 0
    assert plot({}, str(tmp_path / "none.png")) == "plot skipped: no op or end-to-end results"


def test_attention_sets_are_cold_by_size_past_twice_the_l2(monkeypatch):
    monkeypatch.setattr(timing, "l2_bytes", lambda: 50 << 20)
    monkeypatch.setattr(attention, "l2_bytes", lambda: 50 << 20)
    made = []
    make = lambda: made.append(1) or {}  # noqa: E731
    sets, how = attention._sets(make, 100 << 20)
    assert (len(sets), how) == (1, "size")
    sets, how = attention._sets(make, 30 << 20)
    assert how == "copies" and len(sets) * (30 << 20) > 100 << 20
    # The benchmark's shapes: every decode shape (~1 GB of KV) is cold by size.
    for seqs, ctx in attention.DECODE:
        assert attention._qkv_bytes(seqs, 1, ctx) >= 2 * (50 << 20)


def test_attention_bench_reports_cold_and_warm_times(monkeypatch):
    """The whole benchmark at tiny shapes: prefill rotates copies (cold plus warm in the
    row), decode is cold by its size (no warm); every row says how it was cold."""
    calls = []

    def fake_graph_us(fn, **kwargs):
        fns = fn if isinstance(fn, list) else [fn]
        for f in fns:
            f()
        calls.append(len(fns))
        return float(len(fns))  # distinguishes the cold (rotated) from the warm timing

    prefill_bytes = attention._qkv_bytes(1, 16, 16)
    decode_bytes = attention._qkv_bytes(2, 1, 32)
    l2 = (prefill_bytes + decode_bytes) // 4  # prefill < 2 x L2 <= decode
    assert prefill_bytes < 2 * l2 <= decode_bytes
    for mod in (timing, attention):
        monkeypatch.setattr(mod, "l2_bytes", lambda: l2)
    monkeypatch.setattr(attention, "graph_us", fake_graph_us)
    # On a GPU machine the kernels run compiled on CUDA (the interpreter only serves CPU tensors).
    monkeypatch.setattr(attention, "DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(attention, "PREFILL", ((1, 16),))
    monkeypatch.setattr(attention, "DECODE", ((2, 32),))
    torch.manual_seed(0)
    res = attention.run(bandwidth=1e12, log=lambda *a: None, block=16)
    (pre,), (dec,) = res["prefill"], res["decode"]
    assert pre["cold_by"] == "copies" and pre["cold_copies"] >= 2
    assert pre["fxfuse_us"] == pre["cold_copies"] and pre["warm"] == dict(fxfuse_us=1.0, sdpa_us=1.0)
    assert pre["max_abs_diff_vs_sdpa"] < 0.05
    assert [r["quant"] for r in res["fused_quant"]] == ["fp8", "nvfp4"]
    assert all(r["cold_by"] == "copies" and "warm" in r for r in res["fused_quant"])
    assert dec["cold_by"] == "size" and dec["cold_copies"] == 1 and "warm" not in dec
    assert torch.isfinite(torch.tensor(dec["pct_bw"]))


def test_write_choices_keeps_other_devices_entries(tmp_path):
    """A table measured on a second GPU joins the shipped one instead of replacing it, and
    the shipped table itself names each device's measurement."""
    import json

    from fxfuse.bench import write_choices
    from fxfuse.passes.native_lowering import CHOICES_PATH, load_choices

    shipped = load_choices(CHOICES_PATH)
    assert set(shipped["devices"]) <= set(shipped["measured"])
    path = tmp_path / "choices.json"
    path.write_text(json.dumps({"devices": {"GPU A": {"rms_norm": {"4096": {"16": "inductor"}}}},
                                "measured": "2026-11-25, torch 2.11.0"}))  # the first format: one string
    env = dict(date="2026-12-03", torch="2.11.0", triton="3.6.0")
    write_choices(str(path), {"GPU B": {"rms_norm": {"4096": {"16": "kernel"}}}}, env)
    table = json.loads(path.read_text())
    assert table["devices"]["GPU A"]["rms_norm"]["4096"]["16"] == "inductor"
    assert table["devices"]["GPU B"]["rms_norm"]["4096"]["16"] == "kernel"
    assert table["measured"]["GPU A"] == "2026-11-25, torch 2.11.0"
    assert table["measured"]["GPU B"].startswith("2026-12-03, torch 2.11.0, triton 3.6.0")
    write_choices(str(path), {"GPU A": {"rms_norm": {"4096": {"16": "kernel"}}}}, env)  # a re-measurement replaces
    assert json.loads(path.read_text())["devices"]["GPU A"]["rms_norm"]["4096"]["16"] == "kernel"
    write_choices(str(tmp_path / "new.json"), {"GPU C": {}}, env)
    assert set(json.loads((tmp_path / "new.json").read_text())["devices"]) == {"GPU C"}


def test_e2e_runs_every_preset_and_quant_and_fails_fast_on_a_typo(monkeypatch):
    """The rows: one model per preset and quant scheme, each row naming its model; an
    unknown preset fails before any model is built."""
    built = []

    def fake_run_model(layers, quant, log, preset, **options):  # options: the floor's bandwidth, variants, ...
        built.append((preset, quant, layers))
        return [dict(model=preset, quant=quant, layers=layers)]

    monkeypatch.setattr(e2e, "_run_model", fake_run_model)
    rows = e2e.run(layers=2, quants=("fp8", "fp8-block"), log=lambda *a: None)
    assert built == [(p, q, 2) for p in ("llama3-8b", "qwen3-8b", "gemma3-12b") for q in ("fp8", "fp8-block")]
    assert [r["model"] for r in rows] == [p for p, _, _ in built]
    built.clear()
    with pytest.raises(ValueError, match="unknown model preset 'qwen3-9b'"):
        e2e.run(presets=("qwen3-8b", "qwen3-9b"))
    assert built == []
    args = build_parser().parse_args(["bench", "--only", "e2e"])
    assert args.e2e_models == "llama3-8b,qwen3-8b,gemma3-12b"
    # The torch-free parser's copies of the defaults agree with the code's.
    import fxfuse_cli
    from fxfuse.cli import MODEL_PRESETS
    from fxfuse.models import FAMILIES

    assert fxfuse_cli.E2E_PRESETS == e2e.PRESETS
    assert fxfuse_cli.MODELS == tuple(sorted(FAMILIES)) == tuple(sorted(MODEL_PRESETS))


@pytest.mark.compile
def test_e2e_path_of_the_new_families_on_the_cpu(monkeypatch):
    """`_run_model` end to end at tiny shapes (kernels in Triton's interpreter, the timer
    faked): both variants compile and run on the triton backend, the fused one fuses, and
    both compute the same logits."""
    import fxfuse

    calls = []

    def fake_graph_us(fn, **kwargs):  # each shape times the unfused variant, then the fused one
        calls.append(fn())
        return 2.0 if len(calls) % 2 else 1.0

    monkeypatch.setattr(e2e, "graph_us", fake_graph_us)
    monkeypatch.setattr(e2e, "DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(e2e, "DECODE", ((2, 9),))
    monkeypatch.setattr(e2e, "PREFILL", ((1, 5),))
    fxfuse.reset_match_table()
    torch._dynamo.reset()
    rows = e2e._run_model(1, "fp8", lambda *a: None, "gemma3-tiny")
    assert [(r["model"], r["phase"], r["layers"]) for r in rows] == [("gemma3-tiny", "decode", 1),
                                                                      ("gemma3-tiny", "prefill", 1)]
    assert all(r["speedup"] == 2.0 for r in rows)
    assert all(torch.equal(a, b) for a, b in zip(calls[0::2], calls[1::2], strict=True))
    assert fxfuse.match_table()["qk_norm_rope_fusion"] == {"QkGemmaNormRope": 1}
