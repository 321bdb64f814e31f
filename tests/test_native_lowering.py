"""native_lowering: fxfuse ops replaced by their native implementation where a measured
table says Inductor's code is faster."""

import pytest
import torch
from conftest import targets, trace_graph

import fxfuse
from fxfuse.passes.native_lowering import (
    LOWERINGS,
    LowerToNative,
    load_choices,
    native_lowering,
    prefers_inductor,
)
from fxfuse.ops.fused import rms_norm_static_fp8_quant_native
from fxfuse.ops.group_quant import silu_and_mul_group_fp8_quant_native

fx = torch.ops.fxfuse


def test_prefers_inductor_reads_the_nearest_measurement():
    entry = {"4096": {"1": "inductor", "256": "inductor", "4096": "kernel"}, "8192": {"1": "kernel"}}
    assert prefers_inductor(entry, 4096, 1)
    assert prefers_inductor(entry, 5000, 300)  # nearest width 4096, nearest count 256
    assert not prefers_inductor(entry, 4096, 3000)
    assert not prefers_inductor(entry, 7000, 1)  # nearest width 8192
    assert not prefers_inductor(entry, 4096, None)  # symbolic: must win at every count
    assert prefers_inductor({"64": {"1": "inductor", "9": "inductor"}}, 64, None)
    assert not prefers_inductor({}, 64, 1)


def _table(winner, op="rms_norm_static_fp8_quant", device="cpu"):
    return {"devices": {device: {op: {"64": {"5": winner}}}}}


def _graph():
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    w = torch.randn(64, dtype=torch.bfloat16)
    s = torch.tensor([0.05])
    return trace_graph(lambda x, w, s: fx.rms_norm_static_fp8_quant(x, w, s, 1e-6), x, w, s), (x, w, s)


def test_lowers_where_the_table_says_inductor_wins():
    gm, (x, w, s) = _graph()
    p = native_lowering(_table("inductor"))
    assert p(gm) == 1
    assert fx.rms_norm_static_fp8_quant.default not in targets(gm)
    gm.recompile()
    out = gm(x, w, s)
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert torch.equal(out.view(torch.uint8), rms_norm_static_fp8_quant_native(x, w, s, 1e-6).view(torch.uint8))


@pytest.mark.parametrize("column_major", [False, True])
def test_lowers_a_group_op_whatever_its_group_size_and_layout(column_major):
    x = torch.randn(5, 256, dtype=torch.bfloat16)  # the pattern was traced with groups of 64
    gm = trace_graph(lambda x: fx.silu_and_mul_group_fp8_quant(x, 128, column_major), x)
    assert native_lowering(_table("inductor", op="silu_and_mul_group_fp8_quant"))(gm) == 1
    assert fx.silu_and_mul_group_fp8_quant.default not in targets(gm)
    gm.recompile()
    q, s = gm(x)
    ref_q, ref_s = silu_and_mul_group_fp8_quant_native(x, 128, column_major)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))
    assert torch.equal(s, ref_s) and s.stride() == ref_s.stride()


@pytest.mark.parametrize("table", [_table("kernel"), _table("inductor", device="NVIDIA Other GPU"),
                                   {"devices": {}}], ids=["kernel-wins", "other-device", "empty"])
def test_keeps_the_op_otherwise(table):
    gm, _ = _graph()
    p = native_lowering(table)
    assert p(gm) == 0
    assert fx.rms_norm_static_fp8_quant.default in targets(gm)


def test_only_ops_lowered_somewhere_get_a_rewrite_and_the_table_is_in_the_key():
    assert native_lowering({"devices": {}}).rewrites == []
    assert native_lowering(_table("inductor", device="NVIDIA Other GPU")).rewrites == []  # not in this process
    a = native_lowering(_table("inductor"))
    b = native_lowering({"devices": {"cpu": {"rms_norm_static_fp8_quant": {"64": {"5": "inductor", "9": "kernel"}}}}})
    assert [r.name for r in a.rewrites] == ["rms_norm_static_fp8_quant_to_native"]
    assert a.uuid() != b.uuid()


def test_every_lowering_traces():
    table = {"devices": {"cpu": {op: {"64": {"5": "inductor"}} for op in LOWERINGS}}}
    assert len(native_lowering(table).rewrites) == len(LOWERINGS)


def test_unknown_op_is_a_clear_error():
    with pytest.raises(ValueError, match="no lowering for op 'rms_nrom'"):
        LowerToNative("rms_nrom", {})


def test_shipped_table_is_well_formed():
    table = load_choices()
    for device, ops in table["devices"].items():
        assert isinstance(device, str)
        for op, entry in ops.items():
            assert op in LOWERINGS
            for width, by_tokens in entry.items():
                assert int(width) > 0
                assert all(int(t) > 0 and v in ("kernel", "inductor") for t, v in by_tokens.items())


def test_default_pipeline_ends_with_native_lowering():
    assert [p.name for p in fxfuse.default_passes()][-1] == "native_lowering"
    assert "native_lowering" not in [p.name for p in fxfuse.default_passes(fxfuse.FusionConfig(native_lowering=False))]
