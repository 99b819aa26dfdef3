"""torch.compile of the forward on the CPU (inductor's C++ backend): same greedy tokens as eager, one graph.

The first compile on a fresh machine takes ~20 s, so one module-scoped engine serves every test here.
"""
import os

import pytest
import torch

from graphserve import LLM, SamplingParams
from graphserve.compile.counters import compilation_counter, dynamo_counts
from graphserve.config import CompilationLevel

PROMPT_LENS = [1, 3, 15, 17, 40]  # a one-token prompt makes one-token steps; 40 > the 32-token budget chunks
PARAMS = SamplingParams(temperature=0.0, max_tokens=16, min_tokens=16, logprobs=2)
ENGINE = dict(dtype="float32", max_num_batched_tokens=32, max_num_seqs=8)


def _prompts():
    g = torch.Generator().manual_seed(2)
    return [torch.randint(4, 512, (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def engines(tiny_model):
    path, _ = tiny_model("llama")
    eager = LLM(path, **ENGINE)
    before, dynamo_before = compilation_counter.snapshot(), dynamo_counts()
    compiled = LLM(path, compile=True, **ENGINE)
    start_up = compilation_counter.since(before)
    start_up["unique_graphs"] = dynamo_counts()["unique_graphs"] - dynamo_before["unique_graphs"]
    return eager, compiled, start_up


def test_cpu_default_is_eager(engines):
    eager, compiled, _ = engines
    assert eager.llm_engine.config.compilation_config.level == CompilationLevel.NO_COMPILATION
    assert compiled.llm_engine.config.compilation_config.level == CompilationLevel.INDUCTOR
    assert not compiled.llm_engine.config.compilation_config.use_cudagraph  # the CPU has no graphs


def test_one_graph_compiled_at_start_up(engines):
    _, compiled, start_up = engines
    cache_dir = compiled.llm_engine.config.compilation_config.cache_dir
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == cache_dir and os.listdir(cache_dir)  # persisted there
    assert start_up["num_models_compiled"] == 1
    assert start_up["num_graphs_compiled"] == 1
    assert start_up["unique_graphs"] == 1


def test_compiled_matches_eager_without_recompiles(engines):
    eager, compiled, _ = engines
    ref = eager.generate(prompt_token_ids=_prompts(), sampling_params=PARAMS, use_tqdm=False)
    before, dynamo_before = compilation_counter.snapshot(), dynamo_counts()
    out = compiled.generate(prompt_token_ids=_prompts(), sampling_params=PARAMS, use_tqdm=False)
    single = compiled.generate(prompt_token_ids=_prompts()[:1], sampling_params=PARAMS, use_tqdm=False)
    # Steps of 32 (chunked prefill + decodes), 5, 4, ... and 1 token(s) all ran through the one graph.
    assert compilation_counter.since(before)["num_graphs_compiled"] == 0
    assert dynamo_counts() == dynamo_before
    for o, r in zip(out + single, ref + ref[:1]):
        assert o.outputs[0].token_ids == r.outputs[0].token_ids
        for step, (lp, lp_ref) in enumerate(zip(o.outputs[0].logprobs, r.outputs[0].logprobs)):
            for token_id, entry in lp_ref.items():
                assert abs(lp[token_id].logprob - entry.logprob) < 1e-4, (step, token_id)


def test_enforce_eager_compiles_nothing(tiny_model):
    path, _ = tiny_model("llama")
    before = compilation_counter.snapshot()
    llm = LLM(path, enforce_eager=True, **ENGINE)
    assert llm.llm_engine.config.compilation_config.level == CompilationLevel.NO_COMPILATION
    assert compilation_counter.since(before)["num_models_compiled"] == 0
    with pytest.raises(ValueError, match="enforce_eager and compile"):
        LLM(path, enforce_eager=True, compile=True, **ENGINE)


def test_graph_runner_reuses_the_compiled_graph(engines):
    """Capturing every bucket over the runner's static buffers hits the graph compiled at start-up."""
    from graphserve.attention.forward_context import set_forward_context
    from graphserve.compile.cuda_graph import CUDAGraphRunner, RerunGraph
    from tests.attention.attention_testutils import attention_inputs

    _, compiled, _ = engines
    runner = compiled.llm_engine.engine_core.model_executor.model_runner
    graph_runner = CUDAGraphRunner((1, 2, 4), runner.model_config.hidden_size, runner.dtype, runner.device,
                                   create_graph=RerunGraph)
    kv_caches = runner.kv_caches
    runner.kv_caches = [kv.clone() for kv in kv_caches]  # leave the engine's pool untouched
    batch = attention_inputs([1, 1, 1], [1, 1, 1], [[1], [2], [3]], runner.block_size)  # three one-token sequences
    before = compilation_counter.snapshot()
    with torch.inference_mode():
        graph_runner.capture(runner._graph_step)
        runner.input_ids.np[:4] = [7, 8, 9, 0]
        runner.positions.np[:4] = 0
        runner.input_ids.upload(4)
        runner.positions.upload(4)
        runner.attn_metadata_builder.prepare_for_replay(batch, 4)
        hidden = graph_runner.replay(4)[:3].clone()
    runner.kv_caches = kv_caches
    assert compilation_counter.since(before)["num_graphs_compiled"] == 0
    md = runner.attn_metadata_builder.build(batch)
    with torch.inference_mode(), set_forward_context(md, [kv.clone() for kv in runner.kv_caches]):
        eager = runner.model.forward(torch.tensor([7, 8, 9]), torch.tensor([0, 0, 0]))
    torch.testing.assert_close(hidden, eager, rtol=1e-5, atol=1e-5)


class _Tiny(torch.nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return (input_ids * self.scale + positions).float().unsqueeze(1)


def test_many_models_of_one_class_compile_once_each():
    """Twelve models of one class in one process: each compiles its own graph once and none counts as a
    recompile of another (dynamo's recompile_limit of 8 would stop the ninth if they shared a code object)."""
    from graphserve.compile.wrapper import CompiledForward

    ids, pos = torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2])
    models = [_Tiny(float(i)) for i in range(12)]
    forwards = [CompiledForward(m.forward) for m in models]
    for i, fwd in enumerate(forwards):
        torch.testing.assert_close(fwd(ids, pos), models[i](ids, pos))
        torch.testing.assert_close(fwd(ids[:2], pos[:2]), models[i](ids[:2], pos[:2]))  # the same graph
    assert [fwd.num_compiles for fwd in forwards] == [1] * 12
    assert models[3].forward.__code__ is _Tiny.forward.__code__  # the models themselves are untouched
