"""Rotary embedding ops (``rotary_embedding``, ``qk_norm_rope``, ``qk_gemma_norm_rope``) and
their Triton kernel (``fxfuse.kernels.rotary``).

What is checked:
- the native reference against independent implementations written from the HF formulas
  (``rotate_half`` for NeoX, ``rotate_every_two`` for GPT-J, partial rotary as HF's
  ``q_rot``/``q_pass`` split): bit for bit in fp32-then-round-once, and within one step of
  the output dtype of a float64 computation;
- the qk-norm ops against their unfused chains (``rms_norm``/``gemma_rms_norm`` per head,
  then ``rotary_embedding``), bit for bit, through the ops and through the native functions;
- the kernel against the native reference under Triton's interpreter (CPU) or on the GPU:
  the rotation bit for bit; for the qk-norm kernel the per-head norm within one or two
  units in the last place (another summation order of the sum of squares, as the RMSNorm
  kernel), and the rotation of the kernel's own normalized heads bit for bit;
- token-strided inputs (q and k slices of a packed qkv), 2-D and 3-D layouts, int32 and
  int64 positions, fp32 and model-dtype caches;
- fake implementations under ``FakeTensorMode``; ``opcheck``; validation messages;
  positions out of the cache's range.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fxfuse.ops  # noqa: F401  (registers torch.ops.fxfuse.*)
from fxfuse.ops.gemma_norm import gemma_rms_norm_native
from fxfuse.ops.norm import rms_norm_native
from fxfuse.ops.rotary import (
    qk_gemma_norm_rope_native,
    qk_norm_rope_native,
    rotary_cos_sin_cache,
    rotary_embedding_native,
)
from conftest import covering

fx = torch.ops.fxfuse
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6
DTYPES = [torch.bfloat16, torch.float16, torch.float32]

# (tokens, q heads, kv heads, head_size, rotary_dim): odd token and head counts, full and
# partial rotary (half of the head, and 48 of 128: not a power of two).
CASES = [
    (1, 4, 2, 64, 64),
    (7, 5, 1, 128, 64),
    (33, 3, 3, 128, 48),
    (6, 2, 1, 16, 6),
]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(shape, dtype, seed, scale=1.0, device="cpu"):
    """Random normal values (never zeros), scaled in fp32, then cast."""
    return (torch.randn(shape, generator=_gen(seed)) * scale).to(dtype).to(device)


def positions(tokens, max_pos, dtype, seed, device="cpu"):
    return torch.randint(0, max_pos, (tokens,), generator=_gen(seed)).to(dtype).to(device)


def head_weight(head_size, dtype, seed, gemma=False, device="cpu"):
    """Llama/Qwen norm weights around 1, or Gemma's offsets around 0 (the op adds 1)."""
    w = 0.3 * torch.randn(head_size, generator=_gen(seed))
    return (w if gemma else 1 + w).to(dtype).to(device)


def _inputs(case, dtype, seed, pos_dtype=torch.int64, cache_dtype=torch.float32, max_pos=4096, device="cpu"):
    tokens, hq, hk, hd, rot = case
    q = randn((tokens, hq * hd), dtype, seed, scale=2.0, device=device)
    k = randn((tokens, hk * hd), dtype, seed + 1, scale=2.0, device=device)
    pos = positions(tokens, max_pos, pos_dtype, seed + 2, device=device)
    cache = rotary_cos_sin_cache(max_pos, rot, base=10000.0, dtype=cache_dtype, device=device)
    return pos, q, k, hd, cache


# --------------------------------------------------------------------------- independent references


def _hf_rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _hf_rotate_every_two(x):
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def hf_rope(x, pos, cache, head_size, is_neox, compute=torch.float32):
    """HF's formulas: ``x_rot * cos + rotate(x_rot) * sin`` with cos/sin repeated to the rotary
    width (``cat(f, f)`` for NeoX, ``repeat_interleave`` for GPT-J), the pass-through part
    concatenated back; computed in ``compute`` and rounded to ``x.dtype`` once."""
    rot = cache.shape[1]
    heads = x.reshape(x.shape[0], -1, head_size)
    cs = cache[pos.long()].to(compute)
    cos, sin = cs[:, : rot // 2], cs[:, rot // 2 :]
    if is_neox:
        cos, sin, rotate = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1), _hf_rotate_half
    else:
        cos, sin, rotate = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1), _hf_rotate_every_two
    x_rot, x_pass = heads[..., :rot].to(compute), heads[..., rot:]
    out = x_rot * cos[:, None, :] + rotate(x_rot) * sin[:, None, :]
    return torch.cat((out.to(x.dtype), x_pass), -1).reshape(x.shape)


def _ulp(t):
    """One step of ``t``'s dtype at each element's magnitude (at least the smallest normal's)."""
    fi = torch.finfo(t.dtype)
    return fi.eps * t.double().abs().clamp_min(fi.tiny)


# --------------------------------------------------------------------------- the cache


def test_cos_sin_cache_is_vllms_layout():
    cache = rotary_cos_sin_cache(100, 8, base=500.0)
    p, i = 37, torch.arange(4)
    f = p * (500.0 ** (-(2 * i).double() / 8))
    assert cache.shape == (100, 8) and cache.dtype == torch.float32
    torch.testing.assert_close(cache[p, :4].double(), f.cos(), rtol=0, atol=2e-6)
    torch.testing.assert_close(cache[p, 4:].double(), f.sin(), rtol=0, atol=2e-6)


# --------------------------------------------------------------------------- native vs references


@pytest.mark.parametrize("case, dtype, is_neox", [(v0,) + (v1,) + (v2,) for v0, v1, v2 in covering(
    CASES,
    DTYPES,
    [True, False],
)])
def test_native_matches_hf_formulas(case, dtype, is_neox):
    pos, q, k, hd, cache = _inputs(case, dtype, seed=sum(case))
    q2, k2 = rotary_embedding_native(pos, q, k, hd, cache, is_neox)
    for x, out in ((q, q2), (k, k2)):
        assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
        # fp32 then one rounding, as HF's expression in fp32: the same arithmetic, bit for bit.
        assert torch.equal(out, hf_rope(x, pos, cache, hd, is_neox))
        # Against float64: at most one step of the output dtype (fp32: a few, from the fp32 products).
        ref = hf_rope(x.double(), pos, cache.double(), hd, is_neox, compute=torch.float64)
        steps = 1.0 if dtype != torch.float32 else 4.0
        bound = steps * _ulp(out) + 4 * torch.finfo(torch.float32).eps * x.double().abs().amax()
        assert bool(((out.double() - ref).abs() <= bound).all())
        rot = cache.shape[1]
        heads, heads_out = x.reshape(x.shape[0], -1, hd), out.reshape(x.shape[0], -1, hd)
        assert torch.equal(heads_out[..., rot:], heads[..., rot:])  # partial rotary passes the rest through


@pytest.mark.parametrize("is_neox", [True, False])
def test_position_zero_is_the_identity_and_pairs_keep_their_norm(is_neox):
    pos, q, k, hd, cache = _inputs((9, 4, 2, 64, 64), torch.float32, seed=5)
    pos[0] = 0
    q2, k2 = rotary_embedding_native(pos, q, k, hd, cache, is_neox)
    assert torch.equal(q2[0], q[0]) and torch.equal(k2[0], k[0])
    heads, heads2 = q.reshape(9, 4, hd), q2.reshape(9, 4, hd)
    pair = (lambda h: h[..., :32] ** 2 + h[..., 32:] ** 2) if is_neox else (lambda h: h[..., 0::2] ** 2 + h[..., 1::2] ** 2)
    torch.testing.assert_close(pair(heads2), pair(heads), rtol=1e-5, atol=1e-5)


def test_styles_differ():
    # A guard against a style flag that does nothing.
    pos, q, k, hd, cache = _inputs((5, 2, 1, 32, 32), torch.float32, seed=6)
    assert not torch.equal(rotary_embedding_native(pos, q, k, hd, cache, True)[0],
                           rotary_embedding_native(pos, q, k, hd, cache, False)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_model_dtype_cache_and_int32_positions(dtype):
    case = (7, 5, 1, 128, 64)
    pos, q, k, hd, cache = _inputs(case, dtype, seed=8, cache_dtype=dtype)
    q2, k2 = fx.rotary_embedding(pos.int(), q, k, hd, cache, True)
    # A model-dtype cache is widened to fp32 exactly: the same result as that cache in fp32.
    r2 = fx.rotary_embedding(pos, q, k, hd, cache.float(), True)
    assert torch.equal(q2, r2[0]) and torch.equal(k2, r2[1])
    assert torch.equal(q2, hf_rope(q, pos, cache, hd, True))


@pytest.mark.parametrize("is_neox", [True, False])
def test_3d_layout_and_token_strided_inputs(is_neox):
    tokens, hq, hk, hd, rot = 7, 5, 1, 128, 64
    pos, q, k, _, cache = _inputs((tokens, hq, hk, hd, rot), torch.bfloat16, seed=9)
    ref_q, ref_k = fx.rotary_embedding(pos, q, k, hd, cache, is_neox)
    q3, k3 = fx.rotary_embedding(pos, q.reshape(tokens, hq, hd), k.reshape(tokens, hk, hd), hd, cache, is_neox)
    assert q3.shape == (tokens, hq, hd) and torch.equal(q3.reshape(ref_q.shape), ref_q)
    # q and k as slices of a packed qkv projection: token stride (hq + 2 * hk) * hd.
    v = randn((tokens, hk * hd), torch.bfloat16, 10)
    qkv = torch.cat((q, k, v), dim=-1)
    qs, ks = qkv[:, : hq * hd], qkv[:, hq * hd : (hq + hk) * hd]
    assert not qs.is_contiguous()
    q4, k4 = fx.rotary_embedding(pos, qs, ks, hd, cache, is_neox)
    assert q4.is_contiguous() and torch.equal(q4, ref_q) and torch.equal(k4, ref_k)


# --------------------------------------------------------------------------- qk norm + rope == the unfused chain


def _per_head(op, x, w, eps, hd):
    return op(x.reshape(x.shape[0], -1, hd), w, eps).reshape(x.shape)


@pytest.mark.parametrize("case, dtype, is_neox, gemma", [(v0,) + (v1,) + (v2,) + (v3,) for v0, v1, v2, v3 in covering(
    CASES,
    DTYPES,
    [True, False],
    [False, True],
)])
def test_qk_norm_rope_equals_the_unfused_chain(case, dtype, is_neox, gemma):
    pos, q, k, hd, cache = _inputs(case, dtype, seed=3 * sum(case))
    wdt = torch.float32 if gemma else dtype
    qw, kw = head_weight(hd, wdt, 11, gemma), head_weight(hd, wdt, 12, gemma)
    fused_op, norm_op = (fx.qk_gemma_norm_rope, fx.gemma_rms_norm) if gemma else (fx.qk_norm_rope, fx.rms_norm)
    native = qk_gemma_norm_rope_native if gemma else qk_norm_rope_native
    norm_native = gemma_rms_norm_native if gemma else rms_norm_native
    fused = fused_op(pos, q, k, qw, kw, EPS, hd, cache, is_neox)
    # The chain as a model writes it: the per-head norm op (its output rounded to the model
    # dtype), then the rotary op.
    chain = fx.rotary_embedding(pos, _per_head(norm_op, q, qw, EPS, hd), _per_head(norm_op, k, kw, EPS, hd),
                                hd, cache, is_neox)
    native_chain = rotary_embedding_native(pos, _per_head(norm_native, q, qw, EPS, hd),
                                           _per_head(norm_native, k, kw, EPS, hd), hd, cache, is_neox)
    for a, b, c, d in zip(fused, chain, native_chain, native(pos, q, k, qw, kw, EPS, hd, cache, is_neox)):
        assert a.dtype == dtype and a.shape == b.shape
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)


def test_qk_norm_normalizes_the_pass_through_part_too():
    pos, q, k, hd, cache = _inputs((3, 2, 1, 128, 64), torch.bfloat16, seed=13)
    qw, kw = head_weight(hd, torch.bfloat16, 14), head_weight(hd, torch.bfloat16, 15)
    q2, _ = fx.qk_norm_rope(pos, q, k, qw, kw, EPS, hd, cache, True)
    normed = _per_head(rms_norm_native, q, qw, EPS, hd)
    assert torch.equal(q2.reshape(3, 2, hd)[..., 64:], normed.reshape(3, 2, hd)[..., 64:])


# --------------------------------------------------------------------------- kernel vs native


def _kernel():
    pytest.importorskip("triton", reason="Triton is part of the test extras")
    from fxfuse.kernels import rotary as R

    return R


def _within_ulps(a, b, ulps):
    a32, b32 = a.float(), b.float()
    step = ulps * torch.finfo(a.dtype).eps * torch.maximum(a32.abs(), b32.abs()).clamp_min(torch.finfo(a.dtype).tiny)
    return bool(((a32 - b32).abs() <= step).all()), float((a32 != b32).float().mean())


def _within_ulps_of_head(a, b, ulps, head_dim):
    """Within ``ulps`` steps of each head's largest value (what a rotated pair is made of)."""
    a32, b32 = a.float().reshape(-1, head_dim), b.float().reshape(-1, head_dim)
    scale = torch.maximum(a32.abs(), b32.abs()).amax(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    step = ulps * torch.finfo(a.dtype).eps * scale
    return bool(((a32 - b32).abs() <= step).all()), float((a32 != b32).float().mean())


# The interpreter runs a program at a time: fewer tokens there, real model shapes on the GPU.
KERNEL_CASES = ([(1, 4, 2, 64, 64), (7, 5, 1, 128, 64), (13, 3, 3, 128, 48), (6, 2, 1, 16, 6)] if DEVICE == "cpu"
                else CASES + [(4096, 32, 8, 128, 128), (257, 16, 8, 256, 256), (300, 32, 4, 128, 64)])


@pytest.mark.parametrize("case, dtype, is_neox, pos_dtype", [(v0,) + (v1,) + (v2,) + (v3,) for v0, v1, v2, v3 in covering(
    KERNEL_CASES,
    DTYPES,
    [True, False],
    [torch.int64, torch.int32],
)])
def test_rotary_kernel_is_bit_exact(case, dtype, is_neox, pos_dtype):
    R = _kernel()
    cache_dtype = torch.float32 if pos_dtype == torch.int64 else dtype
    pos, q, k, hd, cache = _inputs(case, dtype, seed=sum(case), pos_dtype=pos_dtype, cache_dtype=cache_dtype,
                                   device=DEVICE)
    q2, k2 = R.rope(pos, q, k, hd, cache, is_neox)
    r_q, r_k = rotary_embedding_native(pos, q, k, hd, cache, is_neox)
    assert torch.equal(q2, r_q) and torch.equal(k2, r_k)


@pytest.mark.parametrize("heads_per_block, num_warps", [(1, 1), (2, 2), (None, None)])
def test_rotary_kernel_head_blocks_change_no_bit(heads_per_block, num_warps):
    # Heads walked in blocks smaller than the head count (a loop), masked last block.
    R = _kernel()
    pos, q, k, hd, cache = _inputs((5, 5, 3, 64, 48), torch.bfloat16, seed=16, device=DEVICE)
    q2, k2 = R.rope(pos, q, k, hd, cache, True, heads_per_block=heads_per_block, num_warps=num_warps)
    r_q, r_k = rotary_embedding_native(pos, q, k, hd, cache, True)
    assert torch.equal(q2, r_q) and torch.equal(k2, r_k)


def test_rotary_kernel_token_strided_inputs():
    R = _kernel()
    tokens, hq, hk, hd = 7, 4, 2, 64
    pos, q, k, _, cache = _inputs((tokens, hq, hk, hd, 64), torch.bfloat16, seed=17, device=DEVICE)
    qkv = torch.cat((q, k, k), dim=-1)
    qs, ks = qkv[:, : hq * hd], qkv[:, hq * hd : (hq + hk) * hd]
    q2, k2 = R.rope(pos, qs, ks, hd, cache, False)
    r_q, r_k = rotary_embedding_native(pos, q, k, hd, cache, False)
    assert torch.equal(q2, r_q) and torch.equal(k2, r_k)
    q3, _ = R.rope(pos, q.reshape(tokens, hq, hd), k, hd, cache, False)
    assert q3.shape == (tokens, hq, hd) and torch.equal(q3.reshape(r_q.shape), r_q)


def test_rotary_kernel_zero_tokens():
    R = _kernel()
    pos, q, k, hd, cache = _inputs((0, 2, 1, 16, 16), torch.bfloat16, seed=18, device=DEVICE)
    q2, k2 = R.rope(pos, q, k, hd, cache, True)
    assert q2.shape == (0, 32) and k2.shape == (0, 16)


def test_rotary_kernel_out_of_range_position_gives_nan_not_a_stray_read():
    R = _kernel()
    pos, q, k, hd, cache = _inputs((4, 2, 1, 32, 16), torch.float32, seed=19, max_pos=64, device=DEVICE)
    pos[1], pos[2] = 64, -1
    q2, k2 = R.rope(pos, q, k, hd, cache, True)
    ok = torch.tensor([0, 3])
    r_q, _ = rotary_embedding_native(pos[ok], q[ok], k[ok], hd, cache, True)
    assert torch.equal(q2[ok], r_q)
    for t in (1, 2):
        heads, heads_in = q2[t].reshape(2, hd), q[t].reshape(2, hd)
        assert bool(heads[:, :16].isnan().all()) and torch.equal(heads[:, 16:], heads_in[:, 16:])
        assert bool(k2[t].reshape(1, hd)[:, :16].isnan().all())


def _identity_cache(max_pos, rot, dtype, device):
    """cos = 1, sin = 0 at every position: the rotation leaves its input unchanged."""
    return torch.cat((torch.ones(max_pos, rot // 2), torch.zeros(max_pos, rot // 2)), -1).to(dtype).to(device)


@pytest.mark.parametrize("case, dtype, is_neox, gemma", [(v0,) + (v1,) + (v2,) + (v3,) for v0, v1, v2, v3 in covering(
    KERNEL_CASES,
    DTYPES,
    [True, False],
    [False, True],
)])
def test_qk_norm_rope_kernel(case, dtype, is_neox, gemma):
    R = _kernel()
    pos, q, k, hd, cache = _inputs(case, dtype, seed=5 * sum(case), device=DEVICE)
    wdt = torch.float32 if gemma else dtype
    qw, kw = head_weight(hd, wdt, 21, gemma, DEVICE), head_weight(hd, wdt, 22, gemma, DEVICE)
    norm = R.NORM_GEMMA if gemma else R.NORM_RMS
    norm_native = gemma_rms_norm_native if gemma else rms_norm_native
    kw_args = dict(norm=norm, q_weight=qw, k_weight=kw, eps=EPS)
    # The kernel's own normalized heads (an identity rotation)...
    n_q, n_k = R.rope(pos, q, k, hd, _identity_cache(4096, cache.shape[1], torch.float32, DEVICE), is_neox, **kw_args)
    for n, x, w in ((n_q, q, qw), (n_k, k, kw)):
        # ... are the per-head norm within the RMSNorm kernel's tolerance: another order of
        # the sum of squares moves rstd by an ulp or so, which the Llama form's two roundings
        # can make two steps of a 16-bit output (rarely); an fp32 output shows every fp32 ulp
        # of it (a few, on most elements of a head whose rstd moved) ...
        ok, frac = _within_ulps(n, _per_head(norm_native, x, w, EPS, hd), 2 if dtype != torch.float32 else 8)
        assert ok and (frac < 0.02 or dtype == torch.float32), f"{frac:.3%} of elements differ"
    # ... and the fused kernel's output is the native rotation of exactly those, bit for bit.
    q2, k2 = R.rope(pos, q, k, hd, cache, is_neox, **kw_args)
    r_q, r_k = rotary_embedding_native(pos, n_q, n_k, hd, cache, is_neox)
    assert torch.equal(q2, r_q) and torch.equal(k2, r_k)


# --------------------------------------------------------------------------- fake impls, opcheck


def _op_cases():
    pos, q, k, hd, cache = _inputs((7, 5, 1, 128, 64), torch.bfloat16, seed=30)
    qw, kw = head_weight(hd, torch.bfloat16, 31), head_weight(hd, torch.bfloat16, 32)
    gq, gk = head_weight(hd, torch.float32, 33, True), head_weight(hd, torch.float32, 34, True)
    qkv = torch.cat((q, k, k), -1)
    return [
        ("rotary_embedding", (pos, q, k, hd, cache, True)),
        ("rotary_embedding", (pos.int(), q.reshape(7, 5, hd), k, hd, cache.bfloat16(), False)),
        ("rotary_embedding", (pos, qkv[:, : 5 * hd], qkv[:, 5 * hd : 6 * hd], hd, cache, True)),
        ("qk_norm_rope", (pos, q, k, qw, kw, EPS, hd, cache, True)),
        ("qk_gemma_norm_rope", (pos, q.reshape(7, 5, hd), k.reshape(7, 1, hd), gq, gk, EPS, hd, cache, False)),
    ]


@pytest.mark.parametrize("case", range(len(_op_cases())))
def test_fake_impl_matches_real(case):
    name, args = _op_cases()[case]
    op = getattr(fx, name)
    real = op(*args)
    with FakeTensorMode() as mode:
        fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    assert len(fake) == len(real) == 2
    for f, r in zip(fake, real):
        assert (f.shape, f.dtype, f.device, f.stride()) == (r.shape, r.dtype, r.device, r.stride()), name


@pytest.mark.parametrize("case", [0, 1, 3, 4])
def test_opcheck(case):
    name, args = _op_cases()[case]
    torch.library.opcheck(getattr(fx, name).default, args)


def test_symbolic_trace():
    from torch.fx.experimental.proxy_tensor import make_fx

    _, (pos, q, k, qw, kw, eps, hd, cache, neox) = _op_cases()[3]
    tensors = (pos, q, k, qw, kw, cache)

    def fn(p, a, b, wq, wk, c):
        return fx.qk_norm_rope(p, a, b, wq, wk, eps, hd, c, neox)

    gm = make_fx(fn, tracing_mode="symbolic")(*tensors)
    assert any(n.target == fx.qk_norm_rope.default for n in gm.graph.nodes)
    for a, b in zip(gm(*tensors), fn(*tensors)):
        assert torch.equal(a, b)


@pytest.mark.compile
def test_torch_compile_with_dynamic_tokens_on_packed_qkv_slices():
    # The op in a compiled graph: opaque, fed the slices of the packed projection as they
    # are, one graph for every token count.
    hq, hk, hd = 4, 2, 64
    cache = rotary_cos_sin_cache(256, hd)
    qw, kw = head_weight(hd, torch.bfloat16, 60), head_weight(hd, torch.bfloat16, 61)

    def attention_prologue(qkv, pos):
        q, k = qkv[:, : hq * hd], qkv[:, hq * hd : (hq + hk) * hd]
        return fx.qk_norm_rope(pos, q, k, qw, kw, EPS, hd, cache, True)

    torch._dynamo.reset()
    compiled = torch.compile(attention_prologue, fullgraph=True, dynamic=True)
    for tokens in (3, 9):
        qkv = randn((tokens, (hq + 2 * hk) * hd), torch.bfloat16, tokens)
        pos = positions(tokens, 256, torch.int64, tokens)
        for a, b in zip(compiled(qkv, pos), attention_prologue(qkv, pos)):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------- validation


_P, _Q, _K, _HD, _C = _inputs((7, 4, 2, 64, 64), torch.bfloat16, seed=40, max_pos=128)
_QW, _KW = head_weight(64, torch.bfloat16, 41), head_weight(64, torch.bfloat16, 42)


def _rope(**kw):
    args = dict(positions=_P, query=_Q, key=_K, head_size=_HD, cos_sin_cache=_C, is_neox=True) | kw
    return "rotary_embedding", lambda: fx.rotary_embedding(*args.values())


def _qk(op="qk_norm_rope", **kw):
    args = dict(positions=_P, query=_Q, key=_K, q_weight=_QW, k_weight=_KW, eps=EPS, head_size=_HD,
                cos_sin_cache=_C, is_neox=True) | kw
    return op, lambda: getattr(fx, op)(*args.values())


# id: ((op name, call), what the message must say after "fxfuse.<op>: ")
BAD_CASES = {
    "positions-float": (_rope(positions=_P.float()), r"`positions` must have dtype torch.int64 or torch.int32"),
    "positions-2d": (_rope(positions=_P.reshape(7, 1)), r"`positions` must be 1-D"),
    "tokens-mismatch": (_rope(positions=_P[:6]), r"`query` must be .*tokens = 6"),
    "head_size-not-dividing": (_rope(head_size=48, cos_sin_cache=_C[:, :48].contiguous()),
                               r"`query` must hold whole heads of `head_size` 48"),
    "3d-last-dim": (_rope(query=_Q.reshape(7, 8, 32)), r"`query` must hold whole heads of `head_size` 64"),
    "rows-not-dense": (_rope(query=_Q.reshape(7, 64, 4).transpose(1, 2)),
                       r"each token's features in `query` must be contiguous"),
    "last-dim-strided": (_rope(key=torch.cat((_K, _K), -1)[:, ::2]), r"each token's features in `key`"),
    "key-dtype": (_rope(key=_K.half()), r"`key` must have dtype torch.bfloat16"),
    "query-int": (_rope(query=_Q.int()), r"`query` must have dtype in"),
    "cache-dtype": (_rope(cos_sin_cache=_C.half()), r"`cos_sin_cache` must have dtype torch.float32 or torch.bfloat16"),
    "cache-1d": (_rope(cos_sin_cache=_C[0]), r"`cos_sin_cache` must be \[max_position, rotary_dim\]"),
    "rotary-odd": (_rope(cos_sin_cache=_C[:, :7].contiguous()), r"the rotary dim .*, 7\) must be even"),
    "rotary-too-wide": (_rope(cos_sin_cache=torch.cat((_C, _C), -1)),
                        r"the rotary dim .*128\) must be even and between 2 and `head_size` \(64\)"),
    "cache-noncontig": (_rope(cos_sin_cache=torch.cat((_C, _C), -1)[:, ::2]), r"`cos_sin_cache` must be contiguous"),
    "head_size-zero": (_rope(head_size=0), r"`head_size` must be at least 2"),
    "qk-weight-dtype": (_qk(q_weight=_QW.float()), r"`q_weight` must have dtype torch.bfloat16 \("),
    "qk-weight-shape": (_qk(k_weight=_KW[:32]), r"`k_weight` must have shape \[64\]"),
    "qk-eps": (_qk(eps=-1.0), r"`eps` must be >= 0"),
    "qk-gemma-weight-dtype": (_qk("qk_gemma_norm_rope", q_weight=_QW.half()),
                              r"`q_weight` must have dtype torch.bfloat16 or torch.float32"),
    "qk-gemma-positions": (_qk("qk_gemma_norm_rope", positions=_P.short()), r"`positions` must have dtype"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_validation_eager(case):
    (op, fn), what = BAD_CASES[case]
    with pytest.raises(ValueError, match=rf"^fxfuse\.{op}: {what}"):
        fn()


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_validation_under_fake_mode(case):
    # The same checks run in the fake impl: bad input fails at trace/compile time.
    (op, fn), what = BAD_CASES[case]
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(ValueError, match=rf"^fxfuse\.{op}: {what}"):
            fn()


def test_validators_raise_type_errors():
    from fxfuse.ops.rotary import validate_rotary_embedding

    with pytest.raises(TypeError, match=r"fxfuse\.rotary_embedding: `is_neox` must be a bool"):
        validate_rotary_embedding(_P, _Q, _K, _HD, _C, 1)
    with pytest.raises(TypeError, match=r"fxfuse\.rotary_embedding: `head_size` must be an int"):
        validate_rotary_embedding(_P, _Q, _K, 64.0, _C, True)
    with pytest.raises(TypeError, match=r"fxfuse\.rotary_embedding: `query` must be a torch.Tensor"):
        validate_rotary_embedding(_P, None, _K, _HD, _C, True)


@pytest.mark.parametrize("bad", [128, 500, -1])
@pytest.mark.parametrize("op", ["rotary_embedding", "qk_norm_rope", "qk_gemma_norm_rope"])
def test_positions_out_of_the_cache_are_an_error(bad, op):
    pos = _P.clone()
    pos[3] = bad
    _, fn = _rope(positions=pos) if op == "rotary_embedding" else _qk(op, positions=pos)
    with pytest.raises(ValueError, match=rf"fxfuse\.{op}: `positions` must be in \[0, 128\).*got {bad} at index 3"):
        fn()
    # Fake tensors have no values: tracing cannot check them (the real call does).
    with FakeTensorMode(allow_non_fake_inputs=True):
        fn()


def test_valid_inputs_pass_validation():
    # The bad cases above differ from these calls in one argument only.
    for _, fn in (_rope(), _qk(), _qk("qk_gemma_norm_rope"),
                  _qk("qk_gemma_norm_rope", q_weight=_QW.float(), k_weight=_KW.float())):
        fn()


# --------------------------------------------------------------------------- GPU: the ops dispatch to the kernel


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 32, 8, 128, 128), (16, 32, 8, 128, 128), (4096, 32, 8, 128, 128),
                                   (37, 16, 8, 256, 256), (300, 32, 16, 128, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ops_on_cuda_run_the_kernel(shape, dtype, monkeypatch):
    from fxfuse.ops._dispatch import use_kernels

    pos, q, k, hd, cache = _inputs(shape, dtype, seed=50, device="cuda")
    assert use_kernels(q)
    qw, kw = head_weight(hd, dtype, 51, device="cuda"), head_weight(hd, dtype, 52, device="cuda")
    got_rope = fx.rotary_embedding(pos, q, k, hd, cache, True)
    got_qk = fx.qk_norm_rope(pos, q, k, qw, kw, EPS, hd, cache, True)
    monkeypatch.setenv("FXFUSE_KERNELS", "0")
    for a, b in zip(got_rope, fx.rotary_embedding(pos, q, k, hd, cache, True)):
        assert torch.equal(a, b)
    for a, b in zip(got_qk, fx.qk_norm_rope(pos, q, k, qw, kw, EPS, hd, cache, True)):
        # torch's CUDA rsqrt is not correctly rounded; the kernel's 1 / sqrt_rn is: rare
        # one-ulp differences in a head's rstd, up to two steps of the normalized values
        # after the norm's two roundings. The rotation adds two such values: where they
        # cancel (an output near 0) the steps are the inputs', not the output's (the H100
        # run of 2026-12-07 found one element of 37 heads x 256 four output-ulps off).
        ok, frac = _within_ulps_of_head(a, b, 3, hd)
        assert ok and frac < 0.02, f"{frac:.3%} of elements differ"


# --------------------------------------------------------------------------- the kernel, compiled for the H100

_COMPILE_FOR_SM90 = """
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fxfuse.kernels import rotary as R

kernel = R._rope_kernel
names = list(kernel.arg_names)
out = {}
# (name, NORM, NEOX, HBQ, HBK, HALF, PASS, rot_half): Qwen3-8B's heads; 64-of-128 partial rotary
for name, norm, neox, hbq, hbk, half, pas, rot_half in [
        ("rope neox", R.NORM_NONE, True, 32, 8, 64, 0, 64), ("qk-norm neox", R.NORM_RMS, True, 32, 8, 64, 0, 64),
        ("gemma neox", R.NORM_GEMMA, True, 32, 16, 64, 0, 64), ("rope gptj", R.NORM_NONE, False, 32, 8, 64, 0, 64),
        ("qk-norm gptj partial", R.NORM_RMS, False, 32, 8, 32, 64, 32),
        ("rope neox partial", R.NORM_NONE, True, 32, 8, 32, 64, 32)]:
    sig = dict(pos_ptr="*i64", cache_ptr="*fp32", q_ptr="*bf16", k_ptr="*bf16",
               qw_ptr="*fp32" if norm == R.NORM_GEMMA else "*bf16", kw_ptr="*fp32" if norm == R.NORM_GEMMA else "*bf16",
               q_out_ptr="*bf16", k_out_ptr="*bf16", eps="fp32")
    sig.update(dict.fromkeys(["q_stride", "k_stride", "n_q_heads", "n_k_heads", "head_size", "rot_half", "max_pos"], "i32"))
    const = dict(NORM=norm, NEOX=neox, HBQ=hbq, HBK=hbk, HALF=half, PASS=pas, EXACT_CASTS=False)
    sig.update(dict.fromkeys(const, "constexpr"))
    # What the launcher specializes for these shapes: every pointer and size a multiple of 16.
    aligned = [n for n in names if n not in const and n != "eps"]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(kernel, sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "enable_fp_fusion": False})
    ptx = compiled.asm["ptx"]
    out[name] = dict(fma=len(re.findall(r"\\bfma\\.rn\\.f32", ptx)), ld_v4=len(re.findall(r"ld\\.global\\.v4", ptx)),
                     ld_b16=len(re.findall(r"ld\\.global\\.b16", ptx)), shared=compiled.metadata.shared)
json.dump(out, sys.stdout)
"""


def test_kernel_compiles_for_sm90_without_fma_and_with_vector_loads(tmp_path):
    """No GPU here, but Triton compiles to PTX for the H100 without one: every variant
    compiles; no fused multiply-add anywhere (the rotation's bit-exactness on the GPU rests
    on it: enable_fp_fusion=False); q and k are read in 128-bit vectors, with no shared
    memory, in both styles (GPT-J's pairs split in registers, not stride-2 scalar loads)."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a real compile, not the interpreter
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads(done.stdout)
    assert len(stats) == 6
    for name, s in stats.items():
        assert s["fma"] == 0, name
        assert s["ld_v4"] >= 4, (name, s)
        assert s["shared"] == 0, (name, s)
    for name in ("rope neox", "qk-norm neox", "gemma neox", "rope gptj", "rope neox partial"):
        assert stats[name]["ld_b16"] == 0, (name, stats[name])  # the GPT-J norm's weight pairs are scalar loads
