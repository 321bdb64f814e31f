"""Whether an op call runs a Triton kernel or its native implementation.

On CUDA tensors the ops run their Triton kernel (``fxfuse.kernels``), which is faster
than the native chain run eagerly at every shape we measured. Under ``torch.compile``
the choice between the kernel and Inductor's code for the native chain is made at
compile time by the ``native_lowering`` pass, from measurements (see
``fxfuse.passes.native_lowering``).

``FXFUSE_KERNELS=0`` in the environment turns kernels off (the native reference runs
everywhere), for debugging and for benchmarking the native ops eagerly.
"""

from __future__ import annotations

import os

import torch


def use_kernels(x: torch.Tensor) -> bool:
    """Whether ``x``'s op should run its Triton kernel: CUDA, Triton importable, not disabled.

    >>> use_kernels(torch.zeros(2))
    False
    """
    if x.device.type != "cuda" or os.environ.get("FXFUSE_KERNELS", "1") == "0":
        return False
    from .. import kernels

    return kernels.available("cuda")
