"""Exact self-consistency of the engine: chunking, preemption and batch composition never change outputs."""
import pytest
import torch

from graphserve import LLM, SamplingParams


def _prompts(n: int, lo: int = 5, hi: int = 60, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(4, 512, (k,), generator=g).tolist() for k in lens]


GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)


def _run(llm, prompts, params=GREEDY):
    return llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)


def _assert_same(a, b, atol=1e-5):
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for ex, ey in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
            assert ex.keys() == ey.keys()
            for tok in ex:
                assert abs(ex[tok].logprob - ey[tok].logprob) < atol


@pytest.fixture(scope="module")
def llama_dir(tiny_model):
    return tiny_model("llama")[0]


@pytest.fixture(scope="module")
def reference(llama_dir):
    """Ample pool, whole prefills (no chunking), one big step budget."""
    llm = LLM(llama_dir, dtype="float32", enable_chunked_prefill=False, max_num_batched_tokens=1024)
    return llm, _run(llm, _prompts(12))


def test_chunked_prefill_matches_whole_prefill(llama_dir, reference):
    llm = LLM(llama_dir, dtype="float32", max_num_batched_tokens=16, max_num_seqs=4)
    outputs = _run(llm, _prompts(12))
    _assert_same(outputs, reference[1])


def test_preemption_matches_ample_pool(llama_dir, reference):
    # 10 blocks of 16 tokens = 160 token slots for 12 requests of up to ~84 tokens each: preemption must happen.
    llm = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=10, max_num_batched_tokens=64)
    outputs = _run(llm, _prompts(12))
    assert llm.llm_engine.engine_core.scheduler.num_preemptions > 0
    _assert_same(outputs, reference[1])
    assert llm.llm_engine.engine_core.scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == 10


def test_seeded_request_alone_equals_in_busy_batch(reference):
    llm = reference[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=24, ignore_eos=True)
    prompt = _prompts(1, seed=7)[0]
    alone = _run(llm, [prompt], seeded)[0].outputs[0].token_ids
    noise = [SamplingParams(temperature=0.8, max_tokens=30, ignore_eos=True) for _ in range(6)]
    others = _prompts(6, seed=8)
    busy = llm.generate(prompt_token_ids=others[:3] + [prompt] + others[3:],
                        sampling_params=noise[:3] + [seeded] + noise[3:], use_tqdm=False)
    assert busy[3].outputs[0].token_ids == alone
    # And the seed matters: another seed gives another sample.
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=4321, max_tokens=24, ignore_eos=True)
    assert _run(llm, [prompt], other_seed)[0].outputs[0].token_ids != alone


def test_seeded_request_survives_preemption(llama_dir):
    seeded = SamplingParams(temperature=1.0, seed=99, max_tokens=40, ignore_eos=True)
    prompts = _prompts(10, seed=3)
    ample = LLM(llama_dir, dtype="float32")
    tight = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=8, max_num_batched_tokens=48)
    a = _run(ample, prompts, seeded)
    b = _run(tight, prompts, seeded)
    assert tight.llm_engine.engine_core.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
