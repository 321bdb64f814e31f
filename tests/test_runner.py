"""The model runner: paged KV cache, batched ragged prefill + batched decode, metadata, timing.

Eager only (no torch.compile). The cache paths are proven two ways: a ragged batch gives
the same tokens as each sequence alone (batch invariance), and the same tokens as
generation without a cache (the whole sequence re-run every step in fresh blocks).
Block sizes 4 and 8 with prompts longer than a block, so decode crosses block boundaries.
"""

import pytest
import torch

from fxfuse.attention import NoForwardContextError, get_forward_context
from fxfuse.models import (
    PRESETS,
    LlamaForCausalLM,
    ModelConfig,
    ModelRunner,
    RunResult,
    generate,
    pack_prompts,
    random_prompts,
    run,
)

LENS = [5, 11, 3]  # ragged; 11 spans several blocks of 4 or 8
NEW = 7


@pytest.fixture(scope="module", params=["fp8", "nvfp4"])
def model(request):
    m = LlamaForCausalLM(ModelConfig.preset("tiny", quant=request.param))
    yield m
    m.close()


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(PRESETS["tiny"], lengths=LENS, seed=3)


def _no_cache_generate(model, prompts, max_new_tokens):
    """Greedy generation without a KV cache: every step re-runs each whole sequence in a
    fresh runner (fresh blocks, fresh context) and takes the argmax of its last position."""
    seqs = [list(p) for p in prompts]
    for _ in range(max_new_tokens):
        logits = ModelRunner(model, block_size=16).logits(seqs)
        ends = torch.tensor([len(s) for s in seqs]).cumsum(0) - 1
        for s, tok in zip(seqs, logits[ends].argmax(-1).tolist()):
            s.append(tok)
    return [s[len(p):] for s, p in zip(seqs, prompts)]


# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("block_size", [4, 8])
def test_batched_equals_each_alone(model, prompts, block_size):
    runner = ModelRunner(model, block_size=block_size)
    batched = runner.generate(prompts, NEW)
    assert [len(t) for t in batched] == [NEW] * len(LENS)
    # A lone sequence decodes with T == 1; it must still get exactly the same tokens.
    assert batched == [runner.generate([p], NEW)[0] for p in prompts]
    # Prefill logits are bit-identical too: rows never mix.
    alone = torch.cat([runner.logits([p]) for p in prompts])
    assert torch.equal(runner.logits(prompts), alone)


@pytest.mark.parametrize("block_size", [4, 8])
def test_cache_equals_full_recompute(model, prompts, block_size):
    tokens = ModelRunner(model, block_size=block_size).generate(prompts, NEW)
    assert tokens == _no_cache_generate(model, prompts, NEW)
    assert len({t for seq in tokens for t in seq}) > 4  # not a degenerate continuation


def test_decode_logits_match_recompute(model, prompts):
    # The last decode step's logits (read through the cache) against the same positions
    # computed by a fresh prefill of the whole sequences.
    seen = []

    def forward(ids, pos):
        out = model(ids, pos)
        seen.append(out)
        return out

    tokens = ModelRunner(model, forward, block_size=4).generate(prompts, 4)
    seqs = [p + t[:-1] for p, t in zip(prompts, tokens)]
    full = ModelRunner(model).logits(seqs)
    ends = torch.tensor([len(s) for s in seqs]).cumsum(0) - 1
    torch.testing.assert_close(seen[-1].float(), full[ends].float(), atol=0.05, rtol=0.02)


def test_reuses_blocks_across_requests(model, prompts):
    # Stale cache content from an earlier request must not leak into a later one.
    runner = ModelRunner(model, block_size=4)
    first = runner.generate(prompts, NEW)
    runner.generate(random_prompts(model.config, lengths=[9, 2], seed=11), NEW)
    assert runner.generate(prompts, NEW) == first
    assert sorted(runner._free) == list(range(runner.num_blocks))  # everything released


# --------------------------------------------------------------------------- metadata and inputs


def test_metadata_of_prefill_and_decode(model, prompts):
    calls = []

    def forward(ids, pos):
        meta = get_forward_context().metadata
        calls.append((ids.clone(), pos.clone(), meta, getattr(ids, "_dynamo_dynamic_indices", set()),
                      getattr(pos, "_dynamo_dynamic_indices", set())))
        return model(ids, pos)

    runner = ModelRunner(model, forward, block_size=4)
    tokens = runner.generate(prompts, 3)
    assert len(calls) == 3  # one prefill, two decode steps
    ids, pos, meta, dyn_ids, dyn_pos = calls[0]
    assert ids.tolist() == [t for p in prompts for t in p]
    assert pos.tolist() == [i for n in LENS for i in range(n)]
    assert meta.query_start_loc.tolist() == [0, 5, 16, 19]
    assert meta.seq_lens.tolist() == LENS
    assert meta.max_query_len == 11 and meta.max_seq_len == 11
    assert meta.block_table.dtype == torch.int32 and meta.slot_mapping.dtype == torch.int64
    meta.validate(19, block_size=4, num_blocks=runner.num_blocks)
    # Each sequence's blocks are its own.
    used = [meta.block_table[i, : -(-n // 4)].tolist() for i, n in enumerate(LENS)]
    flat = [b for row in used for b in row]
    assert len(flat) == len(set(flat))
    assert dyn_ids == dyn_pos == {0}  # token dim marked dynamic for a compiled forward
    for step, (ids, pos, meta, dyn_ids, dyn_pos) in enumerate(calls[1:]):
        assert ids.tolist() == [t[step] for t in tokens]
        assert pos.tolist() == [n + step for n in LENS]
        assert meta.query_start_loc.tolist() == [0, 1, 2, 3]
        assert meta.seq_lens.tolist() == [n + step + 1 for n in LENS]
        meta.validate(3, block_size=4, num_blocks=runner.num_blocks)
        assert dyn_ids == dyn_pos == {0}


def test_single_sequence_decode_not_marked_dynamic(model):
    marks = []

    def forward(ids, pos):
        marks.append(getattr(ids, "_dynamo_dynamic_indices", set()))
        return model(ids, pos)

    ModelRunner(model, forward).generate([[1, 2, 3]], 3)
    assert marks == [{0}, set(), set()]  # dynamo would specialize a size-1 dim anyway


def test_prefill_context(model, prompts):
    # The forward context of a prefill, for calling (or tracing/compiling) the model by hand.
    runner = ModelRunner(model, block_size=4)
    with runner.prefill_context(prompts) as (ids, pos):
        assert get_forward_context().metadata.seq_lens.tolist() == LENS
        assert pos.tolist() == [i for n in LENS for i in range(n)]
        logits = model(ids, pos)
    assert torch.equal(logits, runner.logits(prompts))
    with pytest.raises(NoForwardContextError):
        get_forward_context()
    assert sorted(runner._free) == list(range(runner.num_blocks))


def test_num_blocks_fixed_and_on_demand(model, prompts):
    auto = ModelRunner(model, block_size=4)
    assert auto.num_blocks == 0
    auto.generate(prompts, NEW)
    # Prompt + max_new_tokens - 1 tokens per sequence: 11/4 + 17/4 + 9/4 -> 3 + 5 + 3 blocks.
    assert auto.num_blocks == 11
    cache = auto.kv_caches[model.attention_layer_names[0]]
    assert cache.key_cache.shape == (11, 4, 2, 16) and cache.dtype == model.config.dtype
    assert set(auto.kv_caches) == set(model.attention_layer_names)

    fixed = ModelRunner(model, block_size=4, num_blocks=11)
    assert fixed.generate(prompts, NEW) == auto.generate(prompts, NEW)
    with pytest.raises(ValueError, match="needs 12 KV-cache blocks.*has 11"):
        fixed.generate(prompts, NEW + 2)
    with pytest.raises(ValueError, match="block_size"):
        ModelRunner(model, block_size=0)
    with pytest.raises(ValueError, match="num_blocks"):
        ModelRunner(model, num_blocks=0)


# --------------------------------------------------------------------------- API


def test_run_result(model, prompts):
    result = run(model, None, prompts, 4, block_size=8)
    assert isinstance(result, RunResult)
    assert result.logits.shape == (sum(LENS), model.config.vocab_size)
    assert torch.equal(result.logits, ModelRunner(model).logits(prompts))
    assert result.tokens.dtype == torch.long and result.tokens.shape == (3, 4)
    assert result.tokens.tolist() == generate(model, prompts, 4)
    assert result.decode_steps == 3 and result.prompt_lens == LENS
    assert result.compile_s > 0 and result.run_s > 0
    zero = run(model, model, prompts, 0)
    assert zero.tokens.shape == (3, 0) and zero.decode_steps == 0
    assert torch.equal(zero.logits, result.logits)


def test_tensor_prompts_and_zero_tokens(model):
    ids = random_prompts(model.config, batch=2, seq_len=6, seed=1)
    assert isinstance(ids, torch.Tensor) and ids.shape == (2, 6)
    runner = ModelRunner(model, block_size=4)
    assert runner.generate(ids, 3) == runner.generate(ids.tolist(), 3)
    assert runner.generate(ids, 0) == [[], []]


def test_prompt_validation(model):
    runner = ModelRunner(model)
    with pytest.raises(ValueError, match="at least one prompt"):
        runner.generate([], 2)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        runner.generate([[1], []], 2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        runner.generate([[1, 256]], 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        runner.generate([[1, 2]], -1)


def test_random_prompts():
    cfg = PRESETS["tiny"]
    a = random_prompts(cfg, lengths=[5, 9, 3], seed=0)
    assert [len(p) for p in a] == [5, 9, 3]
    assert all(isinstance(t, int) and 0 <= t < cfg.vocab_size for p in a for t in p)
    assert a == random_prompts(cfg, lengths=[5, 9, 3], seed=0)
    assert a != random_prompts(cfg, lengths=[5, 9, 3], seed=1)
    t = random_prompts(cfg, batch=3, seq_len=5, seed=11)
    assert t.shape == (3, 5) and t.dtype == torch.long
    assert torch.equal(t, random_prompts(cfg, 3, 5, seed=11))
    with pytest.raises(ValueError, match="lengths"):
        random_prompts(cfg, lengths=[2, 0])
    with pytest.raises(ValueError, match="not both"):
        random_prompts(cfg, batch=1, seq_len=2, lengths=[2])
    with pytest.raises(ValueError):
        random_prompts(cfg)


def test_pack_prompts():
    ids, pos, lens = pack_prompts([[7, 8, 9], [4, 5]])
    assert ids.tolist() == [7, 8, 9, 4, 5] and ids.dtype == torch.long
    assert pos.tolist() == [0, 1, 2, 0, 1] and pos.dtype == torch.long
    assert lens == [3, 2]


def test_default_block_size_follows_the_backends(model):
    # the native backend (and the triton one off Hopper) states no preference: 16
    assert ModelRunner(model).block_size == 16
    with pytest.raises(ValueError, match="block_size must be a positive int or None"):
        ModelRunner(model, block_size=0)
