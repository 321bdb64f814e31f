"""The decoder layer every reference model family is made of, and the pieces it is made of.

One :class:`DecoderLayer` serves every family; its config's :class:`~fxfuse.models.config.Family`
switches what differs (which RMSNorm, the per-head q/k norm, the MLP's activation, the
norms around attention and MLP). What the layer computes, in ``torch.ops.fxfuse`` ops:

- the input norm (``rms_norm`` in layer 0, ``fused_add_rms_norm`` after; Gemma's ``(1 + w)``
  forms in the ``"gemma"`` norm), then the QKV projection;
- with ``qk_norm``, the per-head norm of the q and k slices, written as the chain that
  ``qk_norm_rope_fusion`` matches (:func:`head_norm`);
- ``rotary_embedding`` of q and k (NeoX pairs, full rotary, the model's cos/sin cache);
- ``attention`` over the paged KV cache (or, in ``"reference"`` mode, SDPA of whole
  sequences), then the output projection (and its all-reduce under tensor parallelism);
- with ``sandwich_norms``, the norm of the attention output, then the residual add and
  the pre-MLP norm (one ``fused_add_*`` op);
- the gated MLP: gate/up projection, the activation (``silu_and_mul``, or GeGLU in plain
  PyTorch), the down projection; with ``sandwich_norms``, the norm of its output.

Example:
    >>> layer = DecoderLayer(ModelConfig.preset("qwen3-tiny"), 0, torch.Generator().manual_seed(0),
    ...                      torch.device("cpu"), "model.layers.0.self_attn")
    >>> sorted(name for name, _ in layer.named_buffers() if name.endswith("norm_weight"))
    ['input_norm_weight', 'k_norm_weight', 'post_attention_norm_weight', 'q_norm_weight']
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

import fxfuse.ops  # noqa: F401  (registers torch.ops.fxfuse.*)

from .config import ModelConfig
from .linear import QUANT, REFERENCE, QuantLinear, linear_builders
from .parallel import TensorParallel

_fx = torch.ops.fxfuse


def rms_norm(kind: str, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The family's RMSNorm of ``x``: ``rms_norm`` (``kind="rms"``) or ``gemma_rms_norm`` (``"gemma"``).

    Example:
        >>> rms_norm("gemma", torch.randn(3, 8), torch.zeros(8), 1e-6).shape
        torch.Size([3, 8])
    """
    return (_fx.gemma_rms_norm if kind == "gemma" else _fx.rms_norm)(x, weight, eps)


def add_rms_norm(kind: str, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add, then the family's RMSNorm: ``(y, residual_out)`` of
    ``fused_add_rms_norm`` or ``fused_add_gemma_rms_norm``.

    Example:
        >>> y, r = add_rms_norm("rms", torch.randn(3, 8), torch.randn(3, 8), torch.ones(8), 1e-6)
    """
    op = _fx.fused_add_gemma_rms_norm if kind == "gemma" else _fx.fused_add_rms_norm
    return op(x, residual, weight, eps)


def head_norm(kind: str, x: torch.Tensor, weight: torch.Tensor, eps: float, num_heads: int, head_dim: int
              ) -> torch.Tensor:
    """The RMSNorm of each head of ``x [T, num_heads * head_dim]`` (weight ``[head_dim]``), as
    ``[T, num_heads * head_dim]``.

    ``x`` is a slice of the packed qkv projection; the norm ops take contiguous rows, so it
    is copied first (a no-op where the slice is contiguous: one token). This is the chain
    ``qk_norm_rope_fusion`` matches and replaces, copy included.

    Example:
        >>> head_norm("rms", torch.randn(5, 4 * 16), torch.ones(16), 1e-6, 4, 16).shape
        torch.Size([5, 64])
    """
    tokens = x.shape[0]
    heads = x.contiguous().view(tokens, num_heads, head_dim)
    return rms_norm(kind, heads, weight, eps).view(tokens, num_heads * head_dim)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """GeGLU: ``gelu_tanh(x[..., :d]) * x[..., d:]`` in fp32, rounded once to ``x.dtype``
    (``silu_and_mul``'s numerics with Gemma's activation).

    Example:
        >>> gelu_tanh_and_mul(torch.randn(3, 8, dtype=torch.bfloat16)).shape
        torch.Size([3, 4])
    """
    gate, up = x.float().chunk(2, dim=-1)
    return (F.gelu(gate, approximate="tanh") * up).to(x.dtype)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_lens: Sequence[int]
) -> torch.Tensor:
    """Causal GQA attention of whole sequences without a KV cache: plain SDPA per sequence.

    ``q [T, Hq, D]``, ``k``/``v [T, Hkv, D]`` hold the concatenated sequences of
    ``query_lens``; computed in fp32 and rounded to ``q.dtype`` once (as the native
    paged backend does). Returns ``[T, Hq, D]``.

    Example:
        >>> reference_attention(torch.randn(5, 4, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8), [3, 2]).shape
        torch.Size([5, 4, 8])
    """
    outs = []
    start = 0
    for n in query_lens:
        qi, ki, vi = (t[start : start + n].float().transpose(0, 1) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=True)
        outs.append(o.transpose(0, 1))
        start += n
    return torch.cat(outs, dim=0).to(q.dtype)


class DecoderLayer(torch.nn.Module):
    """One pre-norm decoder layer of any family: paged attention and a gated MLP, quantized
    linears, GQA, composed as ``config.spec`` says (module docstring).

    Built by the model (`fxfuse.models.decoder.DecoderForCausalLM`), which names its
    attention layer (``layer_name``), owns the rotary cos/sin cache and passes the running
    residual between layers. Under tensor parallelism (``tp``) it holds this rank's heads
    and MLP columns, and all-reduces the outputs of ``o_proj`` and ``down_proj``
    (`fxfuse.models.parallel`).

    Buffers: the four linears (``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj``),
    ``input_norm_weight`` and ``post_attention_norm_weight`` (Llama's naming: the norm
    before the MLP; with ``sandwich_norms`` Gemma's: the norm of the attention output),
    and as the family has them ``q_norm_weight``/``k_norm_weight`` (``[head_dim]``) and
    ``pre_feedforward_norm_weight``/``post_feedforward_norm_weight``. Llama-norm weights
    are in the model dtype around 1; Gemma-norm weights are fp32 offsets around 0
    (the norm multiplies by ``1 + w``).

    Example:
        >>> x, residual = layer(x, residual, positions, cos_sin_cache)  # inside a forward context
    """

    def __init__(
        self,
        config: ModelConfig,
        layer_idx: int,
        gen: torch.Generator,
        device: torch.device,
        layer_name: str,
        tp: TensorParallel = TensorParallel(),
    ) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.layer_name = layer_name
        self.tp = tp
        c = config
        spec = c.spec
        dt = c.dtype

        def randn(*shape: int, std: float, dtype: torch.dtype = dt) -> torch.Tensor:
            return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype)

        def norm_weight(width: int) -> torch.Tensor:
            if spec.norm == "gemma":
                return randn(width, std=0.05, dtype=torch.float32)  # 1 + w is the scale
            return (1.0 + randn(width, std=0.05)).to(dt)

        in_linear, resid_linear = linear_builders(c, tp)
        # Fan-in scaling keeps every projection's output near unit RMS for any preset;
        # the residual-writing projections (o, down) are shrunk further so the residual
        # stream does not grow with depth (GPT-2-style). The draws happen in this order
        # for every family, so a Llama is the same model whatever other families exist.
        in_std = c.hidden_size**-0.5
        resid_std = (2 * c.num_layers) ** -0.5
        self.register_buffer("input_norm_weight", norm_weight(c.hidden_size))
        # Column-parallel QKV: each rank's q, k and v rows (its heads). Row-parallel o_proj.
        qkv = randn(c.q_size + 2 * c.kv_size, c.hidden_size, std=in_std)
        self.qkv_proj: QuantLinear = in_linear(qkv, tp.column((c.q_size, c.kv_size, c.kv_size)))
        o = randn(c.hidden_size, c.q_size, std=c.q_size**-0.5 * resid_std)
        self.o_proj: QuantLinear = resid_linear(o, tp.row(c.q_size))
        self.register_buffer("post_attention_norm_weight", norm_weight(c.hidden_size))
        # Gate rows first, then up rows: the activation reads [gate | up] along the last dim;
        # a rank holds its gate rows then the matching up rows.
        gate_up = randn(2 * c.intermediate_size, c.hidden_size, std=in_std)
        self.gate_up_proj: QuantLinear = in_linear(gate_up, tp.column((c.intermediate_size, c.intermediate_size)))
        down = randn(c.hidden_size, c.intermediate_size, std=c.intermediate_size**-0.5 * resid_std)
        self.down_proj: QuantLinear = resid_linear(down, tp.row(c.intermediate_size))
        if spec.qk_norm:
            self.register_buffer("q_norm_weight", norm_weight(c.head_dim))
            self.register_buffer("k_norm_weight", norm_weight(c.head_dim))
        if spec.sandwich_norms:
            self.register_buffer("pre_feedforward_norm_weight", norm_weight(c.hidden_size))
            self.register_buffer("post_feedforward_norm_weight", norm_weight(c.hidden_size))

    def _attention(
        self,
        h: torch.Tensor,
        positions: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        mode: str,
        query_lens: Optional[Sequence[int]],
    ) -> torch.Tensor:
        """QKV projection, q/k norm, rotary embedding and attention of ``h [T, hidden]`` -> ``[T, Hq * D]``.

        The paged ``fxfuse::attention`` op (K/V written to and read from this layer's
        cache in the forward context); in ``"reference"`` mode per-sequence SDPA of the
        whole sequences ``query_lens`` instead, with no cache.
        """
        c = self.config
        kind = c.spec.norm
        hq, hkv, d = c.local_num_heads, c.local_num_kv_heads, c.head_dim
        qkv = self.qkv_proj(h, mode)
        q, k, v = qkv.split([c.local_q_size, c.local_kv_size, c.local_kv_size], dim=-1)
        tokens = q.shape[0]
        if c.spec.qk_norm:
            q = head_norm(kind, q, self.q_norm_weight, c.rms_eps, hq, d)
            k = head_norm(kind, k, self.k_norm_weight, c.rms_eps, hkv, d)
        # The slices of qkv go in as they are (the op reads token-strided rows).
        q, k = _fx.rotary_embedding(positions, q, k, d, cos_sin_cache, True)
        q, k = q.view(tokens, hq, d), k.view(tokens, hkv, d)
        # The split leaves v strided inside qkv; kernels get a dense [T, Hkv, D].
        v = v.reshape(tokens, hkv, d).contiguous()
        if mode == REFERENCE:
            return reference_attention(q, k, v, query_lens).reshape(tokens, c.local_q_size)
        out = torch.empty(tokens, hq, d, dtype=q.dtype, device=q.device)
        _fx.attention(q, k, v, out, self.layer_name)
        return out.view(tokens, hq * d)

    def _mlp(self, h: torch.Tensor, mode: str) -> torch.Tensor:
        gate_up = self.gate_up_proj(h, mode)
        act = _fx.silu_and_mul(gate_up) if self.config.spec.activation == "silu" else gelu_tanh_and_mul(gate_up)
        # Row-parallel projections leave partial sums; their all-reduce (none at tp_size=1)
        # feeds the next fused add + norm, where allreduce_rms_fusion joins them.
        return self.tp.reduce_partial_sums(self.down_proj(act, mode), self.config.dtype)

    def forward(
        self,
        x: torch.Tensor,
        residual: Union[torch.Tensor, None],
        positions: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        mode: str = QUANT,
        query_lens: Optional[Sequence[int]] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [tokens, hidden]`` and the residual so far (``None`` in layer 0) -> ``(x, residual)``.

        The returned ``x`` is the MLP output; it is added to ``residual`` by the next
        layer's (or the final) fused add + norm. ``positions [tokens]`` index
        ``cos_sin_cache [max_position, head_dim]``. ``query_lens`` (the whole sequences in
        the batch) is used, and needed, only by ``mode="reference"``.

        Example:
            >>> x, residual = layer(x, residual, positions, model.cos_sin_cache)
        """
        c = self.config
        kind, eps = c.spec.norm, c.rms_eps
        if residual is None:
            h = rms_norm(kind, x, self.input_norm_weight, eps)
            residual = x
        else:
            h, residual = add_rms_norm(kind, x, residual, self.input_norm_weight, eps)
        attn = self._attention(h, positions, cos_sin_cache, mode, query_lens)
        x = self.tp.reduce_partial_sums(self.o_proj(attn, mode), c.dtype)
        if c.spec.sandwich_norms:
            x = rms_norm(kind, x, self.post_attention_norm_weight, eps)
            h, residual = add_rms_norm(kind, x, residual, self.pre_feedforward_norm_weight, eps)
        else:
            h, residual = add_rms_norm(kind, x, residual, self.post_attention_norm_weight, eps)
        x = self._mlp(h, mode)
        if c.spec.sandwich_norms:
            x = rms_norm(kind, x, self.post_feedforward_norm_weight, eps)
        return x, residual


__all__ = ["DecoderLayer", "rms_norm", "add_rms_norm", "head_norm", "gelu_tanh_and_mul", "reference_attention"]
