"""The ``fxfuse`` command: the demo end to end on the tiny model, patterns, argument errors."""

import json

import pytest

from fxfuse.cli import main


@pytest.mark.compile
@pytest.mark.parametrize("quant", ["fp8", "nvfp4"])
def test_demo_reports_expected_matches_and_identical_tokens(quant, tmp_path, capsys):
    # Ragged prompts, KV-cache decode, dynamic token count: the path an engine takes.
    out = tmp_path / "demo.json"
    assert main(["demo", "--layers", "2", "--quant", quant, "--new-tokens", "4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    table = result["match_table"]
    assert sum(table["rms_quant_fusion"].values()) == 4
    assert table["act_quant_fusion"] == {"SiluMulStaticFp8Quant" if quant == "fp8" else "SiluMulNvfp4Quant": 2}
    assert table["attn_quant_fusion"] == {"AttentionStaticFp8Quant" if quant == "fp8" else "AttentionNvfp4Quant": 2}
    assert result["max_abs_diff"] == 0.0
    assert result["tokens_fused"] == result["tokens_unfused"]
    assert len(result["tokens_fused"]) == 3 and len(result["tokens_fused"][0]) == 4
    printed = capsys.readouterr().out
    assert "rms_quant_fusion" in printed and "greedy tokens identical: yes" in printed


def test_patterns_prints_every_rewrite_and_timing(capsys):
    assert main(["patterns", "--timing"]) == 0
    printed = capsys.readouterr().out
    for name in ("RmsNormStaticFp8Quant", "FusedAddRmsNormDynamicFp8QuantUb", "SiluMulStaticFp8Quant"):
        assert f"# {name} [functional]" in printed
    assert "CallFunction(fxfuse.static_scaled_fp8_quant.default" in printed and "KeywordArg('eps')" in printed
    assert "registration of all built-in passes" in printed


def test_bad_layers_is_a_usage_error():
    with pytest.raises(SystemExit):
        main(["demo", "--layers", "0"])


@pytest.mark.compile
def test_explain_reports_each_fusion_site(capsys):
    assert main(["explain", "--layers", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    matched = sorted(line.split(" [")[0] for line in lines if line.endswith("MATCH"))
    assert matched == [
        "act_quant_fusion/SiluMulStaticFp8Quant",
        "attn_quant_fusion/AttentionStaticFp8Quant",
        "rms_quant_fusion/FusedAddRmsNormStaticFp8Quant",
        "rms_quant_fusion/RmsNormStaticFp8Quant",
    ]
    assert all(": no: " in line or line.endswith("MATCH") for line in lines)
