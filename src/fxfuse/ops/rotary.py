"""Rotary position embedding ops, alone and after a per-head RMSNorm of q and k.

- ``rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox) -> (query_out, key_out)``
- ``qk_norm_rope(positions, query, key, q_weight, k_weight, eps, head_size, cos_sin_cache, is_neox)
  -> (query_out, key_out)``: ``rms_norm`` of each head of ``query`` (weight ``q_weight``) and
  of ``key`` (``k_weight``), then ``rotary_embedding`` (Qwen3)
- ``qk_gemma_norm_rope(...)``, the same arguments: ``gemma_rms_norm`` of each head, then
  ``rotary_embedding`` (Gemma 3)

**Layouts.** ``positions`` is ``[tokens]``, int64 or int32. ``query`` is
``[tokens, q_heads * head_size]`` or ``[tokens, q_heads, head_size]``, ``key`` likewise
with its own (kv) head count; each token's features must be contiguous, the token stride
is free, so the q and k slices of a packed qkv projection go in without a copy.
``cos_sin_cache`` is vLLM's ``[max_position, rotary_dim]``: row ``p`` holds
``cos(p * inv_freq)`` in its first ``rotary_dim / 2`` columns and ``sin(p * inv_freq)`` in
the rest, with ``inv_freq[i] = base ** (-2i / rotary_dim)`` (:func:`rotary_cos_sin_cache`
builds it). Rope scaling variants (linear, NTK, YaRN, Llama 3's) only change the
cache's contents, so every one of them runs through these ops unchanged. The cache is
fp32 or the model dtype; it is read as is and widened to fp32.

**Styles.** The rotated features form ``rotary_dim / 2`` pairs ``(x1, x2)``, each rotated by
its frequency's angle: ``x1' = x1 cos - x2 sin``, ``x2' = x2 cos + x1 sin``. NeoX style
(``is_neox=True``; Llama, Qwen, Gemma, ...) pairs feature ``i`` with ``i + rotary_dim / 2``
(HF's ``rotate_half``); GPT-J style (``is_neox=False``; GPT-J, GLM, DeepSeek's MLA rope)
pairs ``2i`` with ``2i + 1``.

**Partial rotary.** With ``rotary_dim < head_size`` only the first ``rotary_dim`` features
of every head rotate; features ``[rotary_dim, head_size)`` pass through unchanged
(``rotary_embedding``), or normalized but unrotated (the qk-norm ops: the norm always
spans the whole head). ``rotary_dim`` is even and at most ``head_size``; it need not be a
power of two (48 of 128 works).

**Numerics.** Every rotated feature is computed in fp32 from the fp32 values of its
inputs, ``x1 * cos - x2 * sin`` (two products, one difference, no fused multiply-add),
and rounded once to the model dtype. HF and vLLM's native paths instead cast cos/sin to
the model dtype and round every product in it; the result here is the more accurate one,
and it is what the Triton kernel computes, bit for bit. The qk-norm ops are their
unfused chains: the norm's output is rounded to the model dtype (as the norm op returns
it) before the rotation reads it, and their native implementations compose the native
functions, so fused == unfused bit for bit.

**Functional, not in place.** vLLM's ``rotary_embedding`` rotates ``query``/``key`` in
place. These ops return new tensors instead: in the functionalized graphs that
``torch.compile`` hands to fusion passes a mutating op becomes an
``auto_functionalized`` node plus copies, which every pattern that contains it (the
qk-norm fusion here, a later rope + KV-cache-write fusion) would have to spell out, and
which Inductor re-inplaces only where it can prove no other reader; a functional op is
one plain node. The cost is the pass-through part of a partial-rotary head, which an
in-place op would not touch and these ops copy; with full rotary (and always for the
qk-norm ops, which rewrite every feature) the traffic is the same.

**Positions out of range.** A position outside ``[0, max_position)`` is an error: checked
at every call where reading the positions is cheap (CPU and every non-CUDA device), and
on CUDA with ``FXFUSE_CHECK_SCALES=1`` (the switch for every check that reads data and so
syncs the device; never during CUDA graph capture). Unchecked on CUDA, the kernel reads no
memory for such a token and writes NaN into its rotated features.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .. import compat
from . import _validate as V
from ._dispatch import should_check_values, use_kernels
from ._register import define_op
from .gemma_norm import gemma_rms_norm_native
from .norm import rms_norm_native

POSITION_DTYPES: tuple[torch.dtype, ...] = (torch.int64, torch.int32)

# --------------------------------------------------------------------------- the cache


def rotary_cos_sin_cache(
    max_position: int,
    rotary_dim: int,
    base: float = 10000.0,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """vLLM's ``cos_sin_cache`` ``[max_position, rotary_dim]``: ``cat(cos(f), sin(f))`` per row,
    ``f = position * base ** (-arange(0, rotary_dim, 2) / rotary_dim)``, computed in fp32,
    then cast to ``dtype``.

    >>> cache = rotary_cos_sin_cache(4096, 128, base=1e6)  # Qwen3
    >>> cache.shape, cache[0, :64].unique().item(), cache[0, 64:].unique().item()
    (torch.Size([4096, 128]), 1.0, 0.0)
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim))
    freqs = torch.arange(max_position, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype)


# --------------------------------------------------------------------------- native math


def _by_head(x: torch.Tensor, head_size: int) -> torch.Tensor:
    """``x`` as ``[tokens, heads, head_size]`` (a view where the strides allow, else a copy)."""
    return x.reshape(x.shape[0], -1, head_size)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_size: int, is_neox: bool) -> torch.Tensor:
    """``x`` with the first ``2 * cos.shape[-1]`` features of each head rotated (fp32 ``cos``/``sin``
    ``[tokens, rotary_dim / 2]``); a new contiguous tensor of ``x``'s shape and dtype."""
    heads = _by_head(x, head_size)
    rot = 2 * cos.shape[-1]
    xr = heads[..., :rot].float()
    if is_neox:
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2 :]
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
    c, s = cos[:, None, :], sin[:, None, :]
    o1 = x1 * c - x2 * s
    o2 = x2 * c + x1 * s
    rotated = torch.cat((o1, o2), dim=-1) if is_neox else torch.stack((o1, o2), dim=-1).flatten(-2)
    return torch.cat((rotated.to(x.dtype), heads[..., rot:]), dim=-1).reshape(x.shape)


def rotary_embedding_native(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference rotary embedding; returns new ``(query_out, key_out)`` (see the module docstring).

    >>> cache = rotary_cos_sin_cache(16, 8)
    >>> q, k = torch.randn(3, 4 * 8), torch.randn(3, 2 * 8)
    >>> q2, k2 = rotary_embedding_native(torch.tensor([0, 5, 9]), q, k, 8, cache, True)
    >>> torch.equal(q2[0], q[0])  # position 0 is the identity
    True
    """
    cos, sin = cos_sin_cache.index_select(0, positions).float().chunk(2, dim=-1)
    return _rotate(query, cos, sin, head_size, is_neox), _rotate(key, cos, sin, head_size, is_neox)


def _norm_heads(norm, x: torch.Tensor, weight: torch.Tensor, eps: float, head_size: int) -> torch.Tensor:
    return norm(_by_head(x, head_size), weight, eps).reshape(x.shape)


def qk_norm_rope_native(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: ``rotary_embedding`` of ``rms_norm`` over each head of ``query`` and ``key``."""
    q = _norm_heads(rms_norm_native, query, q_weight, eps, head_size)
    k = _norm_heads(rms_norm_native, key, k_weight, eps, head_size)
    return rotary_embedding_native(positions, q, k, head_size, cos_sin_cache, is_neox)


def qk_gemma_norm_rope_native(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: ``rotary_embedding`` of ``gemma_rms_norm`` over each head of ``query`` and ``key``."""
    q = _norm_heads(gemma_rms_norm_native, query, q_weight, eps, head_size)
    k = _norm_heads(gemma_rms_norm_native, key, k_weight, eps, head_size)
    return rotary_embedding_native(positions, q, k, head_size, cos_sin_cache, is_neox)


# --------------------------------------------------------------------------- validators


def _check_positions(op: str, positions: Any) -> None:
    V.check_tensor(op, "positions", positions)
    if positions.dtype not in POSITION_DTYPES:
        raise ValueError(f"fxfuse.{op}: `positions` must have dtype torch.int64 or torch.int32, got {positions.dtype}")
    if positions.dim() != 1:
        raise ValueError(f"fxfuse.{op}: `positions` must be 1-D [tokens], got shape {tuple(positions.shape)}")
    V.check_contiguous(op, "positions", positions)


def _check_heads(op: str, name: str, x: Any, head_size: int, positions: torch.Tensor) -> None:
    """``x`` is ``[tokens, heads * head_size]`` or ``[tokens, heads, head_size]`` with dense rows."""
    V.check_float_dtype(op, name, x)
    tokens = positions.shape[0]
    if x.dim() not in (2, 3) or x.shape[0] != tokens:
        raise ValueError(
            f"fxfuse.{op}: `{name}` must be [tokens, heads * head_size] or [tokens, heads, head_size] with "
            f"tokens = {tokens} (the length of `positions`), got shape {tuple(x.shape)}"
        )
    width = x.shape[1] if x.dim() == 2 else x.shape[1] * x.shape[2]
    if (x.dim() == 2 and x.shape[1] % head_size != 0) or (x.dim() == 3 and x.shape[2] != head_size) or width == 0:
        raise ValueError(
            f"fxfuse.{op}: `{name}` must hold whole heads of `head_size` {head_size} features (at least one), "
            f"got shape {tuple(x.shape)}"
        )
    # Each token's features contiguous; the token stride is free (slices of a packed qkv).
    dense = x.stride(-1) == 1 and (x.dim() == 2 or x.stride(1) == head_size or x.shape[1] == 1)
    if not dense:
        raise ValueError(
            f"fxfuse.{op}: each token's features in `{name}` must be contiguous (the token stride may be "
            f"anything), got shape {tuple(x.shape)} with strides {tuple(x.stride())}"
        )
    V.check_same_device(op, name, x, "positions", positions)


def _check_cache(op: str, cache: Any, head_size: int, query: torch.Tensor) -> None:
    V.check_tensor(op, "cos_sin_cache", cache)
    if cache.dtype not in (torch.float32, query.dtype):
        raise ValueError(
            f"fxfuse.{op}: `cos_sin_cache` must have dtype torch.float32 or {query.dtype} (the dtype of `query`), "
            f"got {cache.dtype}"
        )
    if cache.dim() != 2 or cache.shape[0] == 0:
        raise ValueError(
            f"fxfuse.{op}: `cos_sin_cache` must be [max_position, rotary_dim] (cos then sin per row), "
            f"got shape {tuple(cache.shape)}"
        )
    rotary_dim = cache.shape[1]
    if rotary_dim % 2 != 0 or not 2 <= rotary_dim <= head_size:
        raise ValueError(
            f"fxfuse.{op}: the rotary dim (the last dim of `cos_sin_cache`, {rotary_dim}) must be even and "
            f"between 2 and `head_size` ({head_size})"
        )
    V.check_contiguous(op, "cos_sin_cache", cache)
    V.check_same_device(op, "cos_sin_cache", cache, "query", query)


def check_positions_in_range(op: str, positions: torch.Tensor, max_position: int) -> None:
    """Every position must index a row of the cache: ``0 <= p < max_position``.

    Reads the positions, so it runs where :func:`fxfuse.ops._validate.check_scale_value`
    runs: never on fake tensors or while tracing, on CUDA only with
    ``FXFUSE_CHECK_SCALES=1`` and outside graph capture.

    >>> check_positions_in_range("rotary_embedding", torch.tensor([0, 7, 4096]), 4096)
    Traceback (most recent call last):
    ...
    ValueError: fxfuse.rotary_embedding: `positions` must be in [0, 4096) (the rows of `cos_sin_cache`), got 4096 at index 2
    """
    if positions.numel() == 0 or not compat.has_readable_data(positions):
        return
    if not should_check_values(positions.device):
        return
    bad = (positions < 0) | (positions >= max_position)
    if bool(bad.any()):
        index = int(bad.nonzero()[0])
        raise ValueError(
            f"fxfuse.{op}: `positions` must be in [0, {max_position}) (the rows of `cos_sin_cache`), "
            f"got {int(positions[index])} at index {index}"
        )


def validate_rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
    op: str = "rotary_embedding",
) -> None:
    """Checks for ``rotary_embedding``-shaped arguments; ``op`` names the op in messages."""
    _check_positions(op, positions)
    # A SymInt where torch.compile traces ints as dynamic (dynamic=True).
    if isinstance(head_size, bool) or not isinstance(head_size, (int, torch.SymInt)):
        raise TypeError(f"fxfuse.{op}: `head_size` must be an int, got {type(head_size).__name__}")
    if head_size < 2:
        raise ValueError(f"fxfuse.{op}: `head_size` must be at least 2, got {head_size}")
    _check_heads(op, "query", query, head_size, positions)
    _check_heads(op, "key", key, head_size, positions)
    if key.dtype != query.dtype:
        raise ValueError(f"fxfuse.{op}: `key` must have dtype {query.dtype} (the dtype of `query`), got {key.dtype}")
    _check_cache(op, cos_sin_cache, head_size, query)
    if not isinstance(is_neox, bool):
        raise TypeError(f"fxfuse.{op}: `is_neox` must be a bool, got {type(is_neox).__name__}")
    check_positions_in_range(op, positions, cos_sin_cache.shape[0])


def _check_head_weight(op: str, name: str, w: Any, head_size: int, query: torch.Tensor, gemma: bool) -> None:
    """A per-head norm weight ``[head_size]``: ``query``'s dtype (fp32 also allowed for Gemma's norm)."""
    V.check_tensor(op, name, w)
    allowed = (query.dtype, torch.float32) if gemma else (query.dtype,)
    if w.dtype not in allowed:
        wanted = " or ".join(str(d) for d in dict.fromkeys(allowed))
        raise ValueError(f"fxfuse.{op}: `{name}` must have dtype {wanted} (`query` is {query.dtype}), got {w.dtype}")
    if w.dim() != 1 or w.shape[0] != head_size:
        raise ValueError(f"fxfuse.{op}: `{name}` must have shape [{head_size}] ([head_size]), got {tuple(w.shape)}")
    V.check_contiguous(op, name, w)
    V.check_same_device(op, name, w, "query", query)


def validate_qk_norm_rope(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
    op: str = "qk_norm_rope",
    gemma: bool = False,
) -> None:
    """Checks for ``qk_norm_rope``-shaped arguments (``gemma``: Gemma's norm weights)."""
    validate_rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox, op=op)
    _check_head_weight(op, "q_weight", q_weight, head_size, query, gemma)
    _check_head_weight(op, "k_weight", k_weight, head_size, query, gemma)
    V.check_eps(op, eps)


def validate_qk_gemma_norm_rope(*args: Any) -> None:
    """Checks for ``qk_gemma_norm_rope`` (``qk_norm_rope``'s, with fp32 weights allowed)."""
    validate_qk_norm_rope(*args, op="qk_gemma_norm_rope", gemma=True)


# --------------------------------------------------------------------------- ops


def _like_inputs(positions, query, key, *rest) -> tuple[torch.Tensor, torch.Tensor]:
    # Contiguous outputs of the inputs' shapes, whatever the inputs' token strides.
    return query.new_empty(query.shape), key.new_empty(key.shape)


@define_op("rotary_embedding", fake=_like_inputs, validate=validate_rotary_embedding)
def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of ``query`` and ``key``; returns new ``(query_out, key_out)``.

    ``positions`` ``[tokens]`` (int64/int32); ``query``/``key`` ``[tokens, heads * head_size]``
    or ``[tokens, heads, head_size]`` (bf16, fp16 or fp32); ``cos_sin_cache``
    ``[max_position, rotary_dim]`` (cos, then sin; fp32 or the model dtype); NeoX style when
    ``is_neox``, else GPT-J. Only the first ``rotary_dim`` features of each head rotate.

    >>> cache = rotary_cos_sin_cache(4096, 128, base=1e6)
    >>> q = torch.randn(5, 32 * 128, dtype=torch.bfloat16)
    >>> k = torch.randn(5, 8 * 128, dtype=torch.bfloat16)
    >>> q2, k2 = torch.ops.fxfuse.rotary_embedding(torch.arange(5), q, k, 128, cache, True)
    """
    if use_kernels(query):
        from ..kernels.rotary import rope

        return rope(positions, query, key, head_size, cos_sin_cache, is_neox)
    return rotary_embedding_native(positions, query, key, head_size, cos_sin_cache, is_neox)


@define_op("qk_norm_rope", fake=_like_inputs, validate=validate_qk_norm_rope)
def qk_norm_rope(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of every head of ``query`` and ``key`` (weights ``[head_size]`` in the model
    dtype), then rotary embedding: Qwen3's attention prologue in one op, equal to the
    ``rms_norm`` + ``rotary_embedding`` chain bit for bit.

    >>> qw, kw = torch.ones(128, dtype=torch.bfloat16), torch.ones(128, dtype=torch.bfloat16)
    >>> q2, k2 = torch.ops.fxfuse.qk_norm_rope(torch.arange(5), q, k, qw, kw, 1e-6, 128, cache, True)
    """
    if use_kernels(query):
        from ..kernels.rotary import NORM_RMS, rope

        return rope(positions, query, key, head_size, cos_sin_cache, is_neox,
                    norm=NORM_RMS, q_weight=q_weight, k_weight=k_weight, eps=eps)
    return qk_norm_rope_native(positions, query, key, q_weight, k_weight, eps, head_size, cos_sin_cache, is_neox)


@define_op("qk_gemma_norm_rope", fake=_like_inputs, validate=validate_qk_gemma_norm_rope)
def qk_gemma_norm_rope(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gemma's RMSNorm (``(1 + w)``, fp32 or model-dtype weights) of every head of ``query``
    and ``key``, then rotary embedding: Gemma 3's attention prologue in one op, equal to
    the ``gemma_rms_norm`` + ``rotary_embedding`` chain bit for bit.

    >>> qw, kw = torch.zeros(256), torch.zeros(256)
    >>> q2, k2 = torch.ops.fxfuse.qk_gemma_norm_rope(pos, q, k, qw, kw, 1e-6, 256, cache, True)
    """
    if use_kernels(query):
        from ..kernels.rotary import NORM_GEMMA, rope

        return rope(positions, query, key, head_size, cos_sin_cache, is_neox,
                    norm=NORM_GEMMA, q_weight=q_weight, k_weight=k_weight, eps=eps)
    return qk_gemma_norm_rope_native(
        positions, query, key, q_weight, k_weight, eps, head_size, cos_sin_cache, is_neox
    )
