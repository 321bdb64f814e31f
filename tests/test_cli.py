"""The ``fxfuse`` command: the demo end to end on the tiny model, patterns, explain, argument errors."""

import contextlib
import io
import json
import types

import pytest
import torch

import fxfuse.models
from fxfuse.cli import TIMING_NOTE, expected_matches, main


#: What each family's demo fuses (2 layers): the act-quant and attention rewrites by quant
#: scheme, and which pass takes the rotation (the q/k norm fusion where the family has one).
DEMO_ACT = {"fp8": "SiluMulStaticFp8Quant", "nvfp4": "SiluMulNvfp4Quant"}
DEMO_ATTN = {"fp8": "AttentionStaticFp8Quant", "nvfp4": "AttentionNvfp4Quant"}
DEMO_ROPE = {
    "llama": ("rope_kv_cache_fusion", {"fp8": "RopeAttentionFp8", "nvfp4": "RopeAttentionNvfp4"}),
    "qwen3": ("qk_norm_rope_fusion", {"fp8": "QkNormRope", "nvfp4": "QkNormRope"}),
    "gemma3": ("qk_norm_rope_fusion", {"fp8": "QkGemmaNormRope", "nvfp4": "QkGemmaNormRope"}),
}


@pytest.mark.compile
@pytest.mark.parametrize("model, quant", [("llama", "fp8"), ("llama", "nvfp4"), ("qwen3", "nvfp4"), ("gemma3", "fp8")])
def test_demo_reports_expected_matches_and_identical_tokens(model, quant, tmp_path, capsys):
    # Ragged prompts, KV-cache decode, dynamic token count: the path an engine takes.
    out = tmp_path / "demo.json"
    # --no-timing: counts and tokens only (the timing protocol has its own test below).
    args = ["demo", "--model", model, "--layers", "2", "--quant", quant, "--new-tokens", "4", "--no-timing",
            "--json", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert {"match_table", "max_abs_diff", "tokens_fused", "tokens_unfused"} <= set(result)  # DESIGN §7
    assert result["model"] == model
    table = result["match_table"]
    assert sum(table["rms_quant_fusion"].values()) == 4
    # Gemma 3's GeGLU is plain PyTorch: no act-quant fusion (docs/models.md).
    assert table.get("act_quant_fusion") == (None if model == "gemma3" else {DEMO_ACT[quant]: 2})
    assert table["attn_quant_fusion"] == {DEMO_ATTN[quant]: 2}
    rope_pass, rope_rewrite = DEMO_ROPE[model]
    assert table[rope_pass] == {rope_rewrite[quant]: 2}
    assert {"qk_norm_rope_fusion", "rope_kv_cache_fusion"} - {rope_pass} - set(table) == {
        "qk_norm_rope_fusion", "rope_kv_cache_fusion"} - {rope_pass}
    assert result["max_abs_diff"] == 0.0
    assert result["tokens_fused"] == result["tokens_unfused"]
    assert len(result["tokens_fused"]) == 3 and len(result["tokens_fused"][0]) == 4
    # The compiled model is the eager one: the same prompts (the demo's defaults) give the
    # same tokens without torch.compile.
    cfg = fxfuse.models.ModelConfig.preset(result["preset"], quant=quant, num_layers=2)
    eager_model = fxfuse.models.build_model(cfg)
    try:
        prompts = fxfuse.models.random_prompts(cfg, lengths=[8, 5, 2], seed=0)
        assert fxfuse.models.run(eager_model, None, prompts, 4).tokens.tolist() == result["tokens_fused"]
    finally:
        eager_model.close()
    # The known near misses: the final norm feeds the unquantized head, once per
    # rms_quant_fusion rewrite that starts at its op; Gemma's sandwich norms feed no
    # quant either (2 per layer); nothing else misses.
    misses = result["miss_table"]
    assert misses == result["expected_misses"]
    assert set(misses) == {"rms_quant_fusion"}
    if model == "gemma3":
        assert misses["rms_quant_fusion"]["FusedAddGemmaRmsNormStaticFp8Quant"] == 1
        assert misses["rms_quant_fusion"]["GemmaRmsNormStaticFp8Quant"] == 4
    else:
        assert set(misses["rms_quant_fusion"].values()) == {1}
        assert "FusedAddRmsNormStaticFp8Quant" in misses["rms_quant_fusion"]
        assert not any(name.startswith("RmsNorm") for name in misses["rms_quant_fusion"])
    printed = capsys.readouterr().out
    assert "rms_quant_fusion" in printed and "greedy tokens identical: yes" in printed
    assert "near misses" in printed and "MISMATCH" not in printed
    assert "timings: not measured (--no-timing" in printed


def test_model_and_preset_must_agree(capsys):
    assert main(["demo", "--model", "qwen3", "--preset", "gemma3-12b"]) == 2
    assert "--preset gemma3-12b is a gemma3 model, not qwen3" in capsys.readouterr().err
    assert main(["explain", "--preset", "nope"]) == 2
    assert "unknown model preset 'nope'" in capsys.readouterr().err


def test_expected_matches_follow_the_backends_declared_support():
    from fxfuse.models import LlamaForCausalLM, ModelConfig

    cases = [("fp8", "native", 3), ("fp8", "native-noquant", 0), ("nvfp4", "native", 3), ("nvfp4", "native-noquant", 0)]
    for quant, backend, attn in cases:
        model = LlamaForCausalLM(ModelConfig.preset("tiny", quant=quant, num_layers=3), attention_backend=backend)
        try:
            assert expected_matches(model) == {"rms_quant_fusion": 6, "act_quant_fusion": 3, "attn_quant_fusion": attn,
                                               "qk_norm_rope_fusion": 0, "rope_kv_cache_fusion": 3}
        finally:
            model.close()
    # Block-scaled FP8 quantizes attention's output per token group: no backend fuses that.
    config = types.SimpleNamespace(quant="fp8-block", num_layers=2)
    block = types.SimpleNamespace(config=config, attention_layer_names=[])
    assert expected_matches(block) == {"rms_quant_fusion": 4, "act_quant_fusion": 2, "attn_quant_fusion": 0,
                                       "qk_norm_rope_fusion": 0, "rope_kv_cache_fusion": 0}
    with pytest.raises(ValueError, match="no attention output scheme known for quant 'int4'"):
        expected_matches(types.SimpleNamespace(config=types.SimpleNamespace(quant="int4", num_layers=1)))


@pytest.mark.parametrize("preset, quant, want", [
    ("qwen3-tiny", "fp8", {"rms_quant_fusion": 4, "act_quant_fusion": 2, "attn_quant_fusion": 2,
                           "qk_norm_rope_fusion": 2, "rope_kv_cache_fusion": 0}),
    ("gemma3-tiny", "fp8", {"rms_quant_fusion": 4, "act_quant_fusion": 0, "attn_quant_fusion": 2,
                            "qk_norm_rope_fusion": 2, "rope_kv_cache_fusion": 0}),
    # No fused Gemma norm + per-token-group quant op: no norm-quant fusion in Gemma fp8-block.
    ("gemma3-tiny", "fp8-block", {"rms_quant_fusion": 0, "act_quant_fusion": 0, "attn_quant_fusion": 0,
                                  "qk_norm_rope_fusion": 2, "rope_kv_cache_fusion": 0}),
])
def test_expected_matches_of_each_family(preset, quant, want):
    from fxfuse.models import ModelConfig, build_model

    model = build_model(ModelConfig.preset(preset, quant=quant))
    try:
        assert expected_matches(model) == want
    finally:
        model.close()


def test_a_backend_that_does_not_rotate_expects_the_rotation_unfused():
    from fxfuse.attention import NativeAttentionBackend
    from fxfuse.cli import expected_misses
    from fxfuse.models import LlamaForCausalLM, ModelConfig

    class NoRope(NativeAttentionBackend):
        name = "cli-test-norope"
        fuses_rope = False

    model = LlamaForCausalLM(ModelConfig.preset("tiny"), attention_backend=NoRope())
    try:
        assert expected_matches(model)["rope_kv_cache_fusion"] == 0
        misses = expected_misses(model, fxfuse.default_passes())
        assert misses["rope_kv_cache_fusion"] == {"RopeAttention": 2, "RopeAttentionFp8": 2, "RopeAttentionNvfp4": 2}
    finally:
        model.close()


@pytest.fixture(scope="module")
def noquant_demo(tmp_path_factory):
    """One demo run on a backend without fused output quant, recording each run's state."""
    runs = []
    real_run = fxfuse.models.run

    def spy(model, forward, *args, **kwargs):
        runs.append((model.config.num_layers, torch.compiler.config.force_disable_caches))
        return real_run(model, forward, *args, **kwargs)

    out = tmp_path_factory.mktemp("demo") / "demo.json"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setattr(fxfuse.models, "run", spy)
        rc = main(["demo", "--layers", "2", "--attention-backend", "native-noquant", "--new-tokens", "2",
                   "--json", str(out)])
    return rc, json.loads(out.read_text()), printed.getvalue(), runs


@pytest.mark.compile
def test_demo_expects_attention_fusions_only_where_the_backend_supports_them(noquant_demo):
    rc, result, printed, _ = noquant_demo
    assert result["expected_matches"] == {"rms_quant_fusion": 4, "act_quant_fusion": 2, "attn_quant_fusion": 0,
                                          "qk_norm_rope_fusion": 0, "rope_kv_cache_fusion": 2}
    # The rotation folds into the attention that writes the model dtype (nothing quantizes it).
    assert result["match_table"]["rope_kv_cache_fusion"] == {"RopeAttention": 2}
    assert "attn_quant_fusion" not in result["match_table"]
    assert sum(result["match_table"]["rms_quant_fusion"].values()) == 4
    assert result["tokens_fused"] == result["tokens_unfused"]
    assert "total (expected 0)" in printed and "MISMATCH" not in printed
    # Each attention rewrite misses both layers: their backend cannot write quantized output.
    assert result["miss_table"]["attn_quant_fusion"] == {"AttentionStaticFp8Quant": 2, "AttentionNvfp4Quant": 2}
    assert result["miss_table"] == result["expected_misses"]
    assert rc == 0


@pytest.mark.compile
def test_demo_times_both_variants_after_the_same_warm_up(noquant_demo):
    _, result, printed, runs = noquant_demo
    # A 1-layer warm-up in both variants, then the two timed 2-layer runs; all compile from scratch.
    assert runs == [(1, True), (1, True), (2, True), (2, True)]
    assert result["warm_up_s"] > 0 and set(result["compile_s"]) == {"fused", "unfused"}
    assert result["timing_note"] == TIMING_NOTE
    assert "after an untimed warm-up" in " ".join(printed.split())


def test_patterns_prints_every_rewrite_and_timing(capsys):
    assert main(["patterns", "--timing"]) == 0
    printed = capsys.readouterr().out
    # A pass with no rewrites says why, not what a FusionPass is in general.
    native = printed.split("# pass native_lowering\n")[1].splitlines()[0]
    if torch.cuda.is_available():  # the shipped table lowers some ops on the H100
        assert native.startswith("# ") and "_to_native (" in native
    else:
        assert "no rewrites in this process" in native and "cpu" in native
    assert "A named set of rewrites" not in printed
    for name in ("RmsNormStaticFp8Quant", "FusedAddRmsNormDynamicFp8QuantUb", "SiluMulStaticFp8Quant"):
        assert f"# {name} (" in printed and f"def {name}(" in printed
    # Readable Python, not matcher objects: the wildcard eps passed on by name.
    assert "def RmsNormStaticFp8Quant(x, w, s, eps):" in printed
    assert "rms_norm = fxfuse.rms_norm.default(x, w, eps)" in printed
    assert "CallFunction" not in printed and "KeywordArg" not in printed
    assert "registration of all built-in passes" in printed
    timing = printed.split("registration of all built-in passes")[1].splitlines()[1:]
    columns = {len(line) for line in timing if line.strip()}
    assert len(columns) == 1, f"the timing table is not aligned:\n{chr(10).join(timing)}"


def test_bad_layers_is_a_usage_error():
    with pytest.raises(SystemExit):
        main(["demo", "--layers", "0"])


def test_explain_with_an_unknown_rewrite_exits_2_listing_the_known_names(capsys):
    assert main(["explain", "--rewrite", "RmsNormStaticFp8Qaunt"]) == 2
    err = capsys.readouterr().err
    assert "no rewrite named 'RmsNormStaticFp8Qaunt'" in err
    for name in ("RmsNormStaticFp8Quant", "SiluMulNvfp4Quant", "AttentionStaticFp8Quant"):
        assert name in err


@pytest.mark.compile
def test_explain_takes_the_model_family(capsys):
    assert main(["explain", "--model", "qwen3", "--layers", "1", "--rewrite", "QkNormRope"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("== qk_norm_rope_fusion/QkNormRope: 1 matched, 0 near misses")
    assert any(line.startswith("qk_norm_rope_fusion/QkNormRope") and line.endswith(": MATCH") for line in lines)


@pytest.mark.compile
def test_explain_reports_each_fusion_site(capsys):
    assert main(["explain", "--layers", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    matched = sorted(line.split(" [")[0] for line in lines if line.endswith(": MATCH"))
    assert matched == [
        "act_quant_fusion/SiluMulStaticFp8Quant",
        "attn_quant_fusion/AttentionStaticFp8Quant",
        "rms_quant_fusion/FusedAddRmsNormStaticFp8Quant",
        "rms_quant_fusion/RmsNormStaticFp8Quant",
        "rope_kv_cache_fusion/RopeAttentionFp8",  # the passes run in order: attention writes FP8 by then
    ]
    # One block per rewrite with chains: a header, its pattern once, then one line per chain;
    # the rewrites without any in one line: the all-reduce ones (no process group), the
    # q/k norm ones (a Llama normalizes no head) and Gemma's norm ones.
    passes = fxfuse.default_passes()
    without = {"QkNormRope", "QkGemmaNormRope"}
    # gemm_fusion's block-scaled FP8 rewrites start at block_fp8_linear, which an fp8 model has not.
    with_sites = [r.name for p in passes if p.name != "allreduce_rms_fusion" for r in p.rewrites
                  if r.name not in without and "Gemma" not in r.name and getattr(r, "OP", None) != "block_fp8_linear"]
    headers = [line.split(":")[0][3:].split("/")[1] for line in lines if line.startswith("== ")]
    assert headers == with_sites
    (quiet,) = [line for line in lines if line.startswith("no site in the graph for ")]
    assert "allreduce_rms_fusion: 21 rewrites found from _c10d_functional.all_reduce.default" in quiet
    assert "qk_norm_rope_fusion: 2 rewrites found from aten.reshape.default" in quiet
    assert "gemm_fusion: 12 rewrites found from fxfuse.block_fp8_linear.default" in quiet
    starts = [t for p in passes for t in p.traced
              if t.anchors[0].target is torch.ops.fxfuse.silu_and_mul.default]
    assert len(starts) >= 3  # SiLU-and-mul + static FP8, NVFP4, group FP8 (+ a lowering on GPUs)
    # Patterns print as Python: one call line per pattern of a SiLU-and-mul rewrite.
    assert sum(line.strip().startswith("silu_and_mul = fxfuse.silu_and_mul.default(x)") for line in lines) == len(starts)
    # Sibling rewrites' chains fused by another rewrite say so, not "MATCH" or a miss.
    assert any(line.startswith("act_quant_fusion/SiluMulNvfp4Quant") and ": taken: fused into "
               "act_quant_fusion/SiluMulStaticFp8Quant" in line for line in lines)
    # The final norm feeds the unquantized LM head: a near miss, with where its value goes instead.
    assert any(line.startswith("rms_quant_fusion/FusedAddRmsNormStaticFp8Quant") and ": no: " in line
               and "aten.mm" in line for line in lines)


def test_help_and_bench_without_a_gpu_answer_without_importing_torch():
    # `import fxfuse` imports torch (seconds); a command that does no work must not.
    import subprocess
    import sys

    probe = (
        "import sys, fxfuse_cli\n"
        "for argv in (['--help'], ['patterns', '--help'], ['bench', '--help'], ['bench']):\n"
        "    try:\n"
        "        code = fxfuse_cli.main(argv)\n"
        "    except SystemExit as e:\n"
        "        code = e.code\n"
        "    print(argv, code, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("[")]
    assert len(lines) == 4 and all(line.endswith(" False") for line in lines), out.stdout
    if not torch.cuda.is_available() and fxfuse_cli_no_gpu():
        assert lines[-1] == "['bench'] 2 False"
        assert "needs a CUDA device" in out.stderr


def fxfuse_cli_no_gpu():
    import fxfuse_cli

    return fxfuse_cli.no_gpu_here()
