"""End to end: decode steps and prefills of the reference models at real layer shapes
(Llama-3-8B, Qwen3-8B, Gemma-3-12B; 32 layers by default), compiled with and without
``default_passes()``, timed as CUDA-graph replays.

Both variants run on the triton attention backend and fxfuse's kernels; the only
difference is the fusion passes (and native lowering), which is what this measures. One
model per preset and quant scheme (``"fp8"``: static per-tensor FP8; ``"fp8-block"``:
block-scaled FP8, groups of 128).
"""

from __future__ import annotations

import torch

import fxfuse

from ..attention import AttentionMetadata, ForwardContext, KVCache, TritonAttentionBackend, set_forward_context
from .timing import graph_us

#: Where the models run: the GPU (a test runs the whole path on the CPU, kernels interpreted).
DEVICE = "cuda"
DECODE = ((1, 1024), (32, 1024), (256, 1024))  # (sequences, context incl. the new token)
PREFILL = ((1, 2048), (32, 256), (256, 32))  # (sequences, prompt tokens each)


def block_size() -> int:
    """The KV block size the triton backend prefers on this GPU (what ModelRunner takes)."""
    return TritonAttentionBackend().preferred_block_size(torch.device(DEVICE)) or 16


def _batch(cfg, seqs: int, new: int, total: int, block: int):
    per = -(-total // block)
    table = torch.arange(seqs * per, dtype=torch.int32).view(seqs, per)
    meta = AttentionMetadata.from_lens([new] * seqs, [total] * seqs, table, block, device=DEVICE)
    positions = torch.arange(total - new, total, device=DEVICE).repeat(seqs)
    ids = torch.randint(cfg.vocab_size, (seqs * new,), device=DEVICE)
    return meta, ids, positions, per * seqs


#: Llama-3-8B's depth: a model of fewer layers overstates the fixed costs outside the layers
#: (embedding, head, sampling) against the per-layer fusions. Every preset runs at this
#: depth unless told otherwise (Qwen3-8B has 36, Gemma-3-12B 48), so rows compare per layer.
LAYERS = 32
#: The presets of the end-to-end rows: one per model family.
PRESETS = ("llama3-8b", "qwen3-8b", "gemma3-12b")


def run(layers: int = LAYERS, quants: tuple[str, ...] = ("fp8", "fp8-block"), log=print,
        presets: tuple[str, ...] = PRESETS) -> list[dict]:
    """Decode and prefill rows (``model`` and ``layers`` recorded in each) of one model per
    preset and quant scheme.

    Example:
        >>> rows = run(layers=4, quants=("fp8",), presets=("qwen3-8b",))  # doctest: +SKIP (CUDA)
        >>> {r["model"] for r in rows}
        {'qwen3-8b'}
    """
    from ..models import ModelConfig

    for preset in presets:  # a typo fails before any model is built
        ModelConfig.preset(preset)
    rows = []
    for preset in presets:
        for quant in quants:
            rows += _run_model(layers, quant, log, preset)
            torch._dynamo.reset()
            torch.cuda.empty_cache()
    return rows


def _run_model(layers: int, quant: str, log, preset: str = "llama3-8b") -> list[dict]:
    from ..models import ModelConfig, build_model

    cfg = ModelConfig.preset(preset, quant=quant, num_layers=layers)
    torch.manual_seed(0)
    model = build_model(cfg, device=DEVICE, attention_backend="triton")
    variants = {
        "unfused": torch.compile(model, fullgraph=True),
        "fused": fxfuse.compile(model, passes=fxfuse.PassManager(fxfuse.default_passes()), fullgraph=True),
    }
    rows = []
    block = block_size()
    for phase, shapes in (("decode", [(b, 1, c) for b, c in DECODE]), ("prefill", [(b, n, n) for b, n in PREFILL])):
        for seqs, new, total in shapes:
            meta, ids, positions, n_blocks = _batch(cfg, seqs, new, total, block)
            caches = {name: KVCache.allocate(n_blocks, block, cfg.num_kv_heads, cfg.head_dim, cfg.dtype, DEVICE)
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
            row = dict(model=preset, quant=quant, phase=phase, seqs=seqs, new_tokens=new, context=total, layers=layers,
                       kv_block=block, unfused_us=times["unfused"], fused_us=times["fused"],
                       speedup=times["unfused"] / times["fused"])
            rows.append(row)
            log(f"  {preset:10s} {quant:9s} {phase:7s} {seqs:3d} seq x {new:4d} new (ctx {total:4d}): "
                f"unfused {times['unfused']:9.1f} us  fused {times['fused']:9.1f} us  -> {100 * (row['speedup'] - 1):+.1f}%")
            del caches
    model.close()
    return rows
