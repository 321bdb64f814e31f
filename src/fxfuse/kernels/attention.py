"""Paged causal GQA attention over a block-table KV cache, prefill and decode mixed.

One program handles one query tile of one sequence for one KV head: its rows are
``BLOCK_M // G_PAD`` tokens x the ``G`` query heads that share the KV head, so each K/V
tile read from HBM serves the whole group (decode is one token x G heads). Keys are
visited in ``BLOCK_N`` tiles gathered through the block table, with an online softmax
in base 2; tiles wholly in every row's past skip the causal mask.

Decode batches with few sequences split the context over ``NUM_SPLITS`` programs per
(sequence, KV head) that write fp32 partial outputs and log-sum-exps; a second kernel
combines them. The output epilogue (model dtype, static FP8, NVFP4 with swizzled block
scales) runs where the final output is known: at the end of the main kernel, or in the
combining kernel. It rounds to the model dtype first, so a quantized output equals the
quant of the model-dtype output bit for bit.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import cuda_capability, interpreted, num_sms
from ._nvfp4 import quantize_rows, swizzled_offset
from ._rounding import exact_casts, quantize_fp8, round_to
from .quant import zero_scale_padding

OUT_NONE, OUT_FP8, OUT_NVFP4 = 0, 1, 2
_LOG2E = 1.4426950408889634


@triton.jit
def _store_output(
    o, tok, head, row_ok, out_ptr, sf_ptr, scale_ptr, kb_pad,
    HQ: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr, MODEL_DTYPE: tl.constexpr,
    OUT: tl.constexpr, EXACT_CASTS: tl.constexpr,
):
    """Write fp32 output rows ``o`` [ROWS, D] of (token, head) pairs in the output format."""
    d = tl.arange(0, D)
    y = round_to(o, MODEL_DTYPE, EXACT_CASTS)
    row = tok.to(tl.int64) * HQ + head
    if OUT == 0:
        tl.store(out_ptr + row[:, None] * D + d[None, :], y, mask=row_ok[:, None])
    elif OUT == 1:
        inv = tl.div_rn(1.0, tl.load(scale_ptr))
        tl.store(out_ptr + row[:, None] * D + d[None, :], quantize_fp8(y.to(tl.float32), inv, EXACT_CASTS),
                 mask=row_ok[:, None])
    else:
        yf = tl.where(row_ok[:, None], y.to(tl.float32), 0.0)
        packed, sf8 = quantize_rows(yf, tl.load(scale_ptr), ROWS, D, EXACT_CASTS)
        half = tl.arange(0, D // 2)
        tl.store(out_ptr + row[:, None] * (D // 2) + half[None, :], packed, mask=row_ok[:, None])
        blocks = tl.arange(0, D // 16)
        k = head[:, None] * (D // 16) + blocks[None, :]
        tl.store(sf_ptr + swizzled_offset(tok.to(tl.int64)[:, None], k, kb_pad), sf8, mask=row_ok[:, None])


@triton.jit
def _attend_tile(
    q, acc, m_i, l_i, start, page, k_cache, v_cache, k_desc, v_desc, bt_row, kvh, seq_len, qpos, qk_scale,
    HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, TMA: tl.constexpr, PAGE_PREFETCH: tl.constexpr, PRECISION: tl.constexpr,
    EXACT_CASTS: tl.constexpr,
):
    pos = start + tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    in_seq = pos < seq_len
    if TMA:
        # The tile lies inside one page (BS % BLOCK_N == 0, starts are BLOCK_N-aligned):
        # one bulk copy per operand from the [slots, Hkv * D] view of the cache.
        if not PAGE_PREFETCH:
            page = tl.load(bt_row + start // BS).to(tl.int32)
        slot = page * BS + start % BS
        k = tl.trans(k_desc.load([slot, kvh * D]))
    else:
        if MASKED:
            blk = tl.load(bt_row + pos // BS, mask=in_seq, other=0)
        else:
            blk = tl.load(bt_row + pos // BS)
        kv_off = ((blk.to(tl.int64) * BS + pos % BS) * HKV + kvh) * D
        if MASKED:
            k = tl.load(k_cache + kv_off[None, :] + d[:, None], mask=in_seq[None, :], other=0.0)
        else:
            k = tl.load(k_cache + kv_off[None, :] + d[:, None])
    if EXACT_CASTS:  # Triton's interpreter multiplies bf16 matrices wrongly: do it in fp32
        qk = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
    else:
        qk = tl.dot(q, k, input_precision=PRECISION)
    if MASKED:
        s = tl.where((pos[None, :] <= qpos[:, None]) & in_seq[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        p = tl.math.exp2(s - m_safe[:, None])
    else:
        # Every row has a finite score here, and the scale (> 0) commutes with the max:
        # one fused multiply-add per score.
        m_new = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)
        m_safe = m_new
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if TMA:
        v = v_desc.load([slot, kvh * D])
        if MASKED:  # slots past the sequence hold stale values, possibly NaN: 0 * NaN would leak
            v = tl.where(in_seq[:, None], v, 0.0)
    elif MASKED:
        v = tl.load(v_cache + kv_off[:, None] + d[None, :], mask=in_seq[:, None], other=0.0)
    else:
        v = tl.load(v_cache + kv_off[:, None] + d[None, :])
    acc = acc * alpha[:, None]
    if EXACT_CASTS:
        acc = tl.dot(round_to(p, v.dtype, True).to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _paged_attention_kernel(
    q_ptr, q_desc, k_cache, v_cache, k_desc, v_desc, block_table, seq_lens, query_start_loc,
    out_ptr, sf_ptr, scale_ptr, part_o, part_lse,
    qk_scale, bt_stride, kb_pad, n_q_tiles,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
    BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    OUT: tl.constexpr, TMA: tl.constexpr, Q_TMA: tl.constexpr, PAGE_PREFETCH: tl.constexpr,
    EXACT_CASTS: tl.constexpr, PRECISION: tl.constexpr,
):
    BLOCK_Q: tl.constexpr = BLOCK_M // G_PAD
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq = pid // n_q_tiles
    q_tile = n_q_tiles - 1 - pid % n_q_tiles  # the longest (last) tiles of a causal prefill first
    q_start = tl.load(query_start_loc + seq)
    n_new = tl.load(query_start_loc + seq + 1) - q_start
    if q_tile * BLOCK_Q >= n_new:
        return
    seq_len = tl.load(seq_lens + seq)
    ctx = seq_len - n_new

    r = tl.arange(0, BLOCK_M)
    t_local = q_tile * BLOCK_Q + r // G_PAD
    g = r % G_PAD
    row_ok = (t_local < n_new) & (g < G)
    tok = q_start + t_local
    head = kvh * G + g
    d = tl.arange(0, D)
    if Q_TMA:
        # [tokens, G, D] box of the query: rows token-major, as r above; rows past this
        # sequence's tokens read its neighbour's queries (finite), and are never stored.
        q = tl.reshape(q_desc.load([q_start + q_tile * BLOCK_Q, kvh * G, 0]), (BLOCK_M, D))
    else:
        q = tl.load(q_ptr + (tok.to(tl.int64) * HQ + head)[:, None] * D + d[None, :], mask=row_ok[:, None], other=0.0)
    qpos = ctx + t_local

    kv_end = tl.minimum(seq_len, ctx + tl.minimum((q_tile + 1) * BLOCK_Q, n_new))
    if NUM_SPLITS == 1:
        lo = 0
        hi = kv_end
    else:
        chunk = tl.cdiv(tl.cdiv(kv_end, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(kv_end, lo + chunk)
    # Keys before `diag` precede every row's own position: no mask needed there.
    diag = (ctx + q_tile * BLOCK_Q) // BLOCK_N * BLOCK_N
    mid = tl.minimum(tl.maximum(diag, lo), hi)

    bt_row = block_table + seq.to(tl.int64) * bt_stride
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    # With PAGE_PREFETCH each iteration reads the next tile's page index from the block
    # table, so a bulk copy's address never waits on a table load issued just before it.
    page = tl.load(bt_row + lo // BS, mask=PAGE_PREFETCH and lo < hi, other=0).to(tl.int32)
    for start in range(lo, mid, BLOCK_N):
        if PAGE_PREFETCH:
            next_page = tl.load(bt_row + (start + BLOCK_N) // BS, mask=start + BLOCK_N < hi, other=0).to(tl.int32)
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, start, page, k_cache, v_cache, k_desc, v_desc, bt_row, kvh,
                                     seq_len, qpos, qk_scale, HKV, D, BS, BLOCK_N, False, TMA, PAGE_PREFETCH,
                                     PRECISION, EXACT_CASTS)
        if PAGE_PREFETCH:
            page = next_page
    for start in range(mid, hi, BLOCK_N):
        if PAGE_PREFETCH:
            next_page = tl.load(bt_row + (start + BLOCK_N) // BS, mask=start + BLOCK_N < hi, other=0).to(tl.int32)
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, start, page, k_cache, v_cache, k_desc, v_desc, bt_row, kvh,
                                     seq_len, qpos, qk_scale, HKV, D, BS, BLOCK_N, True, TMA, PAGE_PREFETCH,
                                     PRECISION, EXACT_CASTS)
        if PAGE_PREFETCH:
            page = next_page

    if NUM_SPLITS == 1:
        o = acc / l_i[:, None]
        _store_output(o, tok, head, row_ok, out_ptr, sf_ptr, scale_ptr, kb_pad,
                      HQ, D, BLOCK_M, q_ptr.dtype.element_ty, OUT, EXACT_CASTS)
    else:
        seen = l_i > 0
        o = tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], 0.0)
        lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        part = (tok.to(tl.int64) * HQ + head) * NUM_SPLITS + split
        tl.store(part_o + part[:, None] * D + d[None, :], o, mask=row_ok[:, None])
        tl.store(part_lse + part, lse, mask=row_ok)


@triton.jit
def _combine_splits_kernel(
    part_o, part_lse, out_ptr, sf_ptr, scale_ptr, kb_pad,
    HQ: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, NUM_SPLITS: tl.constexpr,
    MODEL_DTYPE: tl.constexpr, OUT: tl.constexpr, EXACT_CASTS: tl.constexpr,
):
    tok = tl.program_id(0) + tl.zeros([G_PAD], tl.int32)
    g = tl.arange(0, G_PAD)
    head = tl.program_id(1) * G + g
    row_ok = g < G
    d = tl.arange(0, D)
    base = (tok.to(tl.int64) * HQ + head) * NUM_SPLITS
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    for s in range(NUM_SPLITS):
        m = tl.maximum(m, tl.load(part_lse + base + s, mask=row_ok, other=float("-inf")))
    m = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for s in range(NUM_SPLITS):
        w = tl.math.exp2(tl.load(part_lse + base + s, mask=row_ok, other=float("-inf")) - m)
        total += w
        acc += w[:, None] * tl.load(part_o + (base + s)[:, None] * D + d[None, :], mask=row_ok[:, None], other=0.0)
    o = acc / tl.where(total > 0, total, 1.0)[:, None]
    _store_output(o, tok, head, row_ok, out_ptr, sf_ptr, scale_ptr, kb_pad, HQ, D, G_PAD, MODEL_DTYPE, OUT, EXACT_CASTS)


def num_splits(num_seqs: int, num_kv_heads: int, max_query_len: int, max_seq_len: int, device: torch.device) -> int:
    """KV splits for a batch: >1 only for decode batches too small to fill the GPU.

    Each split keeps at least 256 keys; the aim is about two programs per SM.
    """
    if max_query_len != 1:
        return 1
    programs = max(1, num_seqs * num_kv_heads)
    want = triton.cdiv(2 * num_sms(device), programs)
    return max(1, min(want, triton.cdiv(max_seq_len, 256), 32))


def tma_possible(key_cache: torch.Tensor, block_n: int, interpreted_ok: bool = False) -> bool:
    """Whether key tiles of ``block_n`` slots can be bulk-copied (TMA) from this cache.

    Needs a Hopper-or-newer GPU (or, when ``interpreted_ok``, Triton's interpreter, which
    emulates the copies), pages holding whole tiles (``block_size % block_n == 0``: a
    tile never straddles two pages) and the 16-byte alignment bulk copies require.

    Example:
        >>> tma_possible(torch.empty(8, 64, 8, 128, device="cuda", dtype=torch.bfloat16), 64)
        True
    """
    num_blocks, bs, hkv, d = key_cache.shape
    row_bytes = hkv * d * key_cache.element_size()
    aligned = key_cache.is_contiguous() and row_bytes % 16 == 0 and key_cache.data_ptr() % 16 == 0
    if key_cache.device.type == "cuda":
        hardware = cuda_capability(key_cache.device)[0] >= 9
    else:
        hardware = interpreted_ok and interpreted()
    return hardware and aligned and bs % block_n == 0


def _config(g_pad: int, head_size: int, decode: bool, max_query_len: int, tma: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages), from benchmarks/attention_sweep.py on the
    H100 and H200 (head size 128, 4 query heads per KV head; RESULTS.md). With bulk copies
    (``tma``: 64-slot pages) and the block table read a tile ahead, 64x64 tiles, 4 warps,
    3 stages led at both prefill shapes on the H200 (93% / 85% of SDPA in `fxfuse bench`;
    with 2 stages 77%, and 3 stages without the early table read gave 79% on the H100);
    128-row tiles with 4 warps and a bulk-copied query spilled (52-56%)."""
    if decode:
        return max(16, g_pad), 64, 2, 3
    if tma:
        return max(64, g_pad), 64, 4, 3
    if head_size > 128:
        return max(64, g_pad), 64, 4, 2
    if max_query_len >= 4096:
        return max(128, g_pad), 128, 8, 3
    return max(128, g_pad), 64, 4, 3


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    output: torch.Tensor,
    out: int = OUT_NONE,
    output_scale: Optional[torch.Tensor] = None,
    output_block_scale: Optional[torch.Tensor] = None,
    splits: Optional[int] = None,
    config: Optional[tuple[int, int, int, int]] = None,
    tma: Optional[bool] = None,
    q_tma: Optional[bool] = None,
    page_prefetch: Optional[bool] = None,
) -> None:
    """Causal attention of ``query`` [T, Hq, D] over the paged cache, written into ``output``.

    The new tokens' K/V must already be in the cache. ``out`` picks the epilogue:
    ``OUT_NONE`` (``output`` in the model dtype), ``OUT_FP8`` (fp8 ``output``,
    ``output_scale`` the dequant scale), ``OUT_NVFP4`` (``output`` uint8 [T, Hq * D / 2],
    ``output_block_scale`` the swizzled scales, ``output_scale`` the global scale; the
    scale padding is zeroed here). ``splits``, ``config``, ``tma`` (bulk copies of K/V)
    and ``q_tma`` (of the query tile too) and ``page_prefetch`` (block-table reads one
    tile ahead of the bulk copies) override the heuristics (``tma=True`` where
    :func:`tma_possible` is false is an error).

    Example:
        >>> paged_attention(q, kc, vc, bt, seq_lens, qsl, 1, 4096, 128 ** -0.5, out)
    """
    num_tokens, hq, d = query.shape
    hkv, bs = key_cache.shape[2], key_cache.shape[1]
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0 or max_query_len == 0:
        return
    g = hq // hkv
    g_pad = triton.next_power_of_2(g)
    decode = max_query_len == 1
    if config is None:
        config = _config(g_pad, d, decode, max_query_len, tma is not False and tma_possible(key_cache, 64))
    block_m, block_n, warps, stages = config
    n_splits = splits or num_splits(num_seqs, hkv, max_query_len, max_seq_len, query.device)
    kb_pad = 0
    if out == OUT_NVFP4:
        kb_pad = output_block_scale.shape[1]
        zero_scale_padding(output_block_scale, num_tokens, hq * d // 16)
    use_tma = tma_possible(key_cache, block_n) if tma is None else tma
    if page_prefetch is None:
        page_prefetch = not decode  # with 3 stages it let the bulk copies run ahead (H200 sweep)
    if use_tma and not tma_possible(key_cache, block_n, interpreted_ok=True):
        raise ValueError(
            f"paged_attention: tma=True needs KV pages holding whole key tiles (block size {bs} is not a "
            f"multiple of BLOCK_N {block_n}) and a contiguous, 16-byte aligned cache"
        )
    k_desc = v_desc = key_cache  # placeholders the kernel never touches without TMA
    if use_tma:
        slots = key_cache.shape[0] * bs
        k_desc = TensorDescriptor.from_tensor(key_cache.view(slots, hkv * d), [block_n, d])
        v_desc = TensorDescriptor.from_tensor(value_cache.view(slots, hkv * d), [block_n, d])
    # A bulk-copied query tile pays where each warp holds at most 16 of its rows (the
    # wgmma row block); at 32 rows a warp it spilled (H100 sweep, RESULTS.md).
    if q_tma is None:
        q_tma = block_m <= 16 * warps and not decode  # decode: one small load, not swept
    q_tma = use_tma and q_tma and g == g_pad and query.is_contiguous()
    q_desc = TensorDescriptor.from_tensor(query, [block_m // g_pad, g, d]) if q_tma else query
    n_q_tiles = triton.cdiv(max_query_len, block_m // g_pad)
    part_o = part_lse = query  # placeholders the kernel never touches with NUM_SPLITS == 1
    if n_splits > 1:
        part_o = torch.empty((num_tokens, hq, n_splits, d), dtype=torch.float32, device=query.device)
        part_lse = torch.empty((num_tokens, hq, n_splits), dtype=torch.float32, device=query.device)
    scale_arg = output_scale if output_scale is not None else query
    sf_arg = output_block_scale if output_block_scale is not None else output
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    _paged_attention_kernel[(num_seqs * n_q_tiles, hkv, n_splits)](
        query, q_desc, key_cache, value_cache, k_desc, v_desc, block_table, seq_lens, query_start_loc,
        output, sf_arg, scale_arg, part_o, part_lse,
        scale * _LOG2E, block_table.stride(0), kb_pad, n_q_tiles,
        HQ=hq, HKV=hkv, G=g, G_PAD=g_pad, D=d, BS=bs, BLOCK_M=block_m, BLOCK_N=block_n,
        NUM_SPLITS=n_splits, OUT=out, TMA=use_tma, Q_TMA=q_tma, PAGE_PREFETCH=bool(use_tma and page_prefetch),
        EXACT_CASTS=exact_casts(), PRECISION=precision,
        num_warps=warps, num_stages=stages,
    )
    if n_splits > 1:
        _combine_splits_kernel[(num_tokens, hkv)](
            part_o, part_lse, output, sf_arg, scale_arg, kb_pad,
            HQ=hq, G=g, G_PAD=g_pad, D=d, NUM_SPLITS=n_splits,
            MODEL_DTYPE=_tl_dtype(query.dtype), OUT=out, EXACT_CASTS=exact_casts(), num_warps=4,
        )


def _tl_dtype(dtype: torch.dtype):
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]
