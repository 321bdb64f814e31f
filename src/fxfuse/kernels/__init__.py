"""Triton kernels for the fxfuse ops, one module per family.

Kernels import nothing of fxfuse but these shared helpers, and nothing here is needed
on a machine without Triton: `available()` says whether kernels can be used.
"""

from __future__ import annotations

import functools
import os


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreted() -> bool:
    """Triton's CPU interpreter (``TRITON_INTERPRET=1``): kernels run on CPU tensors, slowly."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def cuda_capability(device) -> tuple[int, int]:
    """The compute capability of a CUDA ``device`` (a ``torch.device``, index or None for the
    current one), asked of the driver once per device: launch paths call this per call.

    Example:
        >>> cuda_capability(torch.device("cuda", 0))
        (9, 0)
    """
    import torch

    if isinstance(device, torch.device):
        device = device.index
    return _capability(torch.cuda.current_device() if device is None else device)


def num_sms(device) -> int:
    """Multiprocessors of a CUDA ``device`` (asked once per device); 8 elsewhere (Triton's
    interpreter), so grids sized by it stay small there.

    Example:
        >>> num_sms(torch.device("cuda", 0))  # an H100 SXM
        132
    """
    import torch

    if device.type != "cuda":
        return 8
    return _sm_count(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _sm_count(index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    import torch

    return tuple(torch.cuda.get_device_capability(index))


def available(device_type: str) -> bool:
    """Whether kernels can run on tensors of ``device_type`` in this process."""
    if not triton_importable():
        return False
    return device_type == "cuda" or (device_type == "cpu" and interpreted())
