"""The fused MoE Triton kernel against the op's reference at real MoE shapes (Mixtral-8x7B: 8 experts, top-2,
14336 wide; Qwen3-30B-A3B: 128 experts, top-8, 768 wide), decode and prefill token counts, bf16."""
from __future__ import annotations

import pytest
import torch
from gpu_testutils import rel_err

from graphserve.ops import moe as moe_ops
from graphserve.ops._register import get_op

SHAPES = [("mixtral-8x7b", 8, 2, 4096, 14336), ("qwen3-30b-a3b", 128, 8, 2048, 768)]


@pytest.mark.parametrize("name,num_experts,top_k,hidden,inter", SHAPES, ids=[s[0] for s in SHAPES])
def test_fused_moe_matches_reference(cuda_kernels, name, num_experts, top_k, hidden, inter):
    g = torch.Generator(device="cuda").manual_seed(num_experts)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, device="cuda", generator=g) * 0.02).bfloat16()
    w2 = (torch.randn(num_experts, hidden, inter, device="cuda", generator=g) * 0.02).bfloat16()
    router = torch.randn(hidden, num_experts, device="cuda", generator=g) * 0.05
    for tokens in (1, 7, 64, 2048):
        x = torch.randn(tokens, hidden, device="cuda", generator=g).bfloat16()
        weights, ids = moe_ops.select_experts(x.float() @ router, top_k, renormalize=True)
        out, ref = torch.empty_like(x), torch.empty_like(x)
        torch.ops.graphserve.fused_moe(out, x, w13, w2, weights, ids)
        get_op("fused_moe").reference(ref, x.float(), w13.float(), w2.float(), weights, ids)
        assert rel_err(out, ref) < 1e-2, f"{tokens} tokens"


def test_fused_moe_replays_in_a_cuda_graph(cuda_kernels):
    """No host sync: the op captures once and replays for new routings of the same batch size."""
    num_experts, top_k, hidden, inter, tokens = 8, 2, 256, 512, 16
    w13 = (torch.randn(num_experts, 2 * inter, hidden, device="cuda") * 0.05).bfloat16()
    w2 = (torch.randn(num_experts, hidden, inter, device="cuda") * 0.05).bfloat16()
    x = torch.randn(tokens, hidden, device="cuda").bfloat16()
    logits = torch.randn(tokens, num_experts, device="cuda")
    out = torch.empty_like(x)

    def step():
        weights, ids = moe_ops.select_experts(logits, top_k, renormalize=True)
        torch.ops.graphserve.fused_moe(out, x, w13, w2, weights, ids)

    step()  # compile the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in range(3):
        generator = torch.Generator("cuda").manual_seed(seed)
        logits.copy_(torch.randn(tokens, num_experts, device="cuda", generator=generator))
        graph.replay()
        weights, ids = moe_ops.select_experts(logits, top_k, renormalize=True)
        ref = torch.empty_like(x)
        get_op("fused_moe").reference(ref, x.float(), w13.float(), w2.float(), weights, ids)
        assert rel_err(out, ref) < 1e-2
