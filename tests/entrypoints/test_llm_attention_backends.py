"""The second attention backend through the whole engine: TORCH_SDPA gives PAGED_ATTN's outputs exactly.

Chunked prefill, preemption with recompute, prefix-cache hits and sliding windows all change what the backend
sees (partial contexts, rebuilt block tables, shared blocks, masked history); none may change an output.
"""
import argparse

import pytest
import torch

from graphserve import LLM, SamplingParams
from graphserve.engine.arg_utils import EngineArgs

GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=2)


def _prompts(n: int, seed: int = 0, shared_prefix: int = 0):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(4, 512, (shared_prefix,), generator=g).tolist()
    lens = torch.randint(5, 50, (n,), generator=g).tolist()
    return [prefix + torch.randint(4, 512, (k,), generator=g).tolist() for k in lens]


def _run(llm, prompts):
    return llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)


def _assert_same(a, b, atol=1e-5):
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for ex, ey in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
            assert ex.keys() == ey.keys()
            assert all(abs(ex[t].logprob - ey[t].logprob) < atol for t in ex)


@pytest.mark.parametrize("arch", ["llama", "mistral"])  # mistral: a sliding window of 12 tokens
def test_sdpa_under_chunking_preemption_and_prefix_hits_matches_paged(tiny_model, arch):
    path = tiny_model(arch)[0]
    prompts = _prompts(10, seed=1, shared_prefix=40)  # one 40-token prefix: full blocks shared after the first
    reference = LLM(path, dtype="float32", max_num_batched_tokens=1024, enable_chunked_prefill=False,
                    enable_prefix_caching=False)
    expected = _run(reference, prompts)
    tight = LLM(path, dtype="float32", attention_backend="TORCH_SDPA", max_num_batched_tokens=24,
                num_gpu_blocks_override=12)
    runner = tight.llm_engine.engine_core.model_executor.model_runner
    assert runner.attn_backend.name == "TORCH_SDPA" and runner.graph_runner is None
    assert runner.kv_caches[0].shape == (2, 12, 2, 16, 16)  # HND: [2, blocks, kv heads, block size, head dim]
    _assert_same(_run(tight, prompts), expected)
    scheduler = tight.llm_engine.engine_core.scheduler
    assert scheduler.num_preemptions > 0 and scheduler.prefix_cache_hits > 0


def test_backend_is_chosen_by_name(tiny_model):
    path = tiny_model("llama")[0]
    assert EngineArgs(model=path).create_engine_config().device_config.attention_backend is None
    config = EngineArgs(model=path, attention_backend="torch_sdpa").create_engine_config()
    assert config.device_config.attention_backend == "TORCH_SDPA"
    with pytest.raises(ValueError, match="unknown attention backend 'flash'; choose one of"):
        EngineArgs(model=path, attention_backend="flash").create_engine_config()
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    assert parser.parse_args(["--attention-backend", "torch_sdpa"]).attention_backend == "TORCH_SDPA"
    with pytest.raises(SystemExit):
        parser.parse_args(["--attention-backend", "flash"])
    default = LLM(path, dtype="float32").llm_engine.engine_core.model_executor.model_runner
    assert default.attn_backend.name == "PAGED_ATTN"  # the CPU platform's default
    assert default.kv_caches[0].shape[:3] == (2, default.num_blocks, 16)  # NHD: block size before kv heads
