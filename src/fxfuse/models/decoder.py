"""The reference decoder, for every model family: embedding, decoder layers, final norm, LM head.

The model exists to exercise the fusion passes end to end, so its graph shape is a
contract. Every decoder layer (`fxfuse.models.layers.DecoderLayer`) contains exactly

- two "RMS norm -> quant" chains (before the QKV and the gate/up projections; the norm is
  ``rms_norm`` in layer 0 and ``fused_add_rms_norm`` after, or their Gemma ``(1 + w)``
  forms in the ``"gemma"`` norm),
- one "activation -> quant" chain before the down projection (``silu_and_mul`` in the
  SiLU families; GeGLU in plain PyTorch in Gemma 3, which no fused op covers),
- one "``attention`` -> ``view`` -> quant" chain before the output projection,
- one "``rotary_embedding`` -> ``attention``" chain (q and k rotated, then attended;
  attention writes the KV cache), preceded in the ``qk_norm`` families (Qwen3, Gemma 3)
  by the per-head norm of q and k ("norm per head -> ``rotary_embedding``"),

where "quant" is ``static_scaled_fp8_quant`` with ``quant="fp8"``, ``nvfp4_quant`` with
``quant="nvfp4"`` (the activation and attention chains; the norm chains stay FP8), and
``group_fp8_quant`` with ``quant="fp8-block"``; nothing else quantizes. Gemma 3 adds two
norms per layer that feed no quant (the sandwich norms of the attention and MLP
outputs). The final norm is not followed by a quant (the LM head is a plain matmul in
the model dtype). What each fusion pass therefore matches, per family and quant scheme,
is `fxfuse.cli.expected_matches`; docs/models.md has the table.

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
:class:`DecoderForCausalLM` for the naming rule.

Example:
    >>> import torch
    >>> from fxfuse.models import ModelConfig, ModelRunner, build_model
    >>> model = build_model(ModelConfig.preset("qwen3-tiny"))
    >>> type(model).__name__, model.attention_layer_names
    ('Qwen3ForCausalLM', ['model.layers.0.self_attn', 'model.layers.1.self_attn'])
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
from fxfuse.ops.rotary import rotary_cos_sin_cache

from .config import ModelConfig
from .layers import DecoderLayer, add_rms_norm
from .linear import CALIBRATE, QUANT, REFERENCE, BlockFp8Linear, Fp8Linear, Nvfp4Linear, QuantLinear
from .parallel import TensorParallel
from .runner import ModelRunner, Prompts, random_prompts

#: Calibration prompt lengths; small so that building even the 8B preset stays cheap.
_CALIBRATION_LENGTHS = (32, 24)

#: Attention backends by the name a model's ``attention_backend=`` takes.
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


def _claim_prefix(requested: Optional[str], owner: str = "DecoderForCausalLM") -> str:
    """The instance prefix of a new model's layer names (see :class:`DecoderForCausalLM`);
    ``owner`` (the model's class name) starts the error messages."""
    with _PREFIX_LOCK:
        registered = registered_layer_names()
        if requested is not None:
            if not isinstance(requested, str) or not requested or requested.endswith("."):
                raise ValueError(f"{owner}: layer_prefix must be a non-empty str without a trailing '.', "
                                 f"got {requested!r}")
            if not _prefix_free(requested, registered):
                raise ValueError(
                    f"{owner}: layer_prefix {requested!r} is in use by another model or "
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



def _whole_sequence_lens(positions: torch.Tensor, owner: str) -> list[int]:
    """Lengths of the whole sequences a flat ``positions`` batch holds (each restarts at 0)."""
    pos = positions.tolist()
    if not pos or pos[0] != 0:
        raise ValueError(f"{owner}.forward_reference: positions must be whole sequences, each 0, 1, ..., n-1")
    lens: list[int] = []
    for p in pos:
        if p == 0:
            lens.append(1)
        elif p == lens[-1]:
            lens[-1] += 1
        else:
            raise ValueError(
                f"{owner}.forward_reference: positions must be whole sequences, each 0, 1, ..., n-1 "
                "(the reference has no KV cache, so it cannot continue a sequence)"
            )
    return lens



class DecoderForCausalLM(torch.nn.Module):
    """A causal LM of any family (``config.family``) with random quantized weights from
    ``config.seed``; ready to run once built. Each family's class (`LlamaForCausalLM`,
    `Qwen3ForCausalLM`, `Gemma3ForCausalLM`) is this model for its family's configs;
    :func:`build_model` picks the class from the config.

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

    **Family.** The layers are `fxfuse.models.layers.DecoderLayer`s composed as
    ``config.spec`` says; the model adds the embedding (times ``sqrt(hidden_size)`` where
    the family scales it: Gemma), the rotary cos/sin cache (``[max_position, head_dim]``, fp32: the
    buffer ``cos_sin_cache``, shared by every layer), the final norm and the LM head.

    Example:
        >>> model = LlamaForCausalLM(ModelConfig.preset("tiny", num_layers=3))
        >>> model.attention_layer_names[0]
        'model.layers.0.self_attn'
        >>> compiled = torch.compile(model, fullgraph=True)
        >>> ModelRunner(model, compiled).generate([[1, 2, 3], [4, 5]], max_new_tokens=4)
    """

    #: The family this class builds (None: whichever the config names).
    family: Optional[str] = None

    def __init__(
        self,
        config: ModelConfig,
        device: Union[str, torch.device] = "cpu",
        attention_backend: Union[str, AttentionBackend] = "native",
        layer_prefix: Optional[str] = None,
        tp_group: Optional[object] = None,
    ) -> None:
        super().__init__()
        if self.family is not None and config.family != self.family:
            raise ValueError(
                f"{type(self).__name__} builds the {self.family!r} family, but the config is of family "
                f"{config.family!r}: use {model_class(config.family).__name__} or fxfuse.models.build_model(config)"
            )
        self.config = config
        device = torch.device(device)
        c = config
        self.tp = TensorParallel.resolve(c.tp_size, tp_group)
        backend = resolve_attention_backend(attention_backend)
        self.attention_backend_name: str = backend.name
        gen = torch.Generator(device=device).manual_seed(c.seed)

        def randn(*shape: int, std: float, dtype: torch.dtype = c.dtype) -> torch.Tensor:
            return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype)

        prefix = _claim_prefix(layer_prefix, type(self).__name__)
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

        spec = c.spec
        # Unit-RMS embeddings put the residual stream at the same scale as the layers' writes
        # (a family that scales them by sqrt(hidden) draws them that much smaller).
        self.embed_scale = c.hidden_size**0.5 if spec.scale_embeddings else None
        embed_std = c.hidden_size**-0.5 if spec.scale_embeddings else 1.0
        self.register_buffer("embed_tokens", randn(c.vocab_size, c.hidden_size, std=embed_std))
        self.register_buffer("cos_sin_cache", rotary_cos_sin_cache(c.max_position, c.head_dim, c.rope_theta,
                                                                   device=device))
        self.layers = torch.nn.ModuleList(
            DecoderLayer(c, i, gen, device, names[i], self.tp) for i in range(c.num_layers)
        )
        if spec.norm == "gemma":
            self.register_buffer("final_norm_weight", randn(c.hidden_size, std=0.05, dtype=torch.float32))
        else:
            self.register_buffer("final_norm_weight", (1.0 + randn(c.hidden_size, std=0.05)).to(c.dtype))
        # Logits of roughly unit scale: greedy picks depend on the input, not on ties. Drawn
        # for every family, Gemma's tied one too: with random weights the final hidden state
        # is mostly the token's own embedding, so a tied head would pick the input token
        # every time and token-equality checks would prove nothing.
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
        owner = type(self).__name__
        if input_ids.dim() != 1 or positions.dim() != 1:
            raise ValueError(
                f"{owner}: input_ids and positions must be flat [tokens] tensors, got shapes "
                f"{tuple(input_ids.shape)} and {tuple(positions.shape)}"
            )
        if input_ids.shape[0] != positions.shape[0]:
            raise ValueError(
                f"{owner}: input_ids and positions must have one entry per token, got "
                f"{input_ids.shape[0]} and {positions.shape[0]}"
            )
        x = F.embedding(input_ids, self.embed_tokens)
        if self.embed_scale is not None:
            # In the model dtype, as Gemma scales them (the normalizer is rounded to it first).
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)

        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, self.cos_sin_cache, mode, query_lens)
        h, _ = add_rms_norm(c.spec.norm, x, residual, self.final_norm_weight, c.rms_eps)
        return h @ self.lm_head_weight.t()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Quantized forward of a flat batch: ``input_ids [T]``, ``positions [T]`` (int64) -> ``logits [T, vocab]``.

        Runs inside a forward context whose metadata describes the batch (see
        :class:`~fxfuse.models.ModelRunner`).

        Example:
            >>> ModelRunner(model).logits([[5, 6, 7]]).shape
            torch.Size([3, 256])
        """
        return self._forward(input_ids, positions, QUANT)

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
            query_lens = _whole_sequence_lens(positions, type(self).__name__)
        elif sum(query_lens) != input_ids.shape[0]:
            raise ValueError(
                f"{type(self).__name__}.forward_reference: query_lens {list(query_lens)} must add up to the "
                f"number of tokens ({input_ids.shape[0]})"
            )
        with torch.no_grad():
            return self._forward(input_ids, positions, REFERENCE, list(query_lens))

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
            return self._forward(input_ids, positions, CALIBRATE)

        with torch.no_grad():
            ModelRunner(self, calibrating_forward).logits(prompts)
        return {
            name: float((m.input_scale if isinstance(m, Fp8Linear) else m.input_global_scale).item())
            for name, m in self.linears().items()
            if not isinstance(m, BlockFp8Linear)
        }



#: The model class of each family, filled as the family modules define them.
MODEL_CLASSES: dict[str, type[DecoderForCausalLM]] = {}


def model_class(family: str) -> type[DecoderForCausalLM]:
    """The model class that builds ``family`` (``"llama"``, ``"qwen3"``, ``"gemma3"``).

    Example:
        >>> model_class("gemma3").__name__
        'Gemma3ForCausalLM'
    """
    from . import gemma3, llama, qwen3  # noqa: F401  (each registers its class)

    if family not in MODEL_CLASSES:
        raise ValueError(f"no model class for family {family!r}; known: {', '.join(sorted(MODEL_CLASSES))}")
    return MODEL_CLASSES[family]


def build_model(config: ModelConfig, **kwargs: object) -> DecoderForCausalLM:
    """The model of ``config``'s family, built with ``kwargs`` (``device``,
    ``attention_backend``, ``layer_prefix``, ``tp_group``).

    Example:
        >>> build_model(ModelConfig.preset("gemma3-tiny"), attention_backend="native").config.family
        'gemma3'
    """
    return model_class(config.family)(config, **kwargs)
