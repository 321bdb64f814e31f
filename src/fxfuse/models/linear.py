"""The reference models' quantized linear layers, shared by every model family.

Each is bias-free and inference-only, built from a full-precision weight it quantizes
once, and runs in one of three modes (a Python constant, so a compiled forward
specializes on it and holds no branch): ``"quant"`` (the real model: the input quant op,
then the quantized GEMM), ``"calibrate"`` (the same, after setting the static input scale
from the input's ``amax``) and ``"reference"`` (no activation quant: the input times the
dequantized weight in fp32).

- :class:`Fp8Linear`: per-tensor FP8 weight, static per-tensor FP8 input
  (``static_scaled_fp8_quant`` then ``fp8_linear``);
- :class:`Nvfp4Linear`: NVFP4 weight and input, emulated (``nvfp4_quant``, then an fp32
  matmul of the dequantized operands);
- :class:`BlockFp8Linear`: 128x128 block-scaled FP8 weight, per-token-group FP8 input
  (``group_fp8_quant`` then ``block_fp8_linear``).

Example:
    >>> lin = Fp8Linear(torch.randn(32, 64, dtype=torch.bfloat16), out_dtype=torch.bfloat16)
    >>> lin(torch.randn(4, 64, dtype=torch.bfloat16), mode="calibrate").shape
    torch.Size([4, 32])
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch

import fxfuse.ops  # noqa: F401  (registers torch.ops.fxfuse.*)
from fxfuse.ops.block_linear import dequantize_weight_blocks, quantize_weight_blocks
from fxfuse.ops.nvfp4 import E2M1_MAX, nvfp4_dequantize

from .config import ModelConfig
from .parallel import Shard, TensorParallel

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0

#: Floor of a calibrated activation amax, so an all-zero site never gets a zero scale.
MIN_CALIBRATION_AMAX = 1e-6

# How a forward treats its linear layers (a Python constant, so a compiled forward
# specializes on it and contains no branch).
QUANT = "quant"  # static FP8 / NVFP4 activation quant: the real model
CALIBRATE = "calibrate"  # like QUANT, but first set each site's scale from its input's amax
REFERENCE = "reference"  # no activation quant: matmul with the dequantized weights

_fx = torch.ops.fxfuse


def _input_amax(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """The calibration ``amax`` of a linear's input ``x`` (floored at `MIN_CALIBRATION_AMAX`):
    the largest over the tensor-parallel ranks, whose inputs are slices of one activation
    for a row-parallel layer (and equal for a column-parallel one)."""
    amax = tp.all_reduce(x.abs().amax().float().reshape(1), "max")
    return amax.clamp(min=MIN_CALIBRATION_AMAX)


class Fp8Linear(torch.nn.Module):
    """A bias-free linear layer with a per-tensor FP8 weight and a static FP8 input quant.

    ``forward(x)`` is ``fp8_linear(static_scaled_fp8_quant(x, input_scale), weight_q,
    input_scale, weight_scale)``. The weight is quantized once at construction with
    ``weight_scale = amax / 448``; ``input_scale`` is set by calibration.

    Tensor parallel: ``weight`` is the full weight and the layer keeps ``shard.take`` of it,
    quantized with the full weight's scale; calibration takes the largest ``amax`` over the
    ranks of ``tp``, so every rank quantizes as the ``tp_size=1`` model does.

    Example:
        >>> lin = Fp8Linear(torch.randn(32, 64, dtype=torch.bfloat16), out_dtype=torch.bfloat16)
        >>> x = torch.randn(4, 64, dtype=torch.bfloat16)
        >>> lin(x, mode="calibrate").shape
        torch.Size([4, 32])
    """

    def __init__(
        self,
        weight: torch.Tensor,
        out_dtype: torch.dtype,
        *,
        shard: Optional[Shard] = None,
        tp: TensorParallel = TensorParallel(),
    ) -> None:
        super().__init__()
        self.out_dtype = out_dtype
        self.tp = tp
        amax = weight.abs().amax().float().clamp(min=MIN_CALIBRATION_AMAX)
        weight_scale = (amax / FP8_MAX).reshape(1)
        weight = shard.take(weight) if shard is not None else weight.contiguous()
        weight_q = torch.ops.fxfuse.static_scaled_fp8_quant(weight, weight_scale)
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("weight_scale", weight_scale)
        # Placeholder until calibrate() runs; 1.0 keeps an uncalibrated forward finite.
        self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32, device=weight.device))

    @property
    def in_features(self) -> int:
        """Width of the input.

        Example:
            >>> Fp8Linear(torch.ones(2, 3), torch.float32).in_features
            3
        """
        return self.weight_q.shape[1]

    @property
    def out_features(self) -> int:
        """Width of the output.

        Example:
            >>> Fp8Linear(torch.ones(2, 3), torch.float32).out_features
            2
        """
        return self.weight_q.shape[0]

    def dequantized_weight(self) -> torch.Tensor:
        """The FP8 weight times its scale, in fp32: what the FP8 GEMM actually multiplies by.

        Example:
            >>> lin = Fp8Linear(torch.eye(4), torch.float32)
            >>> torch.allclose(lin.dequantized_weight(), torch.eye(4))
            True
        """
        return self.weight_q.float() * self.weight_scale

    def forward(self, x: torch.Tensor, mode: str = QUANT) -> torch.Tensor:
        """``x [tokens, in]`` (contiguous, in the model dtype) -> ``[tokens, out]`` in ``out_dtype``.

        ``mode`` is ``"quant"`` (default), ``"calibrate"`` (set ``input_scale`` from ``x``
        first) or ``"reference"`` (no activation quant; dequantized weight).

        Example:
            >>> y = lin(torch.randn(4, lin.in_features, dtype=torch.bfloat16))
        """
        if mode == REFERENCE:
            return (x.float() @ self.dequantized_weight().t()).to(self.out_dtype)
        if mode == CALIBRATE:
            amax = _input_amax(x, self.tp)
            self.input_scale.copy_((amax / FP8_MAX).reshape(1))
        elif mode != QUANT:
            raise ValueError(f"Fp8Linear: unknown mode {mode!r}")
        x_q = _fx.static_scaled_fp8_quant(x, self.input_scale)
        return _fx.fp8_linear(x_q, self.weight_q, self.input_scale, self.weight_scale, None, self.out_dtype)


class Nvfp4Linear(torch.nn.Module):
    """A bias-free linear layer with NVFP4 weight and input, emulated: dequantize, then an fp32 matmul.

    ``forward(x)`` is ``q, s = nvfp4_quant(x, input_global_scale)`` followed by
    ``nvfp4_dequantize(q, s, input_global_scale) @ W.T`` in fp32, rounded to ``out_dtype``.
    The weight is quantized to NVFP4 once at construction (``weight_q``,
    ``weight_block_scales``, ``weight_global_scale = 448 * 6 / amax``) and ``W`` is its
    dequantization, kept as the fp32 buffer ``weight_dequant`` so that a forward does not
    dequantize the weight again: exactly what a W4A4 NVFP4 GEMM multiplies, computed
    the slow way (no FP4 tensor cores are needed, so it runs on any device).
    ``input_global_scale = 448 * 6 / amax(x)`` is set by calibration.

    Tensor parallel: as `Fp8Linear` (``weight_global_scale`` from the full weight,
    calibration over the ranks); the slice must keep whole 16-element blocks.

    Example:
        >>> lin = Nvfp4Linear(torch.randn(32, 64, dtype=torch.bfloat16), out_dtype=torch.bfloat16)
        >>> lin(torch.randn(4, 64, dtype=torch.bfloat16), mode="calibrate").shape
        torch.Size([4, 32])
    """

    def __init__(
        self,
        weight: torch.Tensor,
        out_dtype: torch.dtype,
        *,
        shard: Optional[Shard] = None,
        tp: TensorParallel = TensorParallel(),
    ) -> None:
        super().__init__()
        self.out_dtype = out_dtype
        self.tp = tp
        amax = weight.abs().amax().float().clamp(min=MIN_CALIBRATION_AMAX)
        weight_global_scale = (FP8_MAX * E2M1_MAX / amax).reshape(1)
        weight = shard.take(weight) if shard is not None else weight.contiguous()
        weight_q, weight_block_scales = _fx.nvfp4_quant(weight, weight_global_scale)
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("weight_block_scales", weight_block_scales)
        self.register_buffer("weight_global_scale", weight_global_scale)
        self.register_buffer(
            "weight_dequant",
            nvfp4_dequantize(weight_q, weight_block_scales, weight_global_scale, weight.shape, torch.float32),
        )
        # Placeholder until calibrate() runs; 1.0 keeps an uncalibrated forward finite.
        self.register_buffer("input_global_scale", torch.ones(1, dtype=torch.float32, device=weight.device))

    @property
    def in_features(self) -> int:
        """Width of the input."""
        return self.weight_dequant.shape[1]

    @property
    def out_features(self) -> int:
        """Width of the output."""
        return self.weight_dequant.shape[0]

    def dequantized_weight(self) -> torch.Tensor:
        """The NVFP4 weight dequantized, in fp32: what the emulated GEMM multiplies by.

        Example:
            >>> w = torch.randn(16, 32)
            >>> ((Nvfp4Linear(w, torch.float32).dequantized_weight() - w).norm() / w.norm()) < 0.15
            tensor(True)
        """
        return self.weight_dequant

    def forward(self, x: torch.Tensor, mode: str = QUANT) -> torch.Tensor:
        """``x [tokens, in]`` (contiguous, in the model dtype) -> ``[tokens, out]`` in ``out_dtype``.

        ``mode`` is ``"quant"`` (default), ``"calibrate"`` (set ``input_global_scale`` from
        ``x`` first) or ``"reference"`` (no activation quant; dequantized weight).
        """
        if mode == REFERENCE:
            return (x.float() @ self.weight_dequant.t()).to(self.out_dtype)
        if mode == CALIBRATE:
            amax = _input_amax(x, self.tp)
            self.input_global_scale.copy_((FP8_MAX * E2M1_MAX / amax).reshape(1))
        elif mode != QUANT:
            raise ValueError(f"Nvfp4Linear: unknown mode {mode!r}")
        q, block_scales = _fx.nvfp4_quant(x, self.input_global_scale)
        x_dq = nvfp4_dequantize(q, block_scales, self.input_global_scale, x.shape, torch.float32)
        return (x_dq @ self.weight_dequant.t()).to(self.out_dtype)


class BlockFp8Linear(torch.nn.Module):
    """A bias-free linear layer with a 128x128 block-scaled FP8 weight and per-token-group
    FP8 activations (DeepSeek-V3 / Qwen3-FP8 style).

    ``forward(x)`` is ``x_q, x_scales = group_fp8_quant(x, group_size, True)`` then
    ``block_fp8_linear(x_q, x_scales, weight_q, weight_scales)``: dynamic scales, one per
    token and group (column-major, the layout block-FP8 GEMMs read), so nothing is
    calibrated. The weight is quantized once at construction, one scale per 128x128 block
    (``amax / 448``).

    Example:
        >>> lin = BlockFp8Linear(torch.randn(192, 128, dtype=torch.bfloat16), torch.bfloat16, group_size=64)
        >>> lin(torch.randn(4, 128, dtype=torch.bfloat16)).shape
        torch.Size([4, 192])
    """

    def __init__(
        self,
        weight: torch.Tensor,
        out_dtype: torch.dtype,
        group_size: int,
        *,
        shard: Optional[Shard] = None,
    ) -> None:
        super().__init__()
        self.out_dtype = out_dtype
        self.group_size = group_size
        # Blocks are per 128x128 tile: the slice of whole tiles quantizes as the full weight does.
        weight_q, weight_scales = quantize_weight_blocks(shard.take(weight) if shard is not None else weight)
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("weight_scales", weight_scales)

    @property
    def in_features(self) -> int:
        """Width of the input."""
        return self.weight_q.shape[1]

    @property
    def out_features(self) -> int:
        """Width of the output."""
        return self.weight_q.shape[0]

    def dequantized_weight(self) -> torch.Tensor:
        """The block-scaled FP8 weight dequantized, in fp32: what the GEMM multiplies by.

        Example:
            >>> w = torch.randn(256, 128)
            >>> ((BlockFp8Linear(w, torch.float32, 64).dequantized_weight() - w).norm() / w.norm()) < 0.05
            tensor(True)
        """
        return dequantize_weight_blocks(self.weight_q, self.weight_scales)

    def forward(self, x: torch.Tensor, mode: str = QUANT) -> torch.Tensor:
        """``x [tokens, in]`` (contiguous, in the model dtype) -> ``[tokens, out]`` in ``out_dtype``.

        ``mode`` is ``"quant"`` (default) or ``"calibrate"`` (the same: the activation
        scales are dynamic), or ``"reference"`` (no activation quant; dequantized weight).
        """
        if mode == REFERENCE:
            return (x.float() @ self.dequantized_weight().t()).to(self.out_dtype)
        if mode not in (QUANT, CALIBRATE):
            raise ValueError(f"BlockFp8Linear: unknown mode {mode!r}")
        x_q, x_scales = _fx.group_fp8_quant(x, self.group_size, True)
        return _fx.block_fp8_linear(x_q, x_scales, self.weight_q, self.weight_scales, None, self.out_dtype)


#: Any of the model's quantized linear layers.
QuantLinear = Union[Fp8Linear, Nvfp4Linear, BlockFp8Linear]


#: ``build(weight, shard) -> QuantLinear``: a linear layer of this model from its full weight.
LinearBuilder = Callable[[torch.Tensor, Optional[Shard]], QuantLinear]


def linear_builders(config: ModelConfig, tp: TensorParallel = TensorParallel()) -> tuple[LinearBuilder, LinearBuilder]:
    """``(in_linear, resid_linear)`` for ``config``'s quant scheme: the builders of the
    linears that read a normalized activation (QKV, gate/up) and of those that write the
    residual stream (o, down).

    The linears whose inputs the fusions under test quantize (attention output,
    activation output) are NVFP4 in the ``"nvfp4"`` scheme; QKV and gate/up stay FP8.
    ``"fp8-block"`` makes all four block-scaled. The row-parallel ones (o, down) write
    their partial sums in ``tp.partial_sum_dtype`` (the model dtype at ``tp_size=1``).

    Example:
        >>> in_linear, resid_linear = linear_builders(ModelConfig.preset("tiny"))
        >>> in_linear(torch.randn(32, 64, dtype=torch.bfloat16), None).out_features
        32
    """
    c = config
    dt = c.dtype
    partials = tp.partial_sum_dtype(dt)
    if c.quant == "fp8-block":
        def in_linear(w: torch.Tensor, shard: Optional[Shard]) -> QuantLinear:
            return BlockFp8Linear(w, dt, c.activation_group_size, shard=shard)

        def resid_linear(w: torch.Tensor, shard: Optional[Shard]) -> QuantLinear:
            return BlockFp8Linear(w, partials, c.activation_group_size, shard=shard)
    else:
        def in_linear(w: torch.Tensor, shard: Optional[Shard]) -> QuantLinear:
            return Fp8Linear(w, dt, shard=shard, tp=tp)

        def resid_linear(w: torch.Tensor, shard: Optional[Shard]) -> QuantLinear:
            return (Nvfp4Linear if c.quant == "nvfp4" else Fp8Linear)(w, partials, shard=shard, tp=tp)
    return in_linear, resid_linear


__all__ = [
    "Fp8Linear", "Nvfp4Linear", "BlockFp8Linear", "QuantLinear", "LinearBuilder", "linear_builders",
    "MIN_CALIBRATION_AMAX", "FP8_DTYPE", "FP8_MAX", "QUANT", "CALIBRATE", "REFERENCE",
]
