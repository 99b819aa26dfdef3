"""Speculative decoding through the whole engine: n-gram drafts verified k + 1 positions at a time never change a
greedy output, nor its logprobs, whatever stops it, caches it, preempts it or shares its batch.

Tiny random models repeat themselves a lot, so prompt lookup finds drafts and some get accepted: every test checks
the counters to prove drafts were verified (and both accepted and rejected), not silently skipped.
"""
import pytest
import torch

from graphserve import LLM, SamplingParams
from graphserve.engine.arg_utils import EngineArgs

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}


def _prompts(n: int, seed: int = 0):
    """Prompts that repeat a random span (copy-heavy: prompt lookup finds something to draft)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        span = torch.randint(4, 500, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        tail = torch.randint(4, 500, (int(torch.randint(0, 6, (1,), generator=g)),), generator=g).tolist()
        out.append(span * 3 + tail + span[:2])
    return out


def _run(llm, prompts, params):
    return llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)


def _summary(outputs):
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outputs]


def _spec_counts(llm):
    s = llm.llm_engine.engine_core.scheduler
    return s.spec_num_drafts, s.spec_num_draft_tokens, s.spec_num_accepted_tokens


def _assert_verified(llm, before=(0, 0, 0)):
    drafts, tokens, accepted = (a - b for a, b in zip(_spec_counts(llm), before))
    assert drafts > 0 and 0 < accepted < tokens, (drafts, tokens, accepted)


@pytest.fixture(scope="module")
def spec(llama_dir):
    return LLM(llama_dir, dtype="float32", speculative_config=NGRAM)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_identical_to_plain_decoding(tiny_model, arch):
    path = tiny_model(arch)[0]
    prompts = _prompts(8, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    expected = _run(LLM(path, dtype="float32"), prompts, params)
    llm = LLM(path, dtype="float32", speculative_config={**NGRAM, "num_speculative_tokens": 3})
    assert _summary(_run(llm, prompts, params)) == _summary(expected)
    _assert_verified(llm)
    assert llm.llm_engine.engine_core.scheduler.kv_cache_manager.usage == 0.0


def test_max_tokens_and_stop_ids_inside_an_accepted_run(plain, spec):
    """max_tokens 1..12 and stop ids that fall inside a run of accepted drafts: the output is cut exactly there."""
    prompts = _prompts(12, seed=2)
    free = _run(plain, prompts, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    params = []
    for i, out in enumerate(free):
        if i % 2:
            params.append(SamplingParams(temperature=0.0, max_tokens=1 + i, ignore_eos=True))
        else:
            params.append(SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[out.outputs[0].token_ids[5]]))
    before = _spec_counts(spec)
    got = _run(spec, prompts, params)
    assert _summary(got) == _summary(_run(plain, prompts, params))
    assert {o.outputs[0].finish_reason for o in got} == {"stop", "length"}
    _assert_verified(spec, before)


def test_stop_strings(plain, spec):
    prompts = _prompts(6, seed=3)
    free = _run(plain, prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    stops = [o.outputs[0].text[6:9] for o in free if len(o.outputs[0].text) > 10]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=stops)
    assert stops
    assert _summary(_run(spec, prompts, params)) == _summary(_run(plain, prompts, params))


def test_logprobs_are_the_target_models(plain, spec):
    prompts = _prompts(6, seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    expected = _run(plain, prompts, params)
    before = _spec_counts(spec)
    got = _run(spec, prompts, params)
    _assert_verified(spec, before)
    for x, y in zip(got, expected):
        cx, cy = x.outputs[0], y.outputs[0]
        assert cx.token_ids == cy.token_ids
        assert cx.cumulative_logprob == pytest.approx(cy.cumulative_logprob, abs=1e-4)
        assert len(cx.logprobs) == len(cy.logprobs) == len(cx.token_ids)
        for ex, ey in zip(cx.logprobs, cy.logprobs):
            assert ex.keys() == ey.keys()
            assert all(abs(ex[t].logprob - ey[t].logprob) < 1e-4 and ex[t].rank == ey[t].rank for t in ex)
        assert len(x.prompt_logprobs) == len(y.prompt_logprobs)


def test_penalties_bias_and_min_tokens_apply_per_position(plain, spec):
    """Position j of a verify step is processed as if drafts 1..j-1 were output: penalties count them, min_tokens
    masks see their number. Greedy outputs therefore match plain decoding exactly."""
    prompts = _prompts(5, seed=5)
    free = _run(plain, prompts, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    stop_ids = sorted({o.outputs[0].token_ids[2] for o in free})
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.3, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.0, presence_penalty=0.8, frequency_penalty=0.4, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.0, logit_bias={free[2].outputs[0].token_ids[0]: -3.0}, max_tokens=20,
                       ignore_eos=True),
        SamplingParams(temperature=0.0, min_tokens=6, stop_token_ids=stop_ids, max_tokens=20),
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                       logits_processors=[lambda ids, logits: logits]),  # never speculates
    ]
    before = _spec_counts(spec)
    assert _summary(_run(spec, prompts, params)) == _summary(_run(plain, prompts, params))
    assert _spec_counts(spec)[0] > before[0]


def test_seeded_random_requests_reproduce(spec, plain):
    prompts = _prompts(4, seed=6)
    params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=100 + i, max_tokens=24, ignore_eos=True)
              for i in range(4)]
    first = _summary(_run(spec, prompts, params))
    # Alone or in another batch: a seeded request's text depends on its seed only.
    second = _summary(_run(spec, prompts[::-1], params[::-1]))[::-1]
    assert first == second
    # Unseeded random requests and greedy ones share the verify step.
    mixed = [SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True),
             SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)] * 2
    got = _run(spec, prompts, mixed)
    greedy = _run(plain, prompts, mixed)
    assert [o.outputs[0].token_ids for o in got[1::2]] == [o.outputs[0].token_ids for o in greedy[1::2]]
    assert all(len(o.outputs[0].token_ids) == 24 for o in got)


def test_prefix_caching_preemption_chunked_prefill_and_async_flag(llama_dir, plain):
    """A pool too small for the batch (preemption by recompute), shared prefixes (cache hits on blocks holding
    rolled-back positions' neighbours), chunked prompts, and async scheduling asked for (speculation runs the
    steps synchronously): all give the plain outputs."""
    shared = _prompts(1, seed=7)[0] * 3
    prompts = [shared + p for p in _prompts(10, seed=8)]
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    expected = _run(plain, prompts, params)
    llm = LLM(llama_dir, dtype="float32", speculative_config=NGRAM, num_gpu_blocks_override=14,
              max_num_batched_tokens=64, async_scheduling=True)
    core = llm.llm_engine.engine_core
    assert core.async_scheduling is False
    assert _summary(_run(llm, prompts, params)) == _summary(expected)
    assert core.scheduler.num_preemptions > 0 and core.scheduler.prefix_cache_hits > 0
    _assert_verified(llm)
    assert core.scheduler.kv_cache_manager.usage == 0.0


def test_disable_by_batch_size(llama_dir, plain):
    prompts = _prompts(6, seed=9)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    llm = LLM(llama_dir, dtype="float32", speculative_config={**NGRAM, "disable_by_batch_size": 4})
    assert _summary(_run(llm, prompts, params)) == _summary(_run(plain, prompts, params))
    drafts_big_batch = _spec_counts(llm)[0]
    _run(llm, prompts[:2], params)
    assert _spec_counts(llm)[0] > drafts_big_batch  # a batch of 2 speculates
    # Only the tails of the 6-request batch (fewer than 4 left running) may have verified drafts.
    assert drafts_big_batch < 6 * 16 // 2


def test_engine_args_spellings_and_errors():
    parser = EngineArgs.add_cli_args(__import__("argparse").ArgumentParser())
    args = parser.parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}',
                              "--speculative-disable-by-batch-size", "8"])
    config = EngineArgs.from_cli_args(args).create_speculative_config()
    assert (config.method, config.num_speculative_tokens, config.disable_by_batch_size) == ("ngram", 2, 8)
    with pytest.raises(ValueError, match="needs speculative_config"):
        EngineArgs(speculative_disable_by_batch_size=4).create_speculative_config()
    draft = EngineArgs(speculative_config={"model": "/x", "num_speculative_tokens": 2}).create_speculative_config()
    assert (draft.method, draft.model) == ("draft_model", "/x")  # the checkpoint is resolved with the engine config
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineArgs(speculative_config='{"method": "ngram", "num_speculative_tokens": 0}').create_speculative_config()
    with pytest.raises(ValueError, match="not valid JSON"):
        EngineArgs(speculative_config="{ngram").create_speculative_config()


def test_metrics_report_acceptance(spec):
    from graphserve.metrics.loggers import LoggingStatLogger
    from graphserve.metrics.prometheus import PrometheusStatLogger
    from graphserve.metrics.stats import SchedulerStats

    logger = LoggingStatLogger()
    stats = SchedulerStats(spec_decode_num_drafts=10, spec_decode_num_draft_tokens=40,
                           spec_decode_num_accepted_tokens=25)
    logger.record(stats, None)
    line = logger.format_line(logger._last_log_time + 1.0)
    assert "Draft acceptance rate: 62.5%" in line and "Mean accepted length: 3.50" in line
    prom = PrometheusStatLogger("m", 128)
    prom.record(stats, None)
    text = prom.exposition().decode()
    assert 'graphserve:spec_decode_num_draft_tokens_total{model_name="m"} 40.0' in text
    assert 'graphserve:spec_decode_num_accepted_tokens_total{model_name="m"} 25.0' in text
