"""When the fused all-reduce ops run the symmetric-memory kernels, and their workspaces.

A call runs `fxfuse.kernels.allreduce` when its tensors are on CUDA, kernels are on
(``FXFUSE_KERNELS``), its group has the ``triton_symm_mem`` implementation
(`fxfuse.ops._groups.fused_implementation`) and its message (``x.nbytes``) is at most
`TWO_SHOT_MAX_BYTES`: one-shot up to `ONE_SHOT_MAX_BYTES`, two-shot above. Larger
messages go to NCCL and the existing fused kernels, where bandwidth, not latency, decides.

The two limits are provisional: they are torch Inductor's own one-shot limit (128 KiB,
``_collective.one_shot_all_reduce_threshold_bytes``) and the size where published
two-shot kernels stop beating NCCL's ring on 8 NVLink GPUs, not yet measured with
these kernels (``docs/distributed.md``, "Limits"). Override them with
``FXFUSE_ALLREDUCE_ONE_SHOT_MAX_BYTES`` / ``FXFUSE_ALLREDUCE_TWO_SHOT_MAX_BYTES``.

Each (group, device) gets one symmetric buffer of two `REGION_BYTES` regions (input,
then the two-shot gather region), allocated and exchanged with the peers
(a collective) at the group's first call: every rank makes that call at the same point,
as it must for the all-reduce itself. Not during CUDA graph capture: run the op once
before capturing (a warm-up does).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Optional

import torch

from .. import compat
from . import _groups as G
from ._dispatch import use_kernels

ONE_SHOT_MAX_BYTES = int(os.environ.get("FXFUSE_ALLREDUCE_ONE_SHOT_MAX_BYTES", 128 * 1024))
TWO_SHOT_MAX_BYTES = int(os.environ.get("FXFUSE_ALLREDUCE_TWO_SHOT_MAX_BYTES", 2 * 1024 * 1024))
#: Bytes of each region of a workspace (fixed when the process starts, so that changing
#: the limits above later never outgrows a buffer the peers have already mapped).
REGION_BYTES = TWO_SHOT_MAX_BYTES


@dataclasses.dataclass(frozen=True)
class Workspace:
    """This rank's symmetric buffer of a group and the handle that maps the peers' buffers."""

    buffer: torch.Tensor  # uint8, 2 * region_bytes
    handle: Any  # the rendezvous handle: buffer_ptrs_dev, signal_pad_ptrs_dev, rank, world_size
    region_bytes: int
    max_programs: int  # grid cap: co-resident on the GPU, and a signal-pad flag per program and peer


_WORKSPACES: dict[tuple[str, int], Optional[Workspace]] = {}


def kernel_path(nbytes: int) -> Optional[str]:
    """``"one_shot"``, ``"two_shot"`` or None (NCCL) for a message of ``nbytes``.

    >>> kernel_path(4096), kernel_path(1 << 20), kernel_path(1 << 30)
    ('one_shot', 'two_shot', None)
    """
    if nbytes <= ONE_SHOT_MAX_BYTES:
        return "one_shot"
    if nbytes <= TWO_SHOT_MAX_BYTES:
        return "two_shot"
    return None


def workspace(group_name: str, device: torch.device) -> Optional[Workspace]:
    """The group's workspace on ``device``, made at the first call (a collective); None where
    symmetric memory cannot be set up (warned once; the ops then use NCCL)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (group_name, index)
    if key not in _WORKSPACES:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"fxfuse: the first fused all-reduce on group {group_name!r} allocates its symmetric memory, "
                "which cannot happen during CUDA graph capture; run the model once before capturing"
            )
        _WORKSPACES[key] = _make_workspace(group_name, torch.device("cuda", index))
    return _WORKSPACES[key]


def _make_workspace(group_name: str, device: torch.device) -> Optional[Workspace]:
    symm_mem = compat.symmetric_memory()
    try:
        buffer = symm_mem.empty(2 * REGION_BYTES, dtype=torch.uint8, device=device)
        handle = compat.symmetric_memory_rendezvous(buffer, group_name)
    except RuntimeError as e:  # no P2P access between the GPUs, an allocator that cannot map, ...
        warnings.warn(f"fxfuse: no symmetric memory for group {group_name!r} ({e}); "
                      "its fused all-reduce ops use NCCL and the unfused kernels", stacklevel=3)
        return None
    flags = handle.signal_pad_size // 4  # int32 flags per pad
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return Workspace(buffer, handle, REGION_BYTES, max(1, min(sms, flags // handle.world_size)))


def run_fused(
    x: torch.Tensor,
    group_name: str,
    *,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    scale: Optional[torch.Tensor] = None,
    dynamic: bool = False,
    scale_ub: Optional[torch.Tensor] = None,
    global_scale: Optional[torch.Tensor] = None,
    group_size: Optional[int] = None,
    column_major_scales: bool = False,
) -> Optional[tuple[torch.Tensor, ...]]:
    """The op's outputs from the symmetric-memory kernel, or None where it does not apply.

    ``scale`` selects the static FP8 epilogue, ``dynamic`` the per-token one (with
    ``scale_ub``), ``global_scale`` NVFP4, ``group_size`` the per-token-group one; none of
    them: no quant.
    """
    if not use_kernels(x) or G.fused_implementation(group_name, x.device.type) != G.TRITON_SYMM_MEM:
        return None
    path = kernel_path(x.nbytes)
    if path is None or max(x.nbytes, residual.nbytes) > REGION_BYTES:
        return None
    ws = workspace(group_name, x.device)
    if ws is None:
        return None
    from ..kernels import allreduce as K

    if scale is not None:
        epilogue = K.EPILOGUE_STATIC_FP8
    elif dynamic:
        epilogue = K.EPILOGUE_DYNAMIC_FP8
    elif global_scale is not None:
        epilogue, scale = K.EPILOGUE_NVFP4, global_scale
    elif group_size is not None:
        epilogue = K.EPILOGUE_GROUP_FP8
    else:
        epilogue = K.EPILOGUE_NONE
    return K.fused_allreduce_rms_norm(
        x, residual, weight, eps,
        buffer_ptrs=ws.handle.buffer_ptrs_dev, signal_pad_ptrs=ws.handle.signal_pad_ptrs_dev,
        rank=ws.handle.rank, world_size=ws.handle.world_size, gather_offset_bytes=ws.region_bytes,
        max_programs=ws.max_programs, two_shot=path == "two_shot", epilogue=epilogue,
        scale=scale, scale_ub=scale_ub, group_size=group_size, column_major_scales=column_major_scales,
    )
