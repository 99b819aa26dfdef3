"""Verify steps replayed from graphs: every request laid out on 1 + k query rows (padded inside its rows when it has
fewer drafts, or is a short prefill chunk), one graph per batch bucket. On the CPU `RerunGraph` stands in for the
CUDA graph (static buffers rewritten before each replay, metadata fixed at capture), so the whole path runs here:
outputs must equal plain decoding, and most verify steps must come from a graph."""
import pytest
import torch

from graphserve import LLM, SamplingParams
from graphserve.compile.counters import compilation_counter
from graphserve.compile.cuda_graph import CUDAGraphRunner, RerunGraph
from tests.spec_decode.test_spec_decode_engine import NGRAM, _assert_verified, _prompts, _run, _spec_counts, _summary


def _with_rerun_graphs(llm: LLM, sizes=(1, 2, 4, 8)) -> CUDAGraphRunner:
    """Capture decode and verify graphs (RerunGraph) over the engine's runner and make it replay them."""
    runner = llm.llm_engine.engine_core.model_executor.model_runner
    spec = llm.llm_engine.config.speculative_config
    graph_runner = CUDAGraphRunner(sizes, runner.model_config.hidden_size, runner.dtype, runner.device,
                                   create_graph=RerunGraph, verify_query_len=1 + spec.num_speculative_tokens,
                                   verify_max_reqs=spec.disable_by_batch_size, max_num_tokens=runner.max_num_tokens)
    with torch.inference_mode():
        graph_runner.capture(runner._graph_step)
    runner.graph_runner = graph_runner
    return graph_runner


@pytest.fixture(scope="module")
def spec_graphed(llama_dir):
    llm = LLM(llama_dir, dtype="float32", max_num_seqs=8, speculative_config=NGRAM)
    graph_runner = _with_rerun_graphs(llm)
    assert graph_runner.verify_buckets.sizes == (1, 2, 4, 8) and graph_runner.num_graphs == 8
    return llm


def test_greedy_and_logprobs_equal_plain_decoding(plain, spec_graphed):
    prompts = _prompts(8, seed=11)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=2)
    expected = _run(plain, prompts, params)
    before, counts = _spec_counts(spec_graphed), compilation_counter.snapshot()
    got = _run(spec_graphed, prompts, params)
    assert _summary(got) == _summary(expected)
    for x, y in zip(got, expected):
        assert x.outputs[0].cumulative_logprob == pytest.approx(y.outputs[0].cumulative_logprob, abs=1e-4)
    _assert_verified(spec_graphed, before)
    replays = compilation_counter.since(counts)
    drafts = _spec_counts(spec_graphed)[0] - before[0]
    # Every step after the prefill is a graph replay; the verify steps among them replay the verify graphs.
    assert replays["num_verify_graph_replays"] > 0 and replays["num_cudagraph_replays"] > replays[
        "num_verify_graph_replays"]
    assert drafts > 0


def test_seeded_sampling_is_the_same_with_and_without_graphs(llama_dir, spec_graphed):
    """The rejection sampler's draws do not depend on the layout: seeded random requests give the same text."""
    prompts = _prompts(4, seed=12)
    params = [SamplingParams(temperature=0.8, top_p=0.95, seed=200 + i, max_tokens=24, ignore_eos=True)
              for i in range(4)]
    eager = LLM(llama_dir, dtype="float32", max_num_seqs=8, speculative_config=NGRAM)
    assert _summary(_run(spec_graphed, prompts, params)) == _summary(_run(eager, prompts, params))


def test_short_prefill_chunks_and_mixed_draft_counts_share_a_verify_graph(llama_dir, plain):
    """A small token budget chunks the prompts, so prefill chunks of a few tokens, requests without drafts and
    requests with k drafts meet in one step; padded rows never write KV that a real token reads."""
    prompts = _prompts(6, seed=13) + [[7, 8], [9]]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    expected = _run(plain, prompts, params)
    llm = LLM(llama_dir, dtype="float32", max_num_seqs=8, max_num_batched_tokens=16, speculative_config=NGRAM)
    _with_rerun_graphs(llm)
    counts = compilation_counter.snapshot()
    assert _summary(_run(llm, prompts, params)) == _summary(expected)
    _assert_verified(llm)
    assert compilation_counter.since(counts)["num_verify_graph_replays"] > 0
    assert llm.llm_engine.engine_core.scheduler.kv_cache_manager.usage == 0.0


def test_verify_graphs_stop_at_disable_by_batch_size(llama_dir):
    llm = LLM(llama_dir, dtype="float32", max_num_seqs=8,
              speculative_config={**NGRAM, "disable_by_batch_size": 3})
    graph_runner = _with_rerun_graphs(llm)
    assert graph_runner.verify_buckets.sizes == (1, 2)  # batches of 3 or more never verify drafts
