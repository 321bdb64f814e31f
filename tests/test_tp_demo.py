"""``fxfuse demo --tp 2``: two gloo processes on the CPU, rank 0 reporting the summed tables."""

import json

import pytest

from fxfuse.cli import main


@pytest.mark.compile
def test_demo_tp2_fuses_every_all_reduce_and_keeps_the_tp1_tokens(tmp_path, capfd):
    out = tmp_path / "demo.json"
    rc = main(["demo", "--tp", "2", "--layers", "2", "--quant", "nvfp4", "--new-tokens", "3", "--batch", "2", "--no-timing",
               "--json", str(out)])
    result = json.loads(out.read_text())
    printed = capfd.readouterr().out  # rank 0 prints from its own process
    # Per rank 2n all-reduce fusions (the last into the final norm), 1 norm-quant (layer 0's
    # input norm), n act-quant, n attention and n rotation fusions; summed over the 2 ranks.
    assert result["match_table"] == {
        "allreduce_rms_fusion": {"AllReduceFusedAddRmsNormStaticFp8Quant(cast_to=torch.bfloat16)": 6,
                                 "AllReduceFusedAddRmsNormUnusedResidual(cast_to=torch.bfloat16)": 2},
        "rms_quant_fusion": {"RmsNormStaticFp8Quant": 2},
        "act_quant_fusion": {"SiluMulNvfp4Quant": 4},
        "attn_quant_fusion": {"AttentionNvfp4Quant": 4},
        "rope_kv_cache_fusion": {"RopeAttentionNvfp4": 4},
    }
    assert result["expected_matches"] == {"allreduce_rms_fusion": 8, "rms_quant_fusion": 2, "act_quant_fusion": 4,
                                          "attn_quant_fusion": 4, "qk_norm_rope_fusion": 0, "rope_kv_cache_fusion": 4}
    assert result["miss_table"] == {} == result["expected_misses"]
    assert result["tokens_fused"] == result["tokens_unfused"] == result["tokens_tp1"]
    assert result["max_abs_diff"] == 0.0 and result["max_abs_diff_tp1"] == 0.0 and result["tp"] == 2
    assert printed.count("fxfuse demo: tiny Llama") == 1, "only rank 0 reports"
    assert "greedy tokens identical to tp 1: yes" in printed and "MISMATCH" not in printed
    assert rc == 0


def test_demo_with_a_model_that_does_not_split_fails_before_starting_processes(capsys):
    assert main(["demo", "--tp", "4"]) == 2  # the tiny model has 2 KV heads
    assert "--tp 4: ModelConfig.num_kv_heads (2) must be a multiple of tp_size (4)" in capsys.readouterr().err


def test_demo_tp_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--tp", "0"])
    assert "--tp must be at least 1" in capsys.readouterr().err
