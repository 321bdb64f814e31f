"""End to end: one decode step and one prefill of the reference model at Llama-3-8B layer
shapes (all 32 layers by default), compiled with and without ``default_passes()``, timed
as CUDA-graph replays.

Both variants run on the triton attention backend and fxfuse's kernels; the only
difference is the fusion passes (and native lowering), which is what this measures. One
model per quant scheme (``"fp8"``: static per-tensor FP8; ``"fp8-block"``: block-scaled
FP8, groups of 128).
"""

from __future__ import annotations

import torch

import fxfuse

from ..attention import AttentionMetadata, ForwardContext, KVCache, TritonAttentionBackend, set_forward_context
from .timing import graph_us
DECODE = ((1, 1024), (32, 1024), (256, 1024))  # (sequences, context incl. the new token)
PREFILL = ((1, 2048), (32, 256), (256, 32))  # (sequences, prompt tokens each)


def block_size() -> int:
    """The KV block size the triton backend prefers on this GPU (what ModelRunner takes)."""
    return TritonAttentionBackend().preferred_block_size(torch.device("cuda")) or 16


def _batch(cfg, seqs: int, new: int, total: int, block: int):
    per = -(-total // block)
    table = torch.arange(seqs * per, dtype=torch.int32).view(seqs, per)
    meta = AttentionMetadata.from_lens([new] * seqs, [total] * seqs, table, block, device="cuda")
    positions = torch.arange(total - new, total, device="cuda").repeat(seqs)
    ids = torch.randint(cfg.vocab_size, (seqs * new,), device="cuda")
    return meta, ids, positions, per * seqs


#: Llama-3-8B's depth: a model of fewer layers overstates the fixed costs outside the layers
#: (embedding, head, sampling) against the per-layer fusions.
LAYERS = 32


def run(layers: int = LAYERS, quants: tuple[str, ...] = ("fp8", "fp8-block"), log=print) -> list[dict]:
    """Decode and prefill rows (``layers`` recorded in each) of one model per quant scheme."""
    rows = []
    for quant in quants:
        rows += _run_model(layers, quant, log)
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    return rows


def _run_model(layers: int, quant: str, log) -> list[dict]:
    from ..models import LlamaForCausalLM, ModelConfig

    cfg = ModelConfig.preset("llama3-8b", quant=quant, num_layers=layers)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg, device="cuda", attention_backend="triton")
    variants = {
        "unfused": torch.compile(model, fullgraph=True),
        "fused": fxfuse.compile(model, passes=fxfuse.PassManager(fxfuse.default_passes()), fullgraph=True),
    }
    rows = []
    block = block_size()
    for phase, shapes in (("decode", [(b, 1, c) for b, c in DECODE]), ("prefill", [(b, n, n) for b, n in PREFILL])):
        for seqs, new, total in shapes:
            meta, ids, positions, n_blocks = _batch(cfg, seqs, new, total, block)
            caches = {name: KVCache.allocate(n_blocks, block, cfg.num_kv_heads, cfg.head_dim, cfg.dtype, "cuda")
                      for name in model.attention_layer_names}
            for c in caches.values():
                c.key_cache.normal_()
                c.value_cache.normal_()
            if ids.shape[0] > 1:
                torch._dynamo.mark_dynamic(ids, 0)
                torch._dynamo.mark_dynamic(positions, 0)
            times = {}
            with set_forward_context(ForwardContext(meta, caches)):
                for name, fwd in variants.items():
                    fwd(ids, positions)  # compile (once per variant and T == 1 / T > 1) and validate metadata
                    times[name] = graph_us(lambda: fwd(ids, positions), warmup=2)
            row = dict(quant=quant, phase=phase, seqs=seqs, new_tokens=new, context=total, layers=layers, kv_block=block,
                       unfused_us=times["unfused"], fused_us=times["fused"],
                       speedup=times["unfused"] / times["fused"])
            rows.append(row)
            log(f"  {quant:9s} {phase:7s} {seqs:3d} seq x {new:4d} new (ctx {total:4d}): unfused {times['unfused']:9.1f} us  "
                f"fused {times['fused']:9.1f} us  -> {100 * (row['speedup'] - 1):+.1f}%")
            del caches
    model.close()
    return rows
