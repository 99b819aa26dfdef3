"""The decode-graph machinery without a GPU: bucket selection, capture order, replay over rewritten buffers.

`RerunGraph` replays by re-running the captured function over the same static buffers, so everything a real
CUDA graph relies on (inputs rewritten in place, metadata fixed at capture time, padded rows) is exercised.
"""
import pytest
import torch

from graphserve import LLM, SamplingParams
from graphserve.attention.backends.paged import PagedAttentionBackend
from graphserve.attention.backends.sdpa import TorchSDPABackend
from graphserve.attention.forward_context import set_forward_context
from graphserve.compile.counters import compilation_counter
from graphserve.compile.cuda_graph import CUDAGraphRunner, GraphBuckets, RerunGraph, create_graph_runner
from graphserve.config import CompilationConfig, default_cudagraph_capture_sizes
from graphserve.platforms.cpu import CpuPlatform
from graphserve.platforms.interface import PlatformCapabilities
from graphserve.platforms.kernels import KernelChoice
from tests.attention.attention_testutils import attention_inputs


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


def _fake_runner(capture_sizes=(1, 2, 4)):
    return CUDAGraphRunner(capture_sizes, hidden_size=8, dtype=torch.float32, device=torch.device("cpu"),
                           create_graph=RerunGraph)


def test_capture_largest_first_and_replay_into_the_static_output():
    runner = _fake_runner()
    assert runner.padded_size(2, 2) is None  # nothing captured yet
    inputs = torch.zeros(4)  # a static input buffer, rewritten before each replay
    built = []

    def build_step(size, query_len):
        assert query_len == 1  # no verify graphs without speculative decoding
        built.append(size)
        view = inputs[:size]
        return lambda: view.unsqueeze(1).expand(size, 8) * 2

    before = compilation_counter.snapshot()
    runner.capture(build_step)
    assert built == [4, 2, 1] and runner.num_graphs == 3
    assert compilation_counter.since(before)["num_cudagraphs_captured"] == 3
    inputs.copy_(torch.tensor([1.0, 2.0, 3.0, 0.0]))
    with torch.inference_mode():  # where the model runner replays
        out = runner.replay(runner.padded_size(3, 3))
    assert out.shape == (4, 8) and out[:, 0].tolist() == [2.0, 4.0, 6.0, 0.0]
    assert out.data_ptr() == runner.hidden_states.data_ptr()
    assert compilation_counter.since(before)["num_cudagraph_replays"] == 1


def test_only_decode_steps_that_fit_have_a_bucket():
    runner = _fake_runner()
    runner.capture(lambda size, query_len: (lambda: torch.zeros(size * query_len, 8)))
    assert [runner.padded_size(n, n) for n in (1, 2, 3, 4)] == [1, 2, 4, 4]
    assert runner.padded_size(2, 5) is None  # a prefill chunk in the step
    assert runner.padded_size(5, 5) is None  # larger than every bucket
    assert runner.graph_key(2, 5, 4) is None  # no verify graphs without speculative decoding


def test_verify_graphs_for_steps_of_a_few_tokens_per_request():
    """Speculative decoding (k = 2): verify graphs of 3 rows per request, for the buckets whose rows fit the token
    budget and at most verify_max_reqs requests; decode steps keep their one-row graphs."""
    runner = CUDAGraphRunner((1, 2, 4, 8), hidden_size=8, dtype=torch.float32, device=torch.device("cpu"),
                             create_graph=RerunGraph, verify_query_len=3, verify_max_reqs=8, max_num_tokens=14)
    assert runner.verify_buckets.sizes == (1, 2, 4)  # 8 * 3 rows exceed 14 tokens
    assert runner.keys == [(4, 3), (8, 1), (2, 3), (4, 1), (1, 3), (2, 1), (1, 1)]  # largest token count first
    assert runner.max_num_tokens == 12 and runner.hidden_states.shape == (12, 8)
    built = []

    def build_step(size, query_len):
        built.append((size, query_len))
        return lambda: torch.full((size * query_len, 8), float(size * 10 + query_len))

    before = compilation_counter.snapshot()
    runner.capture(build_step)
    assert built == runner.keys and runner.num_graphs == 7
    assert runner.graph_key(3, 3, 1) == (4, 1)  # a decode step
    assert runner.graph_key(3, 7, 3) == (4, 3)  # up to 3 tokens per request: a verify graph
    assert runner.graph_key(1, 2, 2) == (1, 3)
    assert runner.graph_key(2, 5, 4) is None  # a request with more tokens than the graph's rows
    assert runner.graph_key(5, 9, 3) is None  # more requests than any verify bucket
    with torch.inference_mode():
        out = runner.replay(2, 3)
    assert out.shape == (6, 8) and bool((out == 23.0).all())
    counts = compilation_counter.since(before)
    assert counts["num_cudagraph_replays"] == counts["num_verify_graph_replays"] == 1
    limited = CUDAGraphRunner((1, 2, 4, 8), hidden_size=8, dtype=torch.float32, device=torch.device("cpu"),
                              create_graph=RerunGraph, verify_query_len=3, verify_max_reqs=2, max_num_tokens=64)
    assert limited.verify_buckets.sizes == (1, 2)  # speculation is off from batches of disable_by_batch_size


def test_graphs_need_graph_safe_kernels_and_a_capturable_backend():
    platform = CpuPlatform()
    platform.capabilities = PlatformCapabilities(supports_graphs=True, supports_bf16=True, supports_pin_memory=False)
    platform.create_graph = RerunGraph
    cc = CompilationConfig(use_cudagraph=True, cudagraph_capture_sizes=(1, 2))
    kwargs = dict(hidden_size=8, dtype=torch.float32, device=torch.device("cpu"))
    unsafe = {"paged_attention": KernelChoice("torch", False), "rms_norm": KernelChoice("torch", True)}
    assert create_graph_runner(cc, platform, unsafe, PagedAttentionBackend, **kwargs) is None
    safe = {"paged_attention": KernelChoice("triton", True), "rms_norm": KernelChoice("torch", True)}
    runner = create_graph_runner(cc, platform, safe, PagedAttentionBackend, **kwargs)
    assert runner is not None and runner.buckets.sizes == (1, 2)
    assert create_graph_runner(cc, platform, safe, TorchSDPABackend, **kwargs) is None  # loops on the host
    slow_norm = {**safe, "rms_norm": KernelChoice("torch", False)}
    assert create_graph_runner(cc, platform, slow_norm, PagedAttentionBackend, **kwargs) is None
    assert create_graph_runner(CompilationConfig(), platform, safe, PagedAttentionBackend, **kwargs) is None
    assert create_graph_runner(cc, CpuPlatform(), safe, PagedAttentionBackend, **kwargs) is None  # no graphs


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
    runner = graphed.llm_engine.engine_core.model_executor.model_runner
    graph_runner = CUDAGraphRunner((1, 2, 4, 8), runner.model_config.hidden_size, runner.dtype, runner.device,
                                   create_graph=RerunGraph)
    before = compilation_counter.snapshot()
    with torch.inference_mode():
        graph_runner.capture(runner._graph_step)
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
    runner = graphed.llm_engine.engine_core.model_executor.model_runner
    kv_before = [kv.clone() for kv in runner.kv_caches]
    batch = attention_inputs([1, 1, 1], [1, 1, 1], [[1], [2], [3]], runner.block_size)
    with torch.inference_mode():
        runner.input_ids.np[:4] = [11, 12, 13, 0]
        runner.positions.np[:4] = 0
        runner.input_ids.upload(4)
        runner.positions.upload(4)
        runner.attn_metadata_builder.prepare_for_replay(batch, 4)
        hidden = runner.graph_runner.replay(4)[:3].clone()
    kv_after = [kv.clone() for kv in runner.kv_caches]
    for kv, kv0 in zip(runner.kv_caches, kv_before):  # leave the (prefix-cached) pool as it was
        kv.copy_(kv0)
    for kv0, kv1 in zip(kv_before, kv_after):
        changed = (kv0 != kv1).transpose(0, 1).flatten(1).any(1).nonzero().flatten().tolist()
        assert changed == [1, 2, 3]  # blocks of the three real rows; the padded fourth row wrote nothing
    # The same three tokens without padding give the same hidden states (rows are independent).
    md = runner.attn_metadata_builder.build(batch)
    with torch.inference_mode(), set_forward_context(md, [kv.clone() for kv in runner.kv_caches]):
        ref = runner.model(torch.tensor([11, 12, 13]), torch.tensor([0, 0, 0]))
    torch.testing.assert_close(hidden, ref)
