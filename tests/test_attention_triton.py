"""The triton attention backend against the float64 reference and its own unfused chain.

On CUDA when present, else in Triton's CPU interpreter (conftest.py). The batches are
the ragged prefill/decode/chunked-prefill mixes of test_attention.py.
"""

import pytest
import torch

pytest.importorskip("triton", reason="Triton is part of the test extras")

from test_attention import ATOL, CONFIGS, Batch, random_seqs  # noqa: E402

from fxfuse.attention import (  # noqa: E402
    AttentionLayer,
    AttentionMetadata,
    ForwardContext,
    KVCache,
    TritonAttentionBackend,
    set_forward_context,
    temporary_layers,
)
from fxfuse.kernels import attention as K  # noqa: E402
from fxfuse.ops.nvfp4 import nvfp4_block_scales_shape, nvfp4_quant_native  # noqa: E402
from fxfuse.ops.quant import static_scaled_fp8_quant_native  # noqa: E402
from conftest import covering

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn
fx = torch.ops.fxfuse


def on_device(batch):
    """Move a test_attention.Batch's cache and metadata to DEVICE."""
    m = batch.metadata
    batch.metadata = AttentionMetadata(
        m.query_start_loc.to(DEVICE), m.seq_lens.to(DEVICE), m.block_table.to(DEVICE),
        m.slot_mapping.to(DEVICE), m.max_query_len, m.max_seq_len,
    )
    c = batch.cache
    batch.cache = KVCache(c.key_cache.to(DEVICE), c.value_cache.to(DEVICE), c.block_size)
    return batch


def run(batch, name, output, output_scale=None, output_block_scale=None):
    layer = AttentionLayer(name, batch.num_heads, batch.num_kv_heads, batch.head_size, TritonAttentionBackend())
    with temporary_layers(layer), set_forward_context(ForwardContext(batch.metadata, {name: batch.cache})):
        fx.attention(batch.query.to(DEVICE), batch.key.to(DEVICE), batch.value.to(DEVICE), output, name,
                     output_scale, output_block_scale)
    return output


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"bs{c[0]}-h{c[1]}-kv{c[2]}-d{c[3]}-{str(c[4])[6:]}")
def test_matches_float64_reference(cfg):
    block_size, hq, hkv, d, dtype = cfg
    seed = 100 + CONFIGS.index(cfg)
    batch = on_device(Batch(random_seqs(seed, block_size), num_heads=hq, num_kv_heads=hkv, head_size=d,
                            block_size=block_size, dtype=dtype, seed=seed))
    out = torch.full((batch.num_tokens, hq, d), float("nan"), dtype=dtype, device=DEVICE)
    run(batch, "t.ref", out)
    torch.testing.assert_close(out.double().cpu(), batch.reference(), atol=ATOL[dtype], rtol=ATOL[dtype])
    flat = batch.cache.key_cache.view(-1, hkv, d)
    assert torch.equal(flat[batch.metadata.slot_mapping].cpu(), batch.key)


def _decode_batch(dtype=torch.bfloat16, seed=7, contexts=(200, 37, 129)):
    return on_device(Batch([(c, 1) for c in contexts], num_heads=8, num_kv_heads=2, head_size=64,
                           block_size=16, dtype=dtype, seed=seed))


def _launch(batch, output, out=K.OUT_NONE, scale=None, block_scale=None, splits=None):
    m, c = batch.metadata, batch.cache
    K.paged_attention(batch.query.to(DEVICE), c.key_cache, c.value_cache, m.block_table, m.seq_lens,
                      m.query_start_loc, m.max_query_len, m.max_seq_len, batch.head_size ** -0.5,
                      output, out, scale, block_scale, splits=splits)
    return output


@pytest.mark.parametrize("splits", [2, 5])
def test_split_kv_decode_matches_reference(splits):
    batch = _decode_batch()
    run(batch, "t.split", torch.empty(3, 8, 64, dtype=torch.bfloat16, device=DEVICE))  # fills the cache
    out = _launch(batch, torch.empty(3, 8, 64, dtype=torch.bfloat16, device=DEVICE), splits=splits)
    torch.testing.assert_close(out.double().cpu(), batch.reference(), atol=ATOL[torch.bfloat16], rtol=0.02)


def test_split_heuristic_only_splits_small_decode_batches():
    dev = torch.device(DEVICE)
    assert K.num_splits(1, 8, 1, 4096, dev) > 1
    assert K.num_splits(1, 8, 2, 4096, dev) == 1  # prefill or mixed: one split
    assert K.num_splits(64, 8, 1, 4096, dev) == 1  # enough programs already
    assert K.num_splits(1, 8, 1, 100, dev) == 1  # too short to split


@pytest.mark.parametrize("splits, dtype", [(v0,) + (v1,) for v0, v1 in covering(
    [1, 3],
    [torch.bfloat16, torch.float16],
)])
def test_quantized_outputs_equal_the_unfused_chain(splits, dtype):
    if splits == 1:
        batch = on_device(Batch(random_seqs(21), num_heads=8, num_kv_heads=2, head_size=64, block_size=16,
                                dtype=dtype, seed=21))
    else:
        batch = _decode_batch(dtype)
    t, hq, d = batch.num_tokens, batch.num_heads, batch.head_size
    run(batch, "t.q", torch.empty(t, hq, d, dtype=dtype, device=DEVICE))  # writes the new K/V
    y = _launch(batch, torch.empty(t, hq, d, dtype=dtype, device=DEVICE), splits=splits)
    flat = y.reshape(t, hq * d)
    for s in (0.002, 0.02):  # 0.002 saturates some elements
        scale = torch.tensor([s], device=DEVICE)
        q8 = _launch(batch, torch.empty(t, hq, d, dtype=FP8, device=DEVICE), K.OUT_FP8, scale, splits=splits)
        assert torch.equal(q8.view(torch.uint8), static_scaled_fp8_quant_native(y, scale).view(torch.uint8))
    gs = (448.0 * 6.0 / flat.float().abs().amax()).reshape(1)
    q4 = torch.empty(t, hq * d // 2, dtype=torch.uint8, device=DEVICE)
    bs = torch.full(nvfp4_block_scales_shape(t, hq * d), 1.0, device=DEVICE).to(FP8)  # padding rewritten
    _launch(batch, q4, K.OUT_NVFP4, gs, bs, splits=splits)
    ref_q, ref_bs = nvfp4_quant_native(flat, gs)
    assert torch.equal(q4, ref_q) and torch.equal(bs.view(torch.uint8), ref_bs.view(torch.uint8))


def _stale_slots_nan(batch):
    """Fill every cache slot no sequence owns with NaN: a kernel that reads past a
    sequence's end (as whole-page bulk copies do) must not let them into the output."""
    m = batch.metadata
    owned = torch.zeros(batch.cache.key_cache.shape[0] * batch.block_size, dtype=torch.bool, device=DEVICE)
    for i, n in enumerate(m.seq_lens.tolist()):
        pos = torch.arange(n, device=DEVICE)
        owned[m.block_table[i, pos // batch.block_size].long() * batch.block_size + pos % batch.block_size] = True
    for cache in (batch.cache.key_cache, batch.cache.value_cache):
        cache.view(owned.shape[0], -1)[~owned] = float("nan")


@pytest.mark.parametrize("q_tma, page_prefetch, cfg", [tuple(v0) + (v1,) for v0, v1 in covering(
    [(False, False), (None, False), (None, True)],
    [(32, 16, 4, 2), (64, 32, 4, 2)],
)])
def test_tma_path_matches_reference_with_stale_slots(cfg, q_tma, page_prefetch):
    # 32-slot pages hold whole key tiles; pages are shared by no two sequences, and the
    # slots past each sequence's end are NaN.
    batch = on_device(Batch(random_seqs(41, 32), num_heads=8, num_kv_heads=2, head_size=64, block_size=32,
                            dtype=torch.bfloat16, seed=41))
    t = batch.num_tokens
    run(batch, "t.tma", torch.empty(t, 8, 64, dtype=torch.bfloat16, device=DEVICE))  # writes the new K/V
    _stale_slots_nan(batch)
    m, c = batch.metadata, batch.cache
    args = (batch.query.to(DEVICE), c.key_cache, c.value_cache, m.block_table, m.seq_lens, m.query_start_loc,
            m.max_query_len, m.max_seq_len, 64 ** -0.5)
    y = torch.empty(t, 8, 64, dtype=torch.bfloat16, device=DEVICE)
    K.paged_attention(*args, y, config=cfg, tma=True, q_tma=q_tma, page_prefetch=page_prefetch)
    torch.testing.assert_close(y.double().cpu(), batch.reference(), atol=ATOL[torch.bfloat16], rtol=0.02)
    y_gather = torch.empty_like(y)
    K.paged_attention(*args, y_gather, config=cfg, tma=False)
    assert torch.equal(y, y_gather)  # the same tiles in the same order: only the loads differ
    s = torch.tensor([0.02], device=DEVICE)
    q8 = torch.empty(t, 8, 64, dtype=FP8, device=DEVICE)
    K.paged_attention(*args, q8, K.OUT_FP8, s, config=cfg, tma=True, q_tma=q_tma, page_prefetch=page_prefetch)
    assert torch.equal(q8.view(torch.uint8), static_scaled_fp8_quant_native(y, s).view(torch.uint8))


def test_tma_needs_pages_holding_whole_tiles():
    batch = on_device(Batch(random_seqs(43), num_heads=4, num_kv_heads=2, head_size=64, block_size=16,
                            dtype=torch.bfloat16, seed=43))
    m, c = batch.metadata, batch.cache
    out = torch.empty(batch.num_tokens, 4, 64, dtype=torch.bfloat16, device=DEVICE)
    assert not K.tma_possible(c.key_cache, 32, interpreted_ok=True)
    with pytest.raises(ValueError, match="block size 16 is not a multiple of BLOCK_N 32"):
        K.paged_attention(batch.query.to(DEVICE), c.key_cache, c.value_cache, m.block_table, m.seq_lens,
                          m.query_start_loc, m.max_query_len, m.max_seq_len, 0.125, out, config=(64, 32, 4, 2),
                          tma=True)


def test_preferred_block_size():
    assert TritonAttentionBackend().preferred_block_size(torch.device("cpu")) is None
    if torch.cuda.is_available():
        major = torch.cuda.get_device_capability()[0]
        assert TritonAttentionBackend().preferred_block_size(torch.device("cuda")) == (64 if major >= 9 else None)


def test_fused_op_through_the_backend_equals_unfused_ops():
    batch = on_device(Batch(random_seqs(31), num_heads=4, num_kv_heads=2, head_size=64, block_size=16,
                            dtype=torch.bfloat16, seed=31))
    t = batch.num_tokens
    y = run(batch, "t.op", torch.empty(t, 4, 64, dtype=torch.bfloat16, device=DEVICE))
    s = torch.tensor([0.01], device=DEVICE)
    q = run(batch, "t.op", torch.empty(t, 4, 64, dtype=FP8, device=DEVICE), output_scale=s)
    unfused = fx.static_scaled_fp8_quant(y.reshape(t, 256), s).reshape(t, 4, 64)
    assert torch.equal(q.view(torch.uint8), unfused.view(torch.uint8))


def test_head_size_must_be_a_power_of_two():
    batch = on_device(Batch([(3, 2)], num_heads=2, num_kv_heads=1, head_size=48, block_size=16,
                            dtype=torch.bfloat16, seed=1))
    with pytest.raises(ValueError, match="power-of-two head_size >= 16.*has 48"):
        run(batch, "t.bad", torch.empty(2, 2, 48, dtype=torch.bfloat16, device=DEVICE))


def test_metadata_is_validated_once_per_batch():
    batch = _decode_batch()
    calls = []
    original = AttentionMetadata.validate

    def counting(self, *a, **k):
        calls.append(1)
        return original(self, *a, **k)

    AttentionMetadata.validate = counting
    try:
        for _ in range(3):
            run(batch, "t.once", torch.empty(3, 8, 64, dtype=torch.bfloat16, device=DEVICE))
    finally:
        AttentionMetadata.validate = original
    assert len(calls) == 1


@pytest.mark.gpu
def test_decode_step_replays_in_a_cuda_graph():
    batch = _decode_batch(contexts=(300, 17))
    name = "t.graph"
    layer = AttentionLayer(name, 8, 2, 64, TritonAttentionBackend())
    q, k, v = (t.to(DEVICE) for t in (batch.query, batch.key, batch.value))
    out = torch.empty(2, 8, 64, dtype=torch.bfloat16, device=DEVICE)
    ctx = ForwardContext(batch.metadata, {name: batch.cache})
    with temporary_layers(layer), set_forward_context(ctx):
        fx.attention(q, k, v, out, name)  # warm-up compiles and validates
        expected = out.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fx.attention(q, k, v, out, name)
        out.zero_()
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


@pytest.mark.gpu
def test_capture_without_validated_metadata_is_a_clear_error():
    batch = _decode_batch(contexts=(30,))
    name = "t.nograph"
    layer = AttentionLayer(name, 8, 2, 64, TritonAttentionBackend())
    q, k, v = (t.to(DEVICE) for t in (batch.query, batch.key, batch.value))
    out = torch.empty(1, 8, 64, dtype=torch.bfloat16, device=DEVICE)
    with temporary_layers(layer), set_forward_context(ForwardContext(batch.metadata, {name: batch.cache})):
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match="validated before a CUDA graph capture"):
            with torch.cuda.graph(graph):
                fx.attention(q, k, v, out, name)
