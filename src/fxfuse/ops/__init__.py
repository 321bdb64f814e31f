"""The ``torch.ops.fxfuse.*`` operator library.

Importing this package registers every op (``torch.library.custom_op`` in the
``fxfuse`` namespace). Each op has a fake implementation for tracing, input
validation shared by its fake and real implementations, and a native PyTorch
implementation that is the numerical reference (``*_native`` functions in the
submodules):

- :mod:`.norm`: ``rms_norm``, ``fused_add_rms_norm``
- :mod:`.quant`: ``static_scaled_fp8_quant``, ``dynamic_per_token_fp8_quant``
- :mod:`.activation`: ``silu_and_mul``
- :mod:`.linear`: ``fp8_linear``
- :mod:`.fused`: the norm/activation + FP8 quant fusions
- :mod:`.group_quant`: per-token-group FP8 (block-scaled activations), alone and fused
  with ``rms_norm``, ``fused_add_rms_norm`` and ``silu_and_mul``
- :mod:`.block_linear`: ``block_fp8_linear`` (128x128 block-scaled FP8 weights)
- :mod:`.fused_linear`: ``fp8_linear_fused``, ``block_fp8_linear_fused``: the FP8 linears with
  the activation quant before them and SiLU-and-mul or the residual add + RMSNorm (+ quant)
  after them, one small-batch GEMM at decode
- :mod:`.allreduce`: all-reduce (tensor parallelism) fused with ``fused_add_rms_norm`` and
  each quant after it
- :mod:`.gemma_norm`: Gemma's RMSNorm (``(1 + w)``, fp32 weights), its residual-add form and
  their FP8 fusions
- :mod:`.rotary`: ``rotary_embedding`` (NeoX/GPT-J, partial rotary) and the per-head
  q/k norm + rotary fusions ``qk_norm_rope``, ``qk_gemma_norm_rope``

Ops are defined with :func:`._register.define_op` (implementation, fake, validator).
"""

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0

from . import activation, fused, linear, norm, quant  # noqa: E402  (registers the ops)
from . import nvfp4  # noqa: E402  (registers the NVFP4 ops)
from . import attention  # noqa: E402  (registers the paged attention op)
from . import block_linear, group_quant  # noqa: E402  (registers the block-scaled FP8 ops)
from . import allreduce  # noqa: E402  (registers the all-reduce fusions)
from . import gemma_norm, rotary  # noqa: E402  (registers the Gemma norm and rotary ops)
from . import fused_linear  # noqa: E402  (registers the GEMM-fused linears)

__all__ = [
    "FP8_DTYPE", "FP8_MAX", "activation", "allreduce", "block_linear", "fused", "fused_linear", "gemma_norm", "group_quant", "linear",
    "norm", "quant", "rotary",
]
