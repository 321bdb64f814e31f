"""Per-op benchmark: eager unfused chain vs Inductor on the native chain vs fxfuse's kernel.

For every fused op (and every op that has a kernel) and every shape: the eager chain of
unfused native ops, ``torch.compile`` of the same native chain (Inductor's own fusion;
token dimension dynamic, as in a served model), fxfuse's op (its Triton kernel), and the
floor: bytes the op must move / the measured copy bandwidth. All timed as CUDA-graph
replays, twice: with a cold L2 (the graph's calls rotate through input copies whose
bytes exceed twice the L2; the reported number) and warm (one input set replayed; in
the JSON under ``warm``). The winners per shape make the ``native_lowering`` choice table.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from ..ops import activation as act
from ..ops import fused as fu
from ..ops import group_quant as gq
from ..ops import norm as nm
from ..ops import nvfp4 as nv
from ..ops import quant as qu
from .timing import cold_copies, graph_us

fx = torch.ops.fxfuse
TOKENS = (1, 16, 256, 4096, 32768)
HIDDEN = (4096, 8192)
INTERMEDIATE = (14336, 28672)  # Llama-3 8B and 70B MLP widths, for the SiLU-and-mul ops
# Block-scaled FP8 ops as block-FP8 models run them: groups of 128, column-major scales.
GROUP = (128, True)


@dataclasses.dataclass(frozen=True)
class OpCase:
    """One op: how to build inputs at (tokens, width), its unfused native chain, the op."""

    name: str
    inputs: Callable[[int, int], tuple]
    native: Callable[..., Any]  # the unfused chain of native functions
    op: Callable[..., Any]
    widths: tuple[int, ...] = HIDDEN
    fused: bool = True
    unfused_ops: Callable[..., Any] | None = None  # the chain of fxfuse's unfused ops (kernels)


def _x(t, w, k=1):
    return torch.randn(t, k * w, device="cuda", dtype=torch.bfloat16)


def _w(w):
    return (1 + 0.1 * torch.randn(w, device="cuda")).bfloat16()


def _s(v=0.05):
    return torch.tensor([v], device="cuda")


CASES: tuple[OpCase, ...] = (
    OpCase("rms_norm_static_fp8_quant", lambda t, w: (_x(t, w), _w(w), _s(), 1e-6),
           fu.rms_norm_static_fp8_quant_native, fx.rms_norm_static_fp8_quant,
           unfused_ops=lambda x, w, s, e: fx.static_scaled_fp8_quant(fx.rms_norm(x, w, e), s)),
    OpCase("fused_add_rms_norm_static_fp8_quant", lambda t, w: (_x(t, w), _x(t, w), _w(w), _s(), 1e-6),
           fu.fused_add_rms_norm_static_fp8_quant_native, fx.fused_add_rms_norm_static_fp8_quant,
           unfused_ops=lambda x, r, w, s, e: fx.static_scaled_fp8_quant(fx.fused_add_rms_norm(x, r, w, e)[0], s)),
    OpCase("rms_norm_dynamic_per_token_fp8_quant", lambda t, w: (_x(t, w), _w(w), 1e-6),
           fu.rms_norm_dynamic_per_token_fp8_quant_native, fx.rms_norm_dynamic_per_token_fp8_quant,
           unfused_ops=lambda x, w, e: fx.dynamic_per_token_fp8_quant(fx.rms_norm(x, w, e))),
    OpCase("fused_add_rms_norm_dynamic_per_token_fp8_quant", lambda t, w: (_x(t, w), _x(t, w), _w(w), 1e-6),
           fu.fused_add_rms_norm_dynamic_per_token_fp8_quant_native, fx.fused_add_rms_norm_dynamic_per_token_fp8_quant,
           unfused_ops=lambda x, r, w, e: fx.dynamic_per_token_fp8_quant(fx.fused_add_rms_norm(x, r, w, e)[0])),
    OpCase("silu_and_mul_static_fp8_quant", lambda t, w: (_x(t, w, 2), _s()),
           fu.silu_and_mul_static_fp8_quant_native, fx.silu_and_mul_static_fp8_quant, INTERMEDIATE,
           unfused_ops=lambda x, s: fx.static_scaled_fp8_quant(fx.silu_and_mul(x), s)),
    OpCase("silu_and_mul_nvfp4_quant", lambda t, w: (_x(t, w, 2), _s(448.0 * 6 / 4)),
           nv.silu_and_mul_nvfp4_quant_native, fx.silu_and_mul_nvfp4_quant, INTERMEDIATE,
           unfused_ops=lambda x, gs: fx.nvfp4_quant(fx.silu_and_mul(x), gs)),
    OpCase("rms_norm_group_fp8_quant", lambda t, w: (_x(t, w), _w(w), 1e-6, *GROUP),
           gq.rms_norm_group_fp8_quant_native, fx.rms_norm_group_fp8_quant,
           unfused_ops=lambda x, w, e, g, cm: fx.group_fp8_quant(fx.rms_norm(x, w, e), g, cm)),
    OpCase("fused_add_rms_norm_group_fp8_quant", lambda t, w: (_x(t, w), _x(t, w), _w(w), 1e-6, *GROUP),
           gq.fused_add_rms_norm_group_fp8_quant_native, fx.fused_add_rms_norm_group_fp8_quant,
           unfused_ops=lambda x, r, w, e, g, cm: fx.group_fp8_quant(fx.fused_add_rms_norm(x, r, w, e)[0], g, cm)),
    OpCase("silu_and_mul_group_fp8_quant", lambda t, w: (_x(t, w, 2), *GROUP),
           gq.silu_and_mul_group_fp8_quant_native, fx.silu_and_mul_group_fp8_quant, INTERMEDIATE,
           unfused_ops=lambda x, g, cm: fx.group_fp8_quant(fx.silu_and_mul(x), g, cm)),
    OpCase("rms_norm", lambda t, w: (_x(t, w), _w(w), 1e-6), nm.rms_norm_native, fx.rms_norm, fused=False),
    OpCase("fused_add_rms_norm", lambda t, w: (_x(t, w), _x(t, w), _w(w), 1e-6),
           nm.fused_add_rms_norm_native, fx.fused_add_rms_norm, fused=False),
    OpCase("static_scaled_fp8_quant", lambda t, w: (_x(t, w), _s()),
           qu.static_scaled_fp8_quant_native, fx.static_scaled_fp8_quant, fused=False),
    OpCase("dynamic_per_token_fp8_quant", lambda t, w: (_x(t, w),),
           qu.dynamic_per_token_fp8_quant_native, fx.dynamic_per_token_fp8_quant, fused=False),
    OpCase("nvfp4_quant", lambda t, w: (_x(t, w), _s(448.0 * 6 / 5)),
           nv.nvfp4_quant_native, fx.nvfp4_quant, fused=False),
    OpCase("group_fp8_quant", lambda t, w: (_x(t, w), *GROUP), gq.group_fp8_quant_native, fx.group_fp8_quant,
           fused=False),
    OpCase("silu_and_mul", lambda t, w: (_x(t, w, 2),), act.silu_and_mul_native, fx.silu_and_mul, INTERMEDIATE,
           fused=False),
)


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    return 0


def _compiled(native):
    compiled = torch.compile(native, dynamic=None, fullgraph=True)

    def call(*args):
        for a in args:
            if isinstance(a, torch.Tensor) and a.dim() == 2 and a.shape[0] > 1:
                torch._dynamo.mark_dynamic(a, 0)  # served models compile the token dim dynamic
        return compiled(*args)

    return call


def run(bandwidth: float, tokens=TOKENS, only: tuple[str, ...] = (), log=print) -> list[dict]:
    """Time every case at every shape; one row per (op, tokens, width)."""
    torch._dynamo.config.recompile_limit = 64
    rows = []
    for case in CASES:
        if only and case.name not in only:
            continue
        inductor = _compiled(case.native)
        for width in case.widths:
            for t in tokens:
                args = case.inputs(t, width)
                nbytes = _nbytes(args) + _nbytes(case.op(*args))
                inductor(*args)  # compile outside the timed region
                copies = cold_copies(lambda: case.inputs(t, width), _nbytes(args))

                def both(fn):
                    """(cold, warm): rotating input copies past 2x L2, and one input set replayed."""
                    return graph_us([lambda a=a: fn(*a) for a in copies]), graph_us(lambda: fn(*args))

                eager, eager_warm = both(case.native)  # plain PyTorch, op by op
                ind, ind_warm = both(inductor)
                ker, ker_warm = both(case.op)
                unfused, unfused_warm = both(case.unfused_ops) if case.unfused_ops else (None, None)
                floor = nbytes / bandwidth * 1e6
                row = dict(op=case.name, fused=case.fused, tokens=t, width=width, bytes=nbytes,
                           eager_us=eager, inductor_us=ind, fxfuse_us=ker, floor_us=floor,
                           fxfuse_unfused_us=unfused, cold_copies=len(copies),
                           warm=dict(eager_us=eager_warm, inductor_us=ind_warm, fxfuse_us=ker_warm,
                                     fxfuse_unfused_us=unfused_warm),
                           fxfuse_pct_bw=100 * floor / ker, inductor_pct_bw=100 * floor / ind,
                           inductor_over_fxfuse=ind / ker, eager_over_fxfuse=eager / ker)
                rows.append(row)
                log(f"  {case.name:48s} T={t:<6d} W={width:<6d} eager {eager:9.1f}  inductor {ind:8.1f}  "
                    f"fxfuse {ker:8.1f} us  floor {floor:8.1f}  {row['fxfuse_pct_bw']:5.1f}% bw  "
                    f"x{row['inductor_over_fxfuse']:.2f} vs inductor  (cold L2; warm fxfuse {ker_warm:.1f})")
                del args, copies
    return rows


def choices(rows: list[dict], device_name: str, margin: float = 0.03) -> dict:
    """The native_lowering table from benchmark rows: Inductor wins a shape only when it is
    faster than the kernel by more than ``margin`` (noise), else the kernel stays."""
    table: dict[str, dict[str, dict[str, str]]] = {}
    for r in rows:
        winner = "inductor" if r["inductor_us"] < (1 - margin) * r["fxfuse_us"] else "kernel"
        table.setdefault(r["op"], {}).setdefault(str(r["width"]), {})[str(r["tokens"])] = winner
    return {device_name: table}
