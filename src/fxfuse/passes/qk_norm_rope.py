"""``qk_norm_rope_fusion``: the per-head RMSNorm of q and k, then the rotary embedding,
becomes one ``qk_norm_rope`` (Llama's RMSNorm: Qwen3) or ``qk_gemma_norm_rope`` (Gemma's
``(1 + w)`` RMSNorm, fp32 or model-dtype weights: Gemma 3).

The chain, as a model writes it on the q and k slices of its packed qkv projection::

    qn = rms_norm(q.contiguous().view(T, Hq, D), q_weight, eps).view(T, Hq * D)
    kn = rms_norm(k.contiguous().view(T, Hkv, D), k_weight, eps).view(T, Hkv * D)
    q, k = rotary_embedding(positions, qn, kn, D, cos_sin_cache, is_neox)

One registration per norm, whatever the number of layers, heads or head size: the head
size is the weight's length (so the norm's per-head width and the rotation's head size
are one size, as the fused op has them), ``eps`` is a float wildcard, ``is_neox`` a bool
wildcard and the rotary dim is the cache's width. The fused ops take both styles and
every even rotary dim up to the head size (partial rotary: GLM, Phi, Qwen3-Next), so no
style or rotary dim is refused; what is refused is what would change the result: a
Llama-norm weight in another dtype than q (an fp32 weight on a bf16 chain; the kernel
would read it as bf16), a normalized head another op also reads, a norm over another
width than the rotation's head size.

**The copies.** ``rms_norm`` takes contiguous rows, so the q and k slices of a packed
projection are copied before the norm (an ``aten.clone`` in the graph wherever a slice is
not contiguous: every token count but 1). The fused ops read token-strided slices in
place, so after the rewrites this pass drops a copy whose only reader is a fused op's
``query`` or ``key`` (`drop_copies`). A pattern cannot hold that copy itself: patterns are
traced on contiguous examples, where ``.contiguous()`` is no op.

**Anchor.** A chain is found from the reshape of q into heads (`Rewrite.anchor`), not from
the norm or the rotation: either of those alone is a custom op, which would count as a
near miss wherever it stands without the rest (every rotation of a Llama, every RMSNorm
of a hidden state), and the pass runs before ``rms_quant_fusion`` so that the per-head
norms are gone before that pass would count them as norms without a quant.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx

from ..fusion_pass import Application, FusionPass
from ..rewrite import Rewrite, TensorSpec
from ._common import MODEL_DTYPES, val

fx = torch.ops.fxfuse
aten = torch.ops.aten

# Example sizes only shape the trace: any token count, head counts and head size match.
_TOKENS, _Q_HEADS, _KV_HEADS, _HEAD = 5, 4, 2, 32
_FUSED_OPS = (fx.qk_norm_rope.default, fx.qk_gemma_norm_rope.default)


def _heads(x: torch.Tensor, head: Any) -> torch.Tensor:
    """``x [T, H * head]`` as ``[T, H, head]``, sizes from the inputs (one pattern, every shape)."""
    return x.view(x.shape[0], x.shape[1] // head, head)


class _QkNormRope(Rewrite):
    """What both norms share: the chain, the fused replacement, the anchor and the examples."""

    #: Where a chain starts: the reshape of q into heads (see the module docstring).
    anchor = aten.reshape.default
    #: The cache may be fp32 or the model dtype, whatever the weights' dtype.
    free_dtypes: tuple[str, ...] = ("cos_sin_cache",)
    WEIGHT_DTYPE: torch.dtype = torch.bfloat16

    def norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        raise NotImplementedError

    def fused(self, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def pattern(self, positions, q, k, q_weight, k_weight, cos_sin_cache, eps, is_neox):
        head = q_weight.shape[0]
        qn = self.norm(_heads(q, head), q_weight, eps).view(q.shape)
        kn = self.norm(_heads(k, head), k_weight, eps).view(k.shape)
        return fx.rotary_embedding(positions, qn, kn, head, cos_sin_cache, is_neox)

    def replacement(self, positions, q, k, q_weight, k_weight, cos_sin_cache, eps, is_neox):
        return self.fused(positions, q, k, q_weight, k_weight, eps, q_weight.shape[0], cos_sin_cache, is_neox)

    def example_inputs(self):
        act = torch.bfloat16
        return [
            TensorSpec((_TOKENS,), torch.int64),
            TensorSpec((_TOKENS, _Q_HEADS * _HEAD), act),
            TensorSpec((_TOKENS, _KV_HEADS * _HEAD), act),
            TensorSpec((_HEAD,), self.WEIGHT_DTYPE),
            TensorSpec((_HEAD,), self.WEIGHT_DTYPE),
            TensorSpec((4096, _HEAD), torch.float32),
            1e-6,
            # A bool wildcard's sample becomes the variable wherever the trace holds that
            # literal; True is also attention's default of is_neox, so sample False.
            False,
        ]

    def weights_fit(self, q: torch.Tensor, w: torch.Tensor) -> bool:
        return w.dtype == q.dtype

    def check(self, match) -> bool:
        q, k, cache = val(match, "q"), val(match, "k"), val(match, "cos_sin_cache")
        return (
            q.dtype in MODEL_DTYPES and k.dtype == q.dtype
            and all(self.weights_fit(q, val(match, w)) for w in ("q_weight", "k_weight"))
            and cache.dtype in (torch.float32, q.dtype)
            and val(match, "positions").dtype in (torch.int64, torch.int32)
        )


class QkNormRope(_QkNormRope):
    """rotary(rms_norm(q per head), rms_norm(k per head))  ->  qk_norm_rope (Qwen3)

    The weights are in q's dtype (typed match: an fp32 weight on a bf16 chain is refused).
    """

    def norm(self, x, w, eps):
        return fx.rms_norm(x, w, eps)

    def fused(self, *args):
        return fx.qk_norm_rope(*args)


class QkGemmaNormRope(_QkNormRope):
    """rotary(gemma_rms_norm(q per head), gemma_rms_norm(k per head))  ->  qk_gemma_norm_rope (Gemma 3)

    The weights are fp32 (as Gemma checkpoints keep them) or in q's dtype.
    """

    free_dtypes = ("q_weight", "k_weight", "cos_sin_cache")
    WEIGHT_DTYPE = torch.float32

    def norm(self, x, w, eps):
        return fx.gemma_rms_norm(x, w, eps)

    def fused(self, *args):
        return fx.qk_gemma_norm_rope(*args)

    def weights_fit(self, q, w):
        return w.dtype in (torch.float32, q.dtype)


def drop_copies(graph: torch.fx.Graph) -> int:
    """Remove each contiguous copy whose only reader is the ``query`` or ``key`` of a fused
    q/k-norm + rotary op, which reads token-strided rows in place; returns how many.

    A copy stays where the op could not read its source as it is (a head's features not
    contiguous) or where anything else reads it.

    >>> drop_copies(gm.graph)  # after the rewrites: the slices of qkv go straight in
    2
    """
    dropped = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _FUSED_OPS:
            continue
        for index in (1, 2):  # query, key
            copy = node.args[index]
            if not _droppable(copy):
                continue
            node.update_arg(index, copy.args[0])
            graph.erase_node(copy)
            dropped += 1
    return dropped


def _droppable(copy: Any) -> bool:
    if not (isinstance(copy, torch.fx.Node) and copy.target is aten.clone.default and len(copy.users) == 1):
        return False
    if copy.kwargs.get("memory_format", torch.preserve_format) not in (torch.contiguous_format, torch.preserve_format):
        return False
    src = copy.args[0]
    a = src.meta.get("val") if isinstance(src, torch.fx.Node) else None
    b = copy.meta.get("val")
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == 2
            and a.dtype == b.dtype and a.device == b.device and a.shape == b.shape and a.stride(-1) == 1)


class QkNormRopeFusion(FusionPass):
    """The ``qk_norm_rope_fusion`` pass: the two rewrites, then `drop_copies`.

    ``last_copies_dropped`` is the number of copies the last application removed.

    Example:
        >>> p = QkNormRopeFusion(); p(gm.graph)
        1
    """

    def __init__(self) -> None:
        super().__init__("qk_norm_rope_fusion", [QkNormRope(), QkGemmaNormRope()])
        self.last_copies_dropped = 0

    def apply(self, graph: torch.fx.Graph | torch.fx.GraphModule, *, gone: Optional[Any] = None,
              report: bool = True) -> Application:
        result = super().apply(graph, gone=gone, report=report)
        g = graph.graph if isinstance(graph, torch.fx.GraphModule) else graph
        self.last_copies_dropped = drop_copies(g)
        return result


def qk_norm_rope_fusion() -> FusionPass:
    """The ``qk_norm_rope_fusion`` pass.

    Example:
        >>> p = qk_norm_rope_fusion(); p(gm.graph)
    """
    return QkNormRopeFusion()
