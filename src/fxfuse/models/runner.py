"""Batched prefill and greedy decode over a paged KV cache, around a (possibly compiled) forward.

The model's forward takes a *flat* token batch, vLLM style: the new tokens of every
sequence concatenated, ``input_ids [T]`` and ``positions [T]``. Which token belongs to
which sequence, and where each sequence's past keys and values live, is not an input:
:class:`ModelRunner` puts it in the forward context (:mod:`fxfuse.attention`) around
each call, together with one :class:`~fxfuse.attention.KVCache` per attention layer.

Example:
    >>> import torch
    >>> from fxfuse.models import LlamaForCausalLM, ModelConfig, ModelRunner, random_prompts
    >>> model = LlamaForCausalLM(ModelConfig.preset("tiny"))
    >>> prompts = random_prompts(model.config, lengths=[5, 9, 3], seed=0)
    >>> runner = ModelRunner(model, torch.compile(model, fullgraph=True), block_size=16)
    >>> tokens = runner.generate(prompts, max_new_tokens=4)
    >>> [len(t) for t in tokens]
    [4, 4, 4]
"""

from __future__ import annotations

import contextlib
import heapq
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence, Union

import torch

from ..attention import AttentionMetadata, ForwardContext, KVCache, get_layer, set_forward_context
from .config import ModelConfig

#: ``forward(input_ids [T], positions [T]) -> logits [T, vocab]``.
Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: Prompts: ragged lists of token ids, or a ``[batch, seq]`` tensor (one prompt a row).
Prompts = Union[Sequence[Sequence[int]], torch.Tensor]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mark_tokens_dynamic(*tensors: torch.Tensor) -> None:
    # The token count changes between prefill and decode (and between batches); without
    # this a compiled forward would be specialized to the first T and recompile on the
    # next. Dynamo always specializes sizes 0 and 1, so T == 1 (one sequence decoding)
    # is left static: it costs one more compile, after which every T >= 2 and T == 1
    # are both served.
    for t in tensors:
        if t.shape[0] >= 2:
            torch._dynamo.mark_dynamic(t, 0)


DEFAULT_BLOCK_SIZE = 16


def _preferred_block_size(model: torch.nn.Module) -> int:
    """The largest KV block size the model's attention backends prefer on its device
    (``AttentionBackend.preferred_block_size``), else 16."""
    wants = [get_layer(name).backend.preferred_block_size(model.device) for name in model.attention_layer_names]
    return max([w for w in wants if w] or [DEFAULT_BLOCK_SIZE])


def random_prompts(
    config: ModelConfig,
    batch: Optional[int] = None,
    seq_len: Optional[int] = None,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
    *,
    lengths: Optional[Sequence[int]] = None,
) -> Union[list[list[int]], torch.Tensor]:
    """Prompts of token ids drawn uniformly from the vocabulary; the same for the same seed.

    With ``lengths``: a ragged ``list[list[int]]``, prompt ``i`` of ``lengths[i]`` tokens
    (what :class:`ModelRunner` takes). With ``batch`` and ``seq_len`` instead: a LongTensor
    ``[batch, seq_len]`` on ``device`` (equal-length prompts, one a row; the runner takes
    that too). Ids are drawn on the CPU, so they do not depend on ``device``.

    Example:
        >>> cfg = ModelConfig.preset("tiny")
        >>> [len(p) for p in random_prompts(cfg, lengths=[5, 9, 3], seed=0)]
        [5, 9, 3]
        >>> random_prompts(cfg, batch=2, seq_len=5, seed=0).shape
        torch.Size([2, 5])
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if lengths is not None:
        if batch is not None or seq_len is not None:
            raise ValueError("random_prompts: give either `lengths` or `batch` and `seq_len`, not both")
        lengths = list(lengths)
        if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in lengths):
            raise ValueError(f"random_prompts: `lengths` must be a non-empty list of positive ints, got {lengths}")
        ids = torch.randint(0, config.vocab_size, (sum(lengths),), generator=gen, dtype=torch.long)
        return [chunk.tolist() for chunk in ids.split(lengths)]
    if batch is None or seq_len is None:
        raise ValueError("random_prompts: give `lengths`, or both `batch` and `seq_len`")
    if batch <= 0 or seq_len <= 0:
        raise ValueError(f"random_prompts: batch and seq_len must be positive, got batch={batch}, seq_len={seq_len}")
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=gen, dtype=torch.long)
    return ids.to(device)


def _as_prompt_lists(prompts: Prompts, vocab_size: Optional[int] = None) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"prompts: a tensor of prompts must be [batch, seq], got shape {tuple(prompts.shape)}")
        lists = prompts.tolist()
    else:
        lists = [list(p) for p in prompts]
    if not lists:
        raise ValueError("prompts: need at least one prompt")
    for i, p in enumerate(lists):
        if not p:
            raise ValueError(f"prompts: prompt {i} is empty")
        for tok in p:
            if isinstance(tok, bool) or not isinstance(tok, int):
                raise ValueError(f"prompts: prompt {i} holds {tok!r}; token ids must be ints")
            if vocab_size is not None and not 0 <= tok < vocab_size:
                raise ValueError(f"prompts: prompt {i} holds token id {tok}, outside the vocabulary [0, {vocab_size})")
    return lists


def pack_prompts(
    prompts: Prompts, device: Union[str, torch.device, None] = None
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Whole prompts as one flat batch: ``(input_ids [T], positions [T], lengths)``.

    Positions restart at 0 for each prompt. This is a prefill's input; the matching
    metadata is what :class:`ModelRunner` builds.

    Example:
        >>> ids, pos, lens = pack_prompts([[7, 8, 9], [4, 5]])
        >>> ids.tolist(), pos.tolist(), lens
        ([7, 8, 9, 4, 5], [0, 1, 2, 0, 1], [3, 2])
    """
    lists = _as_prompt_lists(prompts)
    lengths = [len(p) for p in lists]
    ids = torch.tensor([t for p in lists for t in p], dtype=torch.long, device=device)
    positions = torch.cat([torch.arange(n, dtype=torch.long) for n in lengths]).to(device)
    return ids, positions, lengths


@dataclass
class _Sequence:
    tokens: list[int]
    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in the cache


@dataclass
class RunResult:
    """What :meth:`ModelRunner.run` (and :func:`run`) measured.

    ``logits`` are the prefill logits ``[T, vocab]`` (all prompts' tokens, concatenated in
    prompt order); ``tokens`` the greedy continuation, LongTensor ``[batch,
    max_new_tokens]`` (every sequence gets the same number of new tokens);
    ``compile_s`` the wall time of the first forward call, the prefill (which includes
    compilation for a compiled forward); ``run_s`` the wall time of the decode steps that
    follow (``decode_steps`` of them, one token per sequence each); ``prompt_lens`` the
    prompts' lengths (to split ``logits``).

    Example:
        >>> r = run(model, model, prompts, max_new_tokens=8)
        >>> print(f"first call {r.compile_s:.2f}s, decode {r.run_s:.2f}s")
    """

    logits: torch.Tensor
    tokens: torch.Tensor
    compile_s: float
    run_s: float
    decode_steps: int = 0
    prompt_lens: list[int] = field(default_factory=list)


class ModelRunner:
    """Owns one paged KV cache per attention layer of ``model`` and runs batches through ``forward``.

    ``model`` is the eager module: it gives the config, the device and the attention
    layer names (``model.attention_layer_names``). ``forward`` is what gets called,
    ``forward(input_ids [T], positions [T]) -> logits [T, vocab]``: the model itself
    (default) or a ``torch.compile`` of it. Every call runs inside
    ``set_forward_context(ForwardContext(metadata, kv_caches))``.

    KV blocks of ``block_size`` slots (default: the largest block size the layers'
    attention backends prefer on the model's device, 64 for the triton backend on Hopper,
    else 16) are handed out per sequence as it grows and freed
    when a :meth:`generate` / :meth:`run` / :meth:`logits` call ends (the caches'
    contents stay; a later request simply overwrites them). With ``num_blocks=None`` the
    caches are allocated, or re-allocated larger, to fit each request; a fixed
    ``num_blocks`` makes a request that needs more fail up front.

    The token dimension of each call's ``input_ids``/``positions`` is marked dynamic
    (when ``T >= 2``), so a compiled forward compiles once for prefill and decode of any
    batch, plus once more if a step has ``T == 1`` (a single sequence decoding).

    Example:
        >>> runner = ModelRunner(model, block_size=8)
        >>> tokens = runner.generate([[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12]], max_new_tokens=5)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        forward: Optional[Forward] = None,
        block_size: Optional[int] = None,
        num_blocks: Optional[int] = None,
    ) -> None:
        if block_size is None:
            block_size = _preferred_block_size(model)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"ModelRunner: block_size must be a positive int or None, got {block_size!r}")
        if num_blocks is not None and (isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks <= 0):
            raise ValueError(f"ModelRunner: num_blocks must be a positive int or None, got {num_blocks!r}")
        self.model = model
        self.forward: Forward = forward if forward is not None else model
        self.config: ModelConfig = model.config
        self.device: torch.device = model.device
        self.block_size = block_size
        self.layer_names: list[str] = list(model.attention_layer_names)
        self._fixed_size = num_blocks is not None
        self.kv_caches: dict[str, KVCache] = {}
        self._free: list[int] = []
        self.num_blocks = 0
        if num_blocks is not None:
            self._allocate(num_blocks)

    # ------------------------------------------------------------------ blocks

    def _allocate(self, num_blocks: int) -> None:
        c = self.config
        self.kv_caches = {
            # A tensor-parallel rank caches its own KV heads only.
            name: KVCache.allocate(num_blocks, self.block_size, c.local_num_kv_heads, c.head_dim, c.dtype, self.device)
            for name in self.layer_names
        }
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks))  # a sorted list is a valid heap

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _reserve(self, final_lens: Sequence[int]) -> None:
        """Make sure blocks for sequences of ``final_lens`` tokens exist (no sequence is live)."""
        need = sum(self._blocks_for(n) for n in final_lens)
        if need <= self.num_blocks:
            return
        if self._fixed_size:
            raise ValueError(
                f"ModelRunner: this request needs {need} KV-cache blocks of {self.block_size} slots, "
                f"but the cache has {self.num_blocks} (num_blocks); use fewer or shorter sequences, "
                f"or a larger num_blocks"
            )
        self._allocate(need)

    def _grow(self, seq: _Sequence, num_tokens: int) -> None:
        while len(seq.blocks) < self._blocks_for(num_tokens):
            if not self._free:
                raise RuntimeError(f"ModelRunner: out of KV-cache blocks ({self.num_blocks} in all)")
            seq.blocks.append(heapq.heappop(self._free))

    def _release(self, seqs: Sequence[_Sequence]) -> None:
        for seq in seqs:
            for b in seq.blocks:
                heapq.heappush(self._free, b)
            seq.blocks = []

    # ------------------------------------------------------------------ one forward call

    @contextlib.contextmanager
    def _batch(
        self, seqs: Sequence[_Sequence], new_tokens: Sequence[Sequence[int]]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Blocks, metadata and forward context for ``new_tokens[i]`` of every ``seqs[i]``
        (appended after its cached tokens); yields ``(input_ids, positions)``."""
        query_lens, seq_lens, ids, positions = [], [], [], []
        for seq, new in zip(seqs, new_tokens):
            start, end = seq.num_cached, seq.num_cached + len(new)
            self._grow(seq, end)
            query_lens.append(len(new))
            seq_lens.append(end)
            ids.extend(new)
            positions.extend(range(start, end))
        metadata = AttentionMetadata.from_lens(
            query_lens, seq_lens, [s.blocks for s in seqs], self.block_size, device=self.device
        )
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        _mark_tokens_dynamic(input_ids, pos)
        with torch.no_grad(), set_forward_context(ForwardContext(metadata, self.kv_caches)):
            yield input_ids, pos
        for seq, n in zip(seqs, seq_lens):
            seq.num_cached = n

    def _step(self, seqs: Sequence[_Sequence], new_tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        """Run ``new_tokens[i]`` of every ``seqs[i]`` through ``forward`` in one batch."""
        with self._batch(seqs, new_tokens) as (input_ids, positions):
            return self.forward(input_ids, positions)

    # ------------------------------------------------------------------ public

    @contextlib.contextmanager
    def prefill_context(self, prompts: Prompts) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A prefill of whole ``prompts`` set up but not run: inside the ``with`` block the
        forward context (metadata, KV caches) is set and ``(input_ids, positions)`` are
        yielded, for calling or tracing the model by hand; the blocks are freed on exit.

        Example:
            >>> with runner.prefill_context([[1, 2, 3], [4, 5]]) as (input_ids, positions):
            ...     gm = make_fx(model)(input_ids, positions)
        """
        lists = _as_prompt_lists(prompts, self.config.vocab_size)
        self._reserve([len(p) for p in lists])
        seqs = [_Sequence(list(p)) for p in lists]
        try:
            with self._batch(seqs, lists) as inputs:
                yield inputs
        finally:
            self._release(seqs)

    def logits(self, prompts: Prompts) -> torch.Tensor:
        """Prefill logits ``[T, vocab]`` of whole ``prompts`` in one batch, in fresh blocks (no
        earlier cache content is read). Running each step's full sequences through this is
        generation without a KV cache.

        Example:
            >>> runner.logits([[1, 2, 3], [4, 5]]).shape
            torch.Size([5, 256])
        """
        with self.prefill_context(prompts) as (input_ids, positions):
            return self.forward(input_ids, positions)

    def run(self, prompts: Prompts, max_new_tokens: int) -> RunResult:
        """One batched prefill of all ``prompts`` (ragged), then ``max_new_tokens - 1`` greedy
        decode steps, each one token per sequence in one batch, reading past K/V from the
        cache. Timed: the prefill (first call, where compilation happens) separately from
        the decode steps.

        Example:
            >>> r = runner.run([[1, 2, 3], [4, 5]], max_new_tokens=4)
            >>> r.tokens.shape, r.logits.shape
            (torch.Size([2, 4]), torch.Size([5, 256]))
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"ModelRunner: max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        lists = _as_prompt_lists(prompts, self.config.vocab_size)
        lens = [len(p) for p in lists]
        # The last new token is never fed back, so a sequence ends with len + max_new - 1 cached.
        self._reserve([n + max(max_new_tokens - 1, 0) for n in lens])
        seqs = [_Sequence(list(p)) for p in lists]
        ends = torch.tensor(lens, device=self.device).cumsum(0) - 1
        new: list[list[int]] = [[] for _ in lists]
        try:
            _synchronize(self.device)
            t0 = time.perf_counter()
            logits = self._step(seqs, lists)
            next_ids = logits[ends].argmax(dim=-1).tolist() if max_new_tokens else []
            _synchronize(self.device)
            t1 = time.perf_counter()
            steps = 0
            for step in range(max_new_tokens):
                for seq, out, tok in zip(seqs, new, next_ids):
                    out.append(tok)
                    seq.tokens.append(tok)
                if step == max_new_tokens - 1:
                    break
                step_logits = self._step(seqs, [[tok] for tok in next_ids])
                next_ids = step_logits.argmax(dim=-1).tolist()
                steps += 1
            _synchronize(self.device)
            t2 = time.perf_counter()
        finally:
            self._release(seqs)
        tokens = torch.tensor(new, dtype=torch.long).reshape(len(lists), max_new_tokens)
        return RunResult(
            logits=logits, tokens=tokens, compile_s=t1 - t0, run_s=t2 - t1, decode_steps=steps, prompt_lens=lens
        )

    def generate(self, prompts: Prompts, max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation of each prompt: ``max_new_tokens`` new ids per prompt (see :meth:`run`).

        Example:
            >>> runner.generate([[1, 2, 3], [4, 5, 6, 7, 8]], max_new_tokens=3)
            [[..., ..., ...], [..., ..., ...]]
        """
        if max_new_tokens == 0:
            _as_prompt_lists(prompts, self.config.vocab_size)
            return [[] for _ in range(len(prompts))]
        return self.run(prompts, max_new_tokens).tokens.tolist()


def generate(
    model: torch.nn.Module,
    prompts: Prompts,
    max_new_tokens: int,
    forward: Optional[Forward] = None,
    block_size: Optional[int] = None,
) -> list[list[int]]:
    """``ModelRunner(model, forward, block_size).generate(prompts, max_new_tokens)``.

    Example:
        >>> generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=4)
    """
    return ModelRunner(model, forward, block_size=block_size).generate(prompts, max_new_tokens)


def run(
    model: torch.nn.Module,
    forward: Optional[Forward],
    prompts: Prompts,
    max_new_tokens: int,
    block_size: Optional[int] = None,
) -> RunResult:
    """Prefill all ``prompts`` in one batch (timed separately: this is where compilation
    happens), then greedy-decode ``max_new_tokens`` per prompt with the KV cache.

    ``model`` is the eager module (config, device, attention layers); ``forward`` is
    what gets called: the model itself (``None``) or ``torch.compile(model)``.
    ``prompts`` is a ragged ``list[list[int]]`` or a ``[batch, seq]`` tensor.

    Example:
        >>> model = LlamaForCausalLM(ModelConfig.preset("tiny"))
        >>> prompts = random_prompts(model.config, lengths=[8, 5], seed=0)
        >>> result = run(model, torch.compile(model, fullgraph=True), prompts, max_new_tokens=8)
        >>> result.logits.shape, result.tokens.shape
        (torch.Size([13, 256]), torch.Size([2, 8]))
    """
    return ModelRunner(model, forward, block_size=block_size).run(prompts, max_new_tokens)
