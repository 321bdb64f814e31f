"""``fxfuse bench --only tp``: the fused all-reduce + residual add + RMSNorm (+ static FP8
quant) against NCCL's all-reduce followed by fxfuse's fused norm kernel (issue 13).

Each of ``world_size`` processes (one GPU each, an NCCL group) times, per message shape
(tokens x hidden, bf16 partial sums) and per op variant (``plain``:
``allreduce_fused_add_rms_norm``; ``static_fp8``: ``..._static_fp8_quant``):

- ``fused``: the fxfuse op as dispatched (the symmetric-memory kernel up to
  ``_symm_mem.TWO_SHOT_MAX_BYTES``, NCCL and the fused norm kernel above);
- ``fused_forced``: the same op with the two-shot limit opened to the workspace region,
  so that the kernel runs at every size (one-shot up to its limit, two-shot above);
  None where it cannot run (no symmetric memory);
- ``nccl``: the functional all-reduce (``_c10d_functional.all_reduce`` + ``wait_tensor``,
  as the tensor-parallel model does) then ``fused_add_rms_norm(_static_fp8_quant)``.

Times are medians of CUDA-graph replays with the ranks met before each replay
(`timing.graph_us` with the group). The threshold of a variant and width is the largest
message at which the forced kernel beat NCCL: where ``TWO_SHOT_MAX_BYTES`` belongs.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterator, Optional

import torch

TOKENS = (1, 16, 256, 2048, 8192)
HIDDEN = (4096, 8192)
VARIANTS = ("plain", "static_fp8")
EPS = 1e-5
#: NVLink multicast off: NCCL's NVLS and symmetric memory's multicast objects are not
#: what the kernel uses, and where they cannot be set up they fail instead of falling back.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

#: ``timer(fn, case) -> microseconds``; ``case`` holds variant, impl, tokens, hidden, bytes.
Timer = Callable[[Callable[[], object], dict], float]


def run(
    world_size: int = 2,
    tokens: tuple[int, ...] = TOKENS,
    hidden: tuple[int, ...] = HIDDEN,
    timer: Optional[Timer] = None,
    device: str = "cuda",
    log: Callable[..., None] = print,
) -> dict:
    """Time the three implementations over ``world_size`` ranks; returns rank 0's rows and
    the thresholds, and prints them (``{}`` when there are too few GPUs).

    ``timer`` (picklable: it travels to the ranks) replaces the CUDA-graph timing, so
    the orchestration runs on the CPU over gloo, where every column is the native chain.

    Example:
        >>> res = run(world_size=2)  # doctest: +SKIP
        >>> res["threshold"][0]
        {'variant': 'plain', 'hidden': 4096, 'tokens': 2048, 'bytes': 16777216}
    """
    from ..distributed import spawn

    if device == "cuda":
        found = torch.cuda.device_count()
        if found < world_size:
            print(f"fxfuse bench --only tp: needs {world_size} GPUs, found {found}", file=sys.stderr)
            return {}
        _multicast_off(log)
        torch.cuda.empty_cache()  # this process's cached blocks (copy_bandwidth's) sit on rank 0's GPU
    rows = spawn(_rank_main, world_size, (tuple(tokens), tuple(hidden), timer), device=device)
    result = dict(world_size=world_size, rows=rows, threshold=thresholds(rows))
    _print(result, log)
    return result


def thresholds(rows: list[dict]) -> list[dict]:
    """Per variant and hidden size, the largest message (``bytes`` of the bf16 partial
    sums, and its ``tokens``) at which the forced kernel was faster than NCCL; None where
    it never was (or could not run).

    Example:
        >>> thresholds([dict(variant="plain", hidden=64, tokens=1, bytes=128, fused_forced_us=2.0, nccl_us=9.0),
        ...             dict(variant="plain", hidden=64, tokens=8, bytes=1024, fused_forced_us=9.0, nccl_us=5.0)])
        [{'variant': 'plain', 'hidden': 64, 'tokens': 1, 'bytes': 128}]
    """
    out = []
    for variant, hidden in dict.fromkeys((r["variant"], r["hidden"]) for r in rows):
        wins = [r for r in rows if r["variant"] == variant and r["hidden"] == hidden
                and r["fused_forced_us"] is not None and r["fused_forced_us"] < r["nccl_us"]]
        best = max(wins, key=lambda r: r["bytes"], default=None)
        out.append(dict(variant=variant, hidden=hidden, tokens=best and best["tokens"], bytes=best and best["bytes"]))
    return out


def _multicast_off(log: Callable[..., None]) -> None:
    # Set here so the ranks inherit them; a value the caller set wins.
    unset = [k for k in MULTICAST_OFF if k not in os.environ]
    for k in unset:
        os.environ[k] = MULTICAST_OFF[k]
    if unset:
        log(f"(set {', '.join(f'{k}={MULTICAST_OFF[k]}' for k in unset)} for the ranks)")


# --------------------------------------------------------------------------- in each rank


def _rank_main(tokens: tuple[int, ...], hidden: tuple[int, ...], timer: Optional[Timer]) -> Optional[list[dict]]:
    import torch.distributed as dist

    from ..ops import _symm_mem

    group = dist.group.WORLD
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    if timer is None:
        from .timing import graph_us

        timer = lambda fn, case: graph_us(fn, group=group)  # noqa: E731
    # The workspace is sized at the group's first call, from REGION_BYTES: opened first (on
    # every rank alike) so the forced kernel takes the largest message too.
    if not _symm_mem._WORKSPACES:
        _symm_mem.REGION_BYTES = max(_symm_mem.REGION_BYTES, max(tokens) * max(hidden) * 2)
    rows = [_measure(v, t, h, group.group_name, device, timer) for h in hidden for t in tokens for v in VARIANTS]
    return rows if dist.get_rank() == 0 else None


def _inputs(tokens: int, hidden: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """This rank's bf16 partial sums; residual, weight and scale the same on every rank."""
    import torch.distributed as dist

    def randn(seed: int) -> torch.Tensor:
        gen = torch.Generator(device).manual_seed(seed)
        return torch.randn(tokens, hidden, generator=gen, device=device).to(torch.bfloat16)

    x, r = randn(1 + dist.get_rank()), randn(0)
    w = torch.ones(hidden, dtype=torch.bfloat16, device=device)
    return x, r, w, torch.tensor([0.05], device=device)


def _calls(variant: str, x, r, w, s, g: str) -> tuple[Callable[[], object], Callable[[], object]]:
    """The fused op and the unfused chain it replaces."""
    from ..ops.allreduce import all_reduce_native

    fx = torch.ops.fxfuse
    if variant == "plain":
        return (lambda: fx.allreduce_fused_add_rms_norm(x, r, w, EPS, g),
                lambda: fx.fused_add_rms_norm(all_reduce_native(x, g), r, w, EPS))
    return (lambda: fx.allreduce_fused_add_rms_norm_static_fp8_quant(x, r, w, s, EPS, g),
            lambda: fx.fused_add_rms_norm_static_fp8_quant(all_reduce_native(x, g), r, w, s, EPS))


@contextlib.contextmanager
def _forced() -> Iterator[None]:
    """The two-shot limit opened to the workspace region: the kernel at every size that
    fits (the one-shot limit kept, so small messages run what dispatch would pick)."""
    from ..ops import _symm_mem

    saved = _symm_mem.TWO_SHOT_MAX_BYTES
    _symm_mem.TWO_SHOT_MAX_BYTES = _symm_mem.REGION_BYTES
    try:
        yield
    finally:
        _symm_mem.TWO_SHOT_MAX_BYTES = saved


def _paths(x: torch.Tensor, g: str) -> tuple[str, Optional[str]]:
    """What the dispatched op runs, and what the forced one runs (None: it cannot)."""
    from ..ops import _groups, _symm_mem
    from ..ops._dispatch import use_kernels

    if x.device.type != "cuda":
        return "native", "native"  # gloo: every column is the native chain
    if (not use_kernels(x) or _groups.fused_implementation(g, "cuda") != _groups.TRITON_SYMM_MEM
            or _symm_mem.workspace(g, x.device) is None):  # a collective at the first call only
        return "nccl", None
    with _forced():
        forced = _symm_mem.kernel_path(x.nbytes) if x.nbytes <= _symm_mem.REGION_BYTES else None
    return _symm_mem.kernel_path(x.nbytes) or "nccl", forced


def _diff(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    return (a[0].float() - b[0].float()).abs().max().item()


def _measure(variant: str, tokens: int, hidden: int, g: str, device: torch.device, timer: Timer) -> dict:
    """One row; every rank runs it at the same point (the calls and timers are collectives)."""
    x, r, w, s = _inputs(tokens, hidden, device)
    fused, nccl = _calls(variant, x, r, w, s, g)
    fused_path, forced_path = _paths(x, g)
    case = dict(variant=variant, tokens=tokens, hidden=hidden, bytes=x.nbytes)
    # One eager call of each first: allocates the workspace outside capture, and checks
    # the fused outputs against the chain's (NCCL may sum in another order: not bitwise).
    want = nccl()
    diff = _diff(fused(), want)
    fused_us = timer(fused, dict(case, impl="fused"))
    forced_us = None
    if forced_path is not None:
        with _forced():
            diff = max(diff, _diff(fused(), want))
            forced_us = timer(fused, dict(case, impl="fused_forced"))
    nccl_us = timer(nccl, dict(case, impl="nccl"))
    return dict(case, fused_path=fused_path, forced_path=forced_path, fused_us=fused_us,
                fused_forced_us=forced_us, nccl_us=nccl_us, speedup=nccl_us / fused_us, max_abs_diff=diff)


# --------------------------------------------------------------------------- report


def _us(t: Optional[float]) -> str:
    return f"{t:>9.1f}" if t is not None else f"{'-':>9}"


def _print(result: dict, log: Callable[..., None]) -> None:
    log(f"{'variant':<11}{'tokens':>7}{'hidden':>7}{'bytes':>11}  {'dispatch':<9}{'fused':>9}"
        f"{'forced':>9}{'nccl':>9}{'speedup':>8}")
    for r in result["rows"]:
        log(f"{r['variant']:<11}{r['tokens']:>7}{r['hidden']:>7}{r['bytes']:>11}  {r['fused_path']:<9}"
            f"{_us(r['fused_us'])}{_us(r['fused_forced_us'])}{_us(r['nccl_us'])}{r['speedup']:>8.2f}")
    for t in result["threshold"]:
        where = (f"up to {t['tokens']} tokens ({t['bytes']} bytes)" if t["bytes"] is not None
                 else "at no measured size")
        log(f"threshold: {t['variant']} at hidden {t['hidden']}: the forced kernel beats NCCL {where}")
