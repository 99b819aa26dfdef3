"""Automatic prefix caching end to end (tiny Llama, fp32): outputs with the cache equal outputs without it.

The workload shares system prompts and few-shot prefixes whose lengths end exactly on, just before and just
after block boundaries (block_size 16), includes whole-prompt duplicates and n > 1, and runs once with an ample
KV pool and once with a pool small enough to force eviction and preemption.
"""
import argparse

import pytest
import torch

from graphserve import LLM, SamplingParams
from graphserve.engine.arg_utils import EngineArgs

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
BLOCK = 16


def _tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 512, (n,), generator=g).tolist()


def _workload() -> list[list[int]]:
    # Two block-aligned systems make equal few-shot blocks follow different prefixes: only the chained hash
    # tells them apart.
    systems = [_tokens(3 * BLOCK, 1), _tokens(2 * BLOCK, 2), _tokens(4 * BLOCK + 1, 3), _tokens(2 * BLOCK - 1, 4)]
    few_shots = [[], _tokens(BLOCK, 5), _tokens(BLOCK + 1, 6), _tokens(2 * BLOCK - 1, 7)]
    prompts = []
    for i, system in enumerate(systems):
        for j, shots in enumerate(few_shots):
            for k, suffix_len in enumerate((0, 1, 7)):
                if (i + j + k) % 2 == 0:  # a varied half of the grid keeps the test fast
                    prompts.append(system + shots + _tokens(suffix_len, 1000 + 100 * i + 10 * j + k))
    prompts.append(list(prompts[0]))  # a whole prompt twice (ends on a block boundary: 48 tokens)
    prompts.append(list(prompts[3]))
    return prompts


def _run(llm, prompts, params=GREEDY):
    return llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)


def _assert_same(a, b, atol=1e-5):
    for x, y in zip(a, b, strict=True):
        for cx, cy in zip(x.outputs, y.outputs, strict=True):
            assert cx.token_ids == cy.token_ids
            for ex, ey in zip(cx.logprobs or [], cy.logprobs or [], strict=True):
                assert ex.keys() == ey.keys()
                assert all(abs(ex[t].logprob - ey[t].logprob) < atol for t in ex)


def _scheduler(llm):
    return llm.llm_engine.engine_core.scheduler


@pytest.fixture(scope="module")
def llama_dir(tiny_model):
    return tiny_model("llama")[0]


@pytest.fixture(scope="module")
def reference(llama_dir):
    """Cache off, ample pool."""
    llm = LLM(llama_dir, dtype="float32", enable_prefix_caching=False, max_num_batched_tokens=256)
    outputs = _run(llm, _workload())
    assert _scheduler(llm).prefix_cache_queries == 0
    return llm, outputs


@pytest.fixture(scope="module")
def cached_llm(llama_dir):
    return LLM(llama_dir, dtype="float32", max_num_batched_tokens=256)


def test_cache_on_matches_cache_off(cached_llm, reference):
    outputs = _run(cached_llm, _workload())
    _assert_same(outputs, reference[1])
    scheduler = _scheduler(cached_llm)
    assert scheduler.prefix_cache_hits > 0.5 * sum(o.num_cached_tokens for o in outputs) > 0
    # The second copy of the 48-token prompt reuses 2 blocks: the block holding its last token is recomputed.
    assert outputs[-2].num_cached_tokens == 2 * BLOCK
    assert all(o.num_cached_tokens % BLOCK == 0 for o in outputs)
    # A second pass over the same workload finds every prompt's full blocks (but the last token's) cached.
    again = _run(cached_llm, _workload())
    _assert_same(again, reference[1])
    assert [o.num_cached_tokens for o in again] == [(len(o.prompt_token_ids) - 1) // BLOCK * BLOCK for o in again]


def test_cache_on_matches_under_eviction_and_preemption(llama_dir, reference):
    # 12 blocks of 16 tokens for 26 prompts of 32-97 tokens: cached blocks get evicted, running requests preempted.
    llm = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=12, max_num_batched_tokens=64)
    pool = _scheduler(llm).kv_cache_manager.block_pool
    evicted = []
    get_new_blocks = pool.get_new_blocks

    def counting_get_new_blocks(num_blocks):
        evicted.extend(i for i in list(pool.iter_free_block_ids())[:num_blocks]
                       if pool.blocks[i].block_hash is not None)
        return get_new_blocks(num_blocks)

    pool.get_new_blocks = counting_get_new_blocks
    outputs = _run(llm, _workload())
    _assert_same(outputs, reference[1])
    scheduler = _scheduler(llm)
    assert scheduler.num_preemptions > 0 and scheduler.prefix_cache_hits > 0 and evicted
    assert pool.get_num_free_blocks() == 12


def test_parallel_sampling_children_share_the_prompt(cached_llm, reference):
    prompt = _tokens(2 * BLOCK + 5, 17)
    assert cached_llm.reset_prefix_cache()
    seeded = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=3, ignore_eos=True, logprobs=1)
    out = _run(cached_llm, [prompt], seeded)[0]
    ref = _run(reference[0], [prompt], seeded)[0]
    _assert_same([out], [ref])
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # the children really are different samples
    # Children 1 and 2 waited one step for child 0's prompt blocks, then shared them.
    assert out.num_cached_tokens == 2 * BLOCK


def test_prompt_logprobs_are_computed_not_skipped(cached_llm, reference):
    prompt = _workload()[5]
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3)
    _run(cached_llm, [prompt])  # warm: the prompt's blocks are cached
    out = _run(cached_llm, [prompt], params)[0]
    ref = _run(reference[0], [prompt], params)[0]
    assert out.num_cached_tokens == 0 and len(out.prompt_logprobs) == len(prompt)
    for a, b in zip(out.prompt_logprobs[1:], ref.prompt_logprobs[1:], strict=True):
        assert a.keys() == b.keys() and all(abs(a[t].logprob - b[t].logprob) < 1e-5 for t in a)


def test_cache_salt_isolates(cached_llm):
    prompt = _tokens(3 * BLOCK + 2, 18)
    short = SamplingParams(temperature=0.0, max_tokens=2)

    def cached(salt=None):
        request = {"prompt_token_ids": prompt} if salt is None else {"prompt_token_ids": prompt, "cache_salt": salt}
        return cached_llm.generate(request, short, use_tqdm=False)[0].num_cached_tokens

    assert [cached(), cached(), cached("tenant-a"), cached("tenant-b"), cached("tenant-a")] == [0, 48, 0, 0, 48]
    for bad in ("", 7):
        with pytest.raises(ValueError, match="cache_salt"):
            cached(bad)


def test_reset_prefix_cache(cached_llm):
    prompt = _tokens(2 * BLOCK + 1, 19)
    first = _run(cached_llm, [prompt])[0]
    assert _run(cached_llm, [prompt])[0].num_cached_tokens == 2 * BLOCK
    assert cached_llm.reset_prefix_cache()
    assert _scheduler(cached_llm).kv_cache_manager.block_pool.num_cached_blocks == 0
    again = _run(cached_llm, [prompt])[0]
    assert again.num_cached_tokens == 0
    _assert_same([again], [first])


def test_flag_default_and_cli_spelling():
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    assert EngineArgs.from_cli_args(parser.parse_args([])).enable_prefix_caching is True
    off = EngineArgs.from_cli_args(parser.parse_args(["--no-enable-prefix-caching"]))
    assert off.enable_prefix_caching is False
    assert EngineArgs.from_cli_args(parser.parse_args(["--enable-prefix-caching"])).enable_prefix_caching is True
