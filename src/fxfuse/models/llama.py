"""The Llama family: Llama 2/3-style decoders (``ModelConfig.family == "llama"``).

What the family is made of (`fxfuse.models.config.FAMILIES`): Llama's RMSNorm (normalized
row rounded to the model dtype, then times a model-dtype weight) before attention and
before the MLP, rotary embeddings (NeoX pairs, full rotary), GQA attention over the paged
KV cache, a SwiGLU MLP (``silu_and_mul``), untied embedding and LM head. Everything else
is the shared decoder (`fxfuse.models.decoder`, `fxfuse.models.layers`); the preset with
real shapes is ``"llama3-8b"``, the CPU one ``"tiny"``.

The names this module has always exported (the linears, the attention backend lookup,
the layer class) are kept here for code that imports them from it.

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

from .decoder import MODEL_CLASSES, ATTENTION_BACKENDS, DecoderForCausalLM, resolve_attention_backend
from .layers import DecoderLayer
from .linear import FP8_DTYPE, FP8_MAX, MIN_CALIBRATION_AMAX, BlockFp8Linear, Fp8Linear, Nvfp4Linear, QuantLinear

#: The decoder layer (shared by every family since the families were split out).
LlamaDecoderLayer = DecoderLayer


class LlamaForCausalLM(DecoderForCausalLM):
    """A Llama-style causal LM (configs of family ``"llama"``): see :class:`DecoderForCausalLM`.

    Example:
        >>> model = LlamaForCausalLM(ModelConfig.preset("tiny", num_layers=3))
        >>> compiled = torch.compile(model, fullgraph=True)
        >>> ModelRunner(model, compiled).generate([[1, 2, 3], [4, 5]], max_new_tokens=4)
    """

    family = "llama"


MODEL_CLASSES["llama"] = LlamaForCausalLM

__all__ = [
    "LlamaForCausalLM", "LlamaDecoderLayer", "Fp8Linear", "Nvfp4Linear", "BlockFp8Linear", "QuantLinear",
    "ATTENTION_BACKENDS", "resolve_attention_backend", "FP8_DTYPE", "FP8_MAX", "MIN_CALIBRATION_AMAX",
]
