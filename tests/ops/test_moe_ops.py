"""Fused MoE op: the reference against a per-token definition, the block alignment's invariants, the Triton kernel
(interpreter, CPU tensors) against the reference, routing (softmax / sigmoid, renormalised or not, ties)."""
import pytest
import torch
import torch.nn.functional as F

from graphserve.ops import moe as moe_ops


def _experts(num_experts: int, hidden: int, inter: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=g) * 0.2).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=g) * 0.2).to(dtype)
    return w13, w2


def _by_definition(x, w13, w2, topk_weights, topk_ids):
    """Token by token, slot by slot."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            gate, up = (w13[e].double() @ x[t].double()).chunk(2)
            out[t] += float(topk_weights[t, j]) * (w2[e].double() @ (F.silu(gate) * up))
    return out


def _route(num_tokens: int, num_experts: int, top_k: int, hidden: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g)
    logits = torch.randn(num_tokens, num_experts, generator=g)
    return x, *moe_ops.select_experts(logits, top_k, renormalize=True)


@pytest.mark.parametrize("num_experts,top_k", [(3, 1), (5, 2), (8, 3)])
def test_reference_matches_definition(num_experts, top_k):
    w13, w2 = _experts(num_experts, 16, 24, seed=num_experts)
    x, weights, ids = _route(7, num_experts, top_k, 16, seed=top_k)
    got = moe_ops.fused_moe(x, w13, w2, weights, ids)
    torch.testing.assert_close(got.double(), _by_definition(x, w13, w2, weights, ids), rtol=1e-5, atol=1e-5)


def test_select_experts_variants_and_ties():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    weights, ids = moe_ops.select_experts(logits, 2, renormalize=False)
    probs = torch.softmax(logits, -1)
    assert torch.equal(ids, torch.topk(probs, 2).indices)  # ties broken like torch.topk (transformers' choice)
    torch.testing.assert_close(weights, torch.topk(probs, 2).values)
    renormed, _ = moe_ops.select_experts(logits, 2, renormalize=True)
    torch.testing.assert_close(renormed.sum(-1), torch.ones(2))
    sig, sig_ids = moe_ops.select_experts(logits, 2, renormalize=False, scoring_func="sigmoid")
    torch.testing.assert_close(sig, torch.sigmoid(logits).gather(1, sig_ids))
    with pytest.raises(ValueError, match="scoring_func"):
        moe_ops.select_experts(logits, 2, True, scoring_func="relu")


@pytest.mark.parametrize("num_tokens,num_experts,top_k,block_m", [(1, 8, 2, 16), (9, 5, 2, 4), (33, 3, 3, 16)])
def test_align_block_size_groups_pairs_by_expert(num_tokens, num_experts, top_k, block_m):
    from graphserve.ops.triton.moe import moe_align_block_size

    _, _, ids = _route(num_tokens, num_experts, top_k, 4, seed=num_tokens)
    sorted_ids, expert_ids = moe_align_block_size(ids, num_experts, block_m)
    flat = ids.flatten()
    pairs = num_tokens * top_k
    assert sorted_ids.numel() % block_m == 0 and sorted_ids.numel() >= pairs + num_experts * (block_m - 1)
    real = sorted_ids[sorted_ids < pairs]
    assert sorted(real.tolist()) == list(range(pairs))  # every pair exactly once
    for b, expert in enumerate(expert_ids.tolist()):
        block = sorted_ids[b * block_m:(b + 1) * block_m]
        block = block[block < pairs]
        if expert == num_experts:
            assert block.numel() == 0
        else:
            assert (flat[block] == expert).all()


@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 4, 2), (6, 5, 2), (40, 3, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernel_matches_reference(num_tokens, num_experts, top_k, dtype):
    from graphserve.ops.triton.moe import fused_moe as triton_fused_moe

    w13, w2 = _experts(num_experts, 32, 48, seed=3, dtype=dtype)
    x, weights, ids = _route(num_tokens, num_experts, top_k, 32, seed=num_tokens)
    x = x.to(dtype)
    expected = moe_ops.fused_moe(x.float(), w13.float(), w2.float(), weights, ids)
    got = torch.empty_like(x)
    triton_fused_moe(got, x, w13, w2, weights, ids)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)
