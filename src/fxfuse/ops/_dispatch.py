"""Decisions an op makes per call from its device and the environment: whether it runs
a Triton kernel, and whether it reads its static scales to check their values.

On CUDA tensors the ops run their Triton kernel (``fxfuse.kernels``), which is faster
than the native chain run eagerly at every shape we measured. Under ``torch.compile``
the choice between the kernel and Inductor's code for the native chain is made at
compile time by the ``native_lowering`` pass, from measurements (see
``fxfuse.passes.native_lowering``).

Environment variables (read at every call, so a test or a debugging session can flip
them without re-importing anything):

- ``FXFUSE_KERNELS=0`` turns kernels off (the native reference runs everywhere), for
  debugging and for benchmarking the native ops eagerly.
- ``FXFUSE_CHECK_SCALES=1`` makes ops on CUDA check that their static scales are
  positive and finite, as they always do on other devices (see
  :func:`should_check_values`).
"""

from __future__ import annotations

import os

import torch

#: Set to ``1`` to check static scale values on CUDA too (each check syncs the device).
CHECK_SCALES_ENV = "FXFUSE_CHECK_SCALES"


def use_kernels(x: torch.Tensor) -> bool:
    """Whether ``x``'s op should run its Triton kernel: CUDA, Triton importable, not disabled.

    >>> use_kernels(torch.zeros(2))
    False
    """
    if x.device.type != "cuda" or os.environ.get("FXFUSE_KERNELS", "1") == "0":
        return False
    from .. import kernels

    return kernels.available("cuda")


def should_check_values(device: torch.device) -> bool:
    """Whether an op whose scale lives on ``device`` reads the scale to check its value.

    Everywhere but CUDA: always; reading one number costs nothing there. On CUDA the
    read is a device-to-host copy that waits for all queued work, a sync on every op
    call, and it is illegal inside CUDA graph capture; so it is off unless
    ``FXFUSE_CHECK_SCALES=1``, and even then skipped while the current stream is
    capturing (the values a graph replays are checked by the eager warm-up runs before
    capture, not at replay).

    >>> should_check_values(torch.device("cpu"))
    True
    """
    if device.type != "cuda":
        return True
    if os.environ.get(CHECK_SCALES_ENV, "0") != "1":
        return False
    # is_current_stream_capturing() raises on a torch built without CUDA; such a build
    # has no CUDA tensor to check, but the decision can still be asked for.
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
