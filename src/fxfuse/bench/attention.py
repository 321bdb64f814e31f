"""Attention benchmark: fxfuse's paged Triton kernel vs SDPA, decode bandwidth, fused FP8.

- prefill: causal TFLOP/s of the paged kernel and of ``scaled_dot_product_attention``
  (PyTorch's fastest available backend, contiguous K/V) on the same shapes;
- decode: the kernel's share of copy bandwidth on its KV reads;
- fused epilogue: attention writing FP8 (or NVFP4) itself vs attention then a separate quant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import attention as K
from ..kernels import quant as Q
from .timing import graph_us

HQ, HKV, D, BLOCK = 32, 8, 128, 16
PREFILL = ((1, 4096), (4, 2048))  # (sequences, tokens each)
DECODE = ((64, 4096), (256, 1024))  # (sequences, context each)


def _paged(seqs: int, ctx: int, new: int, dtype=torch.bfloat16):
    """A paged cache holding ``ctx`` positions of each sequence (new tokens included),
    blocks shuffled, and the metadata tensors for ``new`` new tokens per sequence."""
    blocks_per = -(-ctx // BLOCK)
    n_blocks = seqs * blocks_per
    kc = torch.randn(n_blocks, BLOCK, HKV, D, device="cuda", dtype=dtype)
    vc = torch.randn_like(kc)
    table = torch.randperm(n_blocks, device="cuda", dtype=torch.int64).to(torch.int32).view(seqs, blocks_per)
    seq_lens = torch.full((seqs,), ctx, device="cuda", dtype=torch.int32)
    qsl = torch.arange(0, (seqs + 1) * new, new, device="cuda", dtype=torch.int32)
    q = torch.randn(seqs * new, HQ, D, device="cuda", dtype=dtype)
    return q, kc, vc, table, seq_lens, qsl


def _call(q, kc, vc, table, seq_lens, qsl, max_q, max_s, out, mode=K.OUT_NONE, scale=None, bs=None):
    return lambda: K.paged_attention(q, kc, vc, table, seq_lens, qsl, max_q, max_s, D ** -0.5, out, mode, scale, bs)


def run(bandwidth: float, log=print) -> dict:
    res = {"prefill": [], "decode": [], "fused_quant": []}
    for seqs, n in PREFILL:
        q, kc, vc, table, seq_lens, qsl = _paged(seqs, n, n)
        out = torch.empty_like(q)
        t_ours = graph_us(_call(q, kc, vc, table, seq_lens, qsl, n, n, out))
        # SDPA on contiguous [B, H, S, D] K/V (the same values, gathered once, not timed).
        kk = kc[table.long()].reshape(seqs, -1, HKV, D)[:, :n].transpose(1, 2).contiguous()
        vv = vc[table.long()].reshape(seqs, -1, HKV, D)[:, :n].transpose(1, 2).contiguous()
        qq = q.view(seqs, n, HQ, D).transpose(1, 2).contiguous()
        t_sdpa = graph_us(lambda: F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True))
        ref = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
        err = (ref.transpose(1, 2).reshape_as(out).float() - out.float()).abs().max().item()
        flops = 4 * seqs * HQ * D * n * (n + 1) / 2  # causal: QK^T and PV over the lower triangle
        row = dict(seqs=seqs, tokens=n, fxfuse_us=t_ours, sdpa_us=t_sdpa, fxfuse_tflops=flops / t_ours / 1e6,
                   sdpa_tflops=flops / t_sdpa / 1e6, ratio_to_sdpa=t_sdpa / t_ours, max_abs_diff_vs_sdpa=err)
        res["prefill"].append(row)
        log(f"  prefill {seqs}x{n}: fxfuse {t_ours:8.1f} us {row['fxfuse_tflops']:6.1f} TFLOP/s | sdpa {t_sdpa:8.1f} us "
            f"{row['sdpa_tflops']:6.1f} TFLOP/s | {100 * row['ratio_to_sdpa']:.0f}% of SDPA | max diff {err:.3g}")
        for mode, label in ((K.OUT_FP8, "fp8"), (K.OUT_NVFP4, "nvfp4")):
            s = torch.tensor([0.02 if mode == K.OUT_FP8 else 100.0], device="cuda")
            if mode == K.OUT_FP8:
                qout = torch.empty(q.shape, dtype=torch.float8_e4m3fn, device="cuda")
                fused = graph_us(_call(q, kc, vc, table, seq_lens, qsl, n, n, qout, mode, s))
                sep = graph_us(lambda: (_call(q, kc, vc, table, seq_lens, qsl, n, n, out)(),
                                        Q.static_fp8(out.view(seqs * n, HQ * D), s)))
            else:
                q4, bs = Q.nvfp4_outputs(seqs * n, HQ * D, q.device)
                fused = graph_us(_call(q, kc, vc, table, seq_lens, qsl, n, n, q4, mode, s, bs))
                sep = graph_us(lambda: (_call(q, kc, vc, table, seq_lens, qsl, n, n, out)(),
                                        Q.nvfp4(out.view(seqs * n, HQ * D), s)))
            res["fused_quant"].append(dict(seqs=seqs, tokens=n, quant=label, fused_us=fused, separate_us=sep,
                                           fused_over_separate=fused / sep))
            log(f"    + {label}: fused {fused:8.1f} us vs attention + quant {sep:8.1f} us -> {fused / sep:.3f}x")
        del kc, vc, kk, vv
    for seqs, ctx in DECODE:
        q, kc, vc, table, seq_lens, qsl = _paged(seqs, ctx, 1)
        out = torch.empty_like(q)
        t = graph_us(_call(q, kc, vc, table, seq_lens, qsl, 1, ctx, out))
        kv_bytes = 2 * seqs * ctx * HKV * D * kc.element_size()
        floor = kv_bytes / bandwidth * 1e6
        splits = K.num_splits(seqs, HKV, 1, ctx, q.device)
        res["decode"].append(dict(seqs=seqs, context=ctx, fxfuse_us=t, floor_us=floor, pct_bw=100 * floor / t,
                                  kv_bytes=kv_bytes, splits=splits))
        log(f"  decode {seqs}x{ctx}: {t:8.1f} us, floor {floor:8.1f} us -> {100 * floor / t:5.1f}% of copy bw "
            f"({splits} split(s))")
        del kc, vc
    return res
