"""Tests for paged attention: ``torch.ops.fxfuse.attention`` and :mod:`fxfuse.attention`.

What is checked:
- the op against an independent float64 reference that keeps each sequence's full K/V
  history itself (never reading the paged cache): ragged batches mixing prefill, chunked
  prefill and decode, sequences crossing block boundaries, block sizes 16 and 8, GQA
  ratios 1/4/8, head sizes 64 and 128, bf16/fp16/fp32;
- the KV cache holds ``key``/``value`` at ``slot_mapping`` after the call, and a decode
  step reads the context a previous prefill call wrote;
- the FP8 and NVFP4 outputs equal the quant ops applied to the model-dtype output, byte
  for byte;
- every error is raised before anything is written (cache and output unchanged);
- metadata validation, the layer registry, the forward context, the backend interface;
- the fake impl: FakeTensorMode, ``make_fx``, functionalization, ``torch.compile``.
"""

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import fxfuse.ops  # noqa: F401  (registers torch.ops.fxfuse.*)
from fxfuse.attention import (
    OUTPUT_QUANT_SCHEMES,
    AttentionBackend,
    AttentionLayer,
    AttentionMetadata,
    ForwardContext,
    KVCache,
    NativeAttentionBackend,
    NoForwardContextError,
    NoQuantNativeBackend,
    UnknownLayerError,
    get_forward_context,
    get_layer,
    output_quant_scheme,
    register_layer,
    registered_layer_names,
    set_forward_context,
    temporary_layers,
    unregister_layer,
)
from fxfuse.ops.attention import ATTENTION_SCHEMA
from fxfuse.ops.nvfp4 import nvfp4_block_scales_shape, nvfp4_quant_native
from fxfuse.ops.quant import static_scaled_fp8_quant_native

from conftest import targets, trace_graph

fx = torch.ops.fxfuse
FP8 = torch.float8_e4m3fn

# Tolerances against float64: one rounding of the result to the output dtype (values
# are O(1) weighted averages of N(0, 1) values), plus fp32 accumulation noise.
ATOL = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float32: 2e-5}


# --------------------------------------------------------------------------- helpers


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(shape, dtype, gen):
    return torch.randn(shape, generator=gen).to(dtype)


class Batch:
    """A batch of sequences with their own full K/V history, a paged cache and metadata.

    ``seqs`` is a list of ``(context_len, new_len)``. Blocks are drawn from a shuffled
    pool so that a sequence's blocks are neither contiguous nor in order. The context
    K/V is written straight into the cache (through the block table); the new tokens'
    K/V are what the op is given.
    """

    def __init__(self, seqs, *, num_heads, num_kv_heads, head_size, block_size, dtype, seed,
                 spare_blocks=3, extra_table_cols=1):
        g = _gen(seed)
        self.seqs = seqs
        self.num_heads, self.num_kv_heads, self.head_size = num_heads, num_kv_heads, head_size
        self.block_size, self.dtype = block_size, dtype
        blocks_needed = [math.ceil((c + n) / block_size) for c, n in seqs]
        num_blocks = sum(blocks_needed) + spare_blocks
        pool = torch.randperm(num_blocks, generator=g).tolist()
        self.block_lists = []
        for nb in blocks_needed:
            self.block_lists.append(pool[:nb])
            pool = pool[nb:]
        width = max(blocks_needed) + extra_table_cols
        # Unused table entries point at another sequence's block: they must never be read.
        table = [bl + [self.block_lists[(i + 1) % len(seqs)][0]] * (width - len(bl))
                 for i, bl in enumerate(self.block_lists)]
        self.cache = KVCache.allocate(num_blocks, block_size, num_kv_heads, head_size, dtype)
        # Full per-sequence history, kept independently of the cache.
        self.k_hist = [randn((c + n, num_kv_heads, head_size), dtype, g) for c, n in seqs]
        self.v_hist = [randn((c + n, num_kv_heads, head_size), dtype, g) for c, n in seqs]
        self.q = [randn((n, num_heads, head_size), dtype, g) for _, n in seqs]
        for i, (c, _) in enumerate(seqs):
            for pos in range(c):
                blk, off = self.block_lists[i][pos // block_size], pos % block_size
                self.cache.key_cache[blk, off] = self.k_hist[i][pos]
                self.cache.value_cache[blk, off] = self.v_hist[i][pos]
        self.metadata = AttentionMetadata.from_lens(
            [n for _, n in seqs], [c + n for c, n in seqs], table, block_size
        )

    @property
    def query(self):
        return torch.cat(self.q)

    @property
    def key(self):
        return torch.cat([k[c:] for k, (c, _) in zip(self.k_hist, self.seqs)])

    @property
    def value(self):
        return torch.cat([v[c:] for v, (c, _) in zip(self.v_hist, self.seqs)])

    @property
    def num_tokens(self):
        return sum(n for _, n in self.seqs)

    def context(self, name):
        return ForwardContext(self.metadata, {name: self.cache})

    def reference(self):
        """float64 attention of every new query over its sequence's full history."""
        outs = []
        group = self.num_heads // self.num_kv_heads
        for q, k, v, (c, n) in zip(self.q, self.k_hist, self.v_hist, self.seqs):
            qd = q.double()
            kd = k.double().repeat_interleave(group, dim=1)  # [L, Hq, D]
            vd = v.double().repeat_interleave(group, dim=1)
            scores = torch.einsum("qhd,khd->hqk", qd, kd) / math.sqrt(self.head_size)
            q_pos = torch.arange(c, c + n).unsqueeze(1)
            k_pos = torch.arange(c + n).unsqueeze(0)
            scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
            outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vd))
        return torch.cat(outs)


def layer_for(batch, name, backend=None):
    return AttentionLayer(name, batch.num_heads, batch.num_kv_heads, batch.head_size,
                          backend or NativeAttentionBackend())


def run_op(batch, name, output, output_scale=None, output_block_scale=None, **overrides):
    args = dict(query=batch.query, key=batch.key, value=batch.value)
    args.update(overrides)
    fx.attention(args["query"], args["key"], args["value"], output, name, output_scale, output_block_scale)
    return output


def assert_cache_holds(batch, key, value):
    flat = batch.cache.key_cache.view(-1, batch.num_kv_heads, batch.head_size)
    assert torch.equal(flat[batch.metadata.slot_mapping], key)
    flat = batch.cache.value_cache.view(-1, batch.num_kv_heads, batch.head_size)
    assert torch.equal(flat[batch.metadata.slot_mapping], value)


def random_seqs(seed, block_size=16, n_seqs=6, max_ctx=40, max_new=20):
    """A ragged mix: at least one fresh prefill, one chunked prefill, one decode, and one
    chunk of new tokens that straddles a block boundary."""
    g = _gen(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    seqs = [(0, r(2, max_new)), (r(1, max_ctx), r(2, 8)), (r(1, max_ctx), 1),
            (r(1, 2) * block_size - r(1, 3), r(4, 8))]
    for _ in range(n_seqs - 3):
        seqs.append((r(0, max_ctx), 1 if r(0, 1) else r(1, max_new)))
    order = torch.randperm(len(seqs), generator=g).tolist()
    return [seqs[i] for i in order]


# --------------------------------------------------------------------------- numerics

CONFIGS = [
    # (block_size, num_heads, num_kv_heads, head_size, dtype)
    (16, 2, 2, 64, torch.bfloat16),
    (8, 2, 2, 128, torch.float16),
    (16, 4, 1, 128, torch.float32),
    (8, 4, 1, 64, torch.bfloat16),
    (16, 8, 1, 64, torch.float16),
    (8, 8, 1, 128, torch.bfloat16),
    (8, 8, 2, 64, torch.float32),
    (16, 4, 2, 128, torch.bfloat16),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"bs{c[0]}-h{c[1]}-kv{c[2]}-d{c[3]}-{str(c[4])[6:]}")
def test_matches_float64_reference(cfg):
    block_size, hq, hkv, d, dtype = cfg
    seed = CONFIGS.index(cfg)
    batch = Batch(random_seqs(seed, block_size), num_heads=hq, num_kv_heads=hkv, head_size=d,
                  block_size=block_size, dtype=dtype, seed=seed)
    # New tokens on both sides of a block boundary, and a decode with context.
    assert any(c > 0 and n == 1 for c, n in batch.seqs)
    assert any((c + n - 1) // block_size > c // block_size for c, n in batch.seqs if n > 1)
    name = "test.ref"
    out = torch.full((batch.num_tokens, hq, d), float("nan"), dtype=dtype)
    with temporary_layers(layer_for(batch, name)), set_forward_context(batch.context(name)):
        run_op(batch, name, out)
    torch.testing.assert_close(out.double(), batch.reference(), atol=ATOL[dtype], rtol=ATOL[dtype])
    assert_cache_holds(batch, batch.key, batch.value)


def test_decode_reads_what_prefill_wrote():
    """Prefill through the op (cache empty), then decode through the op (one new token
    each): the decode step sees the prefill's K/V only via the cache."""
    hq, hkv, d, bs, dtype = 8, 2, 64, 8, torch.bfloat16
    prompt = [13, 1, 8, 22]
    full = Batch([(p, 1) for p in prompt], num_heads=hq, num_kv_heads=hkv, head_size=d,
                 block_size=bs, dtype=dtype, seed=7)
    full.cache.key_cache.zero_()
    full.cache.value_cache.zero_()  # forget the directly written context
    table = full.metadata.block_table
    name = "test.prefill_decode"
    with temporary_layers(layer_for(full, name)):
        # Step 1: prefill the prompts, exactly where the decode step expects them.
        pre_meta = AttentionMetadata.from_lens(prompt, prompt, table, bs)
        pre_q = torch.cat([torch.randn(p, hq, d, generator=_gen(p)).to(dtype) for p in prompt])
        pre_k = torch.cat([k[:p] for k, p in zip(full.k_hist, prompt)])
        pre_v = torch.cat([v[:p] for v, p in zip(full.v_hist, prompt)])
        pre_out = torch.empty_like(pre_q)
        with set_forward_context(ForwardContext(pre_meta, {name: full.cache})):
            fx.attention(pre_q, pre_k, pre_v, pre_out, name)
        # Step 2: decode.
        out = torch.empty(len(prompt), hq, d, dtype=dtype)
        with set_forward_context(full.context(name)):
            run_op(full, name, out)
    torch.testing.assert_close(out.double(), full.reference(), atol=ATOL[dtype], rtol=ATOL[dtype])
    assert_cache_holds(full, full.key, full.value)


def test_causal_mask_uses_absolute_positions():
    """A chunked prefill's first new query sees the whole context plus itself, not just itself."""
    batch = Batch([(16, 3)], num_heads=2, num_kv_heads=1, head_size=64, block_size=8,
                  dtype=torch.float32, seed=3)
    name = "test.causal"
    out = torch.empty(3, 2, 64)
    with temporary_layers(layer_for(batch, name)), set_forward_context(batch.context(name)):
        run_op(batch, name, out)
    torch.testing.assert_close(out.double(), batch.reference(), atol=1e-5, rtol=1e-5)
    # Changing the last new token's value must not affect the first new query.
    batch.v_hist[0][18] += 5.0
    out2 = torch.empty_like(out)
    with temporary_layers(layer_for(batch, name)), set_forward_context(batch.context(name)):
        run_op(batch, name, out2)
    assert torch.equal(out2[:2], out[:2]) and not torch.equal(out2[2], out[2])


def test_query_chunking_does_not_change_the_result(monkeypatch):
    """The native backend splits long prefills into query chunks to bound memory."""
    import fxfuse.attention.native as native

    batch = Batch([(0, 19), (9, 12), (30, 1)], num_heads=4, num_kv_heads=2, head_size=64, block_size=8,
                  dtype=torch.float32, seed=5)
    name = "test.chunks"
    whole, chunked = torch.empty(32, 4, 64), torch.empty(32, 4, 64)
    with temporary_layers(layer_for(batch, name)), set_forward_context(batch.context(name)):
        run_op(batch, name, whole)
        monkeypatch.setattr(native, "_MAX_SCORE_ELEMENTS", 4 * 31 * 3)  # 3 query rows at a time
        run_op(batch, name, chunked)
    # Not bit-equal: BLAS may sum a smaller matmul in another order.
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chunked.double(), batch.reference(), atol=2e-5, rtol=2e-5)


def test_empty_batch():
    meta = AttentionMetadata.from_lens([], [], [], 16)
    cache = KVCache.allocate(2, 16, 1, 64, torch.bfloat16)
    q = torch.empty(0, 4, 64, dtype=torch.bfloat16)
    kv = torch.empty(0, 1, 64, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    with temporary_layers(AttentionLayer("test.empty", 4, 1, 64, NativeAttentionBackend())):
        with set_forward_context(ForwardContext(meta, {"test.empty": cache})):
            fx.attention(q, kv, kv, out, "test.empty")
    assert not cache.key_cache.any()


# --------------------------------------------------------------------------- quantized output


def _quant_batch(dtype=torch.bfloat16, seed=11):
    return Batch(random_seqs(seed), num_heads=8, num_kv_heads=2, head_size=64, block_size=16,
                 dtype=dtype, seed=seed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("scale", [0.002, 0.02])  # 0.002 saturates some elements at +-448
def test_fp8_output_equals_unfused_chain(dtype, scale):
    batch = _quant_batch(dtype)
    name = "test.fp8"
    t, hq, d = batch.num_tokens, batch.num_heads, batch.head_size
    s = torch.tensor([scale], dtype=torch.float32)
    ref_out = torch.empty(t, hq, d, dtype=dtype)
    out8 = torch.empty(t, hq, d, dtype=FP8)
    with temporary_layers(layer_for(batch, name)), set_forward_context(batch.context(name)):
        run_op(batch, name, ref_out)
        run_op(batch, name, out8, output_scale=s)
    unfused = fx.static_scaled_fp8_quant(ref_out.reshape(t, hq * d), s).reshape(t, hq, d)
    assert torch.equal(out8.view(torch.uint8), unfused.view(torch.uint8))
    assert torch.equal(unfused.view(torch.uint8),
                       static_scaled_fp8_quant_native(ref_out, s).view(torch.uint8))
    assert_cache_holds(batch, batch.key, batch.value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nvfp4_output_equals_unfused_chain(dtype):
    batch = _quant_batch(dtype, seed=12)
    name = "test.nvfp4"
    t, hq, d = batch.num_tokens, batch.num_heads, batch.head_size
    ref_out = torch.empty(t, hq, d, dtype=dtype)
    with temporary_layers(layer_for(batch, name)), set_forward_context(batch.context(name)):
        run_op(batch, name, ref_out)
        flat = ref_out.reshape(t, hq * d)
        gs = (448.0 * 6.0 / flat.float().abs().amax()).reshape(1)
        q = torch.empty(t, hq * d // 2, dtype=torch.uint8)
        bs = torch.full(nvfp4_block_scales_shape(t, hq * d), 1.0, dtype=FP8)  # padding must be rewritten
        run_op(batch, name, q, output_scale=gs, output_block_scale=bs)
    q_ref, bs_ref = nvfp4_quant_native(flat, gs)
    assert torch.equal(q, q_ref)
    assert torch.equal(bs.view(torch.uint8), bs_ref.view(torch.uint8))
    q_op, bs_op = fx.nvfp4_quant(flat, gs)
    assert torch.equal(q, q_op) and torch.equal(bs.view(torch.uint8), bs_op.view(torch.uint8))


def test_noquant_backend_computes_the_same_unquantized_output():
    batch = _quant_batch(seed=13)
    t, hq, d = batch.num_tokens, batch.num_heads, batch.head_size
    a, b = torch.empty(t, hq, d, dtype=batch.dtype), torch.empty(t, hq, d, dtype=batch.dtype)
    with set_forward_context(ForwardContext(batch.metadata, {"test.nq": batch.cache, "test.n": batch.cache})):
        with temporary_layers(layer_for(batch, "test.nq", NoQuantNativeBackend()), layer_for(batch, "test.n")):
            run_op(batch, "test.nq", a)
            run_op(batch, "test.n", b)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- errors before writes


def _err_batch():
    return Batch([(5, 3), (20, 1)], num_heads=4, num_kv_heads=2, head_size=64, block_size=8,
                 dtype=torch.bfloat16, seed=21)


def _call_kwargs(batch):
    t = batch.num_tokens
    return dict(query=batch.query, key=batch.key, value=batch.value,
                output=torch.full((t, 4, 64), 7.0, dtype=torch.bfloat16), layer_name="test.err",
                output_scale=None, output_block_scale=None)


def _meta_with(batch, **changes):
    m = batch.metadata
    fields = dict(query_start_loc=m.query_start_loc, seq_lens=m.seq_lens, block_table=m.block_table,
                  slot_mapping=m.slot_mapping, max_query_len=m.max_query_len, max_seq_len=m.max_seq_len)
    fields.update(changes)
    return AttentionMetadata(**fields)


def _fp8_out(kw):
    kw["output"] = torch.zeros(kw["query"].shape, dtype=FP8)


# Each case: (id, edit(batch, kwargs, setup) -> None, exception type, message regex).
# ``setup`` holds what the call runs under: "layer" (an AttentionLayer or None) and
# "ctx" (a ForwardContext or None).
ERROR_CASES = [
    ("missing_layer", lambda b, kw, s: s.update(layer=None),
     UnknownLayerError, r"no attention layer named 'test\.err' is registered"),
    ("missing_forward_context", lambda b, kw, s: s.update(ctx=None),
     NoForwardContextError, r"no forward context is set"),
    ("missing_kv_cache", lambda b, kw, s: s.update(ctx=ForwardContext(b.metadata, {"other": b.cache})),
     UnknownLayerError, r"no KV cache for layer 'test\.err' \(it has caches for: 'other'\)"),
    ("block_table_too_short",
     lambda b, kw, s: s.update(ctx=ForwardContext(_meta_with(b, block_table=b.metadata.block_table[:, :2]),
                                                  {"test.err": b.cache})),
     ValueError, r"`block_table` is too short for sequence 1: seq_len 21 needs 3 blocks of size 8"),
    ("slot_mapping_disagrees",
     lambda b, kw, s: s.update(ctx=ForwardContext(_meta_with(b, slot_mapping=b.metadata.slot_mapping.flip(0)),
                                                  {"test.err": b.cache})),
     ValueError, r"`slot_mapping\[0\]` = \d+ disagrees with `block_table`"),
    ("slot_mapping_out_of_range",
     lambda b, kw, s: s.update(ctx=ForwardContext(_meta_with(b, slot_mapping=b.metadata.slot_mapping + 10_000),
                                                  {"test.err": b.cache})),
     ValueError, r"`slot_mapping\[0\]` = \d+ is outside the KV cache"),
    ("new_tokens_do_not_add_up",
     lambda b, kw, s: kw.update(query=kw["query"][:3], key=kw["key"][:3], value=kw["value"][:3],
                                output=kw["output"][:3]),
     ValueError, r"must have one entry per new token \(3\)"),
    ("hq_not_multiple_of_hkv",
     lambda b, kw, s: kw.update(query=kw["query"][:, :3], output=kw["output"][:, :3].contiguous()),
     ValueError, r"number of query heads \(3\) must be a positive multiple of the number of key/value heads \(2\)"),
    ("head_counts_differ_from_layer",
     lambda b, kw, s: s.update(layer=AttentionLayer("test.err", 8, 2, 64, NativeAttentionBackend())),
     ValueError, r"have 4 query heads, 2 key/value heads and head_size 64, but layer 'test\.err' has 8, 2 and 64"),
    ("kv_heads_differ_from_layer",
     lambda b, kw, s: s.update(layer=AttentionLayer("test.err", 4, 1, 64, NativeAttentionBackend())),
     ValueError, r"but layer 'test\.err' has 4, 1 and 64"),
    ("key_dtype_mismatch", lambda b, kw, s: kw.update(key=kw["key"].half()),
     ValueError, r"`key` must have dtype torch\.bfloat16 \(the dtype of `query`\), got torch\.float16"),
    ("value_dtype_mismatch", lambda b, kw, s: kw.update(value=kw["value"].float()),
     ValueError, r"`value` must have dtype torch\.bfloat16"),
    ("cache_dtype_mismatch",
     lambda b, kw, s: s.update(ctx=ForwardContext(b.metadata, {"test.err": KVCache(
         b.cache.key_cache.half(), b.cache.value_cache.half(), 8)})),
     ValueError, r"KV cache of layer 'test\.err' must have dtype torch\.bfloat16"),
    ("output_dtype_mismatch", lambda b, kw, s: kw.update(output=kw["output"].half()),
     ValueError, r"`output` must have dtype torch\.bfloat16"),
    ("fp8_output_not_fp8",
     lambda b, kw, s: kw.update(output_scale=torch.tensor([0.1])),
     ValueError, r"`output` must have dtype torch\.float8_e4m3fn"),
    ("fp8_scale_not_fp32",
     lambda b, kw, s: (_fp8_out(kw), kw.update(output_scale=torch.tensor([0.1], dtype=torch.float64))),
     ValueError, r"`output_scale` must have dtype torch\.float32"),
    ("block_scale_without_global_scale",
     lambda b, kw, s: kw.update(output_block_scale=torch.zeros(128, 4, dtype=FP8)),
     ValueError, r"`output_scale` must be given \(the NVFP4 global scale\)"),
    ("nvfp4_block_scale_wrong_shape",
     lambda b, kw, s: kw.update(output=torch.zeros(4, 128, dtype=torch.uint8), output_scale=torch.tensor([1.0]),
                                output_block_scale=torch.zeros(4, 16, dtype=FP8)),
     ValueError, r"`output_block_scale` must have shape \(128, 16\)"),
    ("scheme_unsupported_by_backend",
     lambda b, kw, s: (_fp8_out(kw), kw.update(output_scale=torch.tensor([0.1])),
                       s.update(layer=AttentionLayer("test.err", 4, 2, 64, NoQuantNativeBackend()))),
     ValueError, r"layer 'test\.err' uses attention backend 'native-noquant', which does not support "
                 r"output quant scheme 'fp8_static' \(it supports: 'none'\)"),
    ("nvfp4_unsupported_by_backend",
     lambda b, kw, s: (kw.update(output=torch.zeros(4, 128, dtype=torch.uint8), output_scale=torch.tensor([1.0]),
                                 output_block_scale=torch.zeros(128, 16, dtype=FP8)),
                       s.update(layer=AttentionLayer("test.err", 4, 2, 64, NoQuantNativeBackend()))),
     ValueError, r"does not support output quant scheme 'nvfp4'"),
    ("layer_name_empty", lambda b, kw, s: kw.update(layer_name=""),
     ValueError, r"`layer_name` must be non-empty"),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors_raise_before_any_write(case):
    _, edit, exc, pattern = case
    batch = _err_batch()
    kw = _call_kwargs(batch)
    setup = {"layer": AttentionLayer("test.err", 4, 2, 64, NativeAttentionBackend()),
             "ctx": batch.context("test.err")}
    edit(batch, kw, setup)
    caches = [batch.cache, *(setup["ctx"].kv_caches.values() if setup["ctx"] else ())]
    before = [(c.key_cache.clone(), c.value_cache.clone()) for c in caches]
    outs = [t for t in (kw["output"], kw["output_block_scale"]) if t is not None]
    outs_before = [t.clone() for t in outs]
    layers = [setup["layer"]] if setup["layer"] is not None else []
    with temporary_layers(*layers):
        if setup["layer"] is None:
            assert "test.err" not in registered_layer_names()
        if setup["ctx"] is None:
            with pytest.raises(exc, match=pattern):
                fx.attention(**kw)
        else:
            with set_forward_context(setup["ctx"]), pytest.raises(exc, match=pattern):
                fx.attention(**kw)
    for c, (k, v) in zip(caches, before):
        assert torch.equal(c.key_cache, k) and torch.equal(c.value_cache, v)
    for t, t0 in zip(outs, outs_before):
        assert torch.equal(t.view(torch.uint8), t0.view(torch.uint8))


def test_error_messages_name_the_op():
    batch = _err_batch()
    kw = _call_kwargs(batch)
    kw["key"] = kw["key"].half()
    with pytest.raises(ValueError, match=r"^fxfuse\.attention: "):
        fx.attention(**kw)
    with pytest.raises(KeyError) as info:
        get_layer("does.not.exist")
    assert str(info.value).startswith("fxfuse.attention: no attention layer named 'does.not.exist'")


# --------------------------------------------------------------------------- metadata


def test_from_lens_builds_consistent_metadata():
    m = AttentionMetadata.from_lens([3, 1], [3, 18], [[7], [2, 5]], block_size=16)
    assert m.query_start_loc.tolist() == [0, 3, 4]
    assert m.seq_lens.tolist() == [3, 18]
    assert m.block_table.tolist() == [[7, 0], [2, 5]]
    assert m.slot_mapping.tolist() == [112, 113, 114, 81]
    assert (m.max_query_len, m.max_seq_len) == (3, 18)
    assert m.query_start_loc.dtype == torch.int32 and m.slot_mapping.dtype == torch.int64
    m.validate(4, block_size=16, num_blocks=8)


@pytest.mark.parametrize("change, num_tokens, pattern", [
    (dict(query_start_loc=torch.tensor([0, 3, 4], dtype=torch.int64)), 4, r"`query_start_loc` must have dtype torch\.int32"),
    (dict(seq_lens=torch.tensor([[3, 18]], dtype=torch.int32)), 4, r"`seq_lens` must have 1 dimension"),
    (dict(query_start_loc=torch.tensor([1, 3, 4], dtype=torch.int32)), 4, r"must start at 0"),
    (dict(query_start_loc=torch.tensor([0, 3, 2], dtype=torch.int32)), 4, r"must be non-decreasing"),
    (dict(query_start_loc=torch.tensor([0, 3], dtype=torch.int32)), 4, r"must have num_seqs \+ 1 = 3 entries"),
    (dict(), 5, r"`slot_mapping` must have one entry per new token \(5\)"),
    (dict(seq_lens=torch.tensor([2, 18], dtype=torch.int32)), 4, r"sequence 0 must have 0 <= new tokens <= seq_len"),
    (dict(max_seq_len=10), 4, r"`max_seq_len` \(10\) must be at least"),
    (dict(max_query_len=2.5), 4, r"`max_query_len` must be a non-negative int"),
    (dict(block_table=torch.tensor([[7], [2]], dtype=torch.int32)), 4, r"too short for sequence 1"),
    (dict(block_table=torch.tensor([[9, 0], [2, 5]], dtype=torch.int32)), 4, r"`block_table\[0, 0\]` = 9 is not a block"),
])
def test_metadata_validate_errors(change, num_tokens, pattern):
    m = AttentionMetadata.from_lens([3, 1], [3, 18], [[7], [2, 5]], block_size=16)
    fields = dict(query_start_loc=m.query_start_loc, seq_lens=m.seq_lens, block_table=m.block_table,
                  slot_mapping=m.slot_mapping, max_query_len=m.max_query_len, max_seq_len=m.max_seq_len)
    fields.update(change)
    with pytest.raises(ValueError, match=pattern):
        AttentionMetadata(**fields).validate(num_tokens, block_size=16, num_blocks=8)


def test_from_lens_rejects_bad_input():
    with pytest.raises(ValueError, match=r"needs 2 blocks of size 16, but its `block_table` row has 1"):
        AttentionMetadata.from_lens([1], [20], [[0]], 16)
    with pytest.raises(ValueError, match=r"0 <= query_len <= seq_len"):
        AttentionMetadata.from_lens([5], [3], [[0]], 16)


def test_kv_cache_allocate_and_checks():
    c = KVCache.allocate(4, 8, 2, 64, torch.float16)
    assert c.key_cache.shape == (4, 8, 2, 64) and c.value_cache.dtype == torch.float16
    assert (c.num_blocks, c.block_size, c.num_kv_heads, c.head_size) == (4, 8, 2, 64)
    with pytest.raises(ValueError, match=r"`block_size` \(16\) must equal dim 1"):
        KVCache(c.key_cache, c.value_cache, 16)
    with pytest.raises(ValueError, match=r"`value_cache` must match `key_cache`"):
        KVCache(c.key_cache, c.value_cache.float(), 8)
    with pytest.raises(ValueError, match=r"`num_kv_heads` must be a positive int"):
        KVCache.allocate(4, 8, 0, 64)


# --------------------------------------------------------------------------- registry, context, backends


def test_registry_roundtrip_and_conflicts():
    a = AttentionLayer("test.reg", 4, 2, 64, NativeAttentionBackend())
    try:
        assert register_layer(a) is a
        register_layer(AttentionLayer("test.reg", 4, 2, 64, NativeAttentionBackend()))  # equal: no-op
        b = AttentionLayer("test.reg", 4, 2, 64, NoQuantNativeBackend())
        with pytest.raises(ValueError, match=r"a different layer is already registered as 'test\.reg'"):
            register_layer(b)
        register_layer(b, replace=True)
        assert get_layer("test.reg").backend.name == "native-noquant"
        with pytest.raises(UnknownLayerError, match=r"registered: .*'test\.reg'"):
            get_layer("test.nope")
    finally:
        unregister_layer("test.reg")
    assert "test.reg" not in registered_layer_names()
    with pytest.raises(UnknownLayerError):
        unregister_layer("test.reg")


def test_temporary_layers_restores_previous_entries():
    outer = AttentionLayer("test.tmp", 4, 2, 64, NativeAttentionBackend())
    with temporary_layers(outer):
        inner = AttentionLayer("test.tmp", 8, 1, 128, NoQuantNativeBackend())
        with temporary_layers(inner, AttentionLayer("test.tmp2", 2, 2, 64, NativeAttentionBackend())):
            assert get_layer("test.tmp") is inner and get_layer("test.tmp2").num_heads == 2
        assert get_layer("test.tmp") is outer
        assert "test.tmp2" not in registered_layer_names()
    assert "test.tmp" not in registered_layer_names()


def test_layer_validation():
    with pytest.raises(ValueError, match=r"`num_heads` \(6\) must be a multiple of `num_kv_heads` \(4\)"):
        AttentionLayer("x", 6, 4, 64, NativeAttentionBackend())
    with pytest.raises(TypeError, match=r"`backend` must be an AttentionBackend instance"):
        AttentionLayer("x", 4, 2, 64, "native")
    layer = AttentionLayer("x", 8, 2, 64, NativeAttentionBackend())
    assert layer.num_queries_per_kv == 4 and layer.scale == 1 / 8


def test_forward_context_nesting_and_missing():
    with pytest.raises(NoForwardContextError, match=r"no forward context is set"):
        get_forward_context()
    m = AttentionMetadata.from_lens([1], [1], [[0]], 16)
    a, b = ForwardContext(m), ForwardContext(m)
    with set_forward_context(a):
        assert get_forward_context() is a
        with set_forward_context(b):
            assert get_forward_context() is b
        assert get_forward_context() is a
    with pytest.raises(NoForwardContextError):
        get_forward_context()
    with pytest.raises(TypeError, match=r"expects a ForwardContext"):
        with set_forward_context(m):
            pass


def test_backends_declare_their_schemes():
    assert OUTPUT_QUANT_SCHEMES == ("none", "fp8_static", "nvfp4")
    native, noquant = NativeAttentionBackend(), NoQuantNativeBackend()
    assert native.name == "native" and noquant.name == "native-noquant"
    assert all(native.supports_output_quant(s) for s in OUTPUT_QUANT_SCHEMES)
    assert [noquant.supports_output_quant(s) for s in OUTPUT_QUANT_SCHEMES] == [True, False, False]
    assert isinstance(noquant, AttentionBackend) and native != noquant and native == NativeAttentionBackend()
    with pytest.raises(ValueError, match=r"unknown output quant scheme 'fp8'"):
        native.supports_output_quant("fp8")
    assert output_quant_scheme(None, None) == "none"
    assert output_quant_scheme(torch.ones(1), None) == "fp8_static"
    assert output_quant_scheme(torch.ones(1), torch.ones(1)) == "nvfp4"


def test_backend_with_unknown_scheme_is_rejected():
    class Typo(NativeAttentionBackend):
        name = "typo"
        supported_output_quant = frozenset({"none", "fp8"})

    with pytest.raises(TypeError, match=r"names unknown scheme\(s\) \['fp8'\]"):
        AttentionLayer("x", 4, 2, 64, Typo())


# --------------------------------------------------------------------------- tracing


def test_schema():
    assert str(fx.attention.default._schema) == "fxfuse::attention" + ATTENTION_SCHEMA
    args = {a.name: a for a in fx.attention.default._schema.arguments}
    assert args["output"].alias_info.is_write and args["output_block_scale"].alias_info.is_write
    assert not fx.attention.default._schema.returns


def test_opcheck():
    # Model-dtype output only: opcheck's schema test compares mutated tensors with
    # torch.allclose, which torch does not implement for float8 on CPU.
    batch = _quant_batch(seed=41)
    name = "test.opcheck"
    out = torch.empty(batch.num_tokens, batch.num_heads, batch.head_size, dtype=batch.dtype)
    with temporary_layers(layer_for(batch, name)), set_forward_context(batch.context(name)):
        torch.library.opcheck(fx.attention.default, (batch.query, batch.key, batch.value, out, name))


def _fake_args(mode, t=5, hq=8, hkv=2, d=64, dtype=torch.bfloat16):
    q = mode.from_tensor(torch.empty(t, hq, d, dtype=dtype))
    k = mode.from_tensor(torch.empty(t, hkv, d, dtype=dtype))
    return q, k, k, mode.from_tensor(torch.empty(t, hq, d, dtype=dtype))


def test_fake_impl_needs_no_context_or_registry():
    with FakeTensorMode() as mode:
        q, k, v, out = _fake_args(mode)
        assert fx.attention(q, k, v, out, "not.registered") is None
        s = mode.from_tensor(torch.ones(1))
        out8 = mode.from_tensor(torch.empty(5, 8, 64, dtype=FP8))
        fx.attention(q, k, v, out8, "not.registered", s)
        q4 = mode.from_tensor(torch.empty(5, 256, dtype=torch.uint8))
        bs = mode.from_tensor(torch.empty(128, 32, dtype=FP8))
        fx.attention(q, k, v, q4, "not.registered", s, bs)
        # The static checks run at trace time.
        with pytest.raises(ValueError, match=r"must be a positive multiple"):
            fx.attention(q[:, :3], k, v, out[:, :3], "x")
        with pytest.raises(ValueError, match=r"`output_block_scale` must have shape \(128, 32\)"):
            fx.attention(q, k, v, q4, "x", s, bs[:, :16])


def test_make_fx_records_the_mutating_op():
    def fn(q, k, v, out):
        fx.attention(q, k, v, out, "layers.0.attn")
        return out

    with FakeTensorMode() as mode:
        args = _fake_args(mode)
    gm = make_fx(fn, tracing_mode="fake")(*args)
    assert fx.attention.default in targets(gm)
    # Functionalized (as post-grad passes see it): the mutation becomes auto_functionalized.
    gm2 = trace_graph(fn, *[torch.empty(a.shape, dtype=a.dtype) for a in args])
    af = [n for n in gm2.graph.nodes if n.op == "call_function" and "auto_functionalized" in str(n.target)]
    assert len(af) == 1 and af[0].args[0] is fx.attention.default
    assert af[0].kwargs["layer_name"] == "layers.0.attn"


@pytest.mark.compile
def test_torch_compile_fullgraph_matches_eager():
    batch = _quant_batch(seed=31)
    name = "test.compiled"
    t, hq, d = batch.num_tokens, batch.num_heads, batch.head_size
    s = torch.tensor([0.01])

    def fn(q, k, v, s, gs):
        out = torch.empty_like(q)
        fx.attention(q, k, v, out, name)
        out8 = torch.empty(q.shape, dtype=FP8)
        fx.attention(q, k, v, out8, name, s)
        q4 = torch.empty(q.shape[0], q.shape[1] * q.shape[2] // 2, dtype=torch.uint8)
        bs = torch.empty(nvfp4_block_scales_shape(q.shape[0], q.shape[1] * q.shape[2]), dtype=FP8)
        fx.attention(q, k, v, q4, name, gs, bs)
        return out * 1, out8, q4, bs

    gs = torch.tensor([50.0])
    args = (batch.query, batch.key, batch.value, s, gs)
    assert t <= 128
    with temporary_layers(layer_for(batch, name)), set_forward_context(batch.context(name)):
        eager = fn(*args)
        # Clear the new tokens' slots: the compiled call must write them again.
        for cache in (batch.cache.key_cache, batch.cache.value_cache):
            cache.view(-1, batch.num_kv_heads, batch.head_size)[batch.metadata.slot_mapping] = 0
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True)(*args)
    for e, c in zip(eager, compiled):
        assert torch.equal(e.view(torch.uint8), c.view(torch.uint8))
    assert compiled[0].shape == (t, hq, d)
    assert_cache_holds(batch, batch.key, batch.value)
