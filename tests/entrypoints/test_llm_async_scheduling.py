"""Async scheduling (step N+1 launched before step N's tokens reach the host) never changes an output.

On the CPU the device work is synchronous, but every part of the async path runs: the scheduler's in-flight
tokens and placeholders, decode inputs gathered from the previous step's sampled-id tensor, outputs booked one
call later, and the one discarded token of a request that stops.
"""
import pytest
import torch

from graphserve import LLM, SamplingParams
from graphserve.worker.input_batch import InputBatch


def _prompts(n: int, lo: int = 5, hi: int = 60, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(4, 512, (k,), generator=g).tolist() for k in lens]


def _run(llm, prompts, params):
    return llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)


def _summary(outputs):
    return [[(c.token_ids, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outputs]


def _assert_same_logprobs(a, b, atol=1e-5):
    for x, y in zip(a, b):
        for cx, cy in zip(x.outputs, y.outputs):
            assert cx.token_ids == cy.token_ids
            assert (cx.cumulative_logprob is None) == (cy.cumulative_logprob is None)
            if cx.cumulative_logprob is not None:
                assert cx.cumulative_logprob == pytest.approx(cy.cumulative_logprob, abs=1e-4)
            for ex, ey in zip(cx.logprobs or [], cy.logprobs or []):
                assert ex.keys() == ey.keys()
                assert all(abs(ex[t].logprob - ey[t].logprob) < atol for t in ex)


@pytest.fixture
def pending_counter(monkeypatch):
    """Counts the steps whose inputs included tokens still on the device (proof the async path ran)."""
    counts = {"steps": 0, "tokens": 0}
    original = InputBatch.prepare

    def prepare(self, states, num_scheduled, pending=None, spec_tokens=None):
        batch = original(self, states, num_scheduled, pending, spec_tokens)
        if len(batch.prev_token_indices):
            counts["steps"] += 1
            counts["tokens"] += len(batch.prev_token_indices)
        return batch

    monkeypatch.setattr(InputBatch, "prepare", prepare)
    return counts


@pytest.fixture(scope="module")
def llama_dir(tiny_model):
    return tiny_model("llama")[0]


@pytest.fixture(scope="module")
def sync_llm(llama_dir):
    return LLM(llama_dir, dtype="float32", async_scheduling=False)


@pytest.fixture(scope="module")
def async_llm(llama_dir):
    llm = LLM(llama_dir, dtype="float32", async_scheduling=True)
    assert llm.llm_engine.engine_core.async_scheduling
    return llm


def test_async_scheduling_is_off_by_default_on_cpu(sync_llm, llama_dir):
    assert LLM(llama_dir, dtype="float32").llm_engine.engine_core.async_scheduling is False


def test_greedy_batch_with_logprobs_matches_sync(sync_llm, async_llm, pending_counter):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    prompts = _prompts(12)
    expected = _run(sync_llm, prompts, params)
    assert pending_counter["steps"] == 0
    got = _run(async_llm, prompts, params)
    _assert_same_logprobs(got, expected)
    # Every decode step after the first read its input from the previous step's device tensor.
    assert pending_counter["steps"] >= 22 and pending_counter["tokens"] >= 12 * 22


def test_stops_mid_batch_match_sync(sync_llm, async_llm, pending_counter):
    """Requests ending at different steps (stop ids, max_tokens 1..9): the discarded extra token never shows."""
    prompts = _prompts(10, seed=5)
    free = _run(sync_llm, prompts, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    params = []
    for i, out in enumerate(free):
        tokens = out.outputs[0].token_ids
        if i % 2:
            params.append(SamplingParams(temperature=0.0, max_tokens=1 + i, ignore_eos=True))
        else:  # stop at the token generated at step 3 + i (its first occurrence)
            params.append(SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[tokens[3 + i]]))
    expected = _run(sync_llm, prompts, params)
    got = _run(async_llm, prompts, params)
    assert _summary(got) == _summary(expected)
    assert {o.outputs[0].finish_reason for o in got} == {"stop", "length"}
    assert pending_counter["steps"] > 0
    assert async_llm.llm_engine.engine_core.scheduler.kv_cache_manager.usage == 0.0


def test_stop_strings_match_sync(sync_llm, async_llm):
    prompts = _prompts(4, seed=9)
    free = _run(sync_llm, prompts, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    stops = [o.outputs[0].text[4:7] for o in free if len(o.outputs[0].text) > 8]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop=stops)
    assert _summary(_run(async_llm, prompts, params)) == _summary(_run(sync_llm, prompts, params))


def test_sampling_features_match_sync(sync_llm, async_llm):
    """Seeds, penalties, min_tokens and logits processors need the host tokens: the runner waits for them."""
    prompts = _prompts(6, seed=2)

    def ban_even(token_ids, logits):
        logits[::2] = float("-inf")
        return logits

    params = [
        SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=16, ignore_eos=True),
        SamplingParams(temperature=0.0, repetition_penalty=1.5, presence_penalty=0.5, max_tokens=16, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=3, n=2, best_of=3, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.0, min_tokens=8, max_tokens=16, stop_token_ids=[5, 6, 7]),
        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logits_processors=[ban_even]),
        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logit_bias={11: 5.0}, logprobs=1),
    ]
    expected = _run(sync_llm, prompts, params)
    got = _run(async_llm, prompts, params)
    assert _summary(got) == _summary(expected)
    _assert_same_logprobs(got, expected)
    assert len(got[2].outputs) == 2 and got[2].outputs[0].cumulative_logprob is not None


def test_prompt_logprobs_and_prefix_cache_match_sync(sync_llm, async_llm):
    shared = _prompts(1, lo=40, hi=41, seed=11)[0]
    prompts = [shared + p for p in _prompts(5, lo=3, hi=20, seed=12)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, prompt_logprobs=1)
    expected = _run(sync_llm, prompts, params)
    got = _run(async_llm, prompts, params)
    assert _summary(got) == _summary(expected)
    for x, y in zip(got, expected):
        assert len(x.prompt_logprobs) == len(y.prompt_logprobs)
        for ex, ey in zip(x.prompt_logprobs[1:], y.prompt_logprobs[1:]):
            assert all(abs(ex[t].logprob - ey[t].logprob) < 1e-5 for t in ex)
    hits = async_llm.llm_engine.engine_core.scheduler.prefix_cache_hits
    _run(async_llm, prompts, SamplingParams(temperature=0.0, max_tokens=4))
    assert async_llm.llm_engine.engine_core.scheduler.prefix_cache_hits > hits


def test_preemption_and_chunked_prefill_match_sync(llama_dir, sync_llm, pending_counter):
    prompts = _prompts(12)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    expected = _run(sync_llm, prompts, params)
    tight = LLM(llama_dir, dtype="float32", async_scheduling=True, num_gpu_blocks_override=10,
                max_num_batched_tokens=48)
    got = _run(tight, prompts, params)
    scheduler = tight.llm_engine.engine_core.scheduler
    assert scheduler.num_preemptions > 0 and pending_counter["steps"] > 0
    assert _summary(got) == _summary(expected)
    assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == 10


def test_abort_while_a_step_is_in_flight(sync_llm, async_llm):
    prompts = _prompts(4, seed=21)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expected = _run(sync_llm, prompts, params)
    engine = async_llm.llm_engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, params)
    finished = {}
    for step in range(100):
        if step == 4:
            engine.abort_request("r1")  # its step 4 is in flight: that output must be dropped
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
        if not engine.has_unfinished_requests():
            break
    assert not engine.engine_core.has_unfinished_requests()
    assert set(finished) == {"r0", "r2", "r3"}
    assert all(finished[f"r{i}"] == expected[i].outputs[0].token_ids for i in (0, 2, 3))
    assert engine.engine_core.scheduler.kv_cache_manager.usage == 0.0


def test_request_id_reused_while_its_aborted_step_is_in_flight(sync_llm, async_llm):
    old_prompt, new_prompt = _prompts(2, seed=31)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    expected = _run(sync_llm, [new_prompt], params)[0].outputs[0].token_ids
    engine = async_llm.llm_engine
    engine.add_request("dup", {"prompt_token_ids": old_prompt}, params)
    for _ in range(3):
        engine.step()
    assert "dup" in engine.engine_core.batch_queue[0][0].num_scheduled_tokens
    engine.abort_request("dup")
    engine.add_request("dup", {"prompt_token_ids": new_prompt}, params)  # the old one's step is still in flight
    finished = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished = out
    assert finished is not None and finished.prompt_token_ids == new_prompt
    assert finished.outputs[0].token_ids == expected
