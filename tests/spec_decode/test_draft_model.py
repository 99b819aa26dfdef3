"""Speculative decoding with a draft model: a second checkpoint with the target's vocabulary proposes k tokens per
step from its own paged KV cache (indexed by the target's block tables, with lookahead slots).

The strongest check of the draft's KV bookkeeping is a draft identical to the target: with correct positions,
slots and catch-up, nearly every greedy draft is accepted. A different tiny model (Qwen2 drafting for Llama) checks
the ordinary case, where drafts are often rejected. In every case the output equals plain decoding.
"""
import pytest
import torch

from graphserve import LLM, SamplingParams
from graphserve.engine.arg_utils import EngineArgs
from tests.spec_decode.test_spec_decode_engine import _prompts, _run, _spec_counts, _summary


def _draft(path: str, k: int = 3, **extra) -> dict:
    return {"model": path, "num_speculative_tokens": k, **extra}


def _random_prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 500, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_the_target_as_its_own_draft_is_almost_always_accepted(llama_dir, plain):
    prompts = _random_prompts(6, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    llm = LLM(llama_dir, dtype="float32", speculative_config=_draft(llama_dir, k=4))
    assert llm.llm_engine.config.speculative_config.method == "draft_model"
    assert _summary(_run(llm, prompts, params)) == _summary(_run(plain, prompts, params))
    drafts, tokens, accepted = _spec_counts(llm)
    assert drafts > 0 and accepted / tokens > 0.9, (drafts, tokens, accepted)
    # Every verify step of 4 drafts emitted close to 5 tokens: 32 tokens per request in about 7 steps.
    assert 1 + accepted / drafts > 4.0
    assert llm.llm_engine.engine_core.scheduler.kv_cache_manager.usage == 0.0


@pytest.mark.parametrize("k", [1, 3])
def test_another_model_as_draft_gives_the_plain_output(llama_dir, qwen_dir, plain, k):
    prompts = _prompts(8, seed=2) + _random_prompts(4, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    llm = LLM(llama_dir, dtype="float32", speculative_config=_draft(qwen_dir, k=k))
    got, expected = _run(llm, prompts, params), _run(plain, prompts, params)
    assert _summary(got) == _summary(expected)
    for x, y in zip(got, expected):
        assert x.outputs[0].cumulative_logprob == pytest.approx(y.outputs[0].cumulative_logprob, abs=1e-4)
    drafts, tokens, accepted = _spec_counts(llm)
    assert drafts > 0 and accepted < tokens


def test_chunked_prefill_preemption_prefix_caching_and_stops(llama_dir, plain):
    """A small token budget (prompts in chunks, the draft catching up chunk by chunk), a pool too small for the
    batch (preemption: the draft restarts from position 0), shared prefixes (cached target blocks the draft
    recomputes), stop ids inside accepted runs and max_tokens: all give the plain outputs."""
    shared = _random_prompts(1, seed=4)[0] * 2
    prompts = [shared + p for p in _random_prompts(10, seed=5)]
    free = _run(plain, prompts, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    params = [SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[o.outputs[0].token_ids[20]])
              if i % 2 else SamplingParams(temperature=0.0, max_tokens=20 + 2 * i, ignore_eos=True)
              for i, o in enumerate(free)]
    llm = LLM(llama_dir, dtype="float32", speculative_config=_draft(llama_dir, k=4), num_gpu_blocks_override=12,
              max_num_batched_tokens=32)
    assert _summary(_run(llm, prompts, params)) == _summary(_run(plain, prompts, params))
    core = llm.llm_engine.engine_core
    assert core.scheduler.num_preemptions > 0 and core.scheduler.prefix_cache_hits > 0
    drafts, tokens, accepted = _spec_counts(llm)
    assert drafts > 0 and accepted / tokens > 0.9  # the KV of restarted and chunked requests is caught up right
    assert core.scheduler.kv_cache_manager.usage == 0.0


def test_seeded_sampling_reproduces_and_greedy_rows_match(llama_dir, qwen_dir, plain):
    prompts = _random_prompts(4, seed=6)
    llm = LLM(llama_dir, dtype="float32", speculative_config=_draft(qwen_dir, k=3))
    seeded = [SamplingParams(temperature=0.9, top_k=50, seed=10 + i, max_tokens=20, ignore_eos=True)
              for i in range(4)]
    first = _summary(_run(llm, prompts, seeded))
    assert first == _summary(_run(llm, prompts[::-1], seeded[::-1]))[::-1]
    mixed = [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True),
             SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)] * 2
    got, greedy = _run(llm, prompts, mixed), _run(plain, prompts, mixed)
    assert [o.outputs[0].token_ids for o in got[1::2]] == [o.outputs[0].token_ids for o in greedy[1::2]]


def test_lookahead_slots_are_reserved_for_the_draft(llama_dir):
    llm = LLM(llama_dir, dtype="float32", speculative_config=_draft(llama_dir, k=5), block_size=16)
    scheduler = llm.llm_engine.engine_core.scheduler
    assert scheduler.num_lookahead_tokens == 5
    ngram = LLM(llama_dir, dtype="float32", speculative_config={"method": "ngram", "num_speculative_tokens": 5})
    assert ngram.llm_engine.engine_core.scheduler.num_lookahead_tokens == 0


def test_config_errors_name_the_field(llama_dir, tmp_path):
    with pytest.raises(ValueError, match="speculative_config.model"):
        EngineArgs(model=llama_dir, speculative_config=_draft(str(tmp_path / "missing"))).create_engine_config()
    import json
    import shutil

    other = tmp_path / "other-vocab"
    shutil.copytree(llama_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] = 640
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="vocabulary"):
        EngineArgs(model=llama_dir, speculative_config=_draft(str(other))).create_engine_config()
    with pytest.raises(ValueError, match="model is required"):
        EngineArgs(model=llama_dir, speculative_config={"method": "draft_model",
                                                        "num_speculative_tokens": 2}).create_engine_config()
