"""``rope_kv_cache_fusion``: the rotary embedding of q and k, then ``attention`` (which writes
k and v into the layer's paged KV cache), becomes one ``attention`` call that takes the
pre-rotary q and k with ``positions`` and the cos/sin cache, and rotates them itself.

fxfuse's ``attention`` op writes the KV cache (DESIGN §5), so "rotary + KV-cache write"
is "rotary + attention" here: the rotation is folded into the attention op, whose backend
applies it where it writes the cache (the triton backend in one kernel that rotates q and
writes the rotated k and the value into their cache slots; docs/passes/rope_kv_cache_fusion.md
argues the design).

One rewrite per output quant scheme of the attention it ends in, whatever the number of
layers: attention writing the model dtype, and attention writing FP8 or NVFP4 itself
(what ``attn_quant_fusion``, which runs first, makes of the attention + quant chain).
``layer_name`` is a string wildcard, ``is_neox`` a bool wildcard, the rotary dim the
cache's width; ``check`` asks the layer's backend whether it applies the rotary
embedding itself (`AttentionBackend.fuses_rope`), and layers whose backend does not keep
the unfused chain. The chain is found from the rotation (`Rewrite.anchor`): a model whose
rotation was fused with its q/k norms (``qk_norm_rope_fusion``) has none left, and its
attention is not a near miss of this pass.

**Sizes read off the chain.** In a graph with a dynamic token count, a replacement that
allocates a buffer reads the count off a node of its match (``sym_size``): the FP8/NVFP4
output that ``attn_quant_fusion`` allocates takes it from attention's query, which here
is the view of the rotation. A chain one of whose inputs is computed from the chain cannot
be replaced, so this pass canonicalizes first (`sizes_from_symbol_inputs`): a
``sym_size`` whose value is a symbol the graph takes as an input reads that input instead.
"""

from __future__ import annotations

import torch

import torch.fx

from ..attention import get_layer, registered_layer_names
from ..canonicalize import DEFAULT_CANONICALIZATIONS
from ..fusion_pass import FusionPass
from ..rewrite import Rewrite, TensorSpec
from ._common import FP8, MODEL_DTYPES, is_fp32_scalar, scale, val

fx = torch.ops.fxfuse
TOKENS, HEADS, KV_HEADS, HEAD = 5, 4, 2, 32


def _rotated(positions, q, k, v, cos_sin_cache, is_neox):
    """The rotation of the q and k slices, viewed as the ``[T, H, D]`` heads attention takes.

    The head size is the value's (what attention reads), so it is the rotation's too.
    """
    head = v.shape[2]
    qr, kr = fx.rotary_embedding(positions, q, k, head, cos_sin_cache, is_neox)
    return qr.view(q.shape[0], q.shape[1] // head, head), kr.view(v.shape)


def _heads(q, k, v):
    head = v.shape[2]
    return q.view(q.shape[0], q.shape[1] // head, head), k.view(v.shape)


def _inputs(out: TensorSpec, *quant: TensorSpec) -> list:
    act = torch.bfloat16
    return [
        TensorSpec((TOKENS,), torch.int64),
        TensorSpec((TOKENS, HEADS * HEAD), act),
        TensorSpec((TOKENS, KV_HEADS * HEAD), act),
        TensorSpec((TOKENS, KV_HEADS, HEAD), act),
        out,
        *quant,
        TensorSpec((4096, HEAD), torch.float32),
        # A bool wildcard's sample becomes the variable wherever the trace holds that literal:
        # True is attention's default of is_neox, which the pattern leaves at its default.
        False,
        "model.layers.0.self_attn",
    ]


class _RopeAttention(Rewrite):
    """What the three rewrites share: the anchor, the backend check and its cache state."""

    SCHEME: str  # the output quant scheme of the attention the chain ends in
    anchor = fx.rotary_embedding.default
    free_dtypes: tuple[str, ...] = ("cos_sin_cache",)

    def chain_fits(self, match) -> bool:
        """Dtypes the op takes, and a registered layer whose backend rotates (and writes the scheme)."""
        q, k, v, cache = val(match, "q"), val(match, "k"), val(match, "v"), val(match, "cos_sin_cache")
        if not (q.dtype in MODEL_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
                and cache.dtype in (torch.float32, q.dtype)
                and val(match, "positions").dtype in (torch.int64, torch.int32)):
            return False
        try:
            layer = get_layer(match.kwargs["layer_name"])
        except KeyError:
            return False  # not a registered layer: nothing can promise the fused rotation
        return layer.fuses_rope and layer.supports_output_quant(self.SCHEME)

    def check(self, match) -> bool:
        return self.chain_fits(match)

    def cache_state(self):
        """Each registered layer's backend, whether it rotates, and whether it writes this scheme.

        >>> RopeAttention().cache_state()  # doctest: +SKIP
        {'model.layers.0.self_attn': ('native', True, True)}
        """
        state = {}
        for name in registered_layer_names():
            backend = get_layer(name).backend
            state[name] = (backend.name, bool(backend.fuses_rope), backend.supports_output_quant(self.SCHEME))
        return state


class RopeAttention(_RopeAttention):
    """rotary(q, k) -> attention(q', k', v, out)  ->  attention(q, k, v, out, positions=, cos_sin_cache=)"""

    SCHEME = "none"

    def pattern(self, positions, q, k, v, out, cos_sin_cache, is_neox, layer_name):
        qr, kr = _rotated(positions, q, k, v, cos_sin_cache, is_neox)
        fx.attention(qr, kr, v, out, layer_name)
        return out

    def replacement(self, positions, q, k, v, out, cos_sin_cache, is_neox, layer_name):
        qh, kh = _heads(q, k, v)
        fx.attention(qh, kh, v, out, layer_name, None, None, positions, cos_sin_cache, is_neox)
        return out

    def example_inputs(self):
        return _inputs(TensorSpec((TOKENS, HEADS, HEAD), torch.bfloat16))


class RopeAttentionFp8(_RopeAttention):
    """rotary(q, k) -> attention(q', k', v, out_fp8, output_scale=s)  ->  the same attention rotating q, k itself"""

    SCHEME = "fp8_static"

    def pattern(self, positions, q, k, v, out, s, cos_sin_cache, is_neox, layer_name):
        qr, kr = _rotated(positions, q, k, v, cos_sin_cache, is_neox)
        fx.attention(qr, kr, v, out, layer_name, s)
        return out

    def replacement(self, positions, q, k, v, out, s, cos_sin_cache, is_neox, layer_name):
        qh, kh = _heads(q, k, v)
        fx.attention(qh, kh, v, out, layer_name, s, None, positions, cos_sin_cache, is_neox)
        return out

    def example_inputs(self):
        return _inputs(TensorSpec((TOKENS, HEADS, HEAD), FP8), scale())

    def check(self, match):
        return self.chain_fits(match) and is_fp32_scalar(val(match, "s"))


class RopeAttentionNvfp4(_RopeAttention):
    """rotary(q, k) -> attention(q', k', v, packed, output_scale=gs, output_block_scale=bs)  ->  the same rotating itself"""

    SCHEME = "nvfp4"

    def pattern(self, positions, q, k, v, out, global_scale, block_scales, cos_sin_cache, is_neox, layer_name):
        qr, kr = _rotated(positions, q, k, v, cos_sin_cache, is_neox)
        fx.attention(qr, kr, v, out, layer_name, global_scale, block_scales)
        return out, block_scales

    def replacement(self, positions, q, k, v, out, global_scale, block_scales, cos_sin_cache, is_neox, layer_name):
        qh, kh = _heads(q, k, v)
        fx.attention(qh, kh, v, out, layer_name, global_scale, block_scales, positions, cos_sin_cache, is_neox)
        return out, block_scales

    def example_inputs(self):
        width = HEADS * HEAD
        # NVFP4 scales: one E4M3 per 16 elements, rows padded to 128 and columns to 4 (swizzled).
        packed = TensorSpec((TOKENS, width // 2), torch.uint8)
        block_scales = TensorSpec((128, (width // 16 + 3) // 4 * 4), FP8)
        return _inputs(packed, scale(), block_scales)

    def check(self, match):
        return self.chain_fits(match) and is_fp32_scalar(val(match, "global_scale"))


def sizes_from_symbol_inputs(graph: torch.fx.Graph) -> int:
    """Canonicalization: each ``sym_size`` whose value is a size symbol the graph takes as an
    input (Dynamo passes every dynamic size in as a ``SymInt`` placeholder) is replaced by that
    input; returns how many. The same value, read without depending on the node it was
    read off, so a chain through that node can be replaced.

    >>> sizes_from_symbol_inputs(gm.graph)  # sym_size(view, 0) -> s0, the token count input
    1
    """
    symbols = {}
    for p in graph.find_nodes(op="placeholder"):
        v = p.meta.get("val")
        if isinstance(v, torch.SymInt) and v.node.expr.is_Symbol:
            symbols.setdefault(v.node.expr, p)
    if not symbols:
        return 0
    changed = 0
    for node in list(graph.find_nodes(op="call_function", target=torch.ops.aten.sym_size.int)):
        v = node.meta.get("val")
        source = symbols.get(v.node.expr) if isinstance(v, torch.SymInt) else None
        if source is None:
            continue
        node.replace_all_uses_with(source)
        graph.erase_node(node)
        changed += 1
    return changed


def rope_kv_cache_fusion() -> FusionPass:
    """The ``rope_kv_cache_fusion`` pass: one rewrite per attention output scheme, for every layer.

    Example:
        >>> p = rope_kv_cache_fusion(); p(gm.graph)
    """
    return FusionPass("rope_kv_cache_fusion", [RopeAttention(), RopeAttentionFp8(), RopeAttentionNvfp4()],
                      canonicalize=(*DEFAULT_CANONICALIZATIONS, sizes_from_symbol_inputs))
