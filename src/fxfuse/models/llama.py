"""A Llama-style FP8 decoder built from ``torch.ops.fxfuse.*``, with seeded random weights.

The model exists to exercise the fusion passes end to end, so its graph shape is a
contract: every decoder layer contains exactly

- two "RMS norm -> ``static_scaled_fp8_quant``" chains (before the QKV and the gate/up
  projections; the norm is ``rms_norm`` in layer 0 and ``fused_add_rms_norm`` after),
- one "``silu_and_mul`` -> ``static_scaled_fp8_quant``" chain (before the down projection),
- one "attention output -> ``static_scaled_fp8_quant``" (before the output projection),

and nothing else quantizes. The final norm is not followed by a quant (the LM head is
a plain matmul in the model dtype). For ``n`` layers a norm-quant fusion therefore
matches ``2n`` times and a silu-quant fusion ``n`` times.

Example:
    >>> import torch
    >>> from fxfuse.models import LlamaForCausalLM, ModelConfig
    >>> model = LlamaForCausalLM(ModelConfig.preset("tiny"))
    >>> logits = model(torch.tensor([[1, 2, 3, 4]]))
    >>> logits.shape
    torch.Size([1, 4, 256])
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F

import fxfuse.ops  # noqa: F401  (registers torch.ops.fxfuse.*)

from .config import ModelConfig
from .runner import random_prompts

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
#: Floor of a calibrated activation amax, so an all-zero site never gets a zero scale.
MIN_CALIBRATION_AMAX = 1e-6

# How a forward treats its linear layers (a Python constant, so a compiled forward
# specializes on it and contains no branch).
_FP8 = "fp8"  # static FP8 quant + fp8_linear: the real model
_CALIBRATE = "calibrate"  # like _FP8, but first set each site's scale from its input's amax
_REFERENCE = "reference"  # no activation quant: matmul with the dequantized weights

#: Calibration prompt shape; small so that building even the 8B preset stays cheap.
_CALIBRATION_BATCH = 2
_CALIBRATION_SEQ = 32

_fx = torch.ops.fxfuse


class Fp8Linear(torch.nn.Module):
    """A bias-free linear layer with a per-tensor FP8 weight and a static FP8 input quant.

    ``forward(x)`` is ``fp8_linear(static_scaled_fp8_quant(x, input_scale), weight_q,
    input_scale, weight_scale)``. The weight is quantized once at construction with
    ``weight_scale = amax / 448``; ``input_scale`` is set by calibration.

    Example:
        >>> lin = Fp8Linear(torch.randn(32, 64, dtype=torch.bfloat16), out_dtype=torch.bfloat16)
        >>> x = torch.randn(4, 64, dtype=torch.bfloat16)
        >>> lin(x, mode="calibrate").shape
        torch.Size([4, 32])
    """

    def __init__(self, weight: torch.Tensor, out_dtype: torch.dtype) -> None:
        super().__init__()
        self.out_dtype = out_dtype
        amax = weight.abs().amax().float().clamp(min=MIN_CALIBRATION_AMAX)
        weight_scale = (amax / FP8_MAX).reshape(1)
        weight_q = torch.ops.fxfuse.static_scaled_fp8_quant(weight.contiguous(), weight_scale)
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("weight_scale", weight_scale)
        # Placeholder until calibrate() runs; 1.0 keeps an uncalibrated forward finite.
        self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32, device=weight.device))

    @property
    def in_features(self) -> int:
        """Width of the input.

        Example:
            >>> Fp8Linear(torch.ones(2, 3), torch.float32).in_features
            3
        """
        return self.weight_q.shape[1]

    @property
    def out_features(self) -> int:
        """Width of the output.

        Example:
            >>> Fp8Linear(torch.ones(2, 3), torch.float32).out_features
            2
        """
        return self.weight_q.shape[0]

    def dequantized_weight(self) -> torch.Tensor:
        """The FP8 weight times its scale, in fp32: what the FP8 GEMM actually multiplies by.

        Example:
            >>> lin = Fp8Linear(torch.eye(4), torch.float32)
            >>> torch.allclose(lin.dequantized_weight(), torch.eye(4))
            True
        """
        return self.weight_q.float() * self.weight_scale

    def forward(self, x: torch.Tensor, mode: str = _FP8) -> torch.Tensor:
        """``x [tokens, in]`` (contiguous, in the model dtype) -> ``[tokens, out]`` in ``out_dtype``.

        ``mode`` is ``"fp8"`` (default), ``"calibrate"`` (set ``input_scale`` from ``x``
        first) or ``"reference"`` (no activation quant; dequantized weight).

        Example:
            >>> y = lin(torch.randn(4, lin.in_features, dtype=torch.bfloat16))
        """
        if mode == _REFERENCE:
            return (x.float() @ self.dequantized_weight().t()).to(self.out_dtype)
        if mode == _CALIBRATE:
            amax = x.abs().amax().float().clamp(min=MIN_CALIBRATION_AMAX)
            self.input_scale.copy_((amax / FP8_MAX).reshape(1))
        elif mode != _FP8:
            raise ValueError(f"Fp8Linear: unknown mode {mode!r}")
        x_q = _fx.static_scaled_fp8_quant(x, self.input_scale)
        return _fx.fp8_linear(x_q, self.weight_q, self.input_scale, self.weight_scale, None, self.out_dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama (rotate-half) RoPE on ``x [tokens, heads, head_dim]``; ``cos``/``sin`` are fp32 ``[tokens, head_dim]``.

    Computed in fp32 and rounded back to ``x``'s dtype once.

    Example:
        >>> cos, sin = rotary_cos_sin(torch.arange(3), head_dim=8, theta=10000.0)
        >>> apply_rotary(torch.randn(3, 2, 8), cos, sin).shape
        torch.Size([3, 2, 8])
    """
    xf = x.float()
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(cos, sin)``, each ``[tokens, head_dim]``, for integer ``positions [tokens]``.

    Example:
        >>> cos, sin = rotary_cos_sin(torch.tensor([0, 1]), head_dim=4, theta=10000.0)
        >>> cos[0].tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class LlamaDecoderLayer(torch.nn.Module):
    """One pre-norm decoder layer: attention and a SwiGLU MLP, FP8 linears, GQA.

    Built by :class:`LlamaForCausalLM`, which passes the running residual between layers.

    Example:
        >>> layer = model.layers[0]
        >>> h, residual = layer(x, None, cos, sin, batch=1, seq=4)  # x: [4, hidden]
    """

    def __init__(
        self,
        config: ModelConfig,
        layer_idx: int,
        gen: torch.Generator,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        c = config
        dt = c.dtype

        def randn(*shape: int, std: float) -> torch.Tensor:
            return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std).to(dt)

        # Fan-in scaling keeps every projection's output near unit RMS for any preset;
        # the residual-writing projections (o, down) are shrunk further so the residual
        # stream does not grow with depth (GPT-2-style).
        in_std = c.hidden_size**-0.5
        resid_std = (2 * c.num_layers) ** -0.5
        self.register_buffer("input_norm_weight", (1.0 + randn(c.hidden_size, std=0.05)).to(dt))
        self.qkv_proj = Fp8Linear(randn(c.q_size + 2 * c.kv_size, c.hidden_size, std=in_std), dt)
        self.o_proj = Fp8Linear(randn(c.hidden_size, c.q_size, std=c.q_size**-0.5 * resid_std), dt)
        self.register_buffer("post_attention_norm_weight", (1.0 + randn(c.hidden_size, std=0.05)).to(dt))
        # Gate rows first, then up rows: silu_and_mul reads [gate | up] along the last dim.
        self.gate_up_proj = Fp8Linear(randn(2 * c.intermediate_size, c.hidden_size, std=in_std), dt)
        self.down_proj = Fp8Linear(
            randn(c.hidden_size, c.intermediate_size, std=c.intermediate_size**-0.5 * resid_std), dt
        )

    def _attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: int, seq: int
    ) -> torch.Tensor:
        """Causal GQA attention over token-major ``q [tokens, heads, d]``, ``k``/``v [tokens, kv_heads, d]``.

        Returns ``[tokens, heads * d]``, contiguous. This is the placeholder that a paged
        KV-cache attention op replaces; it takes the token-major layout such an op uses.

        Example:
            >>> out = layer._attention(q, k, v, batch=1, seq=4)  # [4, hidden]
        """
        c = self.config

        def to_bhsd(t: torch.Tensor, heads: int) -> torch.Tensor:
            return t.reshape(batch, seq, heads, c.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            to_bhsd(q, c.num_heads),
            to_bhsd(k, c.num_kv_heads),
            to_bhsd(v, c.num_kv_heads),
            is_causal=True,
            enable_gqa=True,
        )
        # The quant op that consumes this needs a contiguous input; whether the reshape
        # copies depends on the SDPA backend's output layout, so make it explicit.
        return out.transpose(1, 2).reshape(batch * seq, c.q_size).contiguous()

    def forward(
        self,
        x: torch.Tensor,
        residual: Union[torch.Tensor, None],
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: int,
        seq: int,
        mode: str = _FP8,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [tokens, hidden]`` and the residual so far (``None`` in layer 0) -> ``(x, residual)``.

        The returned ``x`` is the MLP output; it is added to ``residual`` by the next
        layer's (or the final) ``fused_add_rms_norm``.

        Example:
            >>> x, residual = layer(x, residual, cos, sin, batch=2, seq=8)
        """
        c = self.config
        if residual is None:
            h = _fx.rms_norm(x, self.input_norm_weight, c.rms_eps)
            residual = x
        else:
            h, residual = _fx.fused_add_rms_norm(x, residual, self.input_norm_weight, c.rms_eps)
        qkv = self.qkv_proj(h, mode)

        q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        tokens = q.shape[0]
        q = apply_rotary(q.reshape(tokens, c.num_heads, c.head_dim), cos, sin)
        k = apply_rotary(k.reshape(tokens, c.num_kv_heads, c.head_dim), cos, sin)
        v = v.reshape(tokens, c.num_kv_heads, c.head_dim)
        attn = self._attention(q, k, v, batch, seq)
        x = self.o_proj(attn, mode)

        h, residual = _fx.fused_add_rms_norm(x, residual, self.post_attention_norm_weight, c.rms_eps)
        gate_up = self.gate_up_proj(h, mode)
        x = self.down_proj(_fx.silu_and_mul(gate_up), mode)
        return x, residual


class LlamaForCausalLM(torch.nn.Module):
    """Llama-style causal LM with random FP8 weights from ``config.seed``; ready to run once built.

    Weights are drawn from a ``torch.Generator`` on ``device`` seeded with ``config.seed``,
    so the same config on the same device type gives the same model in every process.
    The constructor calibrates the static activation scales on a fixed random prompt.
    Everything is a buffer (no parameters): the model is inference-only.

    ``forward(input_ids [batch, seq]) -> logits [batch, seq, vocab]`` in ``config.dtype``
    is a full causal forward (no KV cache) and compiles with ``fullgraph=True``.

    Example:
        >>> model = LlamaForCausalLM(ModelConfig.preset("tiny", num_layers=3))
        >>> ids = torch.randint(0, 256, (2, 8))
        >>> model(ids).shape
        torch.Size([2, 8, 256])
        >>> compiled = torch.compile(model, fullgraph=True)
    """

    def __init__(self, config: ModelConfig, device: Union[str, torch.device] = "cpu") -> None:
        super().__init__()
        self.config = config
        device = torch.device(device)
        c = config
        gen = torch.Generator(device=device).manual_seed(c.seed)

        def randn(*shape: int, std: float) -> torch.Tensor:
            return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std).to(c.dtype)

        # Unit-RMS embeddings put the residual stream at the same scale as the layers' writes.
        self.register_buffer("embed_tokens", randn(c.vocab_size, c.hidden_size, std=1.0))
        self.layers = torch.nn.ModuleList(
            LlamaDecoderLayer(c, i, gen, device) for i in range(c.num_layers)
        )
        self.register_buffer("final_norm_weight", (1.0 + randn(c.hidden_size, std=0.05)).to(c.dtype))
        # Logits of roughly unit scale: greedy picks depend on the input, not on ties.
        self.register_buffer("lm_head_weight", randn(c.vocab_size, c.hidden_size, std=c.hidden_size**-0.5))
        self.requires_grad_(False)
        self.eval()
        self.calibrate(
            random_prompts(c, _CALIBRATION_BATCH, _CALIBRATION_SEQ, seed=c.seed + 1, device=device)
        )

    @property
    def device(self) -> torch.device:
        """The device the weights live on.

        Example:
            >>> LlamaForCausalLM(ModelConfig.preset("tiny")).device
            device(type='cpu')
        """
        return self.embed_tokens.device

    def linears(self) -> dict[str, Fp8Linear]:
        """Every FP8 linear layer by qualified name, in forward order (four per layer).

        Example:
            >>> list(model.linears())[:2]
            ['layers.0.qkv_proj', 'layers.0.o_proj']
        """
        return {name: m for name, m in self.named_modules() if isinstance(m, Fp8Linear)}

    def _forward(self, input_ids: torch.Tensor, mode: str) -> torch.Tensor:
        c = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"LlamaForCausalLM: input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        batch, seq = input_ids.shape
        x = F.embedding(input_ids.reshape(-1), self.embed_tokens)
        # Token-major positions (what a paged-attention op takes) rather than a [seq] range.
        positions = torch.arange(seq, device=input_ids.device).repeat(batch)
        cos, sin = rotary_cos_sin(positions, c.head_dim, c.rope_theta)

        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, batch, seq, mode)
        h, _ = _fx.fused_add_rms_norm(x, residual, self.final_norm_weight, c.rms_eps)
        logits = h @ self.lm_head_weight.t()
        return logits.reshape(batch, seq, c.vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """FP8 forward: ``input_ids [batch, seq]`` (int64) -> ``logits [batch, seq, vocab]``.

        Example:
            >>> model(torch.tensor([[5, 6, 7]])).shape
            torch.Size([1, 3, 256])
        """
        return self._forward(input_ids, _FP8)

    def forward_reference(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The same model without activation quantization: each linear multiplies by its
        dequantized FP8 weight in fp32 (rounded to ``config.dtype``). The yardstick for
        the FP8 forward's accuracy.

        Example:
            >>> ids = torch.tensor([[5, 6, 7]])
            >>> (model(ids).float() - model.forward_reference(ids).float()).abs().max()
        """
        with torch.no_grad():
            return self._forward(input_ids, _REFERENCE)

    def calibrate(self, input_ids: torch.Tensor) -> dict[str, float]:
        """Set every static activation scale to ``max(amax, 1e-6) / 448`` of its input on ``input_ids``.

        Runs the FP8 forward once eagerly; each site is calibrated on the activations
        that the already-calibrated sites before it produce, i.e. exactly what it sees
        at inference. Returns the new scales by linear-layer name.

        Example:
            >>> scales = model.calibrate(torch.randint(0, 256, (4, 64)))
            >>> scales["layers.0.qkv_proj"] > 0
            True
        """
        with torch.no_grad():
            self._forward(input_ids.to(self.device), _CALIBRATE)
        return {name: float(m.input_scale.item()) for name, m in self.linears().items()}
