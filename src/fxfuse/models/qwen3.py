"""The Qwen3 family (dense Qwen3 decoders; ``ModelConfig.family == "qwen3"``).

What differs from Llama is one thing (`fxfuse.models.config.FAMILIES`): **q and k are
RMS-normalized per head** (Llama's RMSNorm over each head's ``head_dim`` features, one
``[head_dim]`` weight for q and one for k, in the model dtype) between the QKV projection
and the rotary embedding. In the graph that is the chain ``qk_norm_rope_fusion`` fuses
into ``qk_norm_rope``. Qwen3 also puts ``num_heads * head_dim`` where it likes (the small
models have it differ from ``hidden_size``) and uses ``rope_theta = 1e6``,
``rms_eps = 1e-6``. The preset ``"qwen3-8b"`` has Qwen3-8B's shapes (36 layers, hidden
4096, 32/8 heads of 128, intermediate 12288, vocabulary 151936); ``"qwen3-tiny"`` runs on
a CPU.

Example:
    >>> from fxfuse.models import ModelConfig, ModelRunner, Qwen3ForCausalLM
    >>> model = Qwen3ForCausalLM(ModelConfig.preset("qwen3-tiny"))
    >>> model.layers[0].q_norm_weight.shape
    torch.Size([16])
    >>> ModelRunner(model).logits([[1, 2, 3]]).shape
    torch.Size([3, 256])
"""

from __future__ import annotations

from .decoder import MODEL_CLASSES, DecoderForCausalLM


class Qwen3ForCausalLM(DecoderForCausalLM):
    """A Qwen3-style causal LM (configs of family ``"qwen3"``): see :class:`DecoderForCausalLM`.

    Example:
        >>> Qwen3ForCausalLM(ModelConfig.preset("qwen3-tiny", num_layers=1)).config.spec.qk_norm
        True
    """

    family = "qwen3"


MODEL_CLASSES["qwen3"] = Qwen3ForCausalLM

__all__ = ["Qwen3ForCausalLM"]
