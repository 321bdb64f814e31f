"""Decode profile: where one decode step's GPU time goes, per layer and kernel family.

One step of the compiled model runs under ``torch.profiler`` (without CUDA graphs, so
each kernel is linked to the op that launched it; kernel times are the GPU's, which a
graph replay does not change, only the gaps between them). Every kernel is attributed:

- **family**: ``gemm`` (launched inside an FP8/BF16 linear op: ``fp8_linear``,
  ``block_fp8_linear``, their fused forms, ``aten::mm``..., or named like a GEMM
  kernel), ``attention`` (inside ``fxfuse::attention``), ``norm_quant`` (inside an
  fxfuse norm, quant or activation op, or an Inductor kernel that computes one:
  ``rsqrt``, ``clamp``, ``sigmoid`` in its name), ``other`` (rotary, copies, the embedding);
- **layer**: a decoder layer ends with its ``down_proj`` GEMM (found by its weight shape);
  layer 0 also holds the step's start (embedding, rotary tables), the *tail* the final
  norm and the LM head;
- **GEMM call**: the kernels of one linear call (the GEMM and its split-K reduction or
  epilogue kernel) give its time, and its weight's bytes over that time its share of the
  copy bandwidth.

The numbers per layer are means over layers 1.. (layer 0 carries the step's start). The
kernel list comes from the profiler's raw kineto events (`kernel_records`), the rest is
plain arithmetic on it (`analyze`), so both run on the CPU with made-up events.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

FAMILIES = ("gemm", "attention", "norm_quant", "other")

#: Ops whose kernels are a linear's, with the position of the weight among their inputs.
#: For aten's matmuls the weight is the second operand as ``[K, N]`` (``x @ w.t()``).
GEMM_OPS = {
    "fxfuse::fp8_linear": (1, False), "fxfuse::fp8_linear_fused": (2, False),
    "fxfuse::block_fp8_linear": (2, False), "fxfuse::block_fp8_linear_fused": (2, False),
    "aten::mm": (1, True), "aten::addmm": (2, True), "aten::_scaled_mm": (1, True), "aten::matmul": (1, True),
}
_GEMM_NAMES = ("gemm", "nvjet", "xmma", "cutlass", "matmul", "_scaled_mm", "cublas")
_ATTN_NAMES = ("attention", "attn", "flash", "fmha")
_NORM_QUANT_NAMES = ("rsqrt", "rms_norm", "quant", "clamp", "silu", "sigmoid", "fp8")


@dataclasses.dataclass(frozen=True)
class KernelRecord:
    """One GPU kernel of the profiled step.

    ``ops``: names of the CPU ops around its launch, innermost first; ``gemm``: ``(call,
    n, k)`` of the linear op call that launched it (``call`` tells calls apart), if any.
    """

    name: str
    us: float
    start_us: float
    ops: tuple[str, ...] = ()
    gemm: Optional[tuple[int, int, int]] = None


def family(record: KernelRecord) -> str:
    """The kernel family of ``record`` (module docstring): by the ops around its launch,
    else by its name.

    >>> family(KernelRecord("_small_fp8_gemm_kernel", 3.0, 0.0, ("fxfuse::fp8_linear_fused",)))
    'gemm'
    >>> family(KernelRecord("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0", 2.0, 0.0))
    'norm_quant'
    """
    if record.gemm is not None or any(op in GEMM_OPS for op in record.ops):
        return "gemm"
    if any(op == "fxfuse::attention" for op in record.ops):
        return "attention"
    if any(op.startswith("fxfuse::") and any(w in op for w in ("norm", "quant", "silu")) for op in record.ops):
        return "norm_quant"
    name = record.name.lower()
    for fam, words in (("gemm", _GEMM_NAMES), ("attention", _ATTN_NAMES), ("norm_quant", _NORM_QUANT_NAMES)):
        if any(w in name for w in words):
            return fam
    return "other"


def kernel_records(events: Iterable[Any]) -> list[KernelRecord]:
    """The GPU kernels of a profile, in launch order, from its raw kineto events
    (``prof.profiler.kineto_results.events()``: objects with ``name()``,
    ``device_type()``, ``correlation_id()``, ``linked_correlation_id()``,
    ``start_ns()``, ``end_ns()``, ``shapes()``, ``start_thread_id()``).

    A kernel's ``linked_correlation_id`` is the correlation id of the op that was
    innermost when it was launched; the ops around that one are those that contain it in
    time on its thread.
    """
    from torch.autograd import DeviceType

    events = list(events)
    # Torch's ops, not the runtime calls (cudaLaunchKernel is a CPU event too, linked to its
    # op, with a CUPTI correlation id that may equal an op's).
    cpu = [e for e in events if e.device_type() == DeviceType.CPU and e.correlation_id()
           and not e.linked_correlation_id()]
    gpu = [e for e in events if e.device_type() != DeviceType.CPU]
    # Parent links by a sweep per thread: ops sorted by start (longest first at a tie);
    # the stack holds the ops that contain the current one.
    parent: dict[int, Any] = {}
    by_id = {e.correlation_id(): e for e in cpu}
    for thread in {e.start_thread_id() for e in cpu}:
        stack: list[Any] = []
        for e in sorted((e for e in cpu if e.start_thread_id() == thread), key=lambda e: (e.start_ns(), -e.end_ns())):
            while stack and stack[-1].end_ns() < e.end_ns():
                stack.pop()
            parent[e.correlation_id()] = stack[-1] if stack else None
            stack.append(e)
    t0 = min((e.start_ns() for e in gpu), default=0)
    out = []
    for k in sorted(gpu, key=lambda e: e.start_ns()):
        chain = []
        op = by_id.get(k.linked_correlation_id())
        while op is not None:
            chain.append(op)
            op = parent.get(op.correlation_id())
        gemm = None
        for op in reversed(chain):  # the outermost linear: fp8_linear, not the _scaled_mm inside it
            if op.name() in GEMM_OPS:
                gemm = _gemm_call(op)
                break
        out.append(KernelRecord(k.name(), (k.end_ns() - k.start_ns()) / 1e3, (k.start_ns() - t0) / 1e3,
                                tuple(op.name() for op in chain), gemm))
    return out


def _gemm_call(op: Any) -> Optional[tuple[int, int, int]]:
    index, transposed = GEMM_OPS[op.name()]
    shapes = op.shapes()
    if index >= len(shapes) or len(shapes[index]) != 2:
        return None
    a, b = shapes[index]
    n, k = (b, a) if transposed else (a, b)
    return op.correlation_id(), int(n), int(k)


def split_layers(records: Sequence[KernelRecord], down_shape: tuple[int, int]) -> tuple[list[list[KernelRecord]],
                                                                                          list[KernelRecord]]:
    """``(layers, tail)``: the records cut after the last kernel of each call whose weight
    is ``down_shape`` (``(n, k)``: the layers' last linear).

    >>> recs = [KernelRecord("a", 1, 0), KernelRecord("g", 1, 1, gemm=(7, 64, 256)), KernelRecord("t", 1, 2)]
    >>> [len(layer) for layer in split_layers(recs, (64, 256))[0]]
    [2]
    """
    ends = [i for i, r in enumerate(records) if r.gemm is not None and (r.gemm[1], r.gemm[2]) == tuple(down_shape)
            and (i + 1 == len(records) or records[i + 1].gemm is None or records[i + 1].gemm[0] != r.gemm[0])]
    layers, start = [], 0
    for end in ends:
        layers.append(list(records[start:end + 1]))
        start = end + 1
    return layers, list(records[start:])


def summarize(records: Sequence[KernelRecord]) -> dict[str, Any]:
    """Kernel count and time (µs), in all and per family.

    >>> summarize([KernelRecord("x_gemm", 2.0, 0.0)])["families"]["gemm"]
    {'kernels': 1, 'us': 2.0}
    """
    fams = {f: dict(kernels=0, us=0.0) for f in FAMILIES}
    for r in records:
        fams[family(r)]["kernels"] += 1
        fams[family(r)]["us"] += r.us
    return dict(kernels=len(records), us=sum(r.us for r in records), families=fams)


def _mean_summary(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    if not summaries:
        return summarize([])
    mean = lambda vals: sum(vals) / len(vals)  # noqa: E731
    return dict(kernels=mean([s["kernels"] for s in summaries]), us=mean([s["us"] for s in summaries]),
                families={f: dict(kernels=mean([s["families"][f]["kernels"] for s in summaries]),
                                  us=mean([s["families"][f]["us"] for s in summaries])) for f in FAMILIES})


def gemm_calls(records: Sequence[KernelRecord], weights: dict[tuple[int, int], tuple[str, int]],
               bandwidth: float) -> list[dict[str, Any]]:
    """Per linear (weight shape): its calls, kernels per call, median µs per call, weight
    bytes and the share of copy bandwidth they stream at (``weights``: ``(n, k) -> (name,
    bytes)``; ``bandwidth`` in bytes/s). Shapes not in ``weights`` are named ``NxK``."""
    calls: dict[int, list[KernelRecord]] = {}
    for r in records:
        if r.gemm is not None:
            calls.setdefault(r.gemm[0], []).append(r)
    per_shape: dict[tuple[int, int], list[list[KernelRecord]]] = {}
    for rs in calls.values():
        per_shape.setdefault((rs[0].gemm[1], rs[0].gemm[2]), []).append(rs)
    out = []
    for (n, k), cs in per_shape.items():
        name, nbytes = weights.get((n, k), (f"{n}x{k}", None))
        us = statistics.median(sum(r.us for r in c) for c in cs)
        out.append(dict(linear=name, n=n, k=k, calls=len(cs), kernels_per_call=sum(len(c) for c in cs) / len(cs),
                        kernels=sorted({r.name for c in cs for r in c}), us=us, weight_bytes=nbytes,
                        pct_copy_bw=None if nbytes is None or us <= 0 else 100 * nbytes / bandwidth / (us * 1e-6)))
    return sorted(out, key=lambda d: -d["us"] * d["calls"])


def analyze(records: Sequence[KernelRecord], down_shape: tuple[int, int],
            weights: dict[tuple[int, int], tuple[str, int]], bandwidth: float, top: int = 12) -> dict[str, Any]:
    """The profile of one step from its kernels: the step, the mean layer (over layers
    1..; layer 0 when there is one), layer 0, the tail, the GEMMs, the top kernels by time.

    Example:
        >>> analyze(kernel_records(prof.profiler.kineto_results.events()), (4096, 14336), weights, 3.0e12)
    """
    layers, tail = split_layers(records, down_shape)
    per_layer = [summarize(layer) for layer in layers]
    by_name: dict[str, dict[str, Any]] = {}
    for r in records:
        d = by_name.setdefault(r.name, dict(name=r.name, family=family(r), count=0, us=0.0))
        d["count"] += 1
        d["us"] += r.us
    return dict(
        step=summarize(records), layers=len(layers),
        per_layer=_mean_summary(per_layer[1:] or per_layer), layer0=per_layer[0] if per_layer else None,
        tail=summarize(tail), gemms=gemm_calls(records, weights, bandwidth),
        top_kernels=sorted(by_name.values(), key=lambda d: -d["us"])[:top],
    )


def model_weights(model: torch.nn.Module) -> dict[tuple[int, int], tuple[str, int]]:
    """``(n, k) -> (name, bytes)`` of the model's linears (the FP8 weight and its scales)
    and its LM head, for `gemm_calls`; each shape named by its first linear (``qkv_proj``),
    layers stripped.

    Example:
        >>> model_weights(model)[(4096, 14336)]
        ('down_proj', 58720260)
    """
    out: dict[tuple[int, int], tuple[str, int]] = {}
    for name, mod in model.named_modules():
        bufs = dict(mod.named_buffers(recurse=False))
        w = bufs.get("weight_q")
        if w is None or w.dim() != 2 or w.dtype != torch.float8_e4m3fn:
            continue
        nbytes = sum(b.numel() * b.element_size() for key, b in bufs.items() if key.startswith("weight"))
        out.setdefault((int(w.shape[0]), int(w.shape[1])), (name.rsplit(".", 1)[-1], nbytes))
    head = getattr(model, "lm_head_weight", None)
    if isinstance(head, torch.Tensor) and head.dim() == 2:
        out.setdefault((int(head.shape[0]), int(head.shape[1])), ("lm_head", head.numel() * head.element_size()))
    return out


def down_shape(weights: dict[tuple[int, int], tuple[str, int]]) -> tuple[int, int]:
    """The weight shape of the layers' last linear (``down_proj``)."""
    for shape, (name, _) in weights.items():
        if name == "down_proj":
            return shape
    raise ValueError(f"decode profile: no down_proj among the model's linears {sorted(v[0] for v in weights.values())}")


def profile(fn: Callable[[], object]) -> list[KernelRecord]:
    """The kernels of one call of ``fn`` (already warmed up), from the torch profiler.

    Example:
        >>> records = profile(lambda: compiled(ids, positions))  # doctest: +SKIP
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        fn()
        torch.cuda.synchronize()
    return kernel_records(prof.profiler.kineto_results.events())


def compare(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Per-layer kernels and µs of two profiles and their differences (``after - before``).

    >>> compare(dict(per_layer=dict(kernels=12, us=100.0)), dict(per_layer=dict(kernels=9, us=90.0)))["kernels"]
    {'before': 12, 'after': 9, 'change': -3}
    """
    out = {}
    for key in ("kernels", "us"):
        b, a = before["per_layer"][key], after["per_layer"][key]
        out[key] = dict(before=b, after=a, change=a - b)
    return out


def format_profile(label: str, p: dict[str, Any]) -> list[str]:
    """Table lines of one profile (what `fxfuse bench` prints)."""
    lines = [f"  {label}: step {p['step']['kernels']} kernels, {p['step']['us']:.1f} us of kernel time; "
             f"{p['layers']} layers"]
    pl = p["per_layer"]
    fams = "  ".join(f"{f} {pl['families'][f]['kernels']:.1f} / {pl['families'][f]['us']:.1f} us" for f in FAMILIES)
    lines.append(f"    per layer: {pl['kernels']:.1f} kernels, {pl['us']:.1f} us  ({fams})")
    lines.append(f"    tail (final norm, LM head): {p['tail']['kernels']} kernels, {p['tail']['us']:.1f} us")
    for g in p["gemms"]:
        bw = f"{g['pct_copy_bw']:5.1f}% of copy BW" if g["pct_copy_bw"] is not None else "        (unknown weight)"
        lines.append(f"    {g['linear']:13s} {g['n']:>6d}x{g['k']:<6d} x{g['calls']:<3d} "
                     f"{g['kernels_per_call']:.1f} kernels "
                     f"{g['us']:8.2f} us  {bw}  [{', '.join(g['kernels'])[:90]}]")
    return lines
