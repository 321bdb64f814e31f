"""Configuration of the reference models: shapes, numerics, and the model family.

A *family* (:class:`Family`, ``ModelConfig.family``) is what a decoder layer is made of
beyond shapes: which RMSNorm, whether q and k are normalized per head, the MLP's
activation, the extra norms around attention and MLP. Every family is composed of the
same layers (`fxfuse.models.layers`), so a family is a row of :data:`FAMILIES`, not a copy
of a model.

Example:
    >>> from fxfuse.models import ModelConfig
    >>> cfg = ModelConfig.preset("tiny", num_layers=3)
    >>> cfg.num_layers, cfg.hidden_size
    (3, 64)
    >>> ModelConfig.preset("qwen3-tiny").spec.qk_norm
    True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

#: Quantization schemes the model can be built with: ``"fp8"`` (static FP8 activations
#: into every linear), ``"nvfp4"`` (FP8 into QKV and gate/up; NVFP4 activations and
#: weights, emulated, into the output and down projections) and ``"fp8-block"``
#: (DeepSeek-V3-style block-scaled FP8 everywhere: per-token-group activations, 128x128
#: block weights).
QUANT_SCHEMES = frozenset({"fp8", "nvfp4", "fp8-block"})

#: NVFP4 quantizes blocks of this many elements along the reduction dimension.
_NVFP4_BLOCK = 16
#: Activation group sizes of ``"fp8-block"`` (those of ``fxfuse.ops.group_quant``).
_GROUP_SIZES = (64, 128)
#: ``"fp8-block"`` weights have one scale per block of this many rows and columns.
_WEIGHT_BLOCK = 128

#: Activation dtypes the fxfuse ops accept.
MODEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class Family:
    """What a model family's decoder layer is made of, beyond its shapes.

    - ``norm``: ``"rms"`` (Llama's RMSNorm: ``rms_norm``/``fused_add_rms_norm``, weights in
      the model dtype) or ``"gemma"`` (``(1 + w)``: ``gemma_rms_norm``/``fused_add_gemma_rms_norm``,
      fp32 weights stored as offsets from 1, as Gemma checkpoints keep them);
    - ``qk_norm``: q and k are normalized per head (that norm, weight ``[head_dim]``)
      before the rotary embedding (Qwen3, Gemma 3);
    - ``activation``: the gated MLP's activation: ``"silu"`` (SwiGLU, ``silu_and_mul``) or
      ``"gelu_tanh"`` (GeGLU, written in plain PyTorch: no fused op covers it; see
      docs/models.md);
    - ``sandwich_norms``: the attention and MLP outputs are normalized too, before they
      join the residual stream (Gemma 2/3: ``post_attention_layernorm``,
      ``post_feedforward_layernorm``);
    - ``scale_embeddings``: embeddings are multiplied by ``sqrt(hidden_size)`` (Gemma);
    - ``q_size_is_hidden``: ``num_heads * head_dim`` must equal ``hidden_size`` (true of
      every Llama checkpoint, so a wrong head_dim is caught; Qwen3 and Gemma 3 have models
      where the two differ);
    - ``tensor_parallel``: whether the family's tensor-parallel path is built and tested.

    Example:
        >>> FAMILIES["gemma3"].norm, FAMILIES["llama"].qk_norm
        ('gemma', False)
    """

    name: str
    norm: str = "rms"
    qk_norm: bool = False
    activation: str = "silu"
    sandwich_norms: bool = False
    scale_embeddings: bool = False
    q_size_is_hidden: bool = True
    tensor_parallel: bool = True


#: The model families, by ``ModelConfig.family``.
FAMILIES: dict[str, Family] = {
    "llama": Family("llama"),
    "qwen3": Family("qwen3", qk_norm=True, q_size_is_hidden=False),
    # Tensor parallel Gemma would all-reduce into a plain (1 + w) norm, which no pass fuses;
    # it is not built, rather than built and untested.
    "gemma3": Family("gemma3", norm="gemma", qk_norm=True, activation="gelu_tanh", sandwich_norms=True,
                     scale_embeddings=True, q_size_is_hidden=False, tensor_parallel=False),
}

_POSITIVE_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "tp_size",
    "max_position",
)


@dataclass(frozen=True)
class ModelConfig:
    """Shape, numerics and family of a reference decoder; validated on construction.

    ``family`` names the layer composition (:data:`FAMILIES`: ``"llama"``, ``"qwen3"``,
    ``"gemma3"``); ``max_position`` is the number of rows of the rotary cos/sin cache
    (positions must be below it). ``dtype`` is the activation/weight dtype outside the
    FP8 GEMMs; ``seed`` fixes the random weights; ``quant`` names the linear-layer
    quantization scheme:

    - ``"fp8"``: per-tensor FP8 weights and static per-tensor FP8 activations everywhere;
    - ``"nvfp4"``: the QKV and gate/up projections as in ``"fp8"``; the output and down
      projections take NVFP4 activations (static global scale, 16-element E4M3 block
      scales) and NVFP4 weights, multiplied in fp32 after dequantization (emulated
      W4A4). Needs ``num_heads * head_dim`` and ``intermediate_size`` to be multiples of 16;
    - ``"fp8-block"``: every linear takes per-token-group FP8 activations (one dynamic
      fp32 scale per ``group_size`` elements, column-major scales) and FP8 weights with one
      scale per 128x128 block, as DeepSeek-V3 and Qwen3-FP8 checkpoints do. Nothing is
      calibrated. ``group_size`` (64 or 128) must divide ``hidden_size`` and
      ``intermediate_size`` (the linears' input widths); left ``None`` it is 128 where both
      allow it, else 64.

    ``tp_size`` splits the model over that many ranks (`fxfuse.models.parallel`): each
    holds ``num_heads / tp_size`` query heads and ``num_kv_heads / tp_size`` KV heads (and
    their KV cache) and ``intermediate_size / tp_size`` MLP columns, so all three must
    divide. A rank's slice of a quantized weight must not cut a quantization block: with
    ``"nvfp4"`` the per-rank widths into ``o_proj`` and ``down_proj`` are multiples of 16,
    with ``"fp8-block"`` every per-rank width (q, k/v, MLP) a multiple of the 128x128
    weight blocks.

    Example:
        >>> cfg = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
        ...                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
        >>> cfg.q_size, cfg.kv_size
        (64, 32)
        >>> ModelConfig.preset("tiny", seed=1).seed
        1
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float = 1e-5
    rope_theta: float = 500000.0
    dtype: torch.dtype = torch.bfloat16
    seed: int = 0
    quant: str = "fp8"
    group_size: int | None = None
    tp_size: int = 1
    family: str = "llama"
    max_position: int = 8192

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"ModelConfig.family must be one of {sorted(FAMILIES)}, got {self.family!r}")
        for name in _POSITIVE_INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"ModelConfig.{name} must be an int, got {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {value}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                f"ModelConfig.num_kv_heads ({self.num_kv_heads})"
            )
        if self.spec.q_size_is_hidden and self.hidden_size != self.num_heads * self.head_dim:
            raise ValueError(
                f"ModelConfig.hidden_size ({self.hidden_size}) must equal num_heads * head_dim "
                f"({self.num_heads} * {self.head_dim} = {self.num_heads * self.head_dim}) "
                f"in the {self.family} family"
            )
        # rotate-half RoPE pairs dimension i with i + head_dim/2.
        if self.head_dim % 2 != 0:
            raise ValueError(f"ModelConfig.head_dim must be even (rotary embedding), got {self.head_dim}")
        for name in ("rms_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"ModelConfig.{name} must be a positive number, got {value!r}")
        if self.dtype not in MODEL_DTYPES:
            raise ValueError(
                f"ModelConfig.dtype must be one of ({', '.join(map(str, MODEL_DTYPES))}), got {self.dtype!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"ModelConfig.seed must be a non-negative int, got {self.seed!r}")
        if self.quant not in QUANT_SCHEMES:
            raise ValueError(
                f"ModelConfig.quant must be one of {sorted(QUANT_SCHEMES)}, got {self.quant!r}"
            )
        if self.group_size is not None and self.quant != "fp8-block":
            raise ValueError(
                f"ModelConfig.group_size is the activation group size of quant='fp8-block'; "
                f"leave it None for quant={self.quant!r}"
            )
        if self.quant == "fp8-block":
            group = self.activation_group_size
            if isinstance(group, bool) or not isinstance(group, int) or group not in _GROUP_SIZES:
                raise ValueError(f"ModelConfig.group_size must be one of {_GROUP_SIZES} or None, got {group!r}")
            for name, width in self._linear_input_widths():
                if width % group != 0:
                    raise ValueError(
                        f"ModelConfig.{name} ({width}) must be a multiple of the activation group size "
                        f"({group}) for quant='fp8-block'"
                    )
        if self.quant == "nvfp4":
            for name, width in (("intermediate_size", self.intermediate_size), ("hidden_size", self.q_size)):
                if width % _NVFP4_BLOCK != 0:
                    raise ValueError(
                        f"ModelConfig.{name} ({width}) must be a multiple of {_NVFP4_BLOCK} for "
                        f"quant='nvfp4' (NVFP4 quantizes {_NVFP4_BLOCK}-element blocks)"
                    )
        if self.tp_size > 1:
            if not self.spec.tensor_parallel:
                raise ValueError(f"ModelConfig.tp_size must be 1 for the {self.family} family: its tensor-parallel "
                                 f"path is not built (families that have one: "
                                 f"{', '.join(n for n, f in FAMILIES.items() if f.tensor_parallel)})")
            self._check_tensor_parallel()

    def _check_tensor_parallel(self) -> None:
        tp = self.tp_size
        for name in ("num_heads", "num_kv_heads", "intermediate_size"):
            if getattr(self, name) % tp != 0:
                raise ValueError(
                    f"ModelConfig.{name} ({getattr(self, name)}) must be a multiple of tp_size ({tp}): "
                    "each rank holds an equal share"
                )
        # Per-rank widths of the sharded dims of the quantized weights.
        widths = {"q_size / tp_size": self.local_q_size, "kv_size / tp_size": self.local_kv_size,
                  "intermediate_size / tp_size": self.local_intermediate_size}
        if self.quant == "nvfp4":  # o_proj and down_proj are split along their NVFP4 blocks
            block, what = _NVFP4_BLOCK, "NVFP4 blocks"
            widths.pop("kv_size / tp_size")
        elif self.quant == "fp8-block":  # every linear is split along or across 128x128 blocks
            block, what = _WEIGHT_BLOCK, "128x128 weight blocks"
        else:
            return
        for name, width in widths.items():
            if width % block != 0:
                raise ValueError(
                    f"ModelConfig {name} ({width}) must be a multiple of {block} for quant={self.quant!r} "
                    f"at tp_size={tp}: a rank's slice of a weight must not cut its {what}"
                )

    def _linear_input_widths(self) -> tuple[tuple[str, int], ...]:
        # QKV and gate/up read hidden_size, o_proj num_heads * head_dim (often equal to it),
        # down_proj intermediate_size.
        widths = (("hidden_size", self.hidden_size), ("intermediate_size", self.intermediate_size))
        if self.q_size != self.hidden_size:
            widths += (("num_heads * head_dim", self.q_size),)
        return widths

    @property
    def spec(self) -> Family:
        """The :class:`Family` this config's layers are made of.

        Example:
            >>> ModelConfig.preset("gemma3-tiny").spec.activation
            'gelu_tanh'
        """
        return FAMILIES[self.family]

    @property
    def activation_group_size(self) -> int | None:
        """The per-token-group size of ``quant="fp8-block"`` activations (None for other schemes):
        ``group_size`` if set, else 128 where every linear input width allows it, else 64.

        Example:
            >>> ModelConfig.preset("tiny", quant="fp8-block").activation_group_size
            64
            >>> ModelConfig.preset("llama3-8b", quant="fp8-block").activation_group_size
            128
        """
        if self.quant != "fp8-block":
            return None
        if self.group_size is not None:
            return self.group_size
        return 128 if all(width % 128 == 0 for _, width in self._linear_input_widths()) else 64

    @property
    def q_size(self) -> int:
        """Width of the query projection: ``num_heads * head_dim``.

        Example:
            >>> ModelConfig.preset("tiny").q_size
            64
        """
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of each of the key and value projections: ``num_kv_heads * head_dim``.

        Example:
            >>> ModelConfig.preset("tiny").kv_size
            32
        """
        return self.num_kv_heads * self.head_dim

    @property
    def local_num_heads(self) -> int:
        """Query heads per tensor-parallel rank.

        Example:
            >>> ModelConfig.preset("tiny", tp_size=2).local_num_heads
            2
        """
        return self.num_heads // self.tp_size

    @property
    def local_num_kv_heads(self) -> int:
        """KV heads (and KV-cache heads) per tensor-parallel rank.

        Example:
            >>> ModelConfig.preset("tiny", tp_size=2).local_num_kv_heads
            1
        """
        return self.num_kv_heads // self.tp_size

    @property
    def local_q_size(self) -> int:
        """Query width per rank: ``local_num_heads * head_dim``."""
        return self.local_num_heads * self.head_dim

    @property
    def local_kv_size(self) -> int:
        """Key (and value) width per rank: ``local_num_kv_heads * head_dim``."""
        return self.local_num_kv_heads * self.head_dim

    @property
    def local_intermediate_size(self) -> int:
        """MLP width per rank: ``intermediate_size / tp_size``."""
        return self.intermediate_size // self.tp_size

    @classmethod
    def preset(cls, name: str, **overrides: object) -> "ModelConfig":
        """A copy of ``PRESETS[name]`` with ``overrides`` applied (and validated).

        Raises ``ValueError`` for an unknown preset (listing the valid names) or an
        invalid resulting config, ``TypeError`` for an override that is not a field.

        Example:
            >>> ModelConfig.preset("llama3-8b", num_layers=2).num_layers
            2
        """
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(
                f"unknown ModelConfig field(s) {', '.join(unknown)}; valid fields: {', '.join(sorted(fields))}"
            )
        return dataclasses.replace(PRESETS[name], **overrides)


#: Named configurations. ``"tiny"``, ``"qwen3-tiny"`` and ``"gemma3-tiny"`` run on a CPU in
#: milliseconds and are what tests use; ``"llama3-8b"`` has Llama 3 8B's shapes (RoPE
#: without Llama 3.1's long-context scaling), ``"qwen3-8b"`` Qwen3 8B's, ``"gemma3-12b"``
#: Gemma 3 12B's text decoder's (every layer global: see docs/models.md).
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
    ),
    "llama3-8b": ModelConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
    ),
    "qwen3-tiny": ModelConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_eps=1e-6,
        rope_theta=1000000.0,
        family="qwen3",
    ),
    "qwen3-8b": ModelConfig(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_eps=1e-6,
        rope_theta=1000000.0,
        family="qwen3",
    ),
    # num_heads * head_dim (128) != hidden_size (64), as in every Gemma 3 model.
    "gemma3-tiny": ModelConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        rms_eps=1e-6,
        rope_theta=1000000.0,
        family="gemma3",
    ),
    "gemma3-12b": ModelConfig(
        vocab_size=262208,
        hidden_size=3840,
        intermediate_size=15360,
        num_layers=48,
        num_heads=16,
        num_kv_heads=8,
        head_dim=256,
        rms_eps=1e-6,
        rope_theta=1000000.0,
        family="gemma3",
    ),
}
