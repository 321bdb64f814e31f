"""The Gemma 3 family (Gemma 3's text decoder; ``ModelConfig.family == "gemma3"``).

What differs from Llama (`fxfuse.models.config.FAMILIES`):

- **Gemma's RMSNorm** everywhere: ``x * rsqrt(mean(x^2) + eps) * (1 + w)`` in fp32,
  rounded once, with fp32 weights stored as offsets from 1 (``gemma_rms_norm`` and its
  fused forms; a Llama-norm kernel on these weights would be wrong twice over);
- **q and k normalized per head** with that norm before the rotary embedding (the chain
  ``qk_norm_rope_fusion`` fuses into ``qk_gemma_norm_rope``);
- **sandwich norms**: the attention output and the MLP output are normalized before they
  join the residual stream, so a layer has four norms (input, post-attention,
  pre-feedforward, post-feedforward);
- **GeGLU**: the MLP's activation is ``gelu_tanh(gate) * up``, written in plain PyTorch
  (no fused ``gelu_and_mul`` op exists; Inductor fuses the pointwise ops, and the quant
  after them stays a separate op, so ``act_quant_fusion`` does not apply);
- **scaled embeddings**: embeddings times ``sqrt(hidden_size)`` (in the model dtype);
- ``num_heads * head_dim`` differs from ``hidden_size``.

Not modelled: the 5:1 interleave of sliding-window (local, rope base 1e4) and global
layers: ``fxfuse::attention`` has no sliding window, so every layer is global (rope base
1e6); ``query_pre_attn_scalar``, which equals ``head_dim`` in the 12B preset's shapes,
so the attention scale ``1 / sqrt(head_dim)`` is Gemma's; and the tied LM head: with
random weights the last hidden state is mostly the token's own embedding, so a tied head
would predict the input token every time and prove nothing, so it is drawn separately. The preset ``"gemma3-12b"`` has
Gemma-3-12B's text shapes (48 layers, hidden 3840, 16/8 heads of 256, intermediate 15360,
vocabulary 262208); ``"gemma3-tiny"`` runs on a CPU. Tensor parallelism is not built for
this family (``ModelConfig`` refuses ``tp_size > 1``).

Example:
    >>> from fxfuse.models import Gemma3ForCausalLM, ModelConfig, ModelRunner
    >>> model = Gemma3ForCausalLM(ModelConfig.preset("gemma3-tiny"))
    >>> model.layers[0].post_feedforward_norm_weight.dtype
    torch.float32
    >>> ModelRunner(model).logits([[1, 2, 3]]).shape
    torch.Size([3, 256])
"""

from __future__ import annotations

from .decoder import MODEL_CLASSES, DecoderForCausalLM


class Gemma3ForCausalLM(DecoderForCausalLM):
    """A Gemma-3-style causal LM (configs of family ``"gemma3"``): see :class:`DecoderForCausalLM`.

    Example:
        >>> Gemma3ForCausalLM(ModelConfig.preset("gemma3-tiny", num_layers=1)).final_norm_weight.dtype
        torch.float32
    """

    family = "gemma3"


MODEL_CLASSES["gemma3"] = Gemma3ForCausalLM

__all__ = ["Gemma3ForCausalLM"]
