"""GGUF blocks kept on the GPU: the Triton GEMV / tl.dot / dequantize kernels against the op's reference at
Llama-3-8B shapes for every type, and a tiny Llama GGUF of a mixed llama.cpp recipe served kept-quantized (the GPU
default) under compile + decode graphs: tokens equal to its eager run, logits within bf16 rounding of the same
file dequantized at load."""
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
from graphserve.ops import gguf as gguf_ops
from graphserve.ops._register import get_op
from tests.ops.test_gguf_ops import FLOATS, K_QUANTS, LEGACY, quantized

SHAPES = [("qkv_proj", 6144, 4096), ("down_proj", 4096, 14336)]


@pytest.mark.parametrize("name", LEGACY + K_QUANTS + FLOATS)
@pytest.mark.parametrize("layer,n,k", SHAPES, ids=[s[0] for s in SHAPES])
def test_gguf_kernels_match_reference(cuda_kernels, name, layer, n, k):
    qtype = gguf_ops.GGML_TYPE_IDS[name]
    blocks = quantized(name, n, k, seed=n + k).cuda()
    dense = torch.empty(n, k, device="cuda")
    torch.ops.graphserve.gguf_dequantize(dense, blocks, qtype)
    reference = torch.empty_like(dense)
    get_op("gguf_dequantize").reference(reference, blocks, qtype)
    assert rel_err(dense, reference) < 1e-6  # only FMA contraction may differ
    g = torch.Generator(device="cuda").manual_seed(k)
    for m in (1, 3, 16, 64, 300, 1024):  # GEMV, GEMV rows, tl.dot tiles, dequantize + cuBLAS
        x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
        out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
        torch.ops.graphserve.gguf_gemm(out, x, blocks, qtype)
        assert rel_err(out, x.float() @ reference.t()) < 1e-2, f"m={m}"


def test_tiny_llama_gguf_kept_quantized_with_graphs(cuda_kernels, tiny_model, tmp_path):
    from graphserve.models.config_loader import create_model_config
    from graphserve.models.loader import get_model
    from tests.models.gguf_testutils import MIXED_TYPES, write_llama_gguf
    from tests.models.model_testutils import our_logits

    tokenizer_dir, hf_model = tiny_model("llama")
    path = str(tmp_path / "tiny.mixed.gguf")
    write_llama_gguf(hf_model, path, MIXED_TYPES)
    kept_config = create_model_config(path, dtype="bfloat16")
    assert kept_config.quantization == "gguf"  # the GPU default
    kept = get_model(kept_config, "cuda")
    dense = get_model(create_model_config(path, dtype="bfloat16", device="cpu"), "cuda")  # dequantized at load
    ids = torch.arange(10, 50, device="cuda")
    with torch.no_grad():
        assert rel_err(our_logits(kept, ids), our_logits(dense, ids)) < 1e-2
    del kept, dense
    release_device_memory()
    prompts = [[5, 6, 7], list(range(10, 50)), list(range(100, 117))]
    expected = tokens_of_fresh_engine(path, prompts, greedy(16), tokenizer=tokenizer_dir, dtype="bfloat16",
                                      enforce_eager=True)
    with counting_compiles() as startup:
        llm = LLM(path, tokenizer=tokenizer_dir, dtype="bfloat16", cuda_graph_sizes=[1, 2, 4], max_num_seqs=4)
    runner = llm.llm_engine.engine_core.model_executor.model_runner
    assert runner.model_config.quantization == "gguf"
    with counting_compiles() as serving:
        got = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=greedy(16),
                                                            use_tqdm=False)]
    assert got == expected
    assert_compiled_once_and_captured(EngineRun(startup=startup, serving=serving), compiled=True, num_graphs=3)
    del llm
    release_device_memory()
