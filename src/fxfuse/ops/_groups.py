"""The process groups the fused all-reduce ops run on: lookup by name, which implementation
serves a group on a device, and the cross-rank argument check.

An op receives a group by its name (``ProcessGroup.group_name``), as the functional
collectives (``torch.ops._c10d_functional.*``) do, so a compiled graph holds a string,
not an object. Which implementation serves a group is a function of its backend on the
tensors' device type and its world size (`fused_implementation`); the
``allreduce_rms_fusion`` pass asks it before fusing and puts `implementation_state`
in its cache key.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .. import compat

#: The symmetric-memory Triton kernels (``fxfuse.kernels.allreduce``): NCCL groups on
#: CUDA, with symmetric memory in the installed torch.
TRITON_SYMM_MEM = "triton_symm_mem"
#: The functional all-reduce followed by the unfused ops (the reference): gloo groups on
#: the CPU, where nothing is faster and which is where tensor parallelism is tested.
NATIVE = "native"

#: Largest group the symmetric-memory kernels serve: a one-shot all-reduce reads every
#: peer's buffer once per element, so its traffic grows with the group; 8 is one NVLink
#: domain of the machines it targets.
MAX_SYMM_MEM_WORLD = 8

#: Set to ``1`` to run the cross-rank argument check on CUDA too (it syncs the device).
CHECK_COLLECTIVES_ENV = "FXFUSE_CHECK_COLLECTIVES"

#: The fused all-reduce ops, by name; an op's index is its code in the cross-rank check.
ALLREDUCE_OPS: tuple[str, ...] = (
    "allreduce_fused_add_rms_norm",
    "allreduce_fused_add_rms_norm_static_fp8_quant",
    "allreduce_fused_add_rms_norm_dynamic_per_token_fp8_quant",
    "allreduce_fused_add_rms_norm_nvfp4_quant",
    "allreduce_fused_add_rms_norm_group_fp8_quant",
)

# Dtype codes of the cross-rank check (an index into this tuple).
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def resolve(op: str, group_name: Any) -> Any:
    """The process group ``group_name`` of this process, or a ValueError naming the op and
    the groups that exist.

    >>> resolve("allreduce_fused_add_rms_norm", "no-such-group")
    Traceback (most recent call last):
    ...
    ValueError: fxfuse.allreduce_fused_add_rms_norm: no process group named 'no-such-group' in this process ...
    """
    check_group_name(op, group_name)
    group = compat.resolve_process_group(group_name)
    if group is None:
        known = ", ".join(repr(n) for n in compat.process_group_names()) or "none: torch.distributed is not initialized"
        raise ValueError(
            f"fxfuse.{op}: no process group named {group_name!r} in this process (known: {known}); "
            "`group_name` is the ProcessGroup.group_name of the group the partial sums are reduced over"
        )
    return group


def check_group_name(op: str, group_name: Any) -> None:
    """``group_name`` must be a non-empty str (checked by fake impls too, which never resolve it)."""
    if not isinstance(group_name, str):
        raise TypeError(f"fxfuse.{op}: `group_name` must be a str, got {type(group_name).__name__}")
    if not group_name:
        raise ValueError(f"fxfuse.{op}: `group_name` must be a non-empty str")


def fused_implementation(group_name: str, device_type: str) -> str | None:
    """Which implementation of the fused all-reduce ops serves ``group_name`` for tensors on
    ``device_type``, or None where fusing would not pay (the pass then leaves the chain alone).

    - ``"triton_symm_mem"``: an NCCL group of at most `MAX_SYMM_MEM_WORLD` ranks on CUDA,
      with symmetric memory in this torch: the one-/two-shot kernels, NCCL above their size
      limits;
    - ``"native"``: a gloo group on the CPU: the reference (functional all-reduce, then the
      unfused ops);
    - None: a group this process does not have, another backend, or CUDA without
      symmetric memory (fusing would only hide NCCL and the same kernels inside one op).

    >>> fused_implementation("no-such-group", "cpu") is None
    True
    """
    group = compat.resolve_process_group(group_name)
    if group is None:
        return None
    backend = compat.process_group_backends(group).get(device_type)
    if device_type == "cpu" and backend == "gloo":
        return NATIVE
    if (
        device_type == "cuda"
        and backend == "nccl"
        and group.size() <= MAX_SYMM_MEM_WORLD
        and compat.symmetric_memory() is not None
    ):
        return TRITON_SYMM_MEM
    return None


def implementation_state() -> dict[str, tuple]:
    """Per process group of this process: its backends, world size and the fused
    implementation on each device type; what ``allreduce_rms_fusion``'s ``check`` reads.

    >>> implementation_state()  # doctest: +SKIP  (a 2-rank gloo world)
    {'0': ((('cpu', 'gloo'), ('cuda', 'gloo')), 2, (('cpu', 'native'), ('cuda', None)))}
    """
    state = {}
    for name in compat.process_group_names():
        group = compat.resolve_process_group(name)
        backends = compat.process_group_backends(group)
        impls = tuple((device, fused_implementation(name, device)) for device in sorted(backends))
        state[name] = (tuple(sorted(backends.items())), group.size(), impls)
    return state


def should_check_across_ranks(device: torch.device) -> bool:
    """Whether an op checks that every rank passes the same shape (a small all-gather first).

    Everywhere but CUDA: always (a mismatch otherwise aborts gloo or hangs). On CUDA the
    check reads the gathered sizes on the host, a sync per call that is illegal inside
    CUDA graph capture, so only with ``FXFUSE_CHECK_COLLECTIVES=1`` and never while capturing.

    >>> should_check_across_ranks(torch.device("cpu"))
    True
    """
    if device.type != "cuda":
        return True
    if os.environ.get(CHECK_COLLECTIVES_ENV, "0") != "1":
        return False
    return not torch.cuda.is_current_stream_capturing()


def check_same_across_ranks(op: str, group_name: str, group: Any, x: torch.Tensor) -> None:
    """Raise on every rank when the ranks of ``group`` are about to all-reduce different things.

    Each rank contributes ``(op, dtype, rows, hidden)`` of its ``x`` to an all-gather of
    fixed size, which completes whatever the ranks' shapes; every rank then compares all
    of them and raises the same ValueError, instead of one rank aborting in gloo or all
    of them hanging in the all-reduce.
    """
    if not should_check_across_ranks(x.device):
        return
    hidden = x.shape[-1]
    rows = x.numel() // hidden if hidden else 0
    code = _DTYPES.index(x.dtype) if x.dtype in _DTYPES else len(_DTYPES)
    mine = torch.tensor([ALLREDUCE_OPS.index(op), code, rows, hidden], dtype=torch.int64, device=x.device)
    world = group.size()
    gathered = torch.ops._c10d_functional.wait_tensor(
        torch.ops._c10d_functional.all_gather_into_tensor(mine, world, group_name)
    ).reshape(world, 4).tolist()
    if all(g == gathered[0] for g in gathered):
        return
    several_ops = len({g[0] for g in gathered}) > 1
    what = "; ".join(f"rank {r}: {_describe(g, several_ops)}" for r, g in enumerate(gathered))
    raise ValueError(
        f"fxfuse.{op}: the ranks of process group {group_name!r} disagree on what to all-reduce ({what}); "
        "every rank must pass `x` of the same shape and dtype to the same op"
    )


def _describe(fingerprint: list[int], name_op: bool) -> str:
    op, dtype, rows, hidden = fingerprint
    dtype_name = str(_DTYPES[dtype]).replace("torch.", "") if dtype < len(_DTYPES) else "another dtype"
    return f"{dtype_name}[{rows} rows x {hidden}]" + (f" in {ALLREDUCE_OPS[op]}" if name_op else "")
