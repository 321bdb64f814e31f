"""The fused all-reduce ops in one process: a gloo world of one rank (and, on a GPU, an NCCL
group of one), where the all-reduce is the identity and everything else can be checked.

What is checked here: every op equals its unfused chain bit for bit, fake impls match the
real ones, argument errors name the op and the argument (eagerly and under fake mode), an
unknown group is a clear error, which implementation serves which group, and the
symmetric-memory kernel's epilogues at world size 1 under Triton's interpreter. The
collective itself over 2 and 4 ranks is in tests/test_tp.py.
"""

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

import fxfuse  # noqa: F401  (registers the ops)
from fxfuse.kernels import allreduce as K
from fxfuse.ops import _groups, _symm_mem
from fxfuse.ops import allreduce as A
from conftest import covering

fx = torch.ops.fxfuse
EPS = 1e-6
# [tokens, hidden]: odd token counts; hidden a multiple of 16 (NVFP4) and 64 (group quant).
SHAPES = [(1, 64), (7, 128), (33, 192)]


@pytest.fixture(scope="module")
def group():
    """The name of a one-rank gloo world, for the whole module."""
    assert not dist.is_initialized(), "another test left a process group behind"
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD.group_name
    dist.destroy_process_group()


def _inputs(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dtype)
    r = torch.randn(shape, generator=gen).to(dtype)
    w = (0.5 + torch.rand(shape[-1], generator=gen)).to(dtype)
    return x, r, w


def _bits(t):
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.uint8) else t


def _variants(partials, r, w, g):
    """(op name, args, the unfused chain on the same inputs) for every op. At world size 1
    the all-reduce is the identity, so the chain starts from the partial sums rounded to
    the residual's dtype."""
    x = partials.to(r.dtype)
    s = torch.tensor([0.02])
    ub = torch.tensor([0.5])
    gs = (448.0 * 6.0 / (x.float() + r.float()).abs().amax()).reshape(1)

    def nvfp4_chain():
        y, r_out = fx.fused_add_rms_norm(x, r, w, EPS)
        return (*fx.nvfp4_quant(y, gs), r_out)

    return [
        ("allreduce_fused_add_rms_norm", (partials, r, w, EPS, g), lambda: fx.fused_add_rms_norm(x, r, w, EPS)),
        ("allreduce_fused_add_rms_norm_static_fp8_quant", (partials, r, w, s, EPS, g),
         lambda: fx.fused_add_rms_norm_static_fp8_quant(x, r, w, s, EPS)),
        ("allreduce_fused_add_rms_norm_dynamic_per_token_fp8_quant", (partials, r, w, EPS, g),
         lambda: fx.fused_add_rms_norm_dynamic_per_token_fp8_quant(x, r, w, EPS)),
        ("allreduce_fused_add_rms_norm_dynamic_per_token_fp8_quant", (partials, r, w, EPS, g, ub),
         lambda: fx.fused_add_rms_norm_dynamic_per_token_fp8_quant(x, r, w, EPS, ub)),
        ("allreduce_fused_add_rms_norm_nvfp4_quant", (partials, r, w, gs, EPS, g), nvfp4_chain),
        ("allreduce_fused_add_rms_norm_group_fp8_quant", (partials, r, w, EPS, 64, g, True),
         lambda: fx.fused_add_rms_norm_group_fp8_quant(x, r, w, EPS, 64, True)),
        ("allreduce_fused_add_rms_norm_group_fp8_quant", (partials, r, w, EPS, 64, g),
         lambda: fx.fused_add_rms_norm_group_fp8_quant(x, r, w, EPS, 64)),
    ]


@pytest.mark.parametrize("fp32_partials, dtype, shape", [(v0,) + (v1,) + (v2,) for v0, v1, v2 in covering(
    [False, True],
    [torch.bfloat16, torch.float16],
    SHAPES,
)])
def test_each_op_equals_its_chain_and_its_native_reference(group, shape, dtype, fp32_partials):
    x, r, w = _inputs(shape, dtype, seed=shape[0])
    if fp32_partials:  # values that bf16/fp16 cannot hold: the op must round them once
        x = x.float() + torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 1e-3
    for name, args, chain in _variants(x, r, w, group):
        got = getattr(fx, name)(*args)
        native = getattr(A, f"{name}_native")(*args)
        for outs in (chain(), native):
            assert len(got) == len(outs), name
            for a, b in zip(got, outs):
                assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), name
                assert torch.equal(_bits(a), _bits(b)), name


def test_every_op_is_registered_and_covered():
    covered = {name for name, _, _ in _variants(*_inputs((2, 64), torch.bfloat16, 0), "g")}
    assert covered == set(_groups.ALLREDUCE_OPS)
    for name in covered:
        assert hasattr(fx, name) and hasattr(A, f"{name}_native")


@pytest.mark.parametrize("case", range(7))
def test_fake_impl_matches_real(group, case):
    x, r, w = _inputs((5, 128), torch.bfloat16, 3)
    name, args, _ = _variants(x, r, w, group)[case]
    real = getattr(fx, name)(*args)
    with FakeTensorMode() as mode:
        fake = getattr(fx, name)(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    assert [(f.shape, f.dtype, f.stride()) for f in fake] == [(t.shape, t.dtype, t.stride()) for t in real]


def test_fake_impl_never_resolves_the_group():
    # The pattern tracer passes a placeholder name: tracing must not need the group to exist.
    x, r, w = _inputs((3, 64), torch.bfloat16, 4)
    with FakeTensorMode() as mode:
        y, r_out = fx.allreduce_fused_add_rms_norm(*[mode.from_tensor(t) for t in (x, r, w)], EPS, "__no_such_group__")
    assert y.shape == x.shape and r_out.dtype == x.dtype


def _bad_cases(g):
    x, r, w = _inputs((5, 64), torch.bfloat16, 5)
    s = torch.tensor([0.02])
    return [
        ("allreduce_fused_add_rms_norm", (x, r[:4], w, EPS, g), ValueError, "`residual` must have shape"),
        ("allreduce_fused_add_rms_norm", (x, r, w.float(), EPS, g), ValueError, "`weight` must have dtype"),
        ("allreduce_fused_add_rms_norm", (x, r, w, EPS, ""), ValueError, "`group_name` must be a non-empty str"),
        ("allreduce_fused_add_rms_norm", (x.half(), r, w, EPS, g), ValueError,
         r"`x` \(the partial sums\) must have the dtype of `residual` \(torch.bfloat16\) or torch.float32"),
        ("allreduce_fused_add_rms_norm_static_fp8_quant", (x, r, w, s.double(), EPS, g), ValueError,
         "`scale` must have dtype torch.float32"),
        ("allreduce_fused_add_rms_norm_nvfp4_quant", (*_inputs((5, 40), torch.bfloat16, 9), s, EPS, g), ValueError,
         "multiple of 16"),
        ("allreduce_fused_add_rms_norm_group_fp8_quant", (x, r, w, EPS, 32, g), ValueError,
         "`group_size` must be one of"),
    ]


@pytest.mark.parametrize("case", range(7))
def test_bad_arguments_name_the_op_and_the_argument(group, case):
    name, args, exc, message = _bad_cases(group)[case]
    with pytest.raises(exc, match=f"fxfuse.{name}: .*{message}"):
        getattr(fx, name)(*args)
    with FakeTensorMode() as mode, pytest.raises(exc, match=message):
        getattr(fx, name)(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])


def test_group_name_must_be_a_string():
    x, r, w = _inputs((2, 64), torch.bfloat16, 6)
    with pytest.raises(TypeError, match="`group_name` must be a str, got int"):
        A.validate_allreduce_fused_add_rms_norm(x, r, w, EPS, 0)


def test_a_group_that_does_not_exist_is_a_clear_error(group):
    x, r, w = _inputs((2, 64), torch.bfloat16, 7)
    with pytest.raises(ValueError, match=rf"no process group named 'tp7' in this process \(known: '{group}'\)"):
        fx.allreduce_fused_add_rms_norm(x, r, w, EPS, "tp7")


def test_which_implementation_serves_which_group(group):
    assert _groups.fused_implementation(group, "cpu") == "native"
    # A gloo group also serves CUDA tensors, but through host copies: nothing to fuse for.
    assert _groups.fused_implementation(group, "cuda") is None
    assert _groups.fused_implementation("no-such-group", "cpu") is None
    state = _groups.implementation_state()
    assert state[group] == ((("cpu", "gloo"), ("cuda", "gloo")), 1, (("cpu", "native"), ("cuda", None)))


def test_the_kernel_path_follows_the_message_size(monkeypatch):
    monkeypatch.setattr(_symm_mem, "ONE_SHOT_MAX_BYTES", 1000)
    monkeypatch.setattr(_symm_mem, "TWO_SHOT_MAX_BYTES", 5000)
    assert [_symm_mem.kernel_path(n) for n in (1, 1000, 1001, 5000, 5001)] == [
        "one_shot", "one_shot", "two_shot", "two_shot", None
    ]


# --------------------------------------------------------------------------- the kernel at world size 1


def _kernel_cases(x, r, w):
    """(epilogue kwargs, the op whose native reference it must equal, that op's extra args)."""
    s = torch.tensor([0.02])
    ub = torch.tensor([0.5])
    gs = torch.tensor([300.0])
    return [
        ({}, "allreduce_fused_add_rms_norm", ()),
        ({"epilogue": K.EPILOGUE_STATIC_FP8, "scale": s}, "allreduce_fused_add_rms_norm_static_fp8_quant", (s,)),
        ({"epilogue": K.EPILOGUE_DYNAMIC_FP8}, "allreduce_fused_add_rms_norm_dynamic_per_token_fp8_quant", ()),
        ({"epilogue": K.EPILOGUE_DYNAMIC_FP8, "scale_ub": ub},
         "allreduce_fused_add_rms_norm_dynamic_per_token_fp8_quant", ("ub",)),
        ({"epilogue": K.EPILOGUE_NVFP4, "scale": gs}, "allreduce_fused_add_rms_norm_nvfp4_quant", (gs,)),
        ({"epilogue": K.EPILOGUE_GROUP_FP8, "group_size": 64, "column_major_scales": True},
         "allreduce_fused_add_rms_norm_group_fp8_quant", (64, True)),
        ({"epilogue": K.EPILOGUE_GROUP_FP8, "group_size": 64}, "allreduce_fused_add_rms_norm_group_fp8_quant",
         (64, False)),
    ]


def _native(name, x, r, w, g, extra):
    if name == "allreduce_fused_add_rms_norm_static_fp8_quant":
        return A.allreduce_fused_add_rms_norm_static_fp8_quant_native(x, r, w, extra[0], EPS, g)
    if name == "allreduce_fused_add_rms_norm_nvfp4_quant":
        return A.allreduce_fused_add_rms_norm_nvfp4_quant_native(x, r, w, extra[0], EPS, g)
    if name == "allreduce_fused_add_rms_norm_group_fp8_quant":
        return A.allreduce_fused_add_rms_norm_group_fp8_quant_native(x, r, w, EPS, extra[0], g, extra[1])
    if name == "allreduce_fused_add_rms_norm_dynamic_per_token_fp8_quant":
        ub = torch.tensor([0.5]) if extra else None
        return A.allreduce_fused_add_rms_norm_dynamic_per_token_fp8_quant_native(x, r, w, EPS, g, ub)
    return A.allreduce_fused_add_rms_norm_native(x, r, w, EPS, g)


@pytest.mark.skipif(not fxfuse.kernels.available("cpu"), reason="needs Triton's interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("two_shot, shape, fp32_partials", [(v0,) + tuple(v1) for v0, v1 in covering(
    [False, True],
    [((1, 64), False), ((5, 192), False), ((3, 64), True)],
)])
def test_kernel_epilogues_at_world_size_1_interpreted(group, shape, fp32_partials, two_shot):
    """The whole kernel (publish, barrier, reduce, epilogue, gather) with one rank, whose
    symmetric buffer and signal pad are plain CPU tensors: equal to the native chain."""
    x, r, w = _inputs(shape, torch.bfloat16, 8 + shape[0])
    if fp32_partials:
        x = x.float() + torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 1e-3
    buffer = torch.zeros(x.nbytes + r.nbytes, dtype=torch.uint8)
    pad = torch.zeros(16, dtype=torch.int32)
    buffer_ptrs = torch.tensor([buffer.data_ptr()], dtype=torch.int64)
    pad_ptrs = torch.tensor([pad.data_ptr()], dtype=torch.int64)
    for kwargs, name, extra in _kernel_cases(x, r, w):
        got = K.fused_allreduce_rms_norm(
            x, r, w, EPS, buffer_ptrs=buffer_ptrs.data_ptr(), signal_pad_ptrs=pad_ptrs.data_ptr(), rank=0,
            world_size=1, gather_offset_bytes=x.nbytes, max_programs=3, two_shot=two_shot, **kwargs,
        )
        want = _native(name, x, r, w, group, extra)
        for a, b in zip(got, want, strict=True):
            assert a.shape == b.shape and a.stride() == b.stride(), (name, kwargs)
            assert torch.equal(_bits(a), _bits(b)), (name, kwargs)
        assert not pad.any(), "the barrier must leave the signal pad zeroed"


# --------------------------------------------------------------------------- on one GPU


def _fraction_differing(a, b):
    return (_bits(a) != _bits(b)).float().mean().item()


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, path, fp32_partials", [tuple(v0) + (v1,) for v0, v1 in covering(
    [(1, "one_shot"), (7, "one_shot"), (200, "two_shot")],
    [False, True],
)])
def test_cuda_one_rank_nccl_group_runs_the_kernel_for_every_op(group, tokens, path, fp32_partials):
    """World size 1 on CUDA: an NCCL subgroup of the one-rank world, symmetric memory on the
    one GPU; every op through the symmetric-memory kernel against the same op on the
    NCCL path (the functional all-reduce, then the existing CUDA kernels). 1 and 7 rows of
    4096 bf16 take one-shot, 200 rows (1.6 MiB) two-shot; fp32 partials double the bytes."""
    if fxfuse.compat.symmetric_memory() is None:
        pytest.skip("this torch has no usable symmetric memory")
    nccl = dist.new_group([0], backend="nccl")
    g = nccl.group_name
    assert _groups.fused_implementation(g, "cuda") == "triton_symm_mem"
    x, r, w = (t.cuda() for t in _inputs((tokens, 4096), torch.bfloat16, tokens))
    if fp32_partials:
        x = x.float() + 1e-3 * torch.randn_like(x, dtype=torch.float32)
    if _symm_mem.kernel_path(x.nbytes) != path:
        pytest.skip(f"{x.nbytes} bytes take another path")
    for name, args, _ in _variants(x, r, w, g):
        args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
        got = getattr(fx, name)(*args)
        with pytest.MonkeyPatch.context() as mp:  # the same op, without the kernel: NCCL then the CUDA kernels
            mp.setattr(_symm_mem, "TWO_SHOT_MAX_BYTES", 0)
            mp.setattr(_symm_mem, "ONE_SHOT_MAX_BYTES", 0)
            want = getattr(fx, name)(*args)
        assert [(a.shape, a.dtype, a.stride()) for a in got] == [(b.shape, b.dtype, b.stride()) for b in want], name
        assert torch.equal(got[-1], want[-1]), f"{name}: residual_out"  # the rounded sum plus the residual
        # The norm is the unfused kernel's code; compiled separately, its row sum may be
        # ordered differently: DESIGN §2's rare one-step differences.
        for a, b in zip(got[:-1], want[:-1]):
            assert _fraction_differing(a, b) < 1e-3, name
    assert _symm_mem.workspace(g, x.device) is not None


# --------------------------------------------------------------------------- the kernel, compiled for the H100

_COMPILE_FOR_SM90 = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fxfuse.kernels import allreduce as K

kernel = K._allreduce_rms_norm_kernel
names = list(kernel.arg_names)
out = {}
for x_dtype, epilogue, two_shot in [("bf16", K.EPILOGUE_STATIC_FP8, False), ("fp32", K.EPILOGUE_NVFP4, True)]:
    sig = dict.fromkeys(names[:18], "i32")
    sig.update(x_ptr="*" + x_dtype, res_ptr="*bf16", w_ptr="*bf16", scale_ptr="*fp32", ub_ptr="*fp32",
               out_ptr="*fp8e4nv" if epilogue == K.EPILOGUE_STATIC_FP8 else "*u8", s_ptr="*fp8e4nv",
               res_out_ptr="*bf16", buffer_ptrs="i64", signal_pad_ptrs="i64", eps="fp32")
    const = dict(WORLD=4, TWO_SHOT=two_shot, SLICES=4 if two_shot else 1, EPILOGUE=epilogue, HAS_UB=False,
                 GROUP=1, BLOCK=4096, EXACT_CASTS=False)
    sig.update(dict.fromkeys(const, "constexpr"))
    src = ASTSource(kernel, sig, constexprs={(names.index(k),): v for k, v in const.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
    # (guard, instruction) of every atomic: "@%p48 atom.global.release.sys.cas.b32 ..."
    atomics = [line.split()[:2] for line in ptx.splitlines() if " atom." in line]
    out[f"{x_dtype} {'two' if two_shot else 'one'}-shot"] = atomics
json.dump(out, sys.stdout)
"""


def test_kernel_compiles_for_sm90_with_a_one_thread_system_scope_barrier(tmp_path):
    """No GPU here, but Triton compiles to PTX for the H100 without one: the barrier's
    compare-and-swaps are predicated (Triton issues a scalar atomic from one thread and
    hands its result to the others through shared memory), release when signalling,
    acquire when waiting, at system scope (the peers are other GPUs)."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a real compile, not the interpreter
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ptx_atomics = json.loads(done.stdout)
    # W = 4: each meeting is 4 sends and 4 waits; one-shot meets twice, two-shot three times.
    for name, meetings in (("bf16 one-shot", 2), ("fp32 two-shot", 3)):
        guards, ops = zip(*ptx_atomics[name])
        assert len(ops) == 8 * meetings, name
        assert ops.count("atom.global.release.sys.cas.b32") == 4 * meetings, name
        assert ops.count("atom.global.acquire.sys.cas.b32") == 4 * meetings, name
        assert all(g.startswith("@%p") for g in guards), name
