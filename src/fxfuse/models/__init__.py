"""Reference models that exercise the fxfuse ops and fusion passes end to end.

Example:
    >>> import torch
    >>> from fxfuse.models import LlamaForCausalLM, ModelConfig, ModelRunner, random_prompts
    >>> cfg = ModelConfig.preset("tiny")
    >>> model = LlamaForCausalLM(cfg)
    >>> prompts = random_prompts(cfg, lengths=[8, 5, 11], seed=0)
    >>> runner = ModelRunner(model, torch.compile(model, fullgraph=True))
    >>> [len(t) for t in runner.generate(prompts, max_new_tokens=4)]
    [4, 4, 4]
"""

from .config import PRESETS, QUANT_SCHEMES, ModelConfig
from .llama import (
    ATTENTION_BACKENDS,
    BlockFp8Linear,
    Fp8Linear,
    LlamaForCausalLM,
    Nvfp4Linear,
    resolve_attention_backend,
)
from .runner import ModelRunner, RunResult, generate, pack_prompts, random_prompts, run

__all__ = [
    "ModelConfig", "PRESETS", "QUANT_SCHEMES",
    "LlamaForCausalLM", "Fp8Linear", "Nvfp4Linear", "BlockFp8Linear", "ATTENTION_BACKENDS", "resolve_attention_backend",
    "ModelRunner", "RunResult", "generate", "pack_prompts", "random_prompts", "run",
]
