"""Rotary position embedding, alone or after a per-head RMSNorm of q and k: one pass.

One program per token handles every query head and every key head of that token: it
reads the token's position and its cos/sin row once, then walks the heads in blocks of
``HB`` heads. A head is read as three tiles, so that no element is loaded twice and the
rotation needs no shuffles:

- ``a``: the first element of each rotated pair (NeoX: features ``[0, r/2)``; GPT-J:
  the even features ``0, 2, .., r - 2``),
- ``b``: its partner (NeoX: ``[r/2, r)``; GPT-J: the odd features),
- ``p``: the features ``[r, head_size)`` that partial rotary passes through (absent,
  ``PASS == 0``, when ``r == head_size``),

with ``r`` the rotary dim; ``HALF`` and ``PASS`` are the tiles' power-of-two widths and
masks cover the rest, so ``r`` need not be a power of two (48 of 128). GPT-J's ``a`` and
``b`` are loaded as one contiguous ``[HB, 2 * HALF]`` tile and split in registers (as
two stride-2 loads they compiled to scalar 16-bit accesses for sm_90; this way, to
128-bit vectors, as NeoX's), and stored joined back the same way. Then
``a' = a cos - b sin`` and ``b' = b cos + a sin`` in fp32, rounded once to the model dtype.

With ``NORM`` the head is first RMS-normalized over all its ``head_size`` features (the
three tiles' sums of squares), exactly as the unfused ``rms_norm`` (``NORM_RMS``: the
normalized value rounded to the model dtype, times the weight, rounded) or
``gemma_rms_norm`` (``NORM_GEMMA``: ``x * rstd * (1 + w)`` in fp32, rounded once) would,
and the rotation reads those rounded values: the unfused chain's arithmetic, op by op.

Numerics: the kernels are launched with ``enable_fp_fusion=False`` so that
``a * cos - b * sin`` is two roundings and a subtraction, as torch computes it, not a
fused multiply-add; the rotation is then bit-exact against the native reference on the
GPU as in the interpreter. The per-head sum of squares is reduced in the order the
compiler (or NumPy, interpreted) picks, so a normalized value can differ from torch's by
one unit in the last place on rare elements, as in ``norm_quant.py``.

A position outside ``[0, max_position)`` reads no memory; it gives its token NaN in
every rotated feature (the ops check positions on the host where that is cheap).

`rope_kv_cache` is the same program with the rotated key and the value written straight
into their slot of the paged KV cache instead of new tensors: the triton attention
backend's path when ``attention`` is asked to rotate q and k itself (``rope_kv_cache_fusion``).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._rounding import exact_casts, round_to

NORM_NONE, NORM_RMS, NORM_GEMMA = 0, 1, 2
#: Most elements of one ``a``/``b`` tile (heads x HALF) a program holds at once.
_MAX_TILE = 4096


@triton.jit
def _normalize(v, rstd, w, NORM: tl.constexpr, dtype: tl.constexpr, EXACT_CASTS: tl.constexpr):
    """One tile of a normalized head, rounded to ``dtype`` as the unfused norm op returns it."""
    if NORM == 1:
        y = round_to(round_to(v * rstd, dtype, EXACT_CASTS).to(tl.float32) * w, dtype, EXACT_CASTS)
    else:
        y = round_to((v * rstd) * (1.0 + w), dtype, EXACT_CASTS)
    return y.to(tl.float32)


@triton.jit
def _rope_heads(
    x_ptr, o_ptr, w_ptr, x_row, o_row, n_heads, head_size, rot_half, eps, cos, sin,
    NORM: tl.constexpr, NEOX: tl.constexpr, HB: tl.constexpr, HALF: tl.constexpr, PASS: tl.constexpr,
    EXACT_CASTS: tl.constexpr,
):
    """Rotate (and with ``NORM`` first normalize) the ``n_heads`` heads of one token row.

    ``x_row``/``o_row`` are the row's element offsets; ``cos``/``sin`` are fp32 ``[HALF]``.
    """
    i = tl.arange(0, HALF)
    i_ok = i < rot_half
    if NEOX:
        a_col = i
        b_col = i + rot_half
    else:
        a_col = 2 * i
        b_col = 2 * i + 1
    if PASS > 0:
        p_col = 2 * rot_half + tl.arange(0, PASS)
        p_ok = p_col < head_size
    if NORM != 0:
        # One weight row for every head; masked features weigh 0 and are never stored.
        wa = tl.load(w_ptr + a_col, mask=i_ok, other=0.0).to(tl.float32)[None, :]
        wb = tl.load(w_ptr + b_col, mask=i_ok, other=0.0).to(tl.float32)[None, :]
        if PASS > 0:
            wp = tl.load(w_ptr + p_col, mask=p_ok, other=0.0).to(tl.float32)[None, :]
    c = cos[None, :]
    s = sin[None, :]
    for h0 in range(0, n_heads, HB):
        h = h0 + tl.arange(0, HB)
        h_ok = (h < n_heads)[:, None]
        head = h[:, None] * head_size
        m = h_ok & i_ok[None, :]
        if NEOX:
            a = tl.load(x_ptr + x_row + head + a_col[None, :], mask=m, other=0.0)
            b = tl.load(x_ptr + x_row + head + b_col[None, :], mask=m, other=0.0)
        else:
            # The pairs as one contiguous row tile, split in registers: two stride-2 loads
            # compile to scalar 16-bit accesses (sm_90 PTX), this to vectors.
            pair_offs = head + tl.arange(0, 2 * HALF)[None, :]
            pair_mask = h_ok & (tl.arange(0, 2 * HALF) < 2 * rot_half)[None, :]
            ab = tl.load(x_ptr + x_row + pair_offs, mask=pair_mask, other=0.0)
            a, b = tl.split(tl.reshape(ab, (HB, HALF, 2)))
        dtype = a.dtype
        af = a.to(tl.float32)
        bf = b.to(tl.float32)
        if PASS > 0:
            pm = h_ok & p_ok[None, :]
            p = tl.load(x_ptr + x_row + head + p_col[None, :], mask=pm, other=0.0)
        if NORM != 0:
            ss = tl.sum(af * af, axis=1) + tl.sum(bf * bf, axis=1)
            if PASS > 0:
                pf = p.to(tl.float32)
                ss += tl.sum(pf * pf, axis=1)
            rstd = (1.0 / tl.sqrt_rn(tl.div_rn(ss, head_size.to(tl.float32)) + eps))[:, None]
            af = _normalize(af, rstd, wa, NORM, dtype, EXACT_CASTS)
            bf = _normalize(bf, rstd, wb, NORM, dtype, EXACT_CASTS)
            if PASS > 0:
                p = _normalize(pf, rstd, wp, NORM, dtype, EXACT_CASTS).to(dtype)  # exact: already on dtype's grid
        # a' = a cos - b sin, b' = b cos + a sin: the native reference's expressions (no FMA: see the launch).
        oa = round_to(af * c - bf * s, dtype, EXACT_CASTS)
        ob = round_to(bf * c + af * s, dtype, EXACT_CASTS)
        if NEOX:
            tl.store(o_ptr + o_row + head + a_col[None, :], oa, mask=m)
            tl.store(o_ptr + o_row + head + b_col[None, :], ob, mask=m)
        else:
            tl.store(o_ptr + o_row + pair_offs, tl.reshape(tl.join(oa, ob), (HB, 2 * HALF)), mask=pair_mask)
        if PASS > 0:
            tl.store(o_ptr + o_row + head + p_col[None, :], p, mask=pm)


@triton.jit
def _rope_kernel(
    pos_ptr, cache_ptr, q_ptr, k_ptr, qw_ptr, kw_ptr, q_out_ptr, k_out_ptr,
    q_stride, k_stride, n_q_heads, n_k_heads, head_size, rot_half, max_pos, eps,
    NORM: tl.constexpr, NEOX: tl.constexpr, HBQ: tl.constexpr, HBK: tl.constexpr, HALF: tl.constexpr,
    PASS: tl.constexpr, EXACT_CASTS: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, HALF)
    # The range check on a vector: the interpreter mis-types a scalar boolean mask.
    pos_v = tl.zeros([HALF], dtype=tl.int64) + pos
    pos_ok = (pos_v >= 0) & (pos_v < max_pos)
    i_ok = i < rot_half
    row = cache_ptr + pos_v * (2 * rot_half)
    cos = tl.load(row + i, mask=i_ok & pos_ok, other=0.0).to(tl.float32)
    sin = tl.load(row + rot_half + i, mask=i_ok & pos_ok, other=0.0).to(tl.float32)
    cos = tl.where(pos_ok, cos, float("nan"))
    sin = tl.where(pos_ok, sin, float("nan"))
    _rope_heads(q_ptr, q_out_ptr, qw_ptr, t * q_stride, t * n_q_heads * head_size, n_q_heads, head_size, rot_half,
                eps, cos, sin, NORM, NEOX, HBQ, HALF, PASS, EXACT_CASTS)
    _rope_heads(k_ptr, k_out_ptr, kw_ptr, t * k_stride, t * n_k_heads * head_size, n_k_heads, head_size, rot_half,
                eps, cos, sin, NORM, NEOX, HBK, HALF, PASS, EXACT_CASTS)


def rope_launch(
    n_q_heads: int, n_k_heads: int, head_size: int, rotary_dim: int,
    heads_per_block: Optional[int] = None, num_warps: Optional[int] = None,
) -> tuple[int, int, int, int, int]:
    """``(HBQ, HBK, HALF, PASS, num_warps)`` for one token's heads.

    Each head block is as many heads as there are, up to ``_MAX_TILE`` elements a tile
    (``heads_per_block`` overrides the cap, for sweeps); warps give each thread ~16
    elements of a tile (``num_warps`` overrides).

    Example:
        >>> rope_launch(32, 8, 128, 128)  # Qwen3-8B
        (32, 8, 64, 0, 4)
        >>> rope_launch(16, 8, 128, 64)   # partial rotary: 64 pass-through features
        (16, 8, 32, 64, 2)
    """
    half = triton.next_power_of_2(rotary_dim // 2)
    pass_width = head_size - rotary_dim
    pass_block = triton.next_power_of_2(pass_width) if pass_width else 0
    cap = heads_per_block or max(_MAX_TILE // max(half, pass_block), 1)
    hbq = min(triton.next_power_of_2(n_q_heads), triton.next_power_of_2(cap))
    hbk = min(triton.next_power_of_2(n_k_heads), triton.next_power_of_2(cap))
    warps = num_warps or min(max(hbq * max(half, pass_block) // 512, 1), 8)
    return hbq, hbk, half, pass_block, warps


def _heads(x: torch.Tensor, head_size: int) -> int:
    return x.shape[1] // head_size if x.dim() == 2 else x.shape[1]


def rope(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
    *,
    norm: int = NORM_NONE,
    q_weight: Optional[torch.Tensor] = None,
    k_weight: Optional[torch.Tensor] = None,
    eps: float = 0.0,
    heads_per_block: Optional[int] = None,
    num_warps: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel; returns new contiguous ``(query_out, key_out)`` of the inputs' shapes.

    Inputs are validated by the ops that call this: ``query``/``key`` ``[tokens, heads *
    head_size]`` or ``[tokens, heads, head_size]`` with each token's features contiguous
    (any token stride: slices of a packed qkv work), ``cos_sin_cache`` contiguous
    ``[max_position, rotary_dim]``. ``norm`` (``NORM_RMS``, ``NORM_GEMMA``) normalizes each
    head with ``q_weight``/``k_weight`` first. ``heads_per_block`` and ``num_warps``
    override `rope_launch`'s choice.

    Example:
        >>> q2, k2 = rope(pos, q, k, 128, cache, True)
        >>> q2, k2 = rope(pos, q, k, 128, cache, True, norm=NORM_RMS, q_weight=qw, k_weight=kw, eps=1e-6)
    """
    q_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    k_out = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    tokens = positions.shape[0]
    if tokens == 0:
        return q_out, k_out
    n_q, n_k = _heads(query, head_size), _heads(key, head_size)
    rotary_dim = cos_sin_cache.shape[1]
    hbq, hbk, half, pass_block, warps = rope_launch(n_q, n_k, head_size, rotary_dim, heads_per_block, num_warps)
    dummy = cos_sin_cache  # pointer for the weights a NORM_NONE launch never reads
    _rope_kernel[(tokens,)](
        positions, cos_sin_cache, query, key,
        q_weight if q_weight is not None else dummy, k_weight if k_weight is not None else dummy,
        q_out, k_out, query.stride(0), key.stride(0), n_q, n_k, head_size, rotary_dim // 2,
        cos_sin_cache.shape[0], float(eps),
        NORM=norm, NEOX=bool(is_neox), HBQ=hbq, HBK=hbk, HALF=half, PASS=pass_block,
        EXACT_CASTS=exact_casts(), num_warps=warps, enable_fp_fusion=False,
    )
    return q_out, k_out


# --------------------------------------------------------------------------- rope + KV-cache write


@triton.jit
def _rope_kv_cache_kernel(
    pos_ptr, cache_ptr, q_ptr, k_ptr, v_ptr, q_out_ptr, kc_ptr, vc_ptr, slot_ptr,
    q_stride, k_stride, v_stride, n_q_heads, n_k_heads, head_size, rot_half, max_pos,
    NEOX: tl.constexpr, HBQ: tl.constexpr, HBK: tl.constexpr, HALF: tl.constexpr, PASS: tl.constexpr,
    VB: tl.constexpr, EXACT_CASTS: tl.constexpr,
):
    """`_rope_kernel`'s rotation of one token, with the key (rotated) and the value written
    straight into their paged-cache slot instead of a new tensor."""
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    i = tl.arange(0, HALF)
    pos_v = tl.zeros([HALF], dtype=tl.int64) + pos  # a vector: see _rope_kernel
    pos_ok = (pos_v >= 0) & (pos_v < max_pos)
    i_ok = i < rot_half
    row = cache_ptr + pos_v * (2 * rot_half)
    cos = tl.load(row + i, mask=i_ok & pos_ok, other=0.0).to(tl.float32)
    sin = tl.load(row + rot_half + i, mask=i_ok & pos_ok, other=0.0).to(tl.float32)
    cos = tl.where(pos_ok, cos, float("nan"))
    sin = tl.where(pos_ok, sin, float("nan"))
    kv_width = n_k_heads * head_size
    _rope_heads(q_ptr, q_out_ptr, cache_ptr, t * q_stride, t * n_q_heads * head_size, n_q_heads, head_size,
                rot_half, 0.0, cos, sin, 0, NEOX, HBQ, HALF, PASS, EXACT_CASTS)
    # A slot of the [num_blocks, block_size, Hkv, D] cache is one dense row of Hkv * D.
    _rope_heads(k_ptr, kc_ptr, cache_ptr, t * k_stride, slot * kv_width, n_k_heads, head_size,
                rot_half, 0.0, cos, sin, 0, NEOX, HBK, HALF, PASS, EXACT_CASTS)
    for c0 in range(0, kv_width, VB):
        c = c0 + tl.arange(0, VB)
        ok = c < kv_width
        tl.store(vc_ptr + slot * kv_width + c, tl.load(v_ptr + t * v_stride + c, mask=ok), mask=ok)


def rope_kv_cache(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """Rotate ``query`` and ``key`` and write the rotated key and ``value`` into the paged
    cache at ``slot_mapping``, in one kernel; returns the rotated query, contiguous, of
    ``query``'s shape.

    ``query``/``key``/``value`` are ``[T, H, head_size]`` with each token's heads dense (any
    token stride: views of a packed qkv projection); ``key_cache``/``value_cache`` are the
    contiguous ``[num_blocks, block_size, Hkv, head_size]`` caches of ``value``'s dtype.
    What lands in the cache is bit for bit what `rope` followed by the native cache write
    stores (the same device code rotates; ``enable_fp_fusion=False``).

    Example:
        >>> q_rot = rope_kv_cache(pos, q, k, v, 128, cache, True, kc, vc, meta.slot_mapping)
    """
    q_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    tokens = positions.shape[0]
    if tokens == 0:
        return q_out
    if value.stride(-1) != 1 or (value.dim() == 3 and value.shape[1] > 1 and value.stride(1) != head_size):
        value = value.contiguous()  # the kernel copies each token's heads as one dense row
    n_q, n_k = _heads(query, head_size), _heads(key, head_size)
    rotary_dim = cos_sin_cache.shape[1]
    hbq, hbk, half, pass_block, warps = rope_launch(n_q, n_k, head_size, rotary_dim)
    vb = min(triton.next_power_of_2(n_k * head_size), _MAX_TILE)
    _rope_kv_cache_kernel[(tokens,)](
        positions, cos_sin_cache, query, key, value, q_out, key_cache, value_cache, slot_mapping,
        query.stride(0), key.stride(0), value.stride(0), n_q, n_k, head_size, rotary_dim // 2, cos_sin_cache.shape[0],
        NEOX=bool(is_neox), HBQ=hbq, HBK=hbk, HALF=half, PASS=pass_block, VB=vb,
        EXACT_CASTS=exact_casts(), num_warps=warps, enable_fp_fusion=False,
    )
    return q_out
