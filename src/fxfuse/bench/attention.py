"""Attention benchmark: fxfuse's paged Triton kernel vs SDPA, decode bandwidth, fused FP8.

- prefill: causal TFLOP/s of the paged kernel and of ``scaled_dot_product_attention``
  (PyTorch's fastest available backend, contiguous K/V) on the same shapes;
- decode: the kernel's share of copy bandwidth on its KV reads;
- fused epilogue: attention writing FP8 (or NVFP4) itself vs attention then a separate quant,
  and (FP8, on CUDA) vs SDPA followed by Inductor's quant (``torch.compile`` of both).

Pages hold ``block`` slots: by default the size the triton backend prefers on the GPU (64
on Hopper: TMA bulk copies), with the prefill rows repeated at 16-slot pages (``kv_block``
in every row).

Every time is taken with a cold L2, as the op benchmarks' are: where one call's inputs
(Q, K and V) are smaller than twice the L2, the CUDA graph's calls rotate through input
copies (`cold_copies`; ``cold_by: "copies"`` in the JSON, the one-set time under
``warm``); where they already exceed it (every decode shape: ~1 GB of KV; the largest
prefill), one call evicts its own inputs before the next reads them, so one set is
replayed (``cold_by: "size"``, no ``warm``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..attention import TritonAttentionBackend
from ..kernels import attention as K
from ..kernels import quant as Q
from .timing import cold_copies, graph_us, l2_bytes

HQ, HKV, D, BLOCK = 32, 8, 128, 16
DEVICE = "cuda"  # a module global so a CPU test can run the code paths at tiny shapes
PREFILL = ((1, 4096), (4, 2048))  # (sequences, tokens each)
DECODE = ((64, 4096), (256, 1024))  # (sequences, context each)


def _paged(seqs: int, ctx: int, new: int, block: int = BLOCK, dtype=torch.bfloat16):
    """A paged cache holding ``ctx`` positions of each sequence (new tokens included),
    blocks shuffled, and the metadata tensors for ``new`` new tokens per sequence."""
    blocks_per = -(-ctx // block)
    n_blocks = seqs * blocks_per
    kc = torch.randn(n_blocks, block, HKV, D, device=DEVICE, dtype=dtype)
    vc = torch.randn_like(kc)
    table = torch.randperm(n_blocks, device=DEVICE, dtype=torch.int64).to(torch.int32).view(seqs, blocks_per)
    seq_lens = torch.full((seqs,), ctx, device=DEVICE, dtype=torch.int32)
    qsl = torch.arange(0, (seqs + 1) * new, new, device=DEVICE, dtype=torch.int32)
    q = torch.randn(seqs * new, HQ, D, device=DEVICE, dtype=dtype)
    return q, kc, vc, table, seq_lens, qsl


def _qkv_bytes(seqs: int, new: int, ctx: int, block: int = BLOCK) -> int:
    """Bytes of one bf16 set's Q (``new`` tokens a sequence) and paged K and V (``ctx``)."""
    return 2 * seqs * (new * HQ * D + 2 * -(-ctx // block) * block * HKV * D)


def _sets(make: Callable[[], dict], nbytes: int) -> tuple[list[dict], str]:
    """Input sets for a cold-L2 timing and how it is cold: ``"size"`` (one set: its
    ``nbytes`` already exceed twice the L2) or ``"copies"`` (rotated, `cold_copies`)."""
    if nbytes >= 2 * l2_bytes():
        return [make()], "size"
    return cold_copies(make, nbytes), "copies"


def _timed(sets: list[dict], call: Callable[[dict], object]) -> tuple[float, float | None]:
    """(cold, warm) microseconds of ``call`` over ``sets``; warm is None when one set is
    already cold by its size."""
    cold = graph_us([lambda s=s: call(s) for s in sets])
    return cold, (graph_us(lambda: call(sets[0])) if len(sets) > 1 else None)


def _paged_set(seqs: int, n: int, new: int, block: int = BLOCK) -> dict:
    q, kc, vc, table, seq_lens, qsl = _paged(seqs, n, new, block)
    return dict(q=q, kc=kc, vc=vc, table=table, seq_lens=seq_lens, qsl=qsl, out=torch.empty_like(q))


def _attend(s: dict, max_q: int, max_s: int, out=None, mode=K.OUT_NONE, scale=None, bs=None):
    return K.paged_attention(s["q"], s["kc"], s["vc"], s["table"], s["seq_lens"], s["qsl"], max_q, max_s,
                             D ** -0.5, s["out"] if out is None else out, mode, scale, bs)


def _sdpa_set(seqs: int, n: int) -> dict:
    """Contiguous ``[B, H, S, D]`` Q/K/V for SDPA, new values per set (as each paged set's)."""
    rnd = lambda h: torch.randn(seqs, h, n, D, device=DEVICE, dtype=torch.bfloat16)  # noqa: E731
    return dict(q=rnd(HQ), k=rnd(HKV), v=rnd(HKV))


def _sdpa(s: dict):
    return F.scaled_dot_product_attention(s["q"], s["k"], s["v"], is_causal=True, enable_gqa=True)


def _max_diff_vs_sdpa(s: dict, seqs: int, n: int) -> float:
    """The paged kernel's output against SDPA on the same values (K/V gathered, not timed)."""
    kk = s["kc"][s["table"].long()].reshape(seqs, -1, HKV, D)[:, :n].transpose(1, 2).contiguous()
    vv = s["vc"][s["table"].long()].reshape(seqs, -1, HKV, D)[:, :n].transpose(1, 2).contiguous()
    qq = s["q"].view(seqs, n, HQ, D).transpose(1, 2).contiguous()
    ref = _sdpa(dict(q=qq, k=kk, v=vv))
    _attend(s, n, n)  # writes s["out"]
    out = s["out"]
    return (ref.transpose(1, 2).reshape_as(out).float() - out.float()).abs().max().item()


def _prefill(seqs: int, n: int, log, block: int = BLOCK, epilogues: bool = True) -> tuple[dict, list[dict]]:
    sets, cold_by = _sets(lambda: _paged_set(seqs, n, n, block), _qkv_bytes(seqs, n, n, block))
    t_ours, w_ours = _timed(sets, lambda s: _attend(s, n, n))
    sdpa_sets = [_sdpa_set(seqs, n) for _ in sets]  # the same bytes: the same number of copies
    t_sdpa, w_sdpa = _timed(sdpa_sets, _sdpa)
    del sdpa_sets
    err = _max_diff_vs_sdpa(sets[0], seqs, n)
    flops = 4 * seqs * HQ * D * n * (n + 1) / 2  # causal: QK^T and PV over the lower triangle
    row = dict(seqs=seqs, tokens=n, fxfuse_us=t_ours, sdpa_us=t_sdpa, fxfuse_tflops=flops / t_ours / 1e6,
               sdpa_tflops=flops / t_sdpa / 1e6, ratio_to_sdpa=t_sdpa / t_ours, max_abs_diff_vs_sdpa=err,
               cold_by=cold_by, cold_copies=len(sets), kv_block=block)
    if w_ours is not None:
        row["warm"] = dict(fxfuse_us=w_ours, sdpa_us=w_sdpa)
    log(f"  prefill {seqs}x{n} (KV block {block}): fxfuse {t_ours:8.1f} us {row['fxfuse_tflops']:6.1f} TFLOP/s | sdpa {t_sdpa:8.1f} us "
        f"{row['sdpa_tflops']:6.1f} TFLOP/s | {100 * row['ratio_to_sdpa']:.0f}% of SDPA | max diff {err:.3g} "
        f"(cold L2 by {cold_by}{f', warm fxfuse {w_ours:.1f}' if w_ours is not None else ''})")
    if not epilogues:
        return row, []
    fused_rows = [_fused_quant(sets, cold_by, seqs, n, mode, label, log)
                  for mode, label in ((K.OUT_FP8, "fp8"), (K.OUT_NVFP4, "nvfp4"))]
    if DEVICE == "cuda":  # the engine's alternative: SDPA, then Inductor's code for the quant
        fp8 = fused_rows[0]
        fp8["sdpa_inductor_us"] = _sdpa_then_inductor_fp8(len(sets), seqs, n)
        fp8["fused_over_sdpa_inductor"] = fp8["fused_us"] / fp8["sdpa_inductor_us"]
        log(f"    sdpa + inductor fp8: {fused_rows[0]['sdpa_inductor_us']:8.1f} us -> fused / that "
            f"{fused_rows[0]['fused_over_sdpa_inductor']:.3f}x")
    return row, fused_rows


def _sdpa_then_inductor_fp8(copies: int, seqs: int, n: int) -> float:
    """``torch.compile`` of SDPA + static FP8 quant of its ``[T, Hq * D]`` output, cold L2
    over as many input copies as the paged timing used."""
    scale = torch.tensor([0.02], device=DEVICE)

    def attend_then_quant(q, k, v):
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        o = o.transpose(1, 2).reshape(seqs * n, HQ * D)
        return (o.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)

    compiled = torch.compile(attend_then_quant)
    sets = [_sdpa_set(seqs, n) for _ in range(copies)]
    compiled(sets[0]["q"], sets[0]["k"], sets[0]["v"])
    return graph_us([lambda s=s: compiled(s["q"], s["k"], s["v"]) for s in sets])


def _fused_quant(sets: list[dict], cold_by: str, seqs: int, n: int, mode: int, label: str, log) -> dict:
    """Attention writing ``label`` itself vs attention then the separate quant, on the same
    (rotated) input sets; each set gets its own output buffers."""
    s = torch.tensor([0.02 if mode == K.OUT_FP8 else 100.0], device=DEVICE)
    for st in sets:
        if mode == K.OUT_FP8:
            st["qout"], st["bs"] = torch.empty(st["q"].shape, dtype=torch.float8_e4m3fn, device=DEVICE), None
        else:
            st["qout"], st["bs"] = Q.nvfp4_outputs(seqs * n, HQ * D, st["q"].device)
    quant = (lambda o: Q.static_fp8(o, s)) if mode == K.OUT_FP8 else (lambda o: Q.nvfp4(o, s))
    fused, fused_warm = _timed(sets, lambda st: _attend(st, n, n, st["qout"], mode, s, st["bs"]))
    sep, sep_warm = _timed(sets, lambda st: (_attend(st, n, n), quant(st["out"].view(seqs * n, HQ * D))))
    for st in sets:
        del st["qout"], st["bs"]
    row = dict(seqs=seqs, tokens=n, quant=label, fused_us=fused, separate_us=sep, fused_over_separate=fused / sep,
               cold_by=cold_by, cold_copies=len(sets))
    if fused_warm is not None:
        row["warm"] = dict(fused_us=fused_warm, separate_us=sep_warm)
    log(f"    + {label}: fused {fused:8.1f} us vs attention + quant {sep:8.1f} us -> {fused / sep:.3f}x")
    return row


def _decode(seqs: int, ctx: int, bandwidth: float, log, block: int = BLOCK) -> dict:
    kv_bytes = 2 * seqs * ctx * HKV * D * 2  # bf16 K and V the step reads
    sets, cold_by = _sets(lambda: _paged_set(seqs, ctx, 1, block), _qkv_bytes(seqs, 1, ctx, block))
    t, warm = _timed(sets, lambda s: _attend(s, 1, ctx))
    floor = kv_bytes / bandwidth * 1e6
    splits = K.num_splits(seqs, HKV, 1, ctx, sets[0]["q"].device)
    row = dict(seqs=seqs, context=ctx, fxfuse_us=t, floor_us=floor, pct_bw=100 * floor / t, kv_bytes=kv_bytes,
               splits=splits, cold_by=cold_by, cold_copies=len(sets), kv_block=block)
    if warm is not None:
        row["warm"] = dict(fxfuse_us=warm)
    log(f"  decode {seqs}x{ctx}: {t:8.1f} us, floor {floor:8.1f} us -> {100 * floor / t:5.1f}% of copy bw "
        f"({splits} split(s); cold L2 by {cold_by})")
    return row


def preferred_block() -> int:
    """The KV block size the triton backend prefers on this device (16 where it has none)."""
    return TritonAttentionBackend().preferred_block_size(torch.device(DEVICE)) or BLOCK


def run(bandwidth: float, log=print, block: int | None = None) -> dict:
    """Prefill, decode and fused-epilogue rows, every time at a cold L2 (see the module doc)."""
    block = block or preferred_block()
    res = {"prefill": [], "decode": [], "fused_quant": [], "kv_block": block}
    for seqs, n in PREFILL:
        row, fused_rows = _prefill(seqs, n, log, block)
        res["prefill"].append(row)
        res["fused_quant"] += fused_rows
        if block != BLOCK:
            res["prefill"].append(_prefill(seqs, n, log, BLOCK, epilogues=False)[0])
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    for seqs, ctx in DECODE:
        res["decode"].append(_decode(seqs, ctx, bandwidth, log, block))
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return res
