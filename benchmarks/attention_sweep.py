"""Sweep the paged attention kernel on the H100: KV block size x TMA x tile config.

Usage: python benchmarks/attention_sweep.py [--json out.json] [--quick] [--cases 0,6,9]

Prefill (32 query / 8 KV heads, head size 128, bf16, causal, shuffled pages) at 1x4096
and 4x2048 for KV block sizes 16 (pointer gathers only: a 64-key tile spans 4 pages) and
64/128 (a key tile inside one page: TMA bulk copies possible), each with the tile
configs (BLOCK_M, BLOCK_N, warps, stages) worth trying; then the output epilogues (FP8,
NVFP4) of the best configs against the same attention followed by a separate quant and
against SDPA followed by Inductor's quant; then decode. Medians of CUDA-graph replays.
The winners go into ``fxfuse/kernels/attention.py:_config``.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

HQ, HKV, D = 32, 8, 128
PREFILL = ((1, 4096), (4, 2048))
DECODE = ((64, 4096), (256, 1024))

# (block size, tma, q_tma, (BLOCK_M, BLOCK_N, warps, stages)[, page_prefetch]); the first is
# the BS-16 default. page_prefetch (default False here) reads the block table one tile ahead
# of the bulk copies; 64-slot pages with (64, 64, 4, 3) and it are the kernel's default since the H200 sweep.
# Tried before and dropped: 8-warp 128x64 and 256-row tiles (60-65% of SDPA), warp
# specialization (no gain at 8 warps; Triton 3.6 fails to compile it at 4).
PREFILL_CASES = [
    (16, False, False, (128, 128, 8, 3)),
    (64, True, False, (128, 64, 4, 3)), (64, True, True, (128, 64, 4, 3)),
    (64, True, False, (64, 64, 4, 3)), (64, True, True, (64, 64, 4, 3)),
    (64, True, True, (128, 64, 4, 2)), (64, True, True, (64, 64, 4, 2)),
    (128, True, True, (128, 64, 4, 3)), (128, True, True, (128, 128, 8, 2)),
    (64, True, True, (64, 64, 4, 2), True), (64, True, True, (64, 64, 4, 3), True),
    (128, True, True, (64, 64, 4, 2), True), (128, True, True, (64, 128, 4, 2), False),
    (128, True, True, (64, 128, 4, 2), True), (128, True, True, (128, 128, 8, 2), True),
    (64, True, True, (64, 64, 4, 4), True), (128, True, True, (64, 64, 4, 3), True),
    (64, True, False, (64, 64, 4, 3), True), (64, True, True, (128, 64, 8, 3), True),
]
DECODE_CASES = [
    (16, False, False, (16, 64, 2, 3)), (64, True, False, (16, 64, 2, 3)), (128, True, False, (16, 64, 2, 3)),
]


def paged(seqs: int, ctx: int, new: int, bs: int, dtype=torch.bfloat16):
    """Cache of ``ctx`` positions per sequence in shuffled pages of ``bs`` slots, the
    slots past each sequence filled with NaN (stale values must not leak), metadata."""
    blocks_per = -(-ctx // bs)
    n_blocks = seqs * blocks_per
    kc = torch.randn(n_blocks, bs, HKV, D, device="cuda", dtype=dtype)
    vc = torch.randn_like(kc)
    table = torch.randperm(n_blocks, device="cuda", dtype=torch.int64).to(torch.int32).view(seqs, blocks_per)
    tail = blocks_per * bs - ctx
    if tail:
        last = table[:, -1].long()
        kc[last, bs - tail:] = float("nan")
        vc[last, bs - tail:] = float("nan")
    seq_lens = torch.full((seqs,), ctx, device="cuda", dtype=torch.int32)
    qsl = torch.arange(0, (seqs + 1) * new, new, device="cuda", dtype=torch.int32)
    q = torch.randn(seqs * new, HQ, D, device="cuda", dtype=dtype)
    return q, kc, vc, table, seq_lens, qsl


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="first prefill shape and 4 cases only")
    ap.add_argument("--cases", help="comma-separated indices into PREFILL_CASES to time (default: all)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("attention_sweep: needs a CUDA GPU; nothing measured")
        return 0
    from fxfuse.bench.timing import graph_us
    from fxfuse.kernels import attention as K
    from fxfuse.kernels import quant as Q

    res = {"device": torch.cuda.get_device_name(), "prefill": [], "epilogue": [], "decode": []}
    shapes = PREFILL[:1] if args.quick else PREFILL
    cases = PREFILL_CASES[:4] if args.quick else PREFILL_CASES
    if args.cases:
        cases = [PREFILL_CASES[int(i)] for i in args.cases.split(",")]

    def attn(q, kc, vc, table, seq_lens, qsl, max_q, max_s, out, bs_case, mode=K.OUT_NONE, scale=None, sf=None):
        _, tma, q_tma, cfg = bs_case[:4]
        prefetch = bs_case[4] if len(bs_case) > 4 else False
        return lambda: K.paged_attention(q, kc, vc, table, seq_lens, qsl, max_q, max_s, D ** -0.5, out, mode, scale,
                                         sf, config=cfg, tma=tma, q_tma=q_tma, page_prefetch=prefetch)

    for seqs, n in shapes:
        flops = 4 * seqs * HQ * D * n * (n + 1) / 2
        by_bs = {}
        ref = None
        for case in cases:
            bs = case[0]
            if bs not in by_bs:
                by_bs[bs] = paged(seqs, n, n, bs)
            q, kc, vc, table, seq_lens, qsl = by_bs[bs]
            if ref is None:
                # SDPA on contiguous K/V gathered from the first cache (not timed)
                kk = kc[table.long()].reshape(seqs, -1, HKV, D)[:, :n].transpose(1, 2).contiguous()
                vv = vc[table.long()].reshape(seqs, -1, HKV, D)[:, :n].transpose(1, 2).contiguous()
                qq = q.view(seqs, n, HQ, D).transpose(1, 2).contiguous()
                ref = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
                ref = ref.transpose(1, 2).reshape(seqs * n, HQ, D)
                t_sdpa = graph_us(lambda: F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True))
                s = torch.tensor([0.02], device="cuda")

                def sdpa_quant(qq, kk, vv, s):
                    o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
                    o = o.transpose(1, 2).reshape(seqs * n, HQ * D)
                    return (o.float() / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)

                compiled = torch.compile(sdpa_quant)
                compiled(qq, kk, vv, s)
                t_sdpa_q = graph_us(lambda: compiled(qq, kk, vv, s))
                res["sdpa"] = res.get("sdpa", []) + [dict(seqs=seqs, tokens=n, us=t_sdpa, tflops=flops / t_sdpa / 1e6,
                                                            with_inductor_fp8_us=t_sdpa_q)]
                print(f"{seqs}x{n} sdpa {t_sdpa:.1f} us {flops / t_sdpa / 1e6:.1f} TFLOP/s; "
                      f"sdpa + inductor fp8 {t_sdpa_q:.1f} us", flush=True)
            out = torch.empty_like(q)
            try:
                fn = attn(q, kc, vc, table, seq_lens, qsl, n, n, out, case)
                fn()
                torch.cuda.synchronize()
                us = graph_us(fn)
            except Exception as e:  # noqa: BLE001 - a config that does not compile or fit is reported
                print(f"{seqs}x{n} {case}: failed {type(e).__name__}: {str(e)[:160]}", flush=True)
                continue
            kk = kc[table.long()].reshape(seqs, -1, HKV, D)[:, :n].transpose(1, 2)
            vv = vc[table.long()].reshape(seqs, -1, HKV, D)[:, :n].transpose(1, 2)
            qq = q.view(seqs, n, HQ, D).transpose(1, 2)
            own_ref = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
            err = (own_ref.transpose(1, 2).reshape_as(out).float() - out.float()).abs().max().item()
            prefetch = case[4] if len(case) > 4 else False
            row = dict(seqs=seqs, tokens=n, block_size=bs, tma=case[1], q_tma=case[2], config=case[3],
                       page_prefetch=prefetch, us=us, tflops=flops / us / 1e6, pct_sdpa=100 * t_sdpa / us,
                       max_diff=err)
            res["prefill"].append(row)
            print(f"{seqs}x{n} bs{bs} tma={case[1]} q_tma={case[2]} prefetch={prefetch} {case[3]}: {us:8.1f} us "
                  f"{row['tflops']:6.1f} "
                  f"TFLOP/s {row['pct_sdpa']:5.1f}% of SDPA, max diff {err:.3g}", flush=True)
        # epilogues for the 3 best cases of this shape
        best = sorted((r for r in res["prefill"] if r["seqs"] == seqs), key=lambda r: r["us"])[:3]
        for r in best:
            case = (r["block_size"], r["tma"], r["q_tma"], r["config"], r["page_prefetch"])
            q, kc, vc, table, seq_lens, qsl = by_bs[r["block_size"]]
            out = torch.empty_like(q)
            s8 = torch.tensor([0.02], device="cuda")
            q8 = torch.empty(q.shape, dtype=torch.float8_e4m3fn, device="cuda")
            fused8 = graph_us(attn(q, kc, vc, table, seq_lens, qsl, n, n, q8, case, K.OUT_FP8, s8))
            plain = attn(q, kc, vc, table, seq_lens, qsl, n, n, out, case)
            sep8 = graph_us(lambda: (plain(), Q.static_fp8(out.view(seqs * n, HQ * D), s8)))
            s4 = torch.tensor([100.0], device="cuda")
            q4, sf = Q.nvfp4_outputs(seqs * n, HQ * D, q.device)
            fused4 = graph_us(attn(q, kc, vc, table, seq_lens, qsl, n, n, q4, case, K.OUT_NVFP4, s4, sf))
            sep4 = graph_us(lambda: (plain(), Q.nvfp4(out.view(seqs * n, HQ * D), s4)))
            sdpa_q = [x for x in res["sdpa"] if x["seqs"] == seqs][0]["with_inductor_fp8_us"]
            e = dict(seqs=seqs, tokens=n, case=str(case), plain_us=r["us"], fp8_us=fused8, fp8_separate_us=sep8,
                     nvfp4_us=fused4, nvfp4_separate_us=sep4, sdpa_inductor_fp8_us=sdpa_q)
            res["epilogue"].append(e)
            print(f"  epilogue {case}: plain {r['us']:.1f} | fp8 {fused8:.1f} vs sep {sep8:.1f} vs sdpa+inductor "
                  f"{sdpa_q:.1f} | nvfp4 {fused4:.1f} vs sep {sep4:.1f}", flush=True)
        del by_bs
        torch.cuda.empty_cache()

    if not args.quick:
        bw = None
        try:
            from fxfuse.bench.timing import copy_bandwidth
            bw = copy_bandwidth()
        except Exception:  # noqa: BLE001
            pass
        for seqs, ctx in DECODE:
            caches = {}
            for case in DECODE_CASES:
                bs = case[0]
                if bs not in caches:
                    caches[bs] = paged(seqs, ctx, 1, bs)
                q, kc, vc, table, seq_lens, qsl = caches[bs]
                out = torch.empty_like(q)
                try:
                    us = graph_us(attn(q, kc, vc, table, seq_lens, qsl, 1, ctx, out, case))
                except Exception as e:  # noqa: BLE001
                    print(f"decode {seqs}x{ctx} {case}: failed {type(e).__name__}: {str(e)[:160]}", flush=True)
                    continue
                kv_bytes = 2 * seqs * ctx * HKV * D * 2
                pct = 100 * kv_bytes / bw / (us * 1e-6) if bw else float("nan")
                res["decode"].append(dict(seqs=seqs, context=ctx, case=str(case), us=us, pct_bw=pct))
                print(f"decode {seqs}x{ctx} {case}: {us:8.1f} us {pct:5.1f}% of copy BW", flush=True)
            del caches
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
