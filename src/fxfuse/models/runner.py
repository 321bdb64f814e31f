"""Greedy generation and timing around a (possibly compiled) model forward.

Example:
    >>> import torch
    >>> from fxfuse.models import LlamaForCausalLM, ModelConfig, random_prompts, run
    >>> cfg = ModelConfig.preset("tiny")
    >>> model = LlamaForCausalLM(cfg)
    >>> ids = random_prompts(cfg, batch=2, seq_len=8, seed=0)
    >>> result = run(model, torch.compile(model, fullgraph=True), ids, max_new_tokens=4)
    >>> result.tokens.shape
    torch.Size([2, 4])
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Union

import torch

from .config import ModelConfig

Forward = Callable[[torch.Tensor], torch.Tensor]


def _mark_seq_dynamic(ids: torch.Tensor) -> None:
    # Generation grows the sequence by one every step; without this a compiled forward
    # is specialized to the first length and recompiles on the next. Dynamo always
    # specializes size-0/1 dims, so a length-1 input is left static (one extra compile
    # when the sequence reaches length 2, then none).
    if ids.shape[1] >= 2:
        torch._dynamo.mark_dynamic(ids, 1)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_prompts(
    config: ModelConfig, batch: int, seq_len: int, seed: int, device: Union[str, torch.device] = "cpu"
) -> torch.Tensor:
    """Token ids ``[batch, seq_len]`` drawn uniformly from the vocabulary; the same for the same seed.

    The ids are drawn on the CPU (so they do not depend on ``device``) and then moved.

    Example:
        >>> cfg = ModelConfig.preset("tiny")
        >>> ids = random_prompts(cfg, batch=2, seq_len=5, seed=0)
        >>> ids.shape, ids.dtype
        (torch.Size([2, 5]), torch.int64)
        >>> bool((ids == random_prompts(cfg, 2, 5, seed=0)).all())
        True
    """
    if batch <= 0 or seq_len <= 0:
        raise ValueError(f"random_prompts: batch and seq_len must be positive, got batch={batch}, seq_len={seq_len}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=gen, dtype=torch.long)
    return ids.to(device)


def generate(forward: Forward, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding: ``max_new_tokens`` new ids per row, ``[batch, max_new_tokens]``.

    There is no KV cache yet, so each step re-runs ``forward`` on the whole sequence so
    far and appends the argmax of the last position. The sequence dim of every step's
    input is marked dynamic, so a ``torch.compile``-d forward compiles once for all lengths.

    Example:
        >>> model = LlamaForCausalLM(ModelConfig.preset("tiny"))
        >>> ids = torch.tensor([[1, 2, 3]])
        >>> generate(model, ids, max_new_tokens=5).shape
        torch.Size([1, 5])
    """
    if input_ids.dim() != 2:
        raise ValueError(f"generate: input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    ids = input_ids
    new_tokens = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            _mark_seq_dynamic(ids)
            logits = forward(ids)
            next_ids = logits[:, -1, :].argmax(dim=-1, keepdim=True).to(ids.dtype)
            new_tokens.append(next_ids)
            ids = torch.cat([ids, next_ids], dim=1)
    if not new_tokens:
        return input_ids.new_empty((input_ids.shape[0], 0))
    return torch.cat(new_tokens, dim=1)


@dataclass
class RunResult:
    """What :func:`run` measured.

    ``logits`` are the prefill logits ``[batch, seq, vocab]``; ``tokens`` the greedy
    continuation ``[batch, max_new_tokens]``; ``compile_s`` the wall time of the first
    forward call (which includes compilation for a compiled forward); ``run_s`` the wall
    time of the generation that follows.

    Example:
        >>> r = run(model, model, ids, max_new_tokens=2)
        >>> print(f"compile {r.compile_s:.2f}s, decode {r.run_s:.2f}s")
    """

    logits: torch.Tensor
    tokens: torch.Tensor
    compile_s: float
    run_s: float


def run(model: torch.nn.Module, forward: Forward, input_ids: torch.Tensor, max_new_tokens: int) -> RunResult:
    """Prefill once (timed separately: this is where compilation happens), then greedy-generate.

    ``model`` is the eager module (it decides the device the ids are moved to);
    ``forward`` is what gets called: the model itself or ``torch.compile(model)``.

    Example:
        >>> model = LlamaForCausalLM(ModelConfig.preset("tiny"))
        >>> ids = random_prompts(model.config, batch=1, seq_len=8, seed=0)
        >>> result = run(model, torch.compile(model, fullgraph=True), ids, max_new_tokens=8)
        >>> result.logits.shape, result.tokens.shape
        (torch.Size([1, 8, 256]), torch.Size([1, 8]))
    """
    device = next(iter(model.buffers()), input_ids).device
    input_ids = input_ids.to(device)
    with torch.no_grad():
        _synchronize(device)
        t0 = time.perf_counter()
        # Marked like generate()'s inputs, so the graph compiled here is the one reused.
        _mark_seq_dynamic(input_ids)
        logits = forward(input_ids)
        _synchronize(device)
        t1 = time.perf_counter()
        tokens = generate(forward, input_ids, max_new_tokens)
        _synchronize(device)
        t2 = time.perf_counter()
    return RunResult(logits=logits, tokens=tokens, compile_s=t1 - t0, run_s=t2 - t1)
