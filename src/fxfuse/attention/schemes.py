"""The output quant schemes an ``attention`` call may ask for and a backend may fuse.

The op reads the scheme off its optional arguments (:func:`output_quant_scheme`); a
backend states which schemes it writes itself (``AttentionBackend.supported_output_quant``);
the ``attn_quant_fusion`` pass fuses a quant into ``attention`` only for those.
"""

from __future__ import annotations

from typing import Optional

import torch

#: Output quant schemes, in the order the op documents them:
#: ``"none"`` writes the model dtype, ``"fp8_static"`` writes float8_e4m3fn with a
#: per-tensor scale (``output_scale``), ``"nvfp4"`` writes packed NVFP4 plus swizzled
#: E4M3 block scales (``output_scale`` is the global scale, ``output_block_scale`` given).
OUTPUT_QUANT_SCHEMES: tuple[str, ...] = ("none", "fp8_static", "nvfp4")


def output_quant_scheme(
    output_scale: Optional[torch.Tensor], output_block_scale: Optional[torch.Tensor]
) -> str:
    """The output quant scheme an ``attention`` call asks for, from its optional arguments.

    >>> output_quant_scheme(None, None)
    'none'
    >>> output_quant_scheme(torch.tensor([0.5]), None)
    'fp8_static'

    Raises ``ValueError`` for ``output_block_scale`` without ``output_scale`` (NVFP4
    needs its global scale).
    """
    if output_block_scale is not None:
        if output_scale is None:
            raise ValueError(
                "fxfuse.attention: `output_scale` must be given (the NVFP4 global scale) "
                "when `output_block_scale` is given"
            )
        return "nvfp4"
    return "none" if output_scale is None else "fp8_static"


def check_scheme(scheme: str) -> None:
    """``scheme`` must be one of :data:`OUTPUT_QUANT_SCHEMES`."""
    if scheme not in OUTPUT_QUANT_SCHEMES:
        raise ValueError(
            f"fxfuse.attention: unknown output quant scheme {scheme!r}; "
            f"expected one of {', '.join(repr(s) for s in OUTPUT_QUANT_SCHEMES)}"
        )
