"""``fxfuse bench --only tp`` on the CPU: the orchestration over 2 gloo processes running
the real ops (their native chains), with a fake timer; the threshold rule; the command
line. The timings themselves need 2 GPUs and are not run here."""

import pytest
import torch

from fxfuse.bench import DEFAULT_SECTIONS, main, tp
from fxfuse.cli import build_parser

TOKENS, HIDDEN = (1, 5), (64,)


def fake_timer(fn, case):
    """Forced kernel wins below 640 bytes for ``plain`` and at both sizes for ``static_fp8``;
    rank 1's numbers are 1000 us off, so a row taken from it shows."""
    import torch.distributed as dist

    fn()  # the call the timer would capture: it must run on every rank
    base = {"fused": 0.5 + case["bytes"] / 32, "fused_forced": 1.0 + case["bytes"] / 32,
            "nccl": 10.0 + case["bytes"] / 128 + (10.0 if case["variant"] == "static_fp8" else 0.0)}
    return base[case["impl"]] + 1000.0 * dist.get_rank()


_LOG: list = []  # what run() printed


@pytest.fixture(scope="module")
def result():
    return tp.run(world_size=2, tokens=TOKENS, hidden=HIDDEN, timer=fake_timer, device="cpu", log=_LOG.append)


def test_every_variant_and_shape_has_a_row_with_rank_0s_times(result):
    rows = result["rows"]
    assert [(r["variant"], r["tokens"], r["hidden"]) for r in rows] == [
        (v, t, h) for h in HIDDEN for t in TOKENS for v in tp.VARIANTS]
    for r in rows:
        assert r["bytes"] == r["tokens"] * r["hidden"] * 2  # bf16 partial sums
        assert r["fused_us"] == 0.5 + r["bytes"] / 32  # rank 0's (rank 1's are 1000 more)
        assert r["fused_forced_us"] == 1.0 + r["bytes"] / 32
        assert r["speedup"] == pytest.approx(r["nccl_us"] / r["fused_us"])
        assert (r["fused_path"], r["forced_path"]) == ("native", "native")
        assert r["max_abs_diff"] == 0.0  # the op over gloo is its chain, bit for bit


def test_thresholds_of_the_run(result):
    assert result["threshold"] == [
        dict(variant="plain", hidden=64, tokens=1, bytes=128),
        dict(variant="static_fp8", hidden=64, tokens=5, bytes=640),
    ]
    assert result["world_size"] == 2


def test_the_table_is_printed_once_by_the_parent(result):
    header = [line for line in _LOG if line.startswith("variant")]
    assert len(header) == 1
    assert len([line for line in _LOG if line.startswith(("plain", "static_fp8"))]) == len(result["rows"])
    assert "threshold: plain at hidden 64: the forced kernel beats NCCL up to 1 tokens (128 bytes)" in _LOG


def test_threshold_is_the_largest_winning_size_per_variant_and_width():
    def row(variant, hidden, tokens, forced, nccl):
        return dict(variant=variant, hidden=hidden, tokens=tokens, bytes=tokens * hidden * 2,
                    fused_forced_us=forced, nccl_us=nccl)

    rows = [row("plain", 8, 1, 1.0, 2.0), row("plain", 8, 4, 3.0, 2.0), row("plain", 8, 16, 1.0, 2.0),
            row("plain", 16, 1, 3.0, 2.0), row("plain", 16, 2, None, 2.0),  # never wins; not timed
            row("static_fp8", 8, 1, 1.0, 2.0), row("static_fp8", 8, 2, 2.0, 2.0)]  # a tie is no win
    assert tp.thresholds(rows) == [
        dict(variant="plain", hidden=8, tokens=16, bytes=256),
        dict(variant="plain", hidden=16, tokens=None, bytes=None),
        dict(variant="static_fp8", hidden=8, tokens=1, bytes=16),
    ]


def test_the_command_line_takes_tp_which_is_not_a_default_section():
    args = build_parser().parse_args(["bench", "--only", "tp", "--tp", "2"])
    assert (args.only, args.tp) == ("tp", 2)
    assert build_parser().parse_args(["bench"]).tp == 2
    assert "tp" not in DEFAULT_SECTIONS


@pytest.mark.skipif(torch.cuda.device_count() >= 4, reason="enough GPUs to run it")
def test_too_few_gpus_is_a_clear_message_and_exit_2(capsys):
    n = torch.cuda.device_count()
    assert main(build_parser().parse_args(["bench", "--only", "tp", "--tp", "4"])) == 2
    assert f"fxfuse bench --only tp: needs 4 GPUs, found {n}" in capsys.readouterr().err
    assert tp.run(world_size=4, device="cuda") == {}
    assert f"needs 4 GPUs, found {n}" in capsys.readouterr().err
