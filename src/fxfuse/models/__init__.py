"""Reference models that exercise the fxfuse ops and fusion passes end to end.

Three families share one decoder (`fxfuse.models.layers`, `fxfuse.models.decoder`) and
differ by configuration (`fxfuse.models.config.FAMILIES`): Llama (`LlamaForCausalLM`),
Qwen3 (`Qwen3ForCausalLM`: per-head q/k norm) and Gemma 3 (`Gemma3ForCausalLM`: Gemma's
``(1 + w)`` norms, q/k norm, sandwich norms, GeGLU). :func:`build_model` builds the
family a config names.

Example:
    >>> import torch
    >>> from fxfuse.models import ModelConfig, ModelRunner, build_model, random_prompts
    >>> cfg = ModelConfig.preset("qwen3-tiny")
    >>> model = build_model(cfg)
    >>> prompts = random_prompts(cfg, lengths=[8, 5, 11], seed=0)
    >>> runner = ModelRunner(model, torch.compile(model, fullgraph=True))
    >>> [len(t) for t in runner.generate(prompts, max_new_tokens=4)]
    [4, 4, 4]
"""

from .config import FAMILIES, PRESETS, QUANT_SCHEMES, Family, ModelConfig
from .decoder import (
    ATTENTION_BACKENDS,
    MODEL_CLASSES,
    DecoderForCausalLM,
    build_model,
    model_class,
    resolve_attention_backend,
)
from .gemma3 import Gemma3ForCausalLM
from .layers import DecoderLayer
from .linear import BlockFp8Linear, Fp8Linear, Nvfp4Linear
from .llama import LlamaForCausalLM
from .qwen3 import Qwen3ForCausalLM
from .runner import ModelRunner, RunResult, generate, pack_prompts, random_prompts, run

__all__ = [
    "ModelConfig", "PRESETS", "QUANT_SCHEMES", "FAMILIES", "Family",
    "DecoderForCausalLM", "DecoderLayer", "LlamaForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM",
    "MODEL_CLASSES", "build_model", "model_class",
    "Fp8Linear", "Nvfp4Linear", "BlockFp8Linear", "ATTENTION_BACKENDS", "resolve_attention_backend",
    "ModelRunner", "RunResult", "generate", "pack_prompts", "random_prompts", "run",
]
