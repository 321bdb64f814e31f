"""Reference models that exercise the fxfuse ops and fusion passes end to end.

Example:
    >>> import torch
    >>> from fxfuse.models import LlamaForCausalLM, ModelConfig, generate, random_prompts
    >>> cfg = ModelConfig.preset("tiny")
    >>> model = LlamaForCausalLM(cfg)
    >>> ids = random_prompts(cfg, batch=2, seq_len=8, seed=0)
    >>> generate(torch.compile(model, fullgraph=True), ids, max_new_tokens=4).shape
    torch.Size([2, 4])
"""

from .config import PRESETS, ModelConfig
from .llama import LlamaForCausalLM
from .runner import RunResult, generate, random_prompts, run

__all__ = ["ModelConfig", "PRESETS", "LlamaForCausalLM", "generate", "random_prompts", "run", "RunResult"]
