"""The decode-graph machinery without a GPU: bucket selection, padding with slot -1, static buffer updates.

`RerunGraph` replays by re-running the captured function over the runner's static buffers, so everything a
real CUDA graph relies on (buffers updated in place, metadata fixed at capture time, padded rows) is exercised.
"""
import numpy as np
import pytest
import torch

from graphserve import LLM, SamplingParams
from graphserve.attention.backends.base import PAD_SLOT_ID
from graphserve.attention.forward_context import set_forward_context
from graphserve.compile.counters import compilation_counter
from graphserve.compile.cuda_graph import CUDAGraphRunner, GraphBuckets, RerunGraph, create_graph_runner
from graphserve.config import CompilationConfig, default_cudagraph_capture_sizes
from graphserve.platforms.cpu import CpuPlatform
from graphserve.platforms.interface import PlatformCapabilities
from graphserve.platforms.kernels import KernelChoice


def test_default_capture_sizes():
    assert default_cudagraph_capture_sizes(256) == (1, 2, 4) + tuple(range(8, 257, 8))
    assert default_cudagraph_capture_sizes(12) == (1, 2, 4, 8, 12)
    assert default_cudagraph_capture_sizes(3) == (1, 2, 3)
    assert default_cudagraph_capture_sizes(1) == (1,)


def test_bucket_selection():
    buckets = GraphBuckets([8, 1, 4, 2, 16])
    assert buckets.sizes == (1, 2, 4, 8, 16)
    expected = {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 8: 8, 9: 16, 16: 16}
    assert {n: buckets.padded_size(n) for n in expected} == expected
    assert buckets.padded_size(0) is None and buckets.padded_size(17) is None


def _fake_runner(capture_sizes=(1, 2, 4), max_model_len=64, block_size=16):
    def forward(input_ids, positions):
        return torch.zeros(input_ids.shape[0], 8)

    return CUDAGraphRunner(forward, capture_sizes, max_model_len, block_size, hidden_size=8, dtype=torch.float32,
                           device=torch.device("cpu"), graph_cls=RerunGraph)


def test_stage_pads_rows_to_the_bucket():
    runner = _fake_runner()
    size = runner.stage(
        input_ids=np.array([5, 6, 7]), positions=np.array([17, 3, 40]), slot_mapping=np.array([33, 50, 104]),
        seq_lens=np.array([18, 4, 41], dtype=np.int32), block_table=np.array([[2, 1], [3, 0], [6, 5]], dtype=np.int32),
    )
    assert size == 4
    h = runner.inputs.host_np
    assert h["input_ids"][:4].tolist() == [5, 6, 7, 0]
    assert h["positions"][:4].tolist() == [17, 3, 40, 0]
    assert h["slot_mapping"][:4].tolist() == [33, 50, 104, PAD_SLOT_ID]
    assert h["seq_lens"][:4].tolist() == [18, 4, 41, 1]
    assert h["block_table"].shape == (4, 4)  # max_model_len 64 / block_size 16
    assert h["block_table"][:4].tolist() == [[2, 1, 0, 0], [3, 0, 0, 0], [6, 5, 0, 0], [0, 0, 0, 0]]
    runner.inputs.upload(size)
    md = runner.metadata(size)
    assert md.slot_mapping.tolist() == [33, 50, 104, PAD_SLOT_ID]
    assert md.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert (md.max_query_len, md.max_seq_len, md.num_seqs) == (1, 64, 4)


def test_stage_clears_stale_rows_and_columns():
    runner = _fake_runner()
    runner.stage(np.arange(4), np.arange(4), np.arange(4), np.full(4, 50, dtype=np.int32),
                 np.full((4, 4), 9, dtype=np.int32))
    runner.stage(np.array([1]), np.array([2]), np.array([3]), np.array([3], dtype=np.int32),
                 np.array([[7]], dtype=np.int32))
    h = runner.inputs.host_np
    assert h["block_table"][0].tolist() == [7, 0, 0, 0]  # the earlier request's blocks are gone
    assert h["seq_lens"][:1].tolist() == [3]
    with pytest.raises(ValueError, match="no graph bucket"):
        runner.stage(np.arange(5), np.arange(5), np.arange(5), np.ones(5, dtype=np.int32),
                     np.zeros((5, 1), dtype=np.int32))


def test_can_run_only_decode_steps_that_fit():
    runner = _fake_runner()
    assert not runner.can_run(2, 2)  # nothing captured yet
    runner.capture(kv_caches=[])
    assert runner.num_graphs == 3
    assert runner.can_run(1, 1) and runner.can_run(3, 3) and runner.can_run(4, 4)
    assert not runner.can_run(2, 5)  # a prefill chunk in the step
    assert not runner.can_run(5, 5)  # larger than every bucket


def test_graphs_need_graph_safe_kernels():
    platform = CpuPlatform()
    platform.capabilities = PlatformCapabilities(supports_graphs=True, supports_bf16=True, supports_pin_memory=False)
    cc = CompilationConfig(use_cudagraph=True, cudagraph_capture_sizes=(1, 2))
    kwargs = dict(max_model_len=32, block_size=16, hidden_size=8, dtype=torch.float32, device=torch.device("cpu"))
    unsafe = {"paged_attention": KernelChoice("torch", False), "rms_norm": KernelChoice("torch", True)}
    assert create_graph_runner(cc, platform, unsafe, lambda i, p: i, **kwargs) is None
    safe = {"paged_attention": KernelChoice("triton", True), "rms_norm": KernelChoice("torch", True)}
    runner = create_graph_runner(cc, platform, safe, lambda i, p: i, **kwargs)
    assert runner is not None and runner.buckets.sizes == (1, 2)
    assert create_graph_runner(CompilationConfig(), platform, safe, lambda i, p: i, **kwargs) is None
    assert create_graph_runner(cc, CpuPlatform(), safe, lambda i, p: i, **kwargs) is None  # no graph support


# -- end to end on the tiny llama: decode steps replayed through the bucket machinery --------------------------

PROMPT_LENS = [3, 15, 17, 40, 9]
PARAMS = SamplingParams(temperature=0.0, max_tokens=12, min_tokens=12)


def _prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(4, 512, (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def llm_pair(tiny_model):
    path, _ = tiny_model("llama")
    kwargs = dict(dtype="float32", max_num_batched_tokens=64, max_num_seqs=8, enforce_eager=True)
    eager = LLM(path, **kwargs)
    graphed = LLM(path, **kwargs)
    runner = graphed.llm_engine.engine_core.model_runner
    graph_runner = CUDAGraphRunner(runner.forward_fn, (1, 2, 4, 8), runner.config.scheduler_config.max_model_len,
                                   runner.block_size, runner.model_config.hidden_size, runner.dtype, runner.device,
                                   graph_cls=RerunGraph)
    before = compilation_counter.snapshot()
    with torch.inference_mode():
        graph_runner.capture(runner.kv_caches)
    assert compilation_counter.since(before)["num_cudagraphs_captured"] == 4
    runner.graph_runner = graph_runner
    return eager, graphed


def test_graph_replay_matches_eager(llm_pair):
    eager, graphed = llm_pair
    ref = eager.generate(prompt_token_ids=_prompts(), sampling_params=PARAMS, use_tqdm=False)
    before = compilation_counter.snapshot()
    out = graphed.generate(prompt_token_ids=_prompts(), sampling_params=PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in ref]
    # 5 requests decode together (bucket 8) and then alone as they finish: most steps are replays.
    assert compilation_counter.since(before)["num_cudagraph_replays"] >= 8


def test_padded_rows_write_no_kv(llm_pair):
    _, graphed = llm_pair
    runner = graphed.llm_engine.engine_core.model_runner
    graph_runner = runner.graph_runner
    kv_before = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    with torch.inference_mode():
        hidden = graph_runner.run(
            input_ids=np.array([11, 12, 13]), positions=np.array([0, 0, 0]), slot_mapping=np.array([16, 32, 48]),
            seq_lens=np.array([1, 1, 1], dtype=np.int32), block_table=np.array([[1], [2], [3]], dtype=np.int32),
        )
    kv_after = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    for (k, v), (k0, v0) in zip(runner.kv_caches, kv_before):  # leave the (prefix-cached) pool as it was
        k.copy_(k0)
        v.copy_(v0)
    assert hidden.shape == (3, runner.model_config.hidden_size)
    for (k0, v0), (k1, v1) in zip(kv_before, kv_after):
        changed = ((k0 != k1).flatten(1).any(1) | (v0 != v1).flatten(1).any(1)).nonzero().flatten().tolist()
        assert changed == [1, 2, 3]  # blocks of the three real rows; the padded fourth row wrote nothing
    # The same three tokens without padding give the same hidden states (rows are independent).
    md = runner.metadata_builder.build([1, 1, 1], [1, 1, 1], [[1], [2], [3]], device=runner.device)

    with torch.inference_mode(), set_forward_context(md, [(k.clone(), v.clone()) for k, v in runner.kv_caches]):
        ref = runner.model(torch.tensor([11, 12, 13]), torch.tensor([0, 0, 0]))
    torch.testing.assert_close(hidden, ref)
