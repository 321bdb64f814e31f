"""Small-batch FP8 GEMM (``fxfuse.kernels.small_gemm``) for ``fp8_linear`` and
``block_fp8_linear`` at decode token counts, and its dispatch table.

What is guaranteed, and tested here (Triton's CPU interpreter, small odd shapes: token
tails of the 16/32/64-row tiles, weight-row tails, K tails, uneven K splits):

- **fp32 result.** Every product of two E4M3 values is exact in fp32, so the kernel's
  fp32 value differs from the exact (float64) product of the dequantized operands only
  by its additions and scale multiplications: at most ``(2K + 16) * 2**-24 * |x| @ |w|``
  (``|x| @ |w|``: the magnitude of the terms, plus ``|bias|``), whatever the tile order
  or split; the native fp32 reference obeys the same bound, so the two differ by at
  most twice it.
- **Rounded outputs.** Rounding is monotone, so a 16-bit output lies between the
  correctly rounded ends of that interval: ``round(exact - e) <= out <= round(exact + e)``.
  Where ``e`` is below half a unit in the last place of the output (every element whose
  value is not cancelled down to ~2% of its terms' magnitude) that puts a bf16 output
  within one bf16 ulp of the correctly rounded native fp32 result, and the test checks
  it there. The bf16 output is exactly the bf16 rounding of the same config's fp32 output.
- **Splits.** Configs that split K (evenly or not), swap the MMA operands or tile
  differently agree within the bound; one config gives the same bits on every run (split
  partials are added by a second kernel in split order, no atomics).

On the GPU (``@pytest.mark.gpu``, Llama-3 shapes) Hopper's FP8 tensor cores add inside
an MMA with fewer than fp32's bits (DeepSeek-V3 measured ~14), so the bound there is
``2**-10 * |x| @ |w|`` plus one output step, as for ``block_fp8_linear``'s kernel; the
kernel is compared with the native op and with ``torch._scaled_mm``.
"""

import json

import pytest
import torch

import fxfuse.ops  # noqa: F401  (registers torch.ops.fxfuse.*)
from fxfuse.kernels import small_gemm_config as C
from fxfuse.kernels.small_gemm_config import SmallGemmConfig as Cfg
from fxfuse.ops import block_linear as BL
from fxfuse.ops import linear as L
from fxfuse.ops.block_linear import block_fp8_linear_native, quantize_weight_blocks
from fxfuse.ops.group_quant import group_fp8_quant_native
from fxfuse.ops.linear import fp8_linear_native
from conftest import covering

fx = torch.ops.fxfuse
FP8 = torch.float8_e4m3fn
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
U = 2.0**-24


def _kernels():
    pytest.importorskip("triton", reason="Triton is part of the test extras")
    from fxfuse.kernels import small_gemm

    return small_gemm


def _rand(*shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _per_tensor_problem(lead, n, k, per_token, seed, device=DEVICE):
    """Quantized activations ``[*lead, k]`` and weight ``[n, k]`` (never zero: randn)."""
    x = _rand(*lead, k, seed=seed, scale=2.0)
    # Rows of different magnitudes, so a wrong row or column scale shows.
    w = _rand(n, k, seed=seed + 1, scale=0.1) * torch.logspace(-1, 1, n)[:, None]
    w_scale = torch.tensor([w.abs().max().item() / 448.0])
    w_q = (w / w_scale).to(FP8)
    if per_token:
        x_scale = (x.abs().amax(-1, keepdim=True) / 448.0).clamp(min=1e-6)
    else:
        # 0-d: fp8_linear takes [] and [1]
        x_scale = torch.tensor(max(x.abs().max().item() if x.numel() else 1.0, 1e-6) / 448.0)
    x_q = (x / x_scale).clamp(-448, 448).to(FP8)
    return [t.to(device) for t in (x_q, w_q, x_scale, w_scale)]


def _block_problem(lead, n, k, group_size, column_major, seed, device=DEVICE):
    x = _rand(*lead, k, seed=seed).to(torch.bfloat16)
    x_q, x_s = group_fp8_quant_native(x, group_size, column_major)
    w = _rand(n, k, seed=seed + 1, scale=0.05) * torch.logspace(-1, 1, n)[:, None]
    w_q, w_s = quantize_weight_blocks(w)
    return [t.to(device) for t in (x_q, x_s, w_q, w_s)]


def _bias(n, dtype, seed):
    return _rand(n, seed=seed).to(dtype).to(DEVICE)


def _exact_per_tensor(x_q, w_q, x_scale, w_scale, bias):
    """float64 product of the dequantized operands (exact up to float64's rounding), and
    the magnitude of its terms, ``|x| @ |w| + |bias|``."""
    x = x_q.cpu().double() * x_scale.cpu().double()
    w = w_q.cpu().double() * w_scale.cpu().double().reshape(())
    out = x @ w.t()
    mag = x.abs() @ w.abs().t()
    if bias is not None:
        out, mag = out + bias.cpu().double(), mag + bias.cpu().double().abs()
    return out, mag


def _exact_block(x_q, x_s, w_q, w_s, bias):
    k = x_q.shape[-1]
    x = x_q.cpu().double() * x_s.cpu().double().repeat_interleave(k // x_s.shape[-1], -1)
    n = w_q.shape[0]
    w = w_q.cpu().double() * w_s.cpu().double().repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    out, mag = x @ w.t(), x.abs() @ w.abs().t()
    if bias is not None:
        out, mag = out + bias.cpu().double(), mag + bias.cpu().double().abs()
    return out, mag


def _fp32_bound(k, mag):
    if DEVICE == "cuda":  # FP8 tensor cores accumulate with ~14 bits inside an MMA
        return 2**-10 * mag
    return (2 * k + 16) * U * mag


def _round_to(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 ``v`` correctly rounded (half to even) onto the grid of ``dtype``, kept in
    float64 (a double -> bf16 cast may round twice)."""
    if dtype == torch.float32:
        return v.float().double()
    bits, min_exp = {torch.bfloat16: (8, -126), torch.float16: (11, -14)}[dtype]
    _, e = torch.frexp(v)
    step = torch.exp2((torch.clamp(e - 1, min=min_exp) - (bits - 1)).double())
    return torch.round(v / step) * step


def _ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    bits, min_exp = {torch.bfloat16: (8, -126), torch.float16: (11, -14)}[dtype]
    _, e = torch.frexp(v)
    return torch.exp2((torch.clamp(e - 1, min=min_exp) - (bits - 1)).double())


def _assert_within(out, exact, mag, k, what=""):
    """``out`` (any dtype) within what the kernel guarantees of the exact product."""
    e = _fp32_bound(k, mag)
    if out.dtype == torch.float32:
        diff = (out.cpu().double() - exact).abs()
        assert bool((diff <= e).all()), f"{what}: max diff {diff.max().item():.3g}, bound there " \
                                        f"{e.flatten()[diff.argmax()].item():.3g}"
        return
    lo, hi = _round_to(exact - e, out.dtype), _round_to(exact + e, out.dtype)
    if DEVICE == "cuda":  # the epilogue's own rounding of the scaled value: one more step
        lo, hi = lo - _ulp(lo, out.dtype), hi + _ulp(hi, out.dtype)
    o = out.cpu().double()
    bad = (o < lo) | (o > hi)
    assert not bool(bad.any()), f"{what}: {int(bad.sum())} of {o.numel()} outside the rounded interval, e.g. " \
                                f"{o[bad][0].item()} not in [{lo[bad][0].item()}, {hi[bad][0].item()}]"


def _assert_one_bf16_ulp(out_bf16, native_f32, exact, mag, k):
    """Where the bound is below half a bf16 ulp of the value, the bf16 output is within one
    bf16 ulp of the correctly rounded native fp32 result; that is most elements."""
    e = _fp32_bound(k, mag)
    ref = _round_to(native_f32.cpu().double(), torch.bfloat16)
    ulp = _ulp(exact, torch.bfloat16)
    sure = e < ulp / 2
    # Random sums cancel to below ~2% of their terms' magnitude on a fifth of the elements
    # at K ~ 300; the interval check of `_assert_within` covers those.
    assert sure.float().mean().item() > 0.5, "the check would cover too few elements"
    diff = (out_bf16.cpu().double() - ref).abs()
    assert bool((diff[sure] <= ulp[sure] * 1.0000001).all()), f"max {(diff / ulp)[sure].max().item()} ulp"


# --------------------------------------------------------------------------- configs


def test_default_config_fills_the_machine_and_fits_the_groups():
    for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (10240, 8192), (8192, 28672)]:
        for m in (1, 2, 16, 17, 32, 64):
            cfg = C.default_config(m, n, k)
            programs = -(-n // cfg.block_n) * cfg.split_k
            # Two programs per multiprocessor, unless one more doubling of the split would
            # leave a split under two K steps or make the partials too big.
            capped = -(-k // cfg.block_k) // (2 * cfg.split_k) < 2 or 2 * cfg.split_k * m * 16 > k
            assert programs >= 2 * 132 or capped, (n, k, m, cfg)
            assert cfg.split_k * m * n * 4 * 2 <= n * k / 2  # partials: at most half the weight's bytes
            assert C.default_config(m, n, k, group_k=128).block_k % 128 == 0
    assert C.default_config(1, 28672, 4096).split_k == 1  # wide layers never split
    assert [C.block_m_for(m) for m in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]


def test_config_dicts_round_trip_and_reject_unknown_keys():
    cfg = Cfg(32, 128, 3, 8, 2, True)
    assert Cfg.from_dict(json.loads(json.dumps(cfg.as_dict()))) == cfg
    with pytest.raises(ValueError, match=r"unknown keys \['blockn'\]"):
        Cfg.from_dict({"blockn": 32, "block_k": 128})


TABLE = {"devices": {"GPU A": {
    "fp8_linear": {"max_tokens": 16, "by_shape": {"4096x14336": 32},
                   "configs": {"4096x4096": {"1": Cfg(32, 512, 8).as_dict(), "4": Cfg(128, 256, 2).as_dict(),
                                             "32": Cfg(64, 64, 1).as_dict()}}},
    "block_fp8_linear": {"max_tokens": 0, "configs": {"4096x4096": {"1": Cfg(64, 64, 4).as_dict()}}}}}}


def test_choose_follows_the_table(monkeypatch):
    monkeypatch.delenv(C.MAX_TOKENS_ENV, raising=False)
    C.check_choices(TABLE)
    pick = lambda *a, **kw: C.choose(TABLE, *a, **kw)  # noqa: E731
    assert pick("GPU B", "fp8_linear", 1, 4096, 4096) is None  # a device without an entry: today's paths
    assert pick("GPU A", "fp8_linear", 1, 4096, 4096) == Cfg(32, 512, 8)
    assert pick("GPU A", "fp8_linear", 2, 4096, 4096) == Cfg(128, 256, 2)  # the next measured count up
    assert pick("GPU A", "fp8_linear", 16, 4096, 4096) == C.default_config(16, 4096, 4096)  # none measured >= 16
    assert pick("GPU A", "fp8_linear", 17, 4096, 4096) is None  # above max_tokens
    assert pick("GPU A", "fp8_linear", 32, 4096, 14336) == C.default_config(32, 4096, 14336)  # by_shape: 32
    assert pick("GPU A", "fp8_linear", 33, 4096, 14336) is None
    assert pick("GPU A", "block_fp8_linear", 1, 4096, 4096) is None  # max_tokens 0: never
    assert pick("GPU A", "fp8_linear", 0, 4096, 4096) is None
    assert pick("GPU A", "fp8_linear", 1, 4096, 4096, sms=8) == Cfg(32, 512, 8)  # measured beats the rule
    assert pick("GPU A", "fp8_linear", 8, 6144, 4096, sms=8) == C.default_config(8, 6144, 4096, sms=8)


def test_environment_overrides_the_token_limit(monkeypatch):
    monkeypatch.setenv(C.MAX_TOKENS_ENV, "64")
    assert C.choose(TABLE, "GPU B", "fp8_linear", 64, 4096, 4096) == C.default_config(64, 4096, 4096)
    assert C.choose(TABLE, "GPU A", "block_fp8_linear", 1, 4096, 4096, group_k=128) == \
        C.default_config(1, 4096, 4096, 128)  # the measured block_k 64 does not fit groups of 128
    assert C.choose(TABLE, "GPU A", "fp8_linear", 65, 4096, 4096) is None  # never past the kernel's 64
    monkeypatch.setenv(C.MAX_TOKENS_ENV, "0")
    assert C.choose(TABLE, "GPU A", "fp8_linear", 1, 4096, 4096) is None
    monkeypatch.setenv(C.MAX_TOKENS_ENV, "lots")
    with pytest.raises(ValueError, match=r"FXFUSE_SMALL_GEMM_MAX_TOKENS must be an integer.*'lots'"):
        C.choose(TABLE, "GPU A", "fp8_linear", 1, 4096, 4096)


@pytest.mark.parametrize("table, msg", [
    ({}, r"needs a 'devices' mapping"),
    ({"devices": {"G": {"fp8_linearr": {"max_tokens": 4}}}}, r"unknown op 'fp8_linearr'"),
    ({"devices": {"G": {"fp8_linear": {"max_tokens": "4"}}}}, r"\['fp8_linear'\] needs an int 'max_tokens'"),
    ({"devices": {"G": {"fp8_linear": {"max_tokens": 4, "by_shape": {"1x2": 1.5}}}}}, r"by_shape\['1x2'\]"),
    ({"devices": {"G": {"fp8_linear": {"max_tokens": 4, "configs": {"1x2": {"1": {"block_n": 8}}}}}}},
     r"configs\['1x2'\]\['1'\]"),
])
def test_bad_tables_are_named(table, msg):
    with pytest.raises(ValueError, match=msg):
        C.check_choices(table)


def test_shipped_table_loads_and_measurements_write_a_table(tmp_path, monkeypatch):
    monkeypatch.delenv(C.CHOICES_ENV, raising=False)
    C.check_choices(C.load_choices())
    rows = []
    for (n, k), wins in {(4096, 4096): (1, 2, 4, 8, 16), (28672, 4096): (1, 2, 4, 8, 16, 32, 64)}.items():
        for t in (1, 2, 4, 8, 16, 32, 64):
            cfg = Cfg(64, 256, 4 if t < 16 else 1).as_dict()
            # A loss at 32 ends o_proj's range even though it wins again at 64.
            won = t in wins or (n, t) == (4096, 64)
            rows.append(dict(op="fp8_linear", n=n, k=k, tokens=t, config=cfg, baseline_us=10.0,
                             us=9.0 if won else 9.9))
    entry = C.choices_from_rows(rows)
    assert entry["fp8_linear"]["max_tokens"] == 16
    assert entry["fp8_linear"]["by_shape"] == {"28672x4096": 64}
    assert sorted(entry["fp8_linear"]["configs"]["4096x4096"], key=int) == ["1", "2", "4", "8", "16"]
    path = tmp_path / "choices.json"
    path.write_text(json.dumps({"devices": {"Other GPU": {"fp8_linear": {"max_tokens": 2}}}, "measured": {}}))
    C.write_choices(path, "GPU A", entry, "today")
    table = C.load_choices(path)
    assert set(table["devices"]) == {"Other GPU", "GPU A"} and table["measured"]["GPU A"] == "today"
    monkeypatch.setenv(C.CHOICES_ENV, str(path))
    assert C.load_choices() == table
    assert C.choose(table, "GPU A", "fp8_linear", 3, 4096, 4096) == Cfg(64, 256, 4)


def _sweep_script():
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location(
        "small_gemm_sweep", pathlib.Path(__file__).parent.parent / "benchmarks" / "small_gemm_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    return sweep


def test_sweep_candidates_are_valid_configs():
    sweep = _sweep_script()
    for _, _, n, k in sweep.SHAPES:
        for m in sweep.TOKENS:
            for group_k in (None, 128):
                configs = sweep.candidates(m, n, k, group_k, torch.device("cuda"), sms=132)
                assert configs[0] == C.default_config(m, n, k, group_k, 132) and len(set(configs)) == len(configs)
                assert 4 <= len(configs) <= 10  # each tiling compiles per token tile: the run stays in minutes
                for cfg in configs:
                    assert C.shared_memory_bytes(m, cfg) <= sweep.SMEM_LIMIT
                    assert group_k is None or cfg.block_k % group_k == 0


def test_sweep_runs_end_to_end_and_writes_a_table(tmp_path, monkeypatch):
    """The sweep's plumbing, on the CPU: tiny shapes through Triton's interpreter, a fake
    timer, every config checked against the baseline, the JSON and the table written."""
    _kernels()
    if DEVICE == "cuda":
        pytest.skip("the GPU runs the real sweep")
    sweep = _sweep_script()
    times = iter(range(1, 100000))
    monkeypatch.setattr(sweep, "DEVICE", "cpu")
    monkeypatch.setattr(sweep, "have_cuda", lambda: True)
    monkeypatch.setattr(sweep, "environment", lambda: dict(date="today", device="Test GPU", torch="t", triton="tr"))
    monkeypatch.setattr(sweep, "copy_bandwidth", lambda: 1e12)
    monkeypatch.setattr(sweep, "num_sms", lambda device: 8)
    monkeypatch.setattr(sweep, "cold_copies", lambda make, nbytes: [make() for _ in range(2)])
    monkeypatch.setattr(sweep, "graph_us", lambda fns, reps=None: [f() for f in fns] and 1.0 + next(times) % 7)
    monkeypatch.setattr(sweep, "SHAPES", (("tiny", "o_proj", 200, 256), ("tiny", "down_proj", 136, 384)))
    choices = tmp_path / "choices.json"
    rc = sweep.main(["--out", str(tmp_path / "out"), "--write-choices", str(choices), "--tokens", "1,17",
                     "--models", "tiny"])
    assert rc == 0  # every config's output matched its baseline
    result = json.loads((tmp_path / "out" / "small_gemm_sweep.json").read_text())
    assert {r["scheme"] for r in result["rows"]} == {"fp8", "fp8-block"}
    assert {r["label"] for r in result["rows"] if r["kind"] == "baseline"} == \
        {"scaled_mm", "triton_block", "scaled_mm_per_tensor"}  # no blockwise _scaled_mm on CPU
    assert len(result["best"]) == 2 * 2 * 2
    checked = lambda r: None if r["label"] == "scaled_mm_per_tensor" else True  # noqa: E731 - the yardstick is not
    assert all(r["matches_baseline"] is checked(r) for r in result["rows"])
    table = C.load_choices(choices)
    assert set(table["devices"]["Test GPU"]) <= {"fp8_linear", "block_fp8_linear"}
    assert table["devices"]["Test GPU"] == result["choices"]


def test_cpu_runs_the_native_reference():
    x_q, w_q, x_scale, w_scale = _per_tensor_problem((3,), 64, 64, False, seed=1, device="cpu")
    assert L.small_gemm_config("fp8_linear", x_q, w_q) is None
    assert L.fp8_linear_path(x_q, w_q, x_scale) == "native"
    bx_q, bx_s, bw_q, _ = _block_problem((3,), 128, 128, 128, True, seed=2, device="cpu")
    assert BL.block_fp8_linear_path(bx_q, bx_s, bw_q) == "native"


# --------------------------------------------------------------------------- the kernel, per-tensor scales

LINEAR_CASES = [((1,), 200, 208), ((3,), 37, 96), ((17,), 136, 320), ((2, 3), 72, 64), ((65,), 40, 48)] \
    if DEVICE == "cpu" else [((1,), 4096, 4096), ((7,), 6144, 4096), ((33,), 4096, 14336), ((64,), 1000, 576)]
DTYPES = [(torch.bfloat16, False), (torch.float16, True), (torch.float32, True), (torch.bfloat16, True)]


@pytest.mark.parametrize("lead, n, k, per_token, out_dtype, with_bias", [tuple(v0) + (v1,) + tuple(v2) for v0, v1, v2 in covering(
    LINEAR_CASES,
    [False, True],
    DTYPES,
)])
def test_kernel_matches_exact_product(lead, n, k, per_token, out_dtype, with_bias):
    sg = _kernels()
    x_q, w_q, x_scale, w_scale = _per_tensor_problem(lead, n, k, per_token, seed=n + k)
    bias = _bias(n, out_dtype, seed=n) if with_bias else None
    out = sg.small_fp8_linear(x_q, w_q, x_scale, w_scale, bias, out_dtype)
    assert out.shape == (*lead, n) and out.dtype == out_dtype and out.device.type == DEVICE
    exact, mag = _exact_per_tensor(x_q, w_q, x_scale, w_scale, bias)
    _assert_within(out, exact, mag, k, "kernel")
    native = fp8_linear_native(x_q, w_q, x_scale, w_scale, bias, torch.float32)
    _assert_within(native, exact, mag, k, "native")  # the bound holds for the reference too
    if out_dtype == torch.bfloat16 and DEVICE == "cpu":  # fp32 accumulation: the interpreter's
        _assert_one_bf16_ulp(out, native, exact, mag, k)
        wide = sg.small_fp8_linear(x_q, w_q, x_scale, w_scale, bias, torch.float32)
        assert torch.equal(out, wide.to(torch.bfloat16))  # one rounding of the same fp32 value


def _configs_for(m):
    """Tilings that cover the kernel's branches: no split, an uneven split (its last
    program has fewer K steps), a split with a K tail, swapped operands, small and wide
    tiles."""
    return [Cfg(64, 64, 1, 4, 2), Cfg(32, 64, 3, 4, 2), Cfg(16, 32, 4, 4, 3), Cfg(64, 128, 2, 4, 2, True),
            Cfg(128, 32, 1, 4, 1, True), Cfg(32, 256, 2, 8, 2)]


@pytest.mark.parametrize("m, n, k, per_token", [tuple(v0) + (v1,) for v0, v1 in covering(
    [(1, 200, 208), (5, 37, 96), (17, 136, 320)] if DEVICE == "cpu" else
                         [(1, 4096, 4096), (16, 6144, 4096), (64, 4096, 14336)],
    [False, True],
)])
def test_configs_agree_and_repeat_bit_for_bit(m, n, k, per_token):
    sg = _kernels()
    x_q, w_q, x_scale, w_scale = _per_tensor_problem((m,), n, k, per_token, seed=m * n)
    bias = _bias(n, torch.float32, seed=3)
    exact, mag = _exact_per_tensor(x_q, w_q, x_scale, w_scale, bias)
    outs = []
    for cfg in _configs_for(m):
        out = sg.small_fp8_linear(x_q, w_q, x_scale, w_scale, bias, torch.float32, cfg)
        _assert_within(out, exact, mag, k, cfg.label())
        again = sg.small_fp8_linear(x_q, w_q, x_scale, w_scale, bias, torch.float32, cfg)
        assert torch.equal(out, again), f"{cfg.label()}: two runs differ"
        outs.append(out)
    e = _fp32_bound(k, mag)
    for cfg, out in zip(_configs_for(m), outs):
        assert bool(((out.cpu().double() - outs[0].cpu().double()).abs() <= 2 * e).all()), cfg.label()


def test_bad_configs_are_named():
    sg = _kernels()
    args = _per_tensor_problem((2,), 32, 64, False, seed=4)
    for cfg, msg in [(Cfg(48, 64), r"block_n must be a power of two >= 16, got 48"),
                     (Cfg(32, 16), r"block_k must be a power of two >= 32"),
                     (Cfg(32, 64, 0), r"split_k must be >= 1"),
                     (Cfg(64, 64, 1, 2, 2, True), r"swap_ab needs a multiple of 4 warps")]:
        with pytest.raises(ValueError, match=msg):
            sg.small_fp8_linear(*args, None, torch.bfloat16, cfg)


def test_empty_and_zero_k_problems():
    sg = _kernels()
    x_q, w_q, x_scale, w_scale = _per_tensor_problem((0,), 32, 64, False, seed=5)
    assert sg.small_fp8_linear(x_q, w_q, x_scale, w_scale, None, torch.bfloat16).shape == (0, 32)
    bias = _bias(8, torch.float32, seed=6)
    z = torch.empty(3, 0, dtype=FP8, device=DEVICE)
    out = sg.small_fp8_linear(z, torch.empty(8, 0, dtype=FP8, device=DEVICE), x_scale, w_scale, bias, torch.float32)
    assert torch.equal(out, bias.expand(3, 8))


# --------------------------------------------------------------------------- the kernel, block scales

BLOCK_CASES = [((1,), 200, 256, 128, True), ((3,), 37, 192, 64, False), ((17,), 136, 320, 64, True),
               ((2, 33), 130, 256, 128, False)] if DEVICE == "cpu" else \
              [((1,), 4096, 4096, 128, True), ((16,), 6144, 4096, 128, True), ((64,), 4096, 14336, 128, False),
               ((9,), 1000, 576, 64, True)]


@pytest.mark.parametrize("lead, n, k, group_size, column_major, out_dtype, with_bias", [tuple(v0) + tuple(v1) for v0, v1 in covering(
    BLOCK_CASES,
    DTYPES[:3],
)])
def test_block_kernel_matches_exact_product(lead, n, k, group_size, column_major, out_dtype, with_bias):
    sg = _kernels()
    x_q, x_s, w_q, w_s = _block_problem(lead, n, k, group_size, column_major, seed=n * k)
    bias = _bias(n, out_dtype, seed=7) if with_bias else None
    out = sg.small_block_fp8_linear(x_q, x_s, w_q, w_s, bias, out_dtype)
    assert out.shape == (*lead, n) and out.dtype == out_dtype
    exact, mag = _exact_block(x_q, x_s, w_q, w_s, bias)
    _assert_within(out, exact, mag, k, "kernel")
    native = block_fp8_linear_native(x_q, x_s, w_q, w_s, bias, torch.float32)
    _assert_within(native, exact, mag, k, "native")
    if out_dtype == torch.bfloat16 and DEVICE == "cpu":
        _assert_one_bf16_ulp(out, native, exact, mag, k)


@pytest.mark.parametrize("m, n, k, group_size", [(1, 200, 320, 64), (6, 136, 384, 128)] if DEVICE == "cpu" else
                         [(1, 4096, 4096, 128), (32, 6144, 4096, 128), (64, 4096, 14336, 64)])
def test_block_configs_agree_and_repeat_bit_for_bit(m, n, k, group_size):
    sg = _kernels()
    x_q, x_s, w_q, w_s = _block_problem((m,), n, k, group_size, True, seed=m + n)
    exact, mag = _exact_block(x_q, x_s, w_q, w_s, None)
    # block_k of one group, and of several (a partial last step at K = 320, 384);
    # uneven splits; swapped operands.
    configs = [Cfg(64, group_size, 1, 4, 2), Cfg(32, 256, 2, 4, 2), Cfg(16, 128, 3, 4, 3),
               Cfg(64, 256, 3, 4, 2, True), Cfg(128, 512, 1, 8, 2, True)]
    outs = []
    for cfg in configs:
        out = sg.small_block_fp8_linear(x_q, x_s, w_q, w_s, None, torch.float32, cfg)
        _assert_within(out, exact, mag, k, cfg.label())
        assert torch.equal(out, sg.small_block_fp8_linear(x_q, x_s, w_q, w_s, None, torch.float32, cfg))
        outs.append(out)
    for cfg, out in zip(configs, outs):
        assert bool(((out.cpu().double() - outs[0].cpu().double()).abs() <= 2 * _fp32_bound(k, mag)).all()), \
            cfg.label()
    with pytest.raises(ValueError, match=r"block_k \(32\) must be a multiple of the activation group size"):
        sg.small_block_fp8_linear(x_q, x_s, w_q, w_s, None, torch.float32, Cfg(32, 32))


# --------------------------------------------------------------------------- the ops' wiring


def test_ops_route_to_the_kernel_where_the_table_says(monkeypatch):
    """The decision is `small_gemm_config` (CUDA only; its table logic is tested above);
    forced here, the ops hand their arguments to the kernel as they are (leading dims,
    0-d, [1] and per-token scales, column-major group scales, bias)."""
    _kernels()
    seen = []

    def forced(op, x_q, w_q, group_k=None):
        seen.append((op, group_k))
        return Cfg(32, 128, 2)

    monkeypatch.setattr(L, "small_gemm_config", forced)
    monkeypatch.setattr(BL, "small_gemm_config", forced)
    for per_token in (False, True):
        x_q, w_q, x_scale, w_scale = _per_tensor_problem((2, 3), 72, 256, per_token, seed=8)
        for xs in ([x_scale] if per_token else [x_scale, x_scale.reshape(1)]):
            bias = _bias(72, torch.bfloat16, seed=9)
            assert L.fp8_linear_path(x_q, w_q, xs) == "small_gemm"
            out = fx.fp8_linear(x_q, w_q, xs, w_scale, bias, torch.bfloat16)
            exact, mag = _exact_per_tensor(x_q, w_q, xs, w_scale, bias)
            _assert_within(out, exact, mag, 256, "fp8_linear")
    x_q, x_s, w_q, w_s = _block_problem((2, 3), 130, 256, 64, True, seed=10)
    assert BL.block_fp8_linear_path(x_q, x_s, w_q) == "small_gemm"
    out = fx.block_fp8_linear(x_q, x_s, w_q, w_s, None, torch.float16)
    exact, mag = _exact_block(x_q, x_s, w_q, w_s, None)
    _assert_within(out, exact, mag, 256, "block_fp8_linear")
    assert ("fp8_linear", None) in seen and ("block_fp8_linear", 64) in seen


# --------------------------------------------------------------------------- on the GPU, Llama-3 shapes

LLAMA = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (10240, 8192), (8192, 28672)]
GPU_TOKENS = (1, 3, 16, 64)


def _gpu_weight(n, k, seed):
    """An FP8 weight made on the GPU (a 28672 x 8192 one takes seconds on the CPU), its
    per-tensor scale, and its 128x128 block quantization."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.05 * torch.logspace(-1, 1, n, device="cuda")[:, None]
    w_scale = (w.abs().max() / 448.0).reshape(1)
    w_q = (w / w_scale).to(FP8)
    wb_q, wb_s = quantize_weight_blocks(w)
    return w_q, w_scale, wb_q, wb_s


def _gpu_activations(m, k, per_token, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g) * 2.0
    x_scale = (x.abs().amax(-1, keepdim=True) if per_token else x.abs().max()) / 448.0
    return (x / x_scale).clamp(-448, 448).to(FP8), x_scale, x.to(torch.bfloat16)


def _cuda_bound_ok(out, ref, mag, steps=1):
    """Another summation order than ``ref`` with FP8 MMA accumulation: within
    ``2**-10 * |x| @ |w|`` plus ``steps`` rounding steps of the output dtype."""
    eps = torch.finfo(out.dtype).eps if out.dtype != torch.float32 else 0.0
    diff = (out.double() - ref.double()).abs()
    bound = 2**-10 * mag.double() + steps * eps * ref.double().abs()
    return bool((diff <= bound).all()), diff.max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", LLAMA)
def test_gpu_kernel_matches_native_and_scaled_mm(n, k):
    from fxfuse.kernels.small_gemm import small_fp8_linear

    w_q, w_scale, _, _ = _gpu_weight(n, k, seed=n)
    bias = torch.randn(n, device="cuda").to(torch.bfloat16)
    for m in GPU_TOKENS:
        for per_token in (False, True):
            x_q, x_scale, _ = _gpu_activations(m, k, per_token, seed=m)
            out = small_fp8_linear(x_q, w_q, x_scale, w_scale, bias, torch.bfloat16)
            native = fp8_linear_native(x_q, w_q, x_scale, w_scale, bias, torch.float32)
            mag = (x_q.float().abs() * x_scale) @ (w_q.float().abs() * w_scale).t() + bias.float().abs()
            ok, worst = _cuda_bound_ok(out, native, mag)
            assert ok, f"M={m} per_token={per_token}: vs native: max diff {worst}"
            scaled_mm = L._fp8_linear_scaled_mm(x_q, w_q, x_scale, w_scale, bias, torch.bfloat16)
            ok, worst = _cuda_bound_ok(out, scaled_mm.float(), mag, steps=2)
            assert ok, f"M={m} per_token={per_token}: vs torch._scaled_mm: max diff {worst}"


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", LLAMA)
def test_gpu_block_kernel_matches_native(n, k):
    from fxfuse.kernels.block_linear import block_fp8_matmul
    from fxfuse.kernels.small_gemm import small_block_fp8_linear

    _, _, w_q, w_s = _gpu_weight(n, k, seed=n + 1)
    abs8 = lambda t: (t.view(torch.uint8) & 0x7F).view(t.dtype)  # noqa: E731 - clear the sign bit
    for m in GPU_TOKENS:
        for group_size in (128, 64):
            _, _, x = _gpu_activations(m, k, False, seed=m + 1)
            x_q, x_s = group_fp8_quant_native(x, group_size, True)
            out = small_block_fp8_linear(x_q, x_s, w_q, w_s, None, torch.bfloat16)
            native = block_fp8_linear_native(x_q, x_s, w_q, w_s, None, torch.float32)
            mag = block_fp8_linear_native(abs8(x_q), x_s, abs8(w_q), w_s, None, torch.float32)
            ok, worst = _cuda_bound_ok(out, native, mag)
            assert ok, f"M={m} group {group_size}: vs native: max diff {worst}"
            general = block_fp8_matmul(x_q, x_s, w_q, w_s, None, torch.float32)
            ok, worst = _cuda_bound_ok(out, general, mag, steps=2)
            assert ok, f"M={m} group {group_size}: vs the general block kernel: max diff {worst}"


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["fp8", "fp8-block"])
def test_gpu_sweep_configs_run_agree_and_repeat(scheme):
    """Every config the sweep tries launches, agrees with the default within the bound,
    and repeats bit for bit (split partials are added in a fixed order)."""
    from fxfuse.kernels.small_gemm import small_block_fp8_linear, small_fp8_linear

    sweep = _sweep_script()
    n, k = 4096, 4096
    w_q, w_scale, wb_q, wb_s = _gpu_weight(n, k, seed=5)
    for m in (1, 16, 32, 64):
        x_q, x_scale, x = _gpu_activations(m, k, True, seed=m)
        if scheme == "fp8":
            run = lambda cfg: small_fp8_linear(x_q, w_q, x_scale, w_scale, None, torch.float32, cfg)  # noqa: E731
            mag = (x_q.float().abs() * x_scale) @ (w_q.float().abs() * w_scale).t()
        else:
            xb_q, xb_s = group_fp8_quant_native(x, 128, True)
            run = lambda cfg: small_block_fp8_linear(xb_q, xb_s, wb_q, wb_s, None, torch.float32, cfg)  # noqa: E731
            abs8 = lambda t: (t.view(torch.uint8) & 0x7F).view(t.dtype)  # noqa: E731
            mag = block_fp8_linear_native(abs8(xb_q), xb_s, abs8(wb_q), wb_s, None, torch.float32)
        ref = run(None)
        for cfg in sweep.candidates(m, n, k, None if scheme == "fp8" else 128, torch.device("cuda")):
            out = run(cfg)
            ok, worst = _cuda_bound_ok(out, ref, 2 * mag)
            assert ok, f"M={m} {cfg.label()}: max diff {worst}"
            assert torch.equal(out, run(cfg)), f"M={m} {cfg.label()}: two runs differ"


@pytest.mark.gpu
def test_gpu_ops_dispatch_by_token_count_and_capture_in_a_graph(monkeypatch):
    monkeypatch.setenv(C.MAX_TOKENS_ENV, "16")
    w_q, w_scale, wb_q, wb_s = _gpu_weight(4096, 4096, seed=6)
    x_q, x_scale, x = _gpu_activations(16, 4096, False, seed=7)
    x_scale = x_scale.reshape(1)
    assert L.fp8_linear_path(x_q, w_q, x_scale) == "small_gemm"
    assert L.fp8_linear_path(_gpu_activations(17, 4096, False, seed=8)[0], w_q, x_scale) == "scaled_mm"
    bx_q, bx_s = group_fp8_quant_native(x[:3], 128, True)
    assert BL.block_fp8_linear_path(bx_q, bx_s, wb_q) == "small_gemm"
    eager = fx.fp8_linear(x_q, w_q, x_scale, w_scale, None, torch.bfloat16)
    block_eager = fx.block_fp8_linear(bx_q, bx_s, wb_q, wb_s, None, torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fx.fp8_linear(x_q, w_q, x_scale, w_scale, None, torch.bfloat16)
        block_out = fx.block_fp8_linear(bx_q, bx_s, wb_q, wb_s, None, torch.bfloat16)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager) and torch.equal(block_out, block_eager)
    monkeypatch.setenv(C.MAX_TOKENS_ENV, "0")
    assert L.fp8_linear_path(x_q, w_q, x_scale) == "scaled_mm"
