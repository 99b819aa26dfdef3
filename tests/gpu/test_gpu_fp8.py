"""FP8 W8A8 on the GPU: the cuBLASLt scaled GEMM (`torch._scaled_mm`, row-wise scales) against the op's reference at
Llama-3-8B shapes, and a tiny bf16 Llama with `--quantization fp8` under compile + decode graphs: token-identical to
its eager run, logits within bf16 rounding of transformers on the same FP8-rounded weights and activations."""
from __future__ import annotations

import pytest
import torch
from gpu_testutils import (
    EngineRun,
    assert_compiled_once_and_captured,
    counting_compiles,
    greedy,
    rel_err,
    release_device_memory,
    tokens_of_fresh_engine,
)

from graphserve import LLM
from graphserve.ops import fp8 as fp8_ops
from graphserve.ops._register import get_op

SHAPES = [("qkv_proj", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up_proj", 28672, 4096), ("down_proj", 4096, 14336)]


@pytest.fixture
def fp8_gpu(cuda_kernels):
    from graphserve.platforms.kernels import register_cublas_kernels_once

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("this GPU has no FP8 tensor cores (compute capability < 8.9)")
    assert register_cublas_kernels_once("CUDA", fp8_gemm=True) == {"fp8_scaled_mm": "cublas"}


@pytest.mark.parametrize("name,n,k", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("m", [1, 16, 64, 300])
def test_scaled_mm_matches_reference(fp8_gpu, name, n, k, m):
    g = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).bfloat16()
    w_scale = fp8_ops.per_channel_scales(w)
    w_q = fp8_ops.quantize_fp8(w, w_scale[:, None])
    x_scale = fp8_ops.per_token_scales(x)
    x_q = fp8_ops.quantize_fp8(x, x_scale)
    out, ref = (torch.empty(m, n, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    torch.ops.graphserve.fp8_scaled_mm(out, x_q, x_scale, w_q, w_scale)
    get_op("fp8_scaled_mm").reference(ref, x_q, x_scale, w_q, w_scale)
    assert rel_err(out, ref) < 1e-2
    static = torch.tensor([0.05], device="cuda")  # a static scalar input scale, expanded per row
    torch.ops.graphserve.fp8_scaled_mm(out, fp8_ops.quantize_fp8(x, static), static, w_q, w_scale)
    get_op("fp8_scaled_mm").reference(ref, fp8_ops.quantize_fp8(x, static), static, w_q, w_scale)
    assert rel_err(out, ref) < 1e-2


def test_tiny_llama_fp8_with_graphs(fp8_gpu, tiny_model):
    from tests.quantization.fp8_testutils import fake_quant_reference, online_reference_weights

    path, hf_model = tiny_model("llama")
    prompts = [[5, 6, 7], list(range(10, 50)), list(range(100, 117))]
    eager = LLM(path, dtype="bfloat16", quantization="fp8", enforce_eager=True)
    expected = [o.outputs[0].token_ids for o in eager.generate(prompt_token_ids=prompts, sampling_params=greedy(16),
                                                               use_tqdm=False)]
    runner = eager.llm_engine.engine_core.model_executor.model_runner
    assert runner.kernel_choices["fp8_scaled_mm"].impl == "cublas"
    # One forward of the first prompt: logits close to transformers on the same FP8 rounding (bf16 model).
    reference = fake_quant_reference(hf_model, online_reference_weights(hf_model)).cuda()
    with torch.no_grad():
        ref_logits = reference(torch.tensor([prompts[1]], device="cuda")).logits[0, -1]
    out = eager.generate(prompt_token_ids=prompts[1:2], sampling_params=greedy(1, logprobs=5), use_tqdm=False)[0]
    top = out.outputs[0].logprobs[0]
    ref_top = torch.log_softmax(ref_logits.float(), -1).topk(5)
    assert next(iter(top)) == int(ref_top.indices[0])
    del eager, reference
    release_device_memory()
    with counting_compiles() as startup:
        llm = LLM(path, dtype="bfloat16", quantization="fp8", cuda_graph_sizes=[1, 2, 4], max_num_seqs=4)
    with counting_compiles() as serving:
        got = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=greedy(16),
                                                            use_tqdm=False)]
    assert got == expected
    assert_compiled_once_and_captured(EngineRun(startup=startup, serving=serving), compiled=True, num_graphs=3)
    del llm
    release_device_memory()


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_kv_cache_kernels_match_reference(cuda_kernels, cache_dtype):
    """The hardware fp32 -> fp8 conversion writes exactly the reference's bytes; decode and prefill attention over
    the FP8 cache (Llama-3-8B heads, a 2 k context) stay within bf16 rounding of the reference."""
    from graphserve.ops.attention import _paged_attention_ref, _reshape_and_cache_ref

    g = torch.Generator(device="cuda").manual_seed(0)
    num_blocks, block_size, kv_heads, heads, head_dim, tokens = 300, 16, 8, 32, 128, 2048
    key = torch.randn(tokens, kv_heads, head_dim, device="cuda", generator=g).bfloat16()
    value = torch.randn(tokens, kv_heads, head_dim, device="cuda", generator=g).bfloat16()
    k_scale, v_scale = torch.tensor([0.02], device="cuda"), torch.tensor([0.015], device="cuda")
    caches = [torch.zeros(num_blocks, block_size, kv_heads, head_dim, dtype=cache_dtype, device="cuda")
              for _ in range(4)]
    slots = torch.randperm(num_blocks * block_size, device="cuda", generator=g)[:tokens]
    torch.ops.graphserve.reshape_and_cache(key, value, caches[0], caches[1], slots, k_scale, v_scale)
    _reshape_and_cache_ref(key, value, caches[2], caches[3], slots, k_scale, v_scale)
    assert torch.equal(caches[0].view(torch.uint8), caches[2].view(torch.uint8))
    assert torch.equal(caches[1].view(torch.uint8), caches[3].view(torch.uint8))
    table = (slots.view(-1, block_size)[:, 0] // block_size).int().view(1, -1).repeat(4, 1)
    for q_lens in ([1, 1, 1, 1], [64, 1, 17, 1]):
        query = torch.randn(sum(q_lens), heads, head_dim, device="cuda", generator=g).bfloat16()
        qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
        seq_lens = torch.tensor([2048, 1500, 700, 33], dtype=torch.int32, device="cuda")
        out, ref = torch.empty_like(query), torch.empty_like(query)
        args = (query, caches[0], caches[1], table, seq_lens, qsl, 0.088, 0, max(q_lens), 2048, k_scale, v_scale)
        torch.ops.graphserve.paged_attention(out, *args)
        _paged_attention_ref(ref, *args)
        assert rel_err(out, ref) < 1e-2


def test_tiny_llama_fp8_kv_cache_with_graphs(cuda_kernels, tiny_model):
    """--kv-cache-dtype fp8 under compile + decode graphs gives the eager run's tokens, nothing recompiled."""
    path, _ = tiny_model("llama")
    prompts = [[5, 6, 7], list(range(10, 50)), list(range(100, 117))]
    expected = tokens_of_fresh_engine(path, prompts, greedy(16), dtype="bfloat16", kv_cache_dtype="fp8",
                                      enforce_eager=True)
    with counting_compiles() as startup:
        llm = LLM(path, dtype="bfloat16", kv_cache_dtype="fp8", cuda_graph_sizes=[1, 2, 4], max_num_seqs=4)
    with counting_compiles() as serving:
        got = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=greedy(16),
                                                            use_tqdm=False)]
    assert got == expected
    assert_compiled_once_and_captured(EngineRun(startup=startup, serving=serving), compiled=True, num_graphs=3)
    del llm
    release_device_memory()
