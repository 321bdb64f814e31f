"""A Llama-style quantized decoder built from ``torch.ops.fxfuse.*``, with seeded random weights.

The model exists to exercise the fusion passes end to end, so its graph shape is a
contract. Every decoder layer contains exactly

- two "RMS norm -> ``static_scaled_fp8_quant``" chains (before the QKV and the gate/up
  projections; the norm is ``rms_norm`` in layer 0 and ``fused_add_rms_norm`` after),
- one "``silu_and_mul`` -> quant" chain (before the down projection),
- one "``attention`` -> ``view`` -> quant" chain (before the output projection),

where "quant" is ``static_scaled_fp8_quant`` with ``quant="fp8"``, ``nvfp4_quant`` with
``quant="nvfp4"`` (the SiLU-and-mul and attention chains; the norm chains stay FP8), and
``group_fp8_quant`` with ``quant="fp8-block"``; nothing else quantizes. The final norm is
not followed by a quant (the LM head is a plain matmul in the model dtype). For ``n``
layers the norm-quant fusion therefore matches ``2n`` times and the activation-quant
fusion ``n`` times; the attention-quant fusion ``n`` times with ``"fp8"`` and ``"nvfp4"``
and never with ``"fp8-block"``: the attention backends' fused output quant schemes are
static per-tensor FP8 and NVFP4 (``AttentionBackend.supports_output_quant``), none
per-token-group, so ``o_proj``'s input is group-quantized by the unfused
``group_fp8_quant``. (A group epilogue is possible where a group is one head's output,
``head_dim == group_size``, but no backend has one yet.)

With ``tp_size > 1`` the outputs of ``o_proj`` and ``down_proj`` are fp32 partial sums,
each followed by an all-reduce (``_c10d_functional.all_reduce``, ``wait_tensor``) and a
cast to the model dtype that feed the next ``fused_add_rms_norm``: ``2n`` all-reduces,
every one fused by ``allreduce_rms_fusion`` together with the norm-quant chain after it,
so that ``rms_quant_fusion`` matches only layer 0's ``rms_norm`` (see
``docs/passes/allreduce_rms_fusion.md``).

Attention is ``torch.ops.fxfuse.attention`` over a paged KV cache: the forward takes a
flat batch of tokens (``input_ids [T]``, ``positions [T]``) and must run inside a forward
context (see :class:`~fxfuse.models.ModelRunner`). Each layer registers its
:class:`~fxfuse.attention.AttentionLayer` when the model is built; see
:class:`LlamaForCausalLM` for the naming rule.

Example:
    >>> import torch
    >>> from fxfuse.models import LlamaForCausalLM, ModelConfig, ModelRunner
    >>> model = LlamaForCausalLM(ModelConfig.preset("tiny"))
    >>> model.attention_layer_names
    ['model.layers.0.self_attn', 'model.layers.1.self_attn']
    >>> ModelRunner(model).logits([[1, 2, 3, 4], [5, 6]]).shape
    torch.Size([6, 256])
"""

from __future__ import annotations

import threading
import weakref
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

import fxfuse.ops  # noqa: F401  (registers torch.ops.fxfuse.*)
from fxfuse.attention import (
    AttentionBackend,
    AttentionLayer,
    NativeAttentionBackend,
    NoQuantNativeBackend,
    TritonAttentionBackend,
    get_layer,
    register_layer,
    registered_layer_names,
    unregister_layer,
)
from fxfuse.ops.block_linear import dequantize_weight_blocks, quantize_weight_blocks
from fxfuse.ops.nvfp4 import E2M1_MAX, nvfp4_dequantize

from .config import ModelConfig
from .parallel import Shard, TensorParallel
from .runner import ModelRunner, Prompts, random_prompts

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
#: Floor of a calibrated activation amax, so an all-zero site never gets a zero scale.
MIN_CALIBRATION_AMAX = 1e-6

# How a forward treats its linear layers (a Python constant, so a compiled forward
# specializes on it and contains no branch).
_QUANT = "quant"  # static FP8 / NVFP4 activation quant: the real model
_CALIBRATE = "calibrate"  # like _QUANT, but first set each site's scale from its input's amax
_REFERENCE = "reference"  # no activation quant: matmul with the dequantized weights

#: Calibration prompt lengths; small so that building even the 8B preset stays cheap.
_CALIBRATION_LENGTHS = (32, 24)

_fx = torch.ops.fxfuse

#: Attention backends by the name ``LlamaForCausalLM(attention_backend=...)`` takes.
#: Other :class:`~fxfuse.attention.AttentionBackend` subclasses are found by their ``name``.
ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {
    "native": NativeAttentionBackend,
    "native-noquant": NoQuantNativeBackend,
    "triton": TritonAttentionBackend,
}


def _all_subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


def resolve_attention_backend(backend: Union[str, AttentionBackend]) -> AttentionBackend:
    """An attention backend instance from a name (``"native"``, ``"native-noquant"``, or the
    ``name`` of any imported :class:`~fxfuse.attention.AttentionBackend` subclass) or an instance.

    Example:
        >>> resolve_attention_backend("native-noquant").supports_output_quant("fp8_static")
        False
    """
    if isinstance(backend, AttentionBackend):
        return backend
    if isinstance(backend, str):
        cls = ATTENTION_BACKENDS.get(backend)
        if cls is None:
            found = [c for c in _all_subclasses(AttentionBackend) if getattr(c, "name", None) == backend]
            cls = found[0] if found else None
        if cls is not None:
            return cls()
    known = sorted(set(ATTENTION_BACKENDS) | {
        c.name for c in _all_subclasses(AttentionBackend) if isinstance(getattr(c, "name", None), str)
    })
    raise ValueError(f"unknown attention backend {backend!r}; known: {', '.join(known)}")


# --------------------------------------------------------------------------- layer names

_PREFIX_LOCK = threading.Lock()
_CLAIMED_PREFIXES: set[str] = set()


def _prefix_free(prefix: str, registered: Sequence[str]) -> bool:
    return prefix not in _CLAIMED_PREFIXES and not any(n.startswith(prefix + ".") for n in registered)


def _claim_prefix(requested: Optional[str]) -> str:
    """The instance prefix of a new model's layer names (see :class:`LlamaForCausalLM`)."""
    with _PREFIX_LOCK:
        registered = registered_layer_names()
        if requested is not None:
            if not isinstance(requested, str) or not requested or requested.endswith("."):
                raise ValueError(f"LlamaForCausalLM: layer_prefix must be a non-empty str without a trailing '.', "
                                 f"got {requested!r}")
            if not _prefix_free(requested, registered):
                raise ValueError(
                    f"LlamaForCausalLM: layer_prefix {requested!r} is in use by another model or "
                    f"registered layer; close() that model first or pick another prefix"
                )
            prefix = requested
        else:
            k = 0
            while not _prefix_free(prefix := ("model" if k == 0 else f"model_{k}"), registered):
                k += 1
        _CLAIMED_PREFIXES.add(prefix)
        return prefix


def _release_layers(prefix: str, layers: tuple[AttentionLayer, ...]) -> None:
    """Unregister ``layers`` (only where the registry still holds these very objects) and free ``prefix``."""
    for layer in layers:
        try:
            current = get_layer(layer.name)
        except KeyError:
            continue
        if current is layer:
            try:
                unregister_layer(layer.name)
            except KeyError:
                pass
    with _PREFIX_LOCK:
        _CLAIMED_PREFIXES.discard(prefix)


def _input_amax(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """The calibration ``amax`` of a linear's input ``x`` (floored at `MIN_CALIBRATION_AMAX`):
    the largest over the tensor-parallel ranks, whose inputs are slices of one activation
    for a row-parallel layer (and equal for a column-parallel one)."""
    amax = tp.all_reduce(x.abs().amax().float().reshape(1), "max")
    return amax.clamp(min=MIN_CALIBRATION_AMAX)


class Fp8Linear(torch.nn.Module):
    """A bias-free linear layer with a per-tensor FP8 weight and a static FP8 input quant.

    ``forward(x)`` is ``fp8_linear(static_scaled_fp8_quant(x, input_scale), weight_q,
    input_scale, weight_scale)``. The weight is quantized once at construction with
    ``weight_scale = amax / 448``; ``input_scale`` is set by calibration.

    Tensor parallel: ``weight`` is the full weight and the layer keeps ``shard.take`` of it,
    quantized with the full weight's scale; calibration takes the largest ``amax`` over the
    ranks of ``tp``, so every rank quantizes as the ``tp_size=1`` model does.

    Example:
        >>> lin = Fp8Linear(torch.randn(32, 64, dtype=torch.bfloat16), out_dtype=torch.bfloat16)
        >>> x = torch.randn(4, 64, dtype=torch.bfloat16)
        >>> lin(x, mode="calibrate").shape
        torch.Size([4, 32])
    """

    def __init__(
        self,
        weight: torch.Tensor,
        out_dtype: torch.dtype,
        *,
        shard: Optional[Shard] = None,
        tp: TensorParallel = TensorParallel(),
    ) -> None:
        super().__init__()
        self.out_dtype = out_dtype
        self.tp = tp
        amax = weight.abs().amax().float().clamp(min=MIN_CALIBRATION_AMAX)
        weight_scale = (amax / FP8_MAX).reshape(1)
        weight = shard.take(weight) if shard is not None else weight.contiguous()
        weight_q = torch.ops.fxfuse.static_scaled_fp8_quant(weight, weight_scale)
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

    def forward(self, x: torch.Tensor, mode: str = _QUANT) -> torch.Tensor:
        """``x [tokens, in]`` (contiguous, in the model dtype) -> ``[tokens, out]`` in ``out_dtype``.

        ``mode`` is ``"quant"`` (default), ``"calibrate"`` (set ``input_scale`` from ``x``
        first) or ``"reference"`` (no activation quant; dequantized weight).

        Example:
            >>> y = lin(torch.randn(4, lin.in_features, dtype=torch.bfloat16))
        """
        if mode == _REFERENCE:
            return (x.float() @ self.dequantized_weight().t()).to(self.out_dtype)
        if mode == _CALIBRATE:
            amax = _input_amax(x, self.tp)
            self.input_scale.copy_((amax / FP8_MAX).reshape(1))
        elif mode != _QUANT:
            raise ValueError(f"Fp8Linear: unknown mode {mode!r}")
        x_q = _fx.static_scaled_fp8_quant(x, self.input_scale)
        return _fx.fp8_linear(x_q, self.weight_q, self.input_scale, self.weight_scale, None, self.out_dtype)


class Nvfp4Linear(torch.nn.Module):
    """A bias-free linear layer with NVFP4 weight and input, emulated: dequantize, then an fp32 matmul.

    ``forward(x)`` is ``q, s = nvfp4_quant(x, input_global_scale)`` followed by
    ``nvfp4_dequantize(q, s, input_global_scale) @ W.T`` in fp32, rounded to ``out_dtype``.
    The weight is quantized to NVFP4 once at construction (``weight_q``,
    ``weight_block_scales``, ``weight_global_scale = 448 * 6 / amax``) and ``W`` is its
    dequantization, kept as the fp32 buffer ``weight_dequant`` so that a forward does not
    dequantize the weight again: exactly what a W4A4 NVFP4 GEMM multiplies, computed
    the slow way (no FP4 tensor cores are needed, so it runs on any device).
    ``input_global_scale = 448 * 6 / amax(x)`` is set by calibration.

    Tensor parallel: as `Fp8Linear` (``weight_global_scale`` from the full weight,
    calibration over the ranks); the slice must keep whole 16-element blocks.

    Example:
        >>> lin = Nvfp4Linear(torch.randn(32, 64, dtype=torch.bfloat16), out_dtype=torch.bfloat16)
        >>> lin(torch.randn(4, 64, dtype=torch.bfloat16), mode="calibrate").shape
        torch.Size([4, 32])
    """

    def __init__(
        self,
        weight: torch.Tensor,
        out_dtype: torch.dtype,
        *,
        shard: Optional[Shard] = None,
        tp: TensorParallel = TensorParallel(),
    ) -> None:
        super().__init__()
        self.out_dtype = out_dtype
        self.tp = tp
        amax = weight.abs().amax().float().clamp(min=MIN_CALIBRATION_AMAX)
        weight_global_scale = (FP8_MAX * E2M1_MAX / amax).reshape(1)
        weight = shard.take(weight) if shard is not None else weight.contiguous()
        weight_q, weight_block_scales = _fx.nvfp4_quant(weight, weight_global_scale)
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("weight_block_scales", weight_block_scales)
        self.register_buffer("weight_global_scale", weight_global_scale)
        self.register_buffer(
            "weight_dequant",
            nvfp4_dequantize(weight_q, weight_block_scales, weight_global_scale, weight.shape, torch.float32),
        )
        # Placeholder until calibrate() runs; 1.0 keeps an uncalibrated forward finite.
        self.register_buffer("input_global_scale", torch.ones(1, dtype=torch.float32, device=weight.device))

    @property
    def in_features(self) -> int:
        """Width of the input."""
        return self.weight_dequant.shape[1]

    @property
    def out_features(self) -> int:
        """Width of the output."""
        return self.weight_dequant.shape[0]

    def dequantized_weight(self) -> torch.Tensor:
        """The NVFP4 weight dequantized, in fp32: what the emulated GEMM multiplies by.

        Example:
            >>> w = torch.randn(16, 32)
            >>> ((Nvfp4Linear(w, torch.float32).dequantized_weight() - w).norm() / w.norm()) < 0.15
            tensor(True)
        """
        return self.weight_dequant

    def forward(self, x: torch.Tensor, mode: str = _QUANT) -> torch.Tensor:
        """``x [tokens, in]`` (contiguous, in the model dtype) -> ``[tokens, out]`` in ``out_dtype``.

        ``mode`` is ``"quant"`` (default), ``"calibrate"`` (set ``input_global_scale`` from
        ``x`` first) or ``"reference"`` (no activation quant; dequantized weight).
        """
        if mode == _REFERENCE:
            return (x.float() @ self.weight_dequant.t()).to(self.out_dtype)
        if mode == _CALIBRATE:
            amax = _input_amax(x, self.tp)
            self.input_global_scale.copy_((FP8_MAX * E2M1_MAX / amax).reshape(1))
        elif mode != _QUANT:
            raise ValueError(f"Nvfp4Linear: unknown mode {mode!r}")
        q, block_scales = _fx.nvfp4_quant(x, self.input_global_scale)
        x_dq = nvfp4_dequantize(q, block_scales, self.input_global_scale, x.shape, torch.float32)
        return (x_dq @ self.weight_dequant.t()).to(self.out_dtype)


class BlockFp8Linear(torch.nn.Module):
    """A bias-free linear layer with a 128x128 block-scaled FP8 weight and per-token-group
    FP8 activations (DeepSeek-V3 / Qwen3-FP8 style).

    ``forward(x)`` is ``x_q, x_scales = group_fp8_quant(x, group_size, True)`` then
    ``block_fp8_linear(x_q, x_scales, weight_q, weight_scales)``: dynamic scales, one per
    token and group (column-major, the layout block-FP8 GEMMs read), so nothing is
    calibrated. The weight is quantized once at construction, one scale per 128x128 block
    (``amax / 448``).

    Example:
        >>> lin = BlockFp8Linear(torch.randn(192, 128, dtype=torch.bfloat16), torch.bfloat16, group_size=64)
        >>> lin(torch.randn(4, 128, dtype=torch.bfloat16)).shape
        torch.Size([4, 192])
    """

    def __init__(
        self,
        weight: torch.Tensor,
        out_dtype: torch.dtype,
        group_size: int,
        *,
        shard: Optional[Shard] = None,
    ) -> None:
        super().__init__()
        self.out_dtype = out_dtype
        self.group_size = group_size
        # Blocks are per 128x128 tile: the slice of whole tiles quantizes as the full weight does.
        weight_q, weight_scales = quantize_weight_blocks(shard.take(weight) if shard is not None else weight)
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("weight_scales", weight_scales)

    @property
    def in_features(self) -> int:
        """Width of the input."""
        return self.weight_q.shape[1]

    @property
    def out_features(self) -> int:
        """Width of the output."""
        return self.weight_q.shape[0]

    def dequantized_weight(self) -> torch.Tensor:
        """The block-scaled FP8 weight dequantized, in fp32: what the GEMM multiplies by.

        Example:
            >>> w = torch.randn(256, 128)
            >>> ((BlockFp8Linear(w, torch.float32, 64).dequantized_weight() - w).norm() / w.norm()) < 0.05
            tensor(True)
        """
        return dequantize_weight_blocks(self.weight_q, self.weight_scales)

    def forward(self, x: torch.Tensor, mode: str = _QUANT) -> torch.Tensor:
        """``x [tokens, in]`` (contiguous, in the model dtype) -> ``[tokens, out]`` in ``out_dtype``.

        ``mode`` is ``"quant"`` (default) or ``"calibrate"`` (the same: the activation
        scales are dynamic), or ``"reference"`` (no activation quant; dequantized weight).
        """
        if mode == _REFERENCE:
            return (x.float() @ self.dequantized_weight().t()).to(self.out_dtype)
        if mode not in (_QUANT, _CALIBRATE):
            raise ValueError(f"BlockFp8Linear: unknown mode {mode!r}")
        x_q, x_scales = _fx.group_fp8_quant(x, self.group_size, True)
        return _fx.block_fp8_linear(x_q, x_scales, self.weight_q, self.weight_scales, None, self.out_dtype)


#: Any of the model's quantized linear layers.
QuantLinear = Union[Fp8Linear, Nvfp4Linear, BlockFp8Linear]


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


def _reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_lens: Sequence[int]
) -> torch.Tensor:
    """Causal GQA attention of whole sequences without a KV cache: plain SDPA per sequence.

    ``q [T, Hq, D]``, ``k``/``v [T, Hkv, D]`` hold the concatenated sequences of
    ``query_lens``; computed in fp32 and rounded to ``q.dtype`` once (as the native
    paged backend does). Returns ``[T, Hq, D]``.
    """
    outs = []
    start = 0
    for n in query_lens:
        qi, ki, vi = (t[start : start + n].float().transpose(0, 1) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=True)
        outs.append(o.transpose(0, 1))
        start += n
    return torch.cat(outs, dim=0).to(q.dtype)


class LlamaDecoderLayer(torch.nn.Module):
    """One pre-norm decoder layer: paged attention and a SwiGLU MLP, quantized linears, GQA.

    Built by :class:`LlamaForCausalLM`, which names its attention layer (``layer_name``)
    and passes the running residual between layers. Under tensor parallelism (``tp``) it
    holds this rank's heads and MLP columns, and all-reduces the outputs of ``o_proj`` and
    ``down_proj`` (`fxfuse.models.parallel`).

    Example:
        >>> layer = model.layers[0]
        >>> h, residual = layer(x, None, cos, sin)  # x: [tokens, hidden], inside a forward context
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
        dt = c.dtype

        def randn(*shape: int, std: float) -> torch.Tensor:
            return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std).to(dt)

        # The linears whose inputs the fusions under test quantize (attention output,
        # SiLU-and-mul output) are NVFP4 in the "nvfp4" scheme; QKV and gate/up stay FP8.
        # "fp8-block" makes all four block-scaled.
        # Each is built from the full weight and keeps this rank's shard (None: all of it).
        # The row-parallel ones (o, down) write their partial sums in `partials` (see
        # TensorParallel.partial_sum_dtype); at tp_size=1 that is the model dtype.
        partials = tp.partial_sum_dtype(dt)
        if c.quant == "fp8-block":
            def in_linear(w: torch.Tensor, shard: Optional[Shard]) -> QuantLinear:
                return BlockFp8Linear(w, dt, c.activation_group_size, shard=shard)

            def resid_linear(w: torch.Tensor, shard: Optional[Shard]) -> QuantLinear:
                return BlockFp8Linear(w, partials, c.activation_group_size, shard=shard)
        else:
            def in_linear(w: torch.Tensor, shard: Optional[Shard]) -> QuantLinear:
                return Fp8Linear(w, dt, shard=shard, tp=tp)

            def resid_linear(w: torch.Tensor, shard: Optional[Shard]) -> QuantLinear:
                return (Nvfp4Linear if c.quant == "nvfp4" else Fp8Linear)(w, partials, shard=shard, tp=tp)

        # Fan-in scaling keeps every projection's output near unit RMS for any preset;
        # the residual-writing projections (o, down) are shrunk further so the residual
        # stream does not grow with depth (GPT-2-style).
        in_std = c.hidden_size**-0.5
        resid_std = (2 * c.num_layers) ** -0.5
        self.register_buffer("input_norm_weight", (1.0 + randn(c.hidden_size, std=0.05)).to(dt))
        # Column-parallel QKV: each rank's q, k and v rows (its heads). Row-parallel o_proj.
        qkv = randn(c.q_size + 2 * c.kv_size, c.hidden_size, std=in_std)
        self.qkv_proj = in_linear(qkv, tp.column((c.q_size, c.kv_size, c.kv_size)))
        o = randn(c.hidden_size, c.q_size, std=c.q_size**-0.5 * resid_std)
        self.o_proj = resid_linear(o, tp.row(c.q_size))
        self.register_buffer("post_attention_norm_weight", (1.0 + randn(c.hidden_size, std=0.05)).to(dt))
        # Gate rows first, then up rows: silu_and_mul reads [gate | up] along the last dim;
        # a rank holds its gate rows then the matching up rows.
        gate_up = randn(2 * c.intermediate_size, c.hidden_size, std=in_std)
        self.gate_up_proj = in_linear(gate_up, tp.column((c.intermediate_size, c.intermediate_size)))
        down = randn(c.hidden_size, c.intermediate_size, std=c.intermediate_size**-0.5 * resid_std)
        self.down_proj = resid_linear(down, tp.row(c.intermediate_size))

    def _attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mode: str,
        query_lens: Optional[Sequence[int]],
    ) -> torch.Tensor:
        """Attention of ``q [T, Hq, D]`` over ``k``/``v [T, Hkv, D]`` -> ``[T, Hq * D]``.

        The paged ``fxfuse::attention`` op (K/V written to and read from this layer's
        cache in the forward context); in ``"reference"`` mode per-sequence SDPA of the
        whole sequences ``query_lens`` instead, with no cache.
        """
        c = self.config
        tokens = q.shape[0]
        if mode == _REFERENCE:
            return _reference_attention(q, k, v, query_lens).reshape(tokens, c.local_q_size)
        out = torch.empty(tokens, c.local_num_heads, c.head_dim, dtype=q.dtype, device=q.device)
        _fx.attention(q, k, v, out, self.layer_name)
        return out.view(tokens, c.local_num_heads * c.head_dim)

    def forward(
        self,
        x: torch.Tensor,
        residual: Union[torch.Tensor, None],
        cos: torch.Tensor,
        sin: torch.Tensor,
        mode: str = _QUANT,
        query_lens: Optional[Sequence[int]] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [tokens, hidden]`` and the residual so far (``None`` in layer 0) -> ``(x, residual)``.

        The returned ``x`` is the MLP output; it is added to ``residual`` by the next
        layer's (or the final) ``fused_add_rms_norm``. ``query_lens`` (the whole
        sequences in the batch) is used, and needed, only by ``mode="reference"``.

        Example:
            >>> x, residual = layer(x, residual, cos, sin)
        """
        c = self.config
        if residual is None:
            h = _fx.rms_norm(x, self.input_norm_weight, c.rms_eps)
            residual = x
        else:
            h, residual = _fx.fused_add_rms_norm(x, residual, self.input_norm_weight, c.rms_eps)
        qkv = self.qkv_proj(h, mode)

        q, k, v = qkv.split([c.local_q_size, c.local_kv_size, c.local_kv_size], dim=-1)
        tokens = q.shape[0]
        q = apply_rotary(q.reshape(tokens, c.local_num_heads, c.head_dim), cos, sin)
        k = apply_rotary(k.reshape(tokens, c.local_num_kv_heads, c.head_dim), cos, sin)
        # The split leaves v strided inside qkv; kernels get a dense [T, Hkv, D].
        v = v.reshape(tokens, c.local_num_kv_heads, c.head_dim).contiguous()
        attn = self._attention(q, k, v, mode, query_lens)
        # Row-parallel projections leave partial sums; their all-reduce (none at tp_size=1)
        # feeds the next fused_add_rms_norm, where allreduce_rms_fusion joins them.
        x = self.tp.reduce_partial_sums(self.o_proj(attn, mode), c.dtype)

        h, residual = _fx.fused_add_rms_norm(x, residual, self.post_attention_norm_weight, c.rms_eps)
        gate_up = self.gate_up_proj(h, mode)
        x = self.tp.reduce_partial_sums(self.down_proj(_fx.silu_and_mul(gate_up), mode), c.dtype)
        return x, residual


def _whole_sequence_lens(positions: torch.Tensor) -> list[int]:
    """Lengths of the whole sequences a flat ``positions`` batch holds (each restarts at 0)."""
    pos = positions.tolist()
    if not pos or pos[0] != 0:
        raise ValueError("LlamaForCausalLM.forward_reference: positions must be whole sequences, each 0, 1, ..., n-1")
    lens: list[int] = []
    for p in pos:
        if p == 0:
            lens.append(1)
        elif p == lens[-1]:
            lens[-1] += 1
        else:
            raise ValueError(
                "LlamaForCausalLM.forward_reference: positions must be whole sequences, each 0, 1, ..., n-1 "
                "(the reference has no KV cache, so it cannot continue a sequence)"
            )
    return lens


class LlamaForCausalLM(torch.nn.Module):
    """Llama-style causal LM with random quantized weights from ``config.seed``; ready to run once built.

    Weights are drawn from a ``torch.Generator`` on ``device`` seeded with ``config.seed``,
    so the same config on the same device type gives the same model in every process.
    The constructor calibrates the static activation scales on a fixed random prompt
    batch. Everything is a buffer (no parameters): the model is inference-only.

    ``forward(input_ids [T], positions [T]) -> logits [T, vocab]`` in ``config.dtype``
    runs a flat batch of new tokens (all sequences concatenated) and compiles with
    ``fullgraph=True``. Attention reads the batch layout and the KV caches from the
    forward context, so call it through :class:`~fxfuse.models.ModelRunner` (or inside
    ``fxfuse.attention.set_forward_context``); outside one the attention op raises
    :class:`~fxfuse.attention.NoForwardContextError`.

    **Attention layers.** Construction registers one
    :class:`~fxfuse.attention.AttentionLayer` per decoder layer, with the backend
    ``attention_backend`` (``"native"``, ``"native-noquant"``, another backend's name, or
    an instance), named ``f"{prefix}.layers.{i}.self_attn"``. The prefix is
    ``layer_prefix`` if given (it must be free), else the first free one of ``"model"``,
    ``"model_1"``, ``"model_2"``, ...; a prefix is free when no live model holds it and no
    registered layer name starts with it. So the first model of a process is
    ``model.layers.{i}.self_attn``, a second one alive at the same time
    ``model_1.layers.{i}.self_attn``, and so on; names are freed by :meth:`close` or
    when the model is garbage-collected (whichever comes first), and then reused.

    **Tensor parallelism.** With ``config.tp_size > 1`` the model is one rank's part of
    the model: construct it on every rank of ``tp_group`` (default: the world group, which
    must then have ``tp_size`` ranks), each in its own process. A rank holds its share of
    the heads (and registers its attention layers, and so its KV caches, with that many
    heads) and of the MLP, and all-reduces the partial sums of ``o_proj`` and ``down_proj``
    (`fxfuse.models.parallel`); embedding, norms and LM head are replicated. Every rank
    computes the same logits, and they are those of ``tp_size=1``: the partial sums are
    added in fp32 and rounded once, where ``tp_size=1`` rounds its fp32 GEMM sum once
    (`TensorParallel.partial_sum_dtype`), so only fp32 reassociation can tell them apart.

    Example:
        >>> model = LlamaForCausalLM(ModelConfig.preset("tiny", num_layers=3))
        >>> model.attention_layer_names[0]
        'model.layers.0.self_attn'
        >>> compiled = torch.compile(model, fullgraph=True)
        >>> ModelRunner(model, compiled).generate([[1, 2, 3], [4, 5]], max_new_tokens=4)
    """

    def __init__(
        self,
        config: ModelConfig,
        device: Union[str, torch.device] = "cpu",
        attention_backend: Union[str, AttentionBackend] = "native",
        layer_prefix: Optional[str] = None,
        tp_group: Optional[object] = None,
    ) -> None:
        super().__init__()
        self.config = config
        device = torch.device(device)
        c = config
        self.tp = TensorParallel.resolve(c.tp_size, tp_group)
        backend = resolve_attention_backend(attention_backend)
        self.attention_backend_name: str = backend.name
        gen = torch.Generator(device=device).manual_seed(c.seed)

        def randn(*shape: int, std: float) -> torch.Tensor:
            return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std).to(c.dtype)

        prefix = _claim_prefix(layer_prefix)
        names = [f"{prefix}.layers.{i}.self_attn" for i in range(c.num_layers)]
        registered: list[AttentionLayer] = []
        try:
            for name in names:
                layer = AttentionLayer(name, c.local_num_heads, c.local_num_kv_heads, c.head_dim, backend)
                registered.append(register_layer(layer))
        except BaseException:
            _release_layers(prefix, tuple(registered))
            raise
        layers = tuple(registered)
        self.layer_prefix: str = prefix
        self._finalizer = weakref.finalize(self, _release_layers, prefix, layers)

        # Unit-RMS embeddings put the residual stream at the same scale as the layers' writes.
        self.register_buffer("embed_tokens", randn(c.vocab_size, c.hidden_size, std=1.0))
        self.layers = torch.nn.ModuleList(
            LlamaDecoderLayer(c, i, gen, device, names[i], self.tp) for i in range(c.num_layers)
        )
        self.register_buffer("final_norm_weight", (1.0 + randn(c.hidden_size, std=0.05)).to(c.dtype))
        # Logits of roughly unit scale: greedy picks depend on the input, not on ties.
        self.register_buffer("lm_head_weight", randn(c.vocab_size, c.hidden_size, std=c.hidden_size**-0.5))
        self.requires_grad_(False)
        self.eval()
        self.calibrate(random_prompts(c, lengths=list(_CALIBRATION_LENGTHS), seed=c.seed + 1))

    @property
    def device(self) -> torch.device:
        """The device the weights live on.

        Example:
            >>> LlamaForCausalLM(ModelConfig.preset("tiny")).device
            device(type='cpu')
        """
        return self.embed_tokens.device

    @property
    def attention_layer_names(self) -> list[str]:
        """The registered attention layer names, one per decoder layer, in order."""
        return [layer.layer_name for layer in self.layers]

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran (or the layers were released otherwise)."""
        return not self._finalizer.alive

    def close(self) -> None:
        """Unregister this model's attention layers and free its name prefix; idempotent.

        Afterwards a forward fails (the attention op finds no layer of that name).
        Called automatically when the model is garbage-collected.
        """
        self._finalizer()

    def linears(self) -> dict[str, QuantLinear]:
        """Every quantized linear layer by qualified name, in forward order (four per layer).

        Example:
            >>> list(model.linears())[:2]
            ['layers.0.qkv_proj', 'layers.0.o_proj']
        """
        return {name: m for name, m in self.named_modules() if isinstance(m, (Fp8Linear, Nvfp4Linear, BlockFp8Linear))}

    def _forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        mode: str,
        query_lens: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        c = self.config
        if input_ids.dim() != 1 or positions.dim() != 1:
            raise ValueError(
                f"LlamaForCausalLM: input_ids and positions must be flat [tokens] tensors, got shapes "
                f"{tuple(input_ids.shape)} and {tuple(positions.shape)}"
            )
        if input_ids.shape[0] != positions.shape[0]:
            raise ValueError(
                f"LlamaForCausalLM: input_ids and positions must have one entry per token, got "
                f"{input_ids.shape[0]} and {positions.shape[0]}"
            )
        x = F.embedding(input_ids, self.embed_tokens)
        cos, sin = rotary_cos_sin(positions, c.head_dim, c.rope_theta)

        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, mode, query_lens)
        h, _ = _fx.fused_add_rms_norm(x, residual, self.final_norm_weight, c.rms_eps)
        return h @ self.lm_head_weight.t()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Quantized forward of a flat batch: ``input_ids [T]``, ``positions [T]`` (int64) -> ``logits [T, vocab]``.

        Runs inside a forward context whose metadata describes the batch (see
        :class:`~fxfuse.models.ModelRunner`).

        Example:
            >>> ModelRunner(model).logits([[5, 6, 7]]).shape
            torch.Size([3, 256])
        """
        return self._forward(input_ids, positions, _QUANT)

    def forward_reference(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        query_lens: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        """The same model without activation quantization and without the KV cache: the
        yardstick for the quantized forward's accuracy and for the paged attention.

        Each linear multiplies by its dequantized weight in fp32 (rounded to
        ``config.dtype``); attention is plain SDPA over each whole sequence. The batch
        must therefore hold whole sequences: ``query_lens`` gives their lengths, or, if
        omitted, they are read from ``positions`` (each sequence counts 0, 1, ..., n-1).
        Needs no forward context.

        Example:
            >>> ids, pos, lens = pack_prompts([[5, 6, 7], [8, 9]])
            >>> model.forward_reference(ids, pos).shape
            torch.Size([5, 256])
        """
        if query_lens is None:
            query_lens = _whole_sequence_lens(positions)
        elif sum(query_lens) != input_ids.shape[0]:
            raise ValueError(
                f"LlamaForCausalLM.forward_reference: query_lens {list(query_lens)} must add up to the "
                f"number of tokens ({input_ids.shape[0]})"
            )
        with torch.no_grad():
            return self._forward(input_ids, positions, _REFERENCE, list(query_lens))

    def calibrate(self, prompts: Prompts) -> dict[str, float]:
        """Set every static activation scale from its input's ``amax`` (floored at 1e-6) on ``prompts``.

        FP8 sites get ``input_scale = amax / 448``, NVFP4 sites
        ``input_global_scale = 448 * 6 / amax``. Runs the quantized forward once eagerly
        (one batched prefill, with this model's own temporary KV caches); each site is
        calibrated on the activations that the already-calibrated sites before it
        produce, i.e. exactly what it sees at inference. Returns the new scales
        (``input_scale`` or ``input_global_scale``) by linear-layer name; block-scaled
        FP8 sites (``quant="fp8-block"``) quantize with dynamic scales and have none.

        Example:
            >>> scales = model.calibrate([[1, 2, 3], [4, 5, 6, 7]])
            >>> scales["layers.0.qkv_proj"] > 0
            True
        """

        def calibrating_forward(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return self._forward(input_ids, positions, _CALIBRATE)

        with torch.no_grad():
            ModelRunner(self, calibrating_forward).logits(prompts)
        return {
            name: float((m.input_scale if isinstance(m, Fp8Linear) else m.input_global_scale).item())
            for name, m in self.linears().items()
            if not isinstance(m, BlockFp8Linear)
        }
