"""Quantized GEMMs on the GPU: the Triton kernels at Llama-3-8B shapes against the fp32 reference, and quantized
tiny models (compile + CUDA graphs + async scheduling) against transformers on their dequantized weights."""
from __future__ import annotations

import pytest
import torch
from gpu_testutils import generate, greedy, rel_err, release_device_memory

from graphserve import LLM
from graphserve.ops._register import get_op

SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]  # Llama-3-8B: qkv, o, gate_up, down
BF16_TOL = 1e-2


def _packed(k: int, n: int, bits: int, group: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    qweight = torch.randint(-(1 << 31), (1 << 31) - 1, (k * bits // 32, n), dtype=torch.int32, device="cuda",
                            generator=g)
    scales = (torch.rand(k // group, n, device="cuda", generator=g) * 0.02 + 0.001).half()
    zeros = torch.randint(0, 1 << bits, (k // group, n), device="cuda", generator=g).half()
    return qweight, scales, zeros


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("m", [1, 2, 4, 5, 16, 64, 300, 1100])  # GEMV, tiled (split), tiled, dense-GEMM paths
def test_quant_gemm_4bit_g128_matches_reference(cuda_kernels, k, n, m):
    """W4A16, groups of 128: every path of the kernel within bf16 tolerance of the fp32 reference."""
    qweight, scales, zeros = _packed(k, n, 4, 128, seed=k + n + m)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    torch.ops.graphserve.quant_gemm(out, x, qweight, scales, zeros, 4, 128)
    ref = torch.empty(m, n, device="cuda", dtype=torch.float32)
    get_op("quant_gemm").reference(ref, x, qweight, scales, zeros, 4, 128)
    assert rel_err(out, ref) < BF16_TOL


@pytest.mark.parametrize("bits,group", [(2, 128), (8, 128), (4, -1), (4, 32), (8, -1)])
def test_quant_gemm_other_bits_and_groups(cuda_kernels, bits, group):
    """2 and 8 bits, per-channel (group -1) and small groups, at the down_proj shape (K = 14336)."""
    k, n = 14336, 4096
    size = k if group == -1 else group
    qweight, scales, zeros = _packed(k, n, bits, size, seed=bits * 100 + size)
    for m in (1, 48):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        torch.ops.graphserve.quant_gemm(out, x, qweight, scales, zeros, bits, size)
        ref = torch.empty(m, n, device="cuda")
        get_op("quant_gemm").reference(ref, x, qweight, scales, zeros, bits, size)
        assert rel_err(out, ref) < BF16_TOL, (m, rel_err(out, ref))


def test_dequantize_is_exact(cuda_kernels):
    qweight, scales, zeros = _packed(4096, 4096, 4, 128, seed=3)
    out = torch.empty(4096, 4096, device="cuda", dtype=torch.float32)
    torch.ops.graphserve.quant_dequantize(out, qweight, scales, zeros, 4, 128)
    ref = torch.empty_like(out)
    get_op("quant_dequantize").reference(ref, qweight, scales, zeros, 4, 128)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("m", [1, 16])
def test_split_k_gemm_in_a_graph_is_deterministic(cuda_kernels, m):
    """The split-K reduction replayed from a CUDA graph: right on new inputs, and bitwise the same on the same input
    whichever split finishes last."""
    from graphserve.ops.triton.quant import choose_config

    k, n = 4096, 4096
    assert choose_config(m, n, k, 4, 128, torch.device("cuda")).split_k > 1
    qweight, scales, zeros = _packed(k, n, 4, 128, seed=11)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    torch.ops.graphserve.quant_gemm(out, x, qweight, scales, zeros, 4, 128)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.graphserve.quant_gemm(out, x, qweight, scales, zeros, 4, 128)
    ref = torch.empty(m, n, device="cuda")
    for _ in range(3):
        x.copy_(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
        graph.replay()
        first = out.clone()
        get_op("quant_gemm").reference(ref, x, qweight, scales, zeros, 4, 128)
        assert rel_err(first, ref) < BF16_TOL
        for _ in range(5):
            graph.replay()
            assert torch.equal(out, first)


@pytest.mark.parametrize("m", [1, 64])
def test_squeezellm_gemm_matches_reference(cuda_kernels, m):
    k, n = 4096, 4096
    qweight = torch.randint(-(1 << 31), (1 << 31) - 1, (k // 8, n), dtype=torch.int32, device="cuda")
    table = torch.randn(n, 16, device="cuda") * 0.02
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    torch.ops.graphserve.squeezellm_gemm(out, x, qweight, table)
    ref = torch.empty(m, n, device="cuda")
    get_op("squeezellm_gemm").reference(ref, x, qweight, table)
    assert rel_err(out, ref) < BF16_TOL


@torch.no_grad()
def _hf_greedy(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    outs = []
    for p in prompts:
        seq = model.generate(torch.tensor([p], device="cuda"), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
        outs.append(seq[0, len(p):].tolist())
    return outs


@pytest.mark.parametrize("method,options", [
    ("awq", {"group_size": 32}),
    ("gptq", {"bits": 4, "group_size": 32, "sym": False, "desc_act": True}),
    ("gptq", {"bits": 3, "group_size": 32}),
    ("squeezellm", {}),
])
def test_quantized_tiny_llama_with_graphs_matches_transformers(needs_cuda, tiny_model, tmp_path, method, options):
    """fp32, the GPU defaults (compile, decode graphs, async scheduling): the quantized checkpoint's greedy tokens
    are transformers' on its dequantized weights, on the same GPU."""
    from tests.quantization.quant_testutils import reference_model, write_quantized_checkpoint

    src, hf_model = tiny_model("llama")
    dequantized = write_quantized_checkpoint(src, str(tmp_path), method, **options)
    reference = reference_model(hf_model, dequantized).cuda()
    prompts = [[5, 6, 7], list(range(10, 50)), list(range(100, 117))]
    expected = _hf_greedy(reference, prompts, 16)
    del reference
    llm = LLM(str(tmp_path), dtype="float32", cuda_graph_sizes=[1, 2, 4], max_num_seqs=4)
    runner = llm.llm_engine.engine_core.model_executor.model_runner
    assert runner.graph_runner is not None and runner.graph_runner.num_graphs == 3
    outputs = generate(llm, prompts, greedy(16))
    assert [o.outputs[0].token_ids for o in outputs] == expected
    del llm
    release_device_memory()
