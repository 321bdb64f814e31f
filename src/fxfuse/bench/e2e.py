"""End to end: decode steps and prefills of the reference models at real layer shapes
(Llama-3-8B, Qwen3-8B, Gemma-3-12B; 32 layers by default), compiled with and without
``default_passes()``, timed as CUDA-graph replays, against the weight-read floor.

Variants (each a compile of the same model, on the triton attention backend and
fxfuse's kernels):

- ``unfused``: ``torch.compile`` without passes (the ops dispatch as they do: the
  small-batch GEMM at the token counts the device's table names);
- ``fused``: ``default_passes()`` (``gemm_fusion`` included);
- ``baseline``: what ran before issue 20: the passes without ``gemm_fusion`` and no
  small-batch GEMM (``FXFUSE_SMALL_GEMM_MAX_TOKENS=0`` while it runs: cuBLAS everywhere).

**The floor** of a step is the bytes it must read, over the measured copy bandwidth:
every weight the step multiplies by (FP8 weights and their scales, norm weights, the
bf16 LM head; of the embedding only the rows of the batch's tokens) plus the KV cache
attention reads (each sequence's context, K and V, every layer). At decode that is the
bound a step can approach; at prefill the step is compute-bound and the floor is only
reported. With ``profile=True`` decode steps are also profiled
(`fxfuse.bench.decode_profile`): kernels per layer by family, each GEMM's share of copy
bandwidth.

One model per preset and quant scheme (``"fp8"``: static per-tensor FP8; ``"fp8-block"``:
block-scaled FP8, groups of 128).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Optional, Sequence

import torch

import fxfuse

from ..attention import AttentionMetadata, ForwardContext, KVCache, TritonAttentionBackend, set_forward_context
from .timing import graph_us

DECODE = ((1, 1024), (32, 1024), (256, 1024))  # (sequences, context incl. the new token)
PREFILL = ((1, 2048), (32, 256), (256, 32))  # (sequences, prompt tokens each)
#: Every variant `run` knows, in the order they are compiled and timed.
VARIANTS = ("baseline", "unfused", "fused")
#: Where the models run: the GPU (a test runs the whole path on the CPU, kernels interpreted).
DEVICE = "cuda"
#: The attention backend of the models (a CPU test takes the native one, which is faster there).
BACKEND = "triton"


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


def weight_read_bytes(model: torch.nn.Module, tokens: int) -> int:
    """Bytes of the model's weights one forward of ``tokens`` tokens reads: every buffer
    (FP8 weights, scales, norm weights, the LM head), except that of a table looked up by
    token or position (a 2-D buffer named ``*embed*`` or ``*cos_sin*``) only the
    ``tokens`` rows looked up.

    >>> weight_read_bytes(build_model(ModelConfig.preset("tiny")), 1)  # doctest: +SKIP
    """
    total = 0
    for name, buf in model.named_buffers():
        nbytes = buf.numel() * buf.element_size()
        leaf = name.rsplit(".", 1)[-1]
        if ("embed" in leaf or "cos_sin" in leaf) and buf.dim() == 2:
            nbytes = min(tokens, buf.shape[0]) * buf.shape[1] * buf.element_size()
        total += nbytes
    return total


def kv_read_bytes(cfg: Any, seqs: int, context: int) -> int:
    """Bytes of KV cache the attention of every layer reads: each sequence's ``context``
    keys and values over the KV heads (the cache is in the model dtype)."""
    elem = torch.empty((), dtype=cfg.dtype).element_size()
    return cfg.num_layers * seqs * context * 2 * cfg.num_kv_heads * cfg.head_dim * elem


def run(layers: int = LAYERS, quants: tuple[str, ...] = ("fp8", "fp8-block"), log=print,
        presets: tuple[str, ...] = PRESETS, bandwidth: Optional[float] = None,
        variants: Sequence[str] = ("unfused", "fused"), decode: Optional[Sequence[tuple[int, int]]] = None,
        prefill: Optional[Sequence[tuple[int, int]]] = None, profile: bool = False) -> list[dict]:
    """Decode and prefill rows (``model`` and ``layers`` recorded in each) of one model per
    preset and quant scheme; ``bandwidth`` (bytes/s; measured per model if None) divides the floor;
    ``variants`` of `VARIANTS`; ``decode``/``prefill`` the shapes (default `DECODE`,
    `PREFILL`); ``profile``: profile each decode step per variant (`fxfuse.bench.decode_profile`).

    Example:
        >>> rows = run(layers=4, quants=("fp8",), presets=("qwen3-8b",))  # doctest: +SKIP (CUDA)
        >>> {r["model"] for r in rows}
        {'qwen3-8b'}
    """
    from ..models import ModelConfig

    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"e2e: unknown variants {unknown}; known: {list(VARIANTS)}")
    for preset in presets:  # a typo fails before any model is built
        ModelConfig.preset(preset)
    # Only what differs from _run_model's defaults is passed on (its plain form stays callable).
    extra = {k: v for k, v in dict(bandwidth=bandwidth, decode=decode, prefill=prefill).items() if v is not None}
    if tuple(variants) != ("unfused", "fused"):
        extra["variants"] = tuple(variants)
    if profile:
        extra["profile"] = True
    rows = []
    for preset in presets:
        for quant in quants:
            rows += _run_model(layers, quant, log, preset, **extra)
            torch._dynamo.reset()
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    return rows


@contextlib.contextmanager
def _environment(**values: str):
    """Environment variables set for the duration (the ops read theirs at every call)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _compiled(model: torch.nn.Module, variant: str):
    """The compiled model of ``variant`` and its PassManager (None unfused); the seconds
    `fxfuse.default_passes` took are in the manager's ``registration_s``."""
    if variant == "unfused":
        return torch.compile(model, fullgraph=True), None
    t0 = time.perf_counter()
    passes = fxfuse.default_passes() if variant == "fused" else fxfuse.default_passes(
        fxfuse.FusionConfig(gemm_fusion=False))
    manager = fxfuse.PassManager(passes)
    manager.registration_s = time.perf_counter() - t0
    return fxfuse.compile(model, passes=manager, fullgraph=True), manager


def _variant_env(variant: str):
    from ..kernels.small_gemm_config import MAX_TOKENS_ENV

    return _environment(**{MAX_TOKENS_ENV: "0"}) if variant == "baseline" else contextlib.nullcontext()


def _run_model(layers: int, quant: str, log, preset: str = "llama3-8b", *, bandwidth: Optional[float] = None,
               variants: Sequence[str] = ("unfused", "fused"), decode=None, prefill=None,
               profile: bool = False) -> list[dict]:
    """The rows of one model; ``bandwidth`` (bytes/s) divides the floor: measured on a GPU
    when not given, elsewhere the rows state no floor."""
    from ..models import ModelConfig, build_model
    from . import decode_profile as dp
    from .timing import copy_bandwidth

    if bandwidth is None and DEVICE == "cuda":
        bandwidth = copy_bandwidth()

    decode = DECODE if decode is None else decode
    prefill = PREFILL if prefill is None else prefill
    cfg = ModelConfig.preset(preset, quant=quant, **({"num_layers": layers} if layers else {}))  # 0: the preset's
    layers = cfg.num_layers
    torch.manual_seed(0)
    model = build_model(cfg, device=DEVICE, attention_backend=BACKEND)
    built = {name: _compiled(model, name) for name in VARIANTS if name in variants}
    compiled = {name: fwd for name, (fwd, _) in built.items()}
    # The first compile of each variant (decode: its first call), and fxfuse's share of
    # it: registration + both stages' pass time (issue 19's "first compile" number).
    first_compile: dict[str, dict[str, float]] = {}
    weights = dp.model_weights(model) if profile else {}
    rows = []
    block = block_size()
    for phase, shapes in (("decode", [(b, 1, c) for b, c in decode]), ("prefill", [(b, n, n) for b, n in prefill])):
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
            times, profiles = {}, {}
            with set_forward_context(ForwardContext(meta, caches)):
                for name, fwd in compiled.items():
                    with _variant_env(name):
                        t0 = time.perf_counter()
                        fwd(ids, positions)  # compile (once per variant and T == 1 / T > 1) and validate metadata
                        if name not in first_compile:
                            manager = built[name][1]
                            first_compile[name] = dict(compile_s=time.perf_counter() - t0)
                            if manager is not None:
                                first_compile[name]["fxfuse_s"] = manager.registration_s + sum(manager.seconds.values())
                        times[name] = graph_us(lambda: fwd(ids, positions), warmup=2)
                        if profile and phase == "decode":
                            profiles[name] = dp.analyze(dp.profile(lambda: fwd(ids, positions)),
                                                        dp.down_shape(weights), weights, bandwidth)
            weight_bytes = weight_read_bytes(model, seqs * new)
            kv_bytes = kv_read_bytes(cfg, seqs, total)
            floor_us = (weight_bytes + kv_bytes) / bandwidth * 1e6 if bandwidth else None
            row = dict(model=preset, quant=quant, phase=phase, seqs=seqs, new_tokens=new, context=total, layers=layers,
                       kv_block=block, weight_bytes=weight_bytes, kv_bytes=kv_bytes, floor_us=floor_us,
                       **{f"{name}_us": us for name, us in times.items()})
            if floor_us:
                row["pct_floor"] = {name: 100 * floor_us / us for name, us in times.items()}
            if "unfused" in times and "fused" in times:
                row["speedup"] = times["unfused"] / times["fused"]
            if profiles:
                row["profile"] = profiles
            if not rows:
                row["first_compile"] = first_compile
                log(f"  {preset} first compile: " + "  ".join(
                    f"{name} {v['compile_s']:.1f} s" + (f" (fxfuse {v['fxfuse_s'] * 1e3:.0f} ms)" if "fxfuse_s" in v else "")
                    for name, v in first_compile.items()))
            rows.append(row)
            pct = lambda us: f" ({100 * floor_us / us:5.1f}% of floor)" if floor_us else ""  # noqa: E731
            log(f"  {preset:10s} {quant:9s} {phase:7s} {seqs:3d} seq x {new:4d} new (ctx {total:4d}): "
                + "  ".join(f"{name} {us:9.1f} us{pct(us)}" for name, us in times.items())
                + (f"  floor {floor_us:8.1f} us" if floor_us else "")
                + (f"  -> fused {100 * (row['speedup'] - 1):+.1f}%" if "speedup" in row else ""))
            for name, p in profiles.items():
                for line in dp.format_profile(f"{name} profile (graph replay {times[name]:.1f} us)", p):
                    log(line)
            del caches
    model.close()
    return rows
