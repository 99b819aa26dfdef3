"""Speculative decoding on the GPU: the Triton rejection sampler against its reference at a Llama-3 vocabulary, and
a tiny Llama served with the GPU defaults (compile, decode graphs) and n-gram drafts, token-identical to plain
decoding, verify steps replayed from their own graphs (1 + k query rows per request) without recompiling."""
from __future__ import annotations

import torch
from gpu_testutils import counting_compiles, release_device_memory, tokens_of_fresh_engine

from graphserve import LLM, SamplingParams
from graphserve.ops._register import get_op

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}


def test_triton_rejection_sampler_matches_reference_at_llama3_vocab(needs_cuda):
    g = torch.Generator(device="cuda").manual_seed(0)
    num_drafts = [4, 0, 2, 4, 1, 3, 4, 4]
    vocab = 128256
    t, b = sum(num_drafts), len(num_drafts)
    probs = torch.softmax(torch.randn(t, vocab, device="cuda", generator=g) * 3, dim=-1)
    draft = probs.argmax(dim=-1)
    draft[::3] = torch.randint(0, vocab, (len(draft[::3]),), device="cuda", generator=g)
    cu = torch.tensor(num_drafts, device="cuda").cumsum(0).int()
    bonus = torch.randint(0, vocab, (b,), device="cuda", generator=g)
    greedy = torch.tensor([True, False] * 4, device="cuda")
    uniform = torch.rand(t, device="cuda", generator=g)
    noise = torch.empty(b, vocab, device="cuda").exponential_(generator=g).clamp_min_(1e-20)
    empty = probs.new_empty((0, vocab))
    outs = []
    for impl in ("CUDA", "reference"):
        out = torch.empty(b, 5, dtype=torch.int64, device="cuda")
        fn = torch.ops.graphserve.rejection_sample if impl == "CUDA" else get_op("rejection_sample").reference
        fn(out, draft, cu, empty, probs, bonus, greedy, uniform, noise)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])


def test_tiny_llama_ngram_with_graphs_matches_plain(needs_cuda, tiny_model):
    path, _ = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    prompts = []
    for _ in range(6):
        span = torch.randint(4, 500, (6,), generator=g).tolist()
        prompts.append(span * 3 + span[:2])
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    expected = tokens_of_fresh_engine(path, prompts, params, dtype="float32", cuda_graph_sizes=[1, 2, 4, 8],
                                      max_num_seqs=8)
    llm = LLM(path, dtype="float32", cuda_graph_sizes=[1, 2, 4, 8], max_num_seqs=8, speculative_config=NGRAM)
    llm.generate(prompt_token_ids=prompts[:1], sampling_params=params, use_tqdm=False)  # warm-up
    with counting_compiles() as serving:
        for batch in (prompts, prompts[:1]):
            got = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=batch, sampling_params=params,
                                                                use_tqdm=False)]
            assert got == expected[:len(batch)]
    scheduler = llm.llm_engine.engine_core.scheduler
    assert 0 < scheduler.spec_num_accepted_tokens < scheduler.spec_num_draft_tokens
    assert serving["dynamo_unique_graphs"] == 0 and serving["num_cudagraphs_captured"] == 0, serving
    assert serving["num_verify_graph_replays"] > 0, serving
    runner = llm.llm_engine.engine_core.model_executor.model_runner
    assert runner.graph_runner.verify_buckets.sizes == (1, 2, 4, 8)
    del llm
    release_device_memory()


def test_tiny_llama_draft_model_with_graphs(needs_cuda, tiny_model):
    """The target as its own draft under compile + graphs (the draft's decode graphs, the target's verify graphs):
    the plain output, nearly every draft accepted, nothing compiled or captured while serving."""
    path, _ = tiny_model("llama")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 500, (int(n),), generator=g).tolist() for n in torch.randint(3, 60, (6,), generator=g)]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    expected = tokens_of_fresh_engine(path, prompts, params, dtype="float32", cuda_graph_sizes=[1, 2, 4, 8],
                                      max_num_seqs=8)
    llm = LLM(path, dtype="float32", cuda_graph_sizes=[1, 2, 4, 8], max_num_seqs=8,
              speculative_config={"model": path, "num_speculative_tokens": 4})
    llm.generate(prompt_token_ids=prompts[:1], sampling_params=params, use_tqdm=False)  # warm-up
    scheduler = llm.llm_engine.engine_core.scheduler
    before = (scheduler.spec_num_draft_tokens, scheduler.spec_num_accepted_tokens)
    with counting_compiles() as serving:
        got = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params,
                                                            use_tqdm=False)]
    assert got == expected
    tokens = scheduler.spec_num_draft_tokens - before[0]
    accepted = scheduler.spec_num_accepted_tokens - before[1]
    assert tokens > 0 and accepted / tokens > 0.9, (tokens, accepted)
    assert serving["dynamo_unique_graphs"] == 0 and serving["num_cudagraphs_captured"] == 0, serving
    assert serving["num_verify_graph_replays"] > 0, serving
    runner = llm.llm_engine.engine_core.model_executor.model_runner
    assert runner.draft.graph_runner is not None and runner.draft.graph_runner.num_graphs == 4
    del llm
    release_device_memory()
