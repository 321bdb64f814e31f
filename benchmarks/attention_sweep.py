"""Sweep the paged attention kernel's tile configs at the benchmark shapes (H100 tuning).

Usage: python benchmarks/attention_sweep.py
Prints, per shape, the median CUDA-graph time of each (BLOCK_M, BLOCK_N, warps, stages)
config; the best ones go into fxfuse/kernels/attention.py:_config.
"""

import torch

from fxfuse.bench.attention import DECODE, PREFILL, _paged, D
from fxfuse.bench.timing import graph_us
from fxfuse.kernels import attention as K

PREFILL_CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4),
                   (64, 128, 4, 2), (128, 128, 8, 3), (256, 64, 8, 2)]
DECODE_CONFIGS = [(16, 64, 4, 3), (16, 128, 4, 2), (16, 32, 4, 4), (16, 64, 2, 3), (16, 128, 8, 3), (16, 256, 4, 2)]


def main():
    for shapes, configs, decode in ((PREFILL, PREFILL_CONFIGS, False), (DECODE, DECODE_CONFIGS, True)):
        for seqs, n in shapes:
            q, kc, vc, table, seq_lens, qsl = _paged(seqs, n, 1 if decode else n)
            out = torch.empty_like(q)
            max_q = 1 if decode else n
            flops = 4 * seqs * 32 * D * n * (n + 1) / 2
            for cfg in configs:
                try:
                    us = graph_us(lambda: K.paged_attention(q, kc, vc, table, seq_lens, qsl, max_q, n, D ** -0.5, out,
                                                            config=cfg))
                except Exception as e:  # noqa: BLE001 - a config that does not fit is reported, not fatal
                    print(f"{'decode' if decode else 'prefill'} {seqs}x{n} {cfg}: failed {type(e).__name__}: {str(e)[:80]}")
                    continue
                extra = f"{2 * seqs * n * 8 * D * 2 / us / 1e3:7.0f} GB/s" if decode else f"{flops / us / 1e6:6.1f} TFLOP/s"
                print(f"{'decode' if decode else 'prefill'} {seqs}x{n} {cfg}: {us:8.1f} us {extra}", flush=True)


if __name__ == "__main__":
    main()
