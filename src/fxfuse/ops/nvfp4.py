"""NVFP4 (E2M1 values, FP8 block scales) quantization ops.

``fxfuse::nvfp4_quant`` quantizes ``x`` (``[M, K]``, or ``[..., K]`` flattened to
``M`` rows) to 4-bit E2M1 values with one float8_e4m3fn scale per block of 16
consecutive elements along ``K``, on top of an fp32 per-tensor ``global_scale``;
``fxfuse::silu_and_mul_nvfp4_quant`` is ``nvfp4_quant(silu_and_mul(x))`` in one op.

The format (the contract every implementation of these ops meets, bit for bit):

- ``global_scale`` is a *multiplier* (fp32, one element, positive and finite: the ops
  reject anything else), typically ``448 * 6 / amax(x)``, so that the largest block
  scale lands at the top of the float8_e4m3fn range.
- Per row and per block of 16 elements, in fp32: ``vmax = max|x|``;
  ``sf = float8_e4m3fn(min(vmax / 6 * global_scale, 448))`` (the cast rounds to
  nearest even); ``inv = global_scale / float(sf)``, or ``0`` where ``sf == 0``.
- Each element ``v = x * inv`` (fp32) is rounded to the nearest E2M1 value, saturating
  at +-6. E2M1 magnitudes are ``{0, 0.5, 1, 1.5, 2, 3, 4, 6}`` (indices 0-7).
  **Ties** (``v`` exactly halfway between two neighbours: 0.25, 0.75, 1.25, 1.75, 2.5,
  3.5, 5) go to the neighbour whose index is even, i.e. whose mantissa bit is 0; this is
  IEEE round-half-to-even in the E2M1 format (0.25 -> 0, 0.75 -> 1, 1.25 -> 1,
  1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4).
- A 4-bit code is ``sign << 3 | index``. Zero is always encoded as code 0: a negative
  value that rounds to zero gets code 0, never ``0b1000`` (-0), so a block whose scale is
  0 is all zero bytes.
- ``q`` is uint8 ``[M, K // 2]``: element ``2j`` of a row in the low nibble of byte
  ``j``, element ``2j + 1`` in the high nibble.
- ``block_scales`` is float8_e4m3fn ``[round_up(M, 128), round_up(K // 16, 4)]`` in the
  128x4 swizzled layout (:func:`swizzle_block_scales`), padding bytes zero.
- Dequantization: ``x ~= e2m1(q) * float(sf) / global_scale``
  (:func:`nvfp4_dequantize`).

Non-finite input: ``+-inf`` saturates to code ``+-6`` and gives its block the largest
scale (448). NaN is not supported; the reference gives a block that contains NaN a NaN
scale byte (0x7F) and all-zero codes, so the whole block dequantizes to NaN; the Triton
kernels instead ignore the NaN in the block's max and encode it as 0 (see
``docs/kernels.md``, "Values").
"""

import math

import torch

from . import _validate as V
from ._dispatch import use_kernels
from ._register import define_op
from .activation import silu_and_mul_native, validate_silu_and_mul
from .quant import FP8_DTYPE, FP8_MAX

#: Elements per block scale.
NVFP4_BLOCK_SIZE = 16
#: Largest E2M1 magnitude.
E2M1_MAX = 6.0
#: E2M1 magnitudes, indexed by the low 3 bits of a code.
E2M1_VALUES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

# Rounding thresholds between E2M1 index i and i + 1: the midpoint of the two values,
# and whether a value exactly at the midpoint rounds up (it does iff i + 1 is even).
_E2M1_THRESHOLDS: tuple[tuple[float, bool], ...] = tuple(
    ((E2M1_VALUES[i] + E2M1_VALUES[i + 1]) / 2, (i + 1) % 2 == 0) for i in range(len(E2M1_VALUES) - 1)
)

# Swizzled scale tiles: 128 rows x 4 block columns, 512 bytes each.
_TILE_ROWS = 128
_TILE_COLS = 4


def _round_up(n, multiple: int):
    # Plain integer arithmetic, so SymInts pass through without guards.
    return (n + multiple - 1) // multiple * multiple


def nvfp4_block_scales_shape(m, k) -> tuple:
    """Shape of the swizzled block scales for ``m`` rows of ``k`` elements:
    ``(round_up(m, 128), round_up(k // 16, 4))``."""
    return (_round_up(m, _TILE_ROWS), _round_up(k // NVFP4_BLOCK_SIZE, _TILE_COLS))


def _rows(x: torch.Tensor):
    """Number of rows of ``x`` viewed as ``[M, K]`` (the product of its leading dims)."""
    return math.prod(x.shape[:-1])


# --------------------------------------------------------------------------- layout helpers


def _check_scale_matrix(fn: str, name: str, s) -> None:
    V.check_tensor(fn, name, s)
    if s.dtype not in (FP8_DTYPE, torch.uint8):
        raise ValueError(f"fxfuse.{fn}: `{name}` must have dtype {FP8_DTYPE} or torch.uint8, got {s.dtype}")
    if s.dim() != 2:
        raise ValueError(f"fxfuse.{fn}: `{name}` must be 2-D, got shape {tuple(s.shape)}")


def swizzle_block_scales(s: torch.Tensor) -> torch.Tensor:
    """Lay out row-major block scales ``[M, Kb]`` in the 128x4 swizzled layout.

    Returns a contiguous ``[round_up(M, 128), round_up(Kb, 4)]`` tensor of ``s``'s dtype
    (float8_e4m3fn or uint8) in which the scale of row ``m``, block ``k`` sits at flat
    byte offset::

        ((m // 128) * (Kb_pad // 4) + k // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + k % 4

    i.e. the zero-padded ``[M_pad, Kb_pad]`` matrix reshaped to
    ``[M_pad / 128, 4, 32, Kb_pad / 4, 4]``, permuted ``(0, 3, 2, 1, 4)`` and flattened.
    Padding bytes are zero.

    >>> s = torch.rand(130, 5).to(torch.float8_e4m3fn)
    >>> swizzle_block_scales(s).shape
    torch.Size([256, 8])
    """
    _check_scale_matrix("swizzle_block_scales", "s", s)
    m, kb = s.shape
    m_pad, kb_pad = _round_up(m, _TILE_ROWS), _round_up(kb, _TILE_COLS)
    padded = torch.zeros((m_pad, kb_pad), dtype=torch.uint8, device=s.device)
    padded[:m, :kb] = s.view(torch.uint8)
    tiles = padded.reshape(m_pad // _TILE_ROWS, 4, 32, kb_pad // _TILE_COLS, _TILE_COLS)
    return tiles.permute(0, 3, 2, 1, 4).reshape(m_pad, kb_pad).view(s.dtype)


def unswizzle_block_scales(s: torch.Tensor, m: int, kb: int) -> torch.Tensor:
    """Inverse of :func:`swizzle_block_scales`: the row-major ``[m, kb]`` block scales.

    ``s`` is a swizzled ``[M_pad, Kb_pad]`` tensor (float8_e4m3fn or uint8) with
    ``M_pad`` a multiple of 128 and ``Kb_pad`` a multiple of 4; ``m <= M_pad`` and
    ``kb <= Kb_pad`` select the unpadded part.

    >>> s = torch.rand(130, 5).to(torch.float8_e4m3fn)
    >>> back = unswizzle_block_scales(swizzle_block_scales(s), 130, 5)
    >>> torch.equal(back.view(torch.uint8), s.view(torch.uint8))
    True
    """
    fn = "unswizzle_block_scales"
    _check_scale_matrix(fn, "s", s)
    m_pad, kb_pad = s.shape
    if m_pad % _TILE_ROWS != 0 or kb_pad % _TILE_COLS != 0:
        raise ValueError(
            f"fxfuse.{fn}: `s` must have shape [multiple of {_TILE_ROWS}, multiple of {_TILE_COLS}], "
            f"got {tuple(s.shape)}"
        )
    if not (0 <= m <= m_pad and 0 <= kb <= kb_pad):
        raise ValueError(
            f"fxfuse.{fn}: `m`, `kb` must be within the padded shape {tuple(s.shape)} of `s`, got ({m}, {kb})"
        )
    tiles = s.contiguous().view(torch.uint8).reshape(m_pad // _TILE_ROWS, kb_pad // _TILE_COLS, 32, 4, _TILE_COLS)
    return tiles.permute(0, 3, 2, 1, 4).reshape(m_pad, kb_pad)[:m, :kb].contiguous().view(s.dtype)


# --------------------------------------------------------------------------- native math


def _e2m1_codes(v: torch.Tensor) -> torch.Tensor:
    """Round fp32 ``v`` to E2M1 codes (uint8 in 0..15): nearest, ties to even index,
    saturating at +-6, zero always +0."""
    a = v.abs()
    idx = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
    for threshold, tie_rounds_up in _E2M1_THRESHOLDS:
        idx += (a >= threshold if tie_rounds_up else a > threshold).to(torch.uint8)
    negative = (v < 0) & (idx != 0)
    return idx | (negative.to(torch.uint8) << 3)


def nvfp4_quant_native(x: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference NVFP4 quant; returns ``(q, block_scales)`` (see the module docstring).

    ``x`` is ``[..., K]`` (``K`` a multiple of 16), read as ``M`` rows of ``K``;
    ``global_scale`` is fp32 with one element. ``q`` is uint8 ``[M, K // 2]`` (two E2M1
    codes a byte, low nibble first); ``block_scales`` is float8_e4m3fn
    ``[round_up(M, 128), round_up(K // 16, 4)]``, swizzled, zero-padded.
    """
    k = x.shape[-1]
    m = _rows(x)
    blocks = x.float().reshape(m, k // NVFP4_BLOCK_SIZE, NVFP4_BLOCK_SIZE)
    gs = global_scale.float().reshape(())
    vmax = blocks.abs().amax(dim=-1, keepdim=True)
    # A tensor divisor: CUDA turns division by a Python scalar into a multiply by its
    # rounded reciprocal, which is not the exact division the format specifies.
    sf = torch.clamp(vmax / torch.full((), E2M1_MAX, device=vmax.device) * gs, max=FP8_MAX).to(FP8_DTYPE)
    sf_f = sf.float()
    inv = torch.where(sf_f != 0, gs / sf_f, torch.zeros_like(sf_f))
    codes = _e2m1_codes(blocks * inv).reshape(m, k)
    q = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return q, swizzle_block_scales(sf.reshape(m, k // NVFP4_BLOCK_SIZE))


def silu_and_mul_nvfp4_quant_native(
    x: torch.Tensor, global_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: ``nvfp4_quant(silu_and_mul(x), global_scale)`` (the SiLU-and-mul output
    rounded to ``x.dtype`` first)."""
    return nvfp4_quant_native(silu_and_mul_native(x), global_scale)


def nvfp4_dequantize(
    q: torch.Tensor,
    block_scales: torch.Tensor,
    global_scale: torch.Tensor,
    shape,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantize NVFP4 ``(q, block_scales)`` back to ``shape`` (the shape of the
    quantized ``x``, ``[..., K]``) in ``dtype``: ``e2m1(q) * float(sf) / global_scale``,
    computed in fp32 (``e2m1 * sf`` is exact, the division rounds once), then cast.

    >>> x = torch.randn(4, 64, dtype=torch.bfloat16)
    >>> gs = (448.0 * 6.0 / x.float().abs().amax()).reshape(1)
    >>> q, s = torch.ops.fxfuse.nvfp4_quant(x, gs)
    >>> nvfp4_dequantize(q, s, gs, x.shape, torch.bfloat16).shape
    torch.Size([4, 64])
    """
    fn = "nvfp4_dequantize"
    shape = tuple(shape)
    if len(shape) < 1 or shape[-1] <= 0 or shape[-1] % NVFP4_BLOCK_SIZE != 0:
        raise ValueError(
            f"fxfuse.{fn}: `shape` must end in K, a positive multiple of {NVFP4_BLOCK_SIZE}, got {shape}"
        )
    k = shape[-1]
    m = math.prod(shape[:-1])
    V.check_tensor(fn, "q", q)
    if q.dtype != torch.uint8 or tuple(q.shape) != (m, k // 2):
        raise ValueError(
            f"fxfuse.{fn}: `q` must be torch.uint8 of shape {(m, k // 2)}, got {q.dtype} {tuple(q.shape)}"
        )
    V.check_fp8(fn, "block_scales", block_scales)
    if tuple(block_scales.shape) != nvfp4_block_scales_shape(m, k):
        raise ValueError(
            f"fxfuse.{fn}: `block_scales` must have shape {nvfp4_block_scales_shape(m, k)}, "
            f"got {tuple(block_scales.shape)}"
        )
    V.check_scalar_scale(fn, "global_scale", global_scale, "q", q)
    V.check_out_dtype(fn, "dtype", dtype)

    lut = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32, device=q.device)
    codes = torch.stack([q & 0xF, q >> 4], dim=-1).reshape(m, k).long()
    vals = lut[codes].reshape(m, k // NVFP4_BLOCK_SIZE, NVFP4_BLOCK_SIZE)
    sf = unswizzle_block_scales(block_scales, m, k // NVFP4_BLOCK_SIZE).float().unsqueeze(-1)
    out = vals * sf / global_scale.float().reshape(())
    return out.reshape(shape).to(dtype)


# --------------------------------------------------------------------------- validators


def _check_nvfp4_k(op: str, name: str, k, shape, what: str = "a last dim K") -> None:
    if k <= 0 or k % NVFP4_BLOCK_SIZE != 0:
        raise ValueError(
            f"fxfuse.{op}: `{name}` must have {what}, with K a positive multiple of {NVFP4_BLOCK_SIZE} "
            f"(one scale per {NVFP4_BLOCK_SIZE}-element block), got K={k} (shape {tuple(shape)})"
        )


def validate_nvfp4_quant(
    x: torch.Tensor, global_scale: torch.Tensor, op: str = "nvfp4_quant", x_name: str = "x"
) -> None:
    """Checks for an NVFP4 quant's input and global scale; ``op`` names the op in messages."""
    V.check_activation(op, x_name, x)
    _check_nvfp4_k(op, x_name, x.shape[-1], x.shape)
    V.check_scalar_scale(op, "global_scale", global_scale, x_name, x)
    V.check_scale_value(op, "global_scale", global_scale)


def validate_silu_and_mul_nvfp4_quant(x: torch.Tensor, global_scale: torch.Tensor) -> None:
    op = "silu_and_mul_nvfp4_quant"
    validate_silu_and_mul(x, op=op)
    _check_nvfp4_k(op, "x", x.shape[-1] // 2, x.shape, what="a last dim 2 * K")
    V.check_scalar_scale(op, "global_scale", global_scale, "x", x)
    V.check_scale_value(op, "global_scale", global_scale)


def nvfp4_empty(x: torch.Tensor, k) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty ``(q, block_scales)`` for quantizing ``x`` viewed as rows of ``k`` elements
    (used by fake impls)."""
    m = _rows(x)
    q = x.new_empty((m, k // 2), dtype=torch.uint8)
    return q, x.new_empty(nvfp4_block_scales_shape(m, k), dtype=FP8_DTYPE)


# --------------------------------------------------------------------------- ops


@define_op("nvfp4_quant", fake=lambda x, global_scale: nvfp4_empty(x, x.shape[-1]), validate=validate_nvfp4_quant)
def nvfp4_quant(x: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to NVFP4; returns ``(q, block_scales)``.

    ``x`` is ``[..., K]`` (bf16, fp16 or fp32, contiguous, ``K`` a multiple of 16), read as
    ``M`` rows; ``global_scale`` is an fp32 one-element multiplier, positive and finite,
    typically ``448 * 6 / amax(x)``. ``q`` is uint8 ``[M, K // 2]`` (E2M1 codes, low nibble first);
    ``block_scales`` is float8_e4m3fn ``[round_up(M, 128), round_up(K // 16, 4)]`` in the
    128x4 swizzled layout. ``x ~= e2m1(q) * block_scale / global_scale``.

    >>> x = torch.randn(4, 64, dtype=torch.bfloat16)
    >>> global_scale = (448.0 * 6.0 / x.float().abs().amax()).reshape(1)
    >>> q, block_scales = torch.ops.fxfuse.nvfp4_quant(x, global_scale)
    >>> q.shape, block_scales.shape
    (torch.Size([4, 32]), torch.Size([128, 4]))
    """
    # On CUDA a Triton kernel; the native function is the reference everywhere else.
    if use_kernels(x):
        from ..kernels.quant import nvfp4

        return nvfp4(x, global_scale)
    return nvfp4_quant_native(x, global_scale)


@define_op(
    "silu_and_mul_nvfp4_quant",
    fake=lambda x, global_scale: nvfp4_empty(x, x.shape[-1] // 2),
    validate=validate_silu_and_mul_nvfp4_quant,
)
def silu_and_mul_nvfp4_quant(x: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU-and-mul then NVFP4 quant; equal to the two-op chain bit for bit.

    ``x`` is ``[..., 2 * K]`` with ``K`` a multiple of 16; returns ``(q, block_scales)`` for
    the ``[..., K]`` SiLU-and-mul output (rounded to ``x.dtype`` before quantizing).

    >>> x = torch.randn(4, 2 * 64, dtype=torch.bfloat16)
    >>> y_amax = torch.ops.fxfuse.silu_and_mul(x).float().abs().amax()
    >>> global_scale = (448.0 * 6.0 / y_amax).reshape(1)
    >>> q, block_scales = torch.ops.fxfuse.silu_and_mul_nvfp4_quant(x, global_scale)
    >>> q.shape
    torch.Size([4, 32])
    """
    # On CUDA a Triton kernel; the native function is the reference everywhere else.
    if use_kernels(x):
        from ..kernels.activation import OUT_NVFP4, silu_and_mul

        return silu_and_mul(x, OUT_NVFP4, global_scale)
    return silu_and_mul_nvfp4_quant_native(x, global_scale)
