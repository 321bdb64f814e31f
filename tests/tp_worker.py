"""Runs in each rank of tests/test_tp.py (a module, so that spawned processes can import it).

`run` executes the named scenarios in order, each on every rank of the gloo world
`fxfuse.distributed.spawn` set up, and writes each rank's results to ``rank{r}.json``:
one spawn per world size serves every test of the module (a process costs seconds to
start here). A scenario returns what its test asserts on; an exception it raises is
recorded as ``{"exception": ...}``, for the test to report.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

import fxfuse
from fxfuse import compat
from fxfuse.ops import allreduce as A

fx = torch.ops.fxfuse
EPS = 1e-5
SCENARIOS: dict[str, Callable[[int, int, str], Any]] = {}


def scenario(fn: Callable[[int, int, str], Any]) -> Callable[[int, int, str], Any]:
    SCENARIOS[fn.__name__] = fn
    return fn


def run(names: list[str], out_dir: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for name in names:
        dist.barrier()
        fxfuse.reset_match_table()
        try:
            results[name] = SCENARIOS[name](rank, world, out_dir)
        except Exception as e:  # noqa: BLE001 - reported by the test that reads it
            results[name] = {"exception": f"{type(e).__name__}: {e}"}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def raise_on_rank_1() -> None:
    """For test_distributed: rank 1 fails while rank 0 would wait for a minute."""
    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 refuses")
    time.sleep(60)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.uint8) else t


def _equal(a, b) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b))


# --------------------------------------------------------------------------- the ops


def _op_cases(x, r, w, g):
    """(name, fused op call, its unfused chain on an already all-reduced sum ``s``)."""
    s, ub = torch.tensor([0.05]), torch.tensor([2.0])
    gs = (448.0 * 6.0 / 8.0 * torch.ones(1))

    def nvfp4(total):
        y, r_out = fx.fused_add_rms_norm(total, r, w, EPS)
        return (*fx.nvfp4_quant(y, gs), r_out)

    return [
        ("plain", lambda: fx.allreduce_fused_add_rms_norm(x, r, w, EPS, g),
         lambda t: fx.fused_add_rms_norm(t, r, w, EPS)),
        ("static", lambda: fx.allreduce_fused_add_rms_norm_static_fp8_quant(x, r, w, s, EPS, g),
         lambda t: fx.fused_add_rms_norm_static_fp8_quant(t, r, w, s, EPS)),
        ("dynamic_ub", lambda: fx.allreduce_fused_add_rms_norm_dynamic_per_token_fp8_quant(x, r, w, EPS, g, ub),
         lambda t: fx.fused_add_rms_norm_dynamic_per_token_fp8_quant(t, r, w, EPS, ub)),
        ("nvfp4", lambda: fx.allreduce_fused_add_rms_norm_nvfp4_quant(x, r, w, gs, EPS, g), nvfp4),
        ("group", lambda: fx.allreduce_fused_add_rms_norm_group_fp8_quant(x, r, w, EPS, 64, g, True),
         lambda t: fx.fused_add_rms_norm_group_fp8_quant(t, r, w, EPS, 64, True)),
    ]


@scenario
def ops_equal_their_chains(rank: int, world: int, out_dir: str) -> dict:
    """Every op over the real group equals the unfused graph's computation (the functional
    all-reduce, rounded, then the existing ops), bit for bit, for partial sums in bf16 and
    fp32; and the all-reduce really sums the ranks' partial sums."""
    g = dist.group.WORLD.group_name
    out = {}
    for tokens, hidden in ((1, 64), (7, 128), (33, 192)):
        for partials in (torch.bfloat16, torch.float32):
            mine = torch.randn(tokens, hidden, generator=_gen(100 * rank + tokens)).to(partials)
            r = torch.randn(tokens, hidden, generator=_gen(7)).to(torch.bfloat16)
            w = (0.5 + torch.rand(hidden, generator=_gen(8))).to(torch.bfloat16)
            total = A.all_reduce_native(mine, g)
            every = sum(torch.randn(tokens, hidden, generator=_gen(100 * p + tokens)).to(partials).double()
                        for p in range(world))
            summed = bool(torch.allclose(total.double(), every, rtol=1e-2, atol=1e-2))
            for name, fused, chain in _op_cases(mine, r, w, g):
                key = f"{name} {tokens}x{hidden} {str(partials).replace('torch.', '')}"
                out[key] = summed and _equal(fused(), chain(total.to(torch.bfloat16)))
    return out


@scenario
def mismatched_shapes_fail_on_every_rank(rank: int, world: int, out_dir: str) -> dict:
    g = dist.group.WORLD.group_name
    tokens = 6 if rank == world - 1 else 5  # the last rank disagrees
    x = torch.randn(tokens, 64).to(torch.bfloat16)
    try:
        fx.allreduce_fused_add_rms_norm(x, x, torch.ones(64, dtype=torch.bfloat16), EPS, g)
        error = None
    except ValueError as e:
        error = str(e)
    # The group is still in step: a collective afterwards completes on every rank.
    after = A.all_reduce_native(torch.ones(3), g).tolist()
    return {"error": error, "after": after}


@scenario
def unknown_group_fails_on_every_rank(rank: int, world: int, out_dir: str) -> dict:
    x = torch.randn(4, 64).to(torch.bfloat16)
    try:
        fx.allreduce_fused_add_rms_norm_static_fp8_quant(x, x, x[0], torch.ones(1), EPS, "tp-nowhere")
    except ValueError as e:
        return {"error": str(e)}
    return {"error": None}


# --------------------------------------------------------------------------- the model


def _config(quant: str, world: int, layers: int = 2):
    from fxfuse.models import ModelConfig

    # The tiny preset's 2 KV heads split over 2 ranks; 4 ranks need 4.
    return ModelConfig.preset("tiny", quant=quant, num_layers=layers, num_kv_heads=max(2, world), tp_size=world)


def _tensor(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def _trace(model, runner, prompts):
    """The model's prefill as a functional graph on fake tensors (what Inductor's post-grad
    passes see), with its collectives."""
    with runner.prefill_context(prompts) as (ids, pos), compat.fake_mode() as mode:
        return compat.trace_functional(model, [mode.from_tensor(ids), mode.from_tensor(pos)], v2=True)


@scenario
def model_fusions_counts_and_outputs(rank: int, world: int, out_dir: str) -> dict:
    """default_passes on the tensor-parallel model's graph: the match and miss tables, the
    tables gathered over the ranks, and whether the fused graph computes the same logits."""
    from fxfuse.models import LlamaForCausalLM, ModelRunner, random_prompts

    out = {}
    for quant in ("fp8", "nvfp4"):
        model = LlamaForCausalLM(_config(quant, world, layers=3))
        runner = ModelRunner(model)
        prompts = random_prompts(model.config, lengths=[6, 3], seed=1)
        try:
            unfused, fused = _trace(model, runner, prompts), _trace(model, runner, prompts)
            fxfuse.reset_match_table()
            fxfuse.PassManager(fxfuse.default_passes())(fused.graph)
            fused.recompile()
            logits = []
            for gm in (unfused, fused):
                with runner.prefill_context(prompts) as (ids, pos):
                    logits.append(gm(ids, pos))
            out[quant] = {
                "matches": fxfuse.match_table(),
                "misses": fxfuse.miss_table(),
                "gathered": fxfuse.distributed.gather_match_table(),
                "same_logits": torch.equal(_tensor(logits[0]), _tensor(logits[1])),
                "all_reduces_left": sum(n.target is torch.ops._c10d_functional.all_reduce.default
                                        for n in fused.graph.nodes),
            }
        finally:
            model.close()
    return out


@scenario
def model_equals_tp1(rank: int, world: int, out_dir: str) -> dict:
    """Prefill logits and greedy tokens of the tensor-parallel model against the same model
    at tp_size=1 (built in this process too), eagerly."""
    import dataclasses

    from fxfuse.models import LlamaForCausalLM, random_prompts, run

    out = {}
    for quant in ("fp8", "nvfp4"):
        config = _config(quant, world)
        results = []
        for cfg in (config, dataclasses.replace(config, tp_size=1)):
            model = LlamaForCausalLM(cfg)
            try:
                results.append(run(model, None, random_prompts(cfg, lengths=[7, 2, 4], seed=2), 6))
            finally:
                model.close()
        tp, single = results
        out[quant] = {
            "tokens_equal": torch.equal(tp.tokens, single.tokens),
            "max_abs_diff": (tp.logits.float() - single.logits.float()).abs().max().item(),
        }
    return out


# --------------------------------------------------------------------------- the kernel


@scenario
def kernel_over_shared_memory(rank: int, world: int, out_dir: str) -> Any:
    """The symmetric-memory kernel under Triton's interpreter, every rank a process whose
    pointer table maps every rank's buffer and signal pad (files in shared memory, standing
    in for symmetric memory): equal to the sum in rank order in fp32, rounded once, then
    the native chain."""
    from fxfuse.kernels import allreduce as K

    if not fxfuse.kernels.available("cpu"):
        return "skipped: needs Triton's interpreter"
    tokens, hidden = 5, 64
    region = tokens * hidden * 4
    mine = [os.path.join(out_dir, f"{kind}{rank}") for kind in ("buffer", "pad")]
    torch.zeros(2 * region, dtype=torch.uint8).numpy().tofile(mine[0])
    torch.zeros(64, dtype=torch.int32).numpy().tofile(mine[1])
    dist.barrier()
    buffers = [torch.from_file(os.path.join(out_dir, f"buffer{p}"), shared=True, size=2 * region,
                               dtype=torch.uint8) for p in range(world)]
    pads = [torch.from_file(os.path.join(out_dir, f"pad{p}"), shared=True, size=64, dtype=torch.int32)
            for p in range(world)]
    buffer_ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64)
    pad_ptrs = torch.tensor([p.data_ptr() for p in pads], dtype=torch.int64)

    partials = [torch.randn(tokens, hidden, generator=_gen(50 + p)) for p in range(world)]
    r = torch.randn(tokens, hidden, generator=_gen(60)).to(torch.bfloat16)
    w = (0.5 + torch.rand(hidden, generator=_gen(61))).to(torch.bfloat16)
    s = torch.tensor([0.05])
    out = {}
    for two_shot in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            xs = [x.to(dtype) for x in partials]
            total = xs[0].float()
            for x in xs[1:]:
                total = total + x.float()
            total = total.to(torch.bfloat16)  # rank order, fp32, rounded once
            cases = [
                ({}, fx.fused_add_rms_norm(total, r, w, EPS)),
                ({"epilogue": K.EPILOGUE_STATIC_FP8, "scale": s},
                 fx.fused_add_rms_norm_static_fp8_quant(total, r, w, s, EPS)),
                ({"epilogue": K.EPILOGUE_GROUP_FP8, "group_size": 64},
                 fx.fused_add_rms_norm_group_fp8_quant(total, r, w, EPS, 64)),
            ]
            for kwargs, want in cases:
                got = K.fused_allreduce_rms_norm(
                    xs[rank], r, w, EPS, buffer_ptrs=buffer_ptrs.data_ptr(), signal_pad_ptrs=pad_ptrs.data_ptr(),
                    rank=rank, world_size=world, gather_offset_bytes=region, max_programs=2, two_shot=two_shot,
                    **kwargs,
                )
                name = f"{'two' if two_shot else 'one'}-shot {kwargs.get('epilogue', 0)} {str(dtype)[6:]}"
                out[name] = _equal(got, want)
    out["pads_zero"] = not pads[rank].any().item()
    return out
