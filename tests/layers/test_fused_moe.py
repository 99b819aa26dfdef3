"""MoE layers against transformers' MoE blocks (Mixtral: renormalised top-k; Qwen2-MoE: raw top-k weights plus the
gated shared expert) at odd expert counts and top-k, with routing ties; expert weight loading and its errors."""
import pytest
import torch

from graphserve.layers.fused_moe import FusedMoE, SparseMoeBlock
from graphserve.models.llama import LlamaMLP

HIDDEN, INTER = 32, 24


def _load_from_hf_experts(block: SparseMoeBlock, hf_block) -> None:
    """Copy transformers' fused expert tensors into ours through the per-expert weight loader, as a checkpoint
    would be loaded (gate, up, down of each expert)."""
    block.gate.weight.data.copy_(hf_block.gate.weight.data)
    experts = block.experts
    for e in range(experts.num_experts):
        gate, up = hf_block.experts.gate_up_proj.data[e].chunk(2, dim=0)
        experts.weight_loader(experts.w13_weight, gate, (e, "w1"))
        experts.weight_loader(experts.w13_weight, up, (e, "w3"))
        experts.weight_loader(experts.w2_weight, hf_block.experts.down_proj.data[e], (e, "w2"))


def _with_ties(hf_block, num_experts: int) -> None:
    """Router rows 0 and 1 identical: every token's scores tie between those two experts."""
    hf_block.gate.weight.data[1] = hf_block.gate.weight.data[0]


@pytest.mark.parametrize("num_experts,top_k", [(3, 1), (5, 2), (7, 3)])
def test_mixtral_block_matches_transformers(num_experts, top_k):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(num_experts)
    config = MixtralConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_local_experts=num_experts,
                           num_experts_per_tok=top_k)
    hf_block = MixtralSparseMoeBlock(config).eval()
    for p in hf_block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    _with_ties(hf_block, num_experts)
    ours = SparseMoeBlock(HIDDEN, num_experts, top_k, INTER, renormalize=True)
    _load_from_hf_experts(ours, hf_block)
    x = torch.randn(11, HIDDEN)
    with torch.no_grad():
        expected = hf_block(x.unsqueeze(0))[0]
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_experts,top_k", [(5, 2), (9, 4)])
def test_qwen2_moe_block_with_shared_expert_matches_transformers(num_experts, top_k):
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    torch.manual_seed(top_k)
    config = Qwen2MoeConfig(hidden_size=HIDDEN, moe_intermediate_size=INTER, shared_expert_intermediate_size=40,
                            num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=False)
    hf_block = Qwen2MoeSparseMoeBlock(config).eval()
    for p in hf_block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    shared = LlamaMLP(HIDDEN, 40, "silu", False)
    ours = SparseMoeBlock(HIDDEN, num_experts, top_k, INTER, renormalize=False, shared_expert=shared)
    _load_from_hf_experts(ours, hf_block)
    hf_shared = hf_block.shared_expert
    shared.gate_up_proj.weight.data.copy_(torch.cat([hf_shared.gate_proj.weight, hf_shared.up_proj.weight]))
    shared.down_proj.weight.data.copy_(hf_shared.down_proj.weight)
    ours.shared_expert_gate.weight.data.copy_(hf_block.shared_expert_gate.weight)
    x = torch.randn(13, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf_block(x.unsqueeze(0))[0], rtol=1e-5, atol=1e-6)


def test_expert_loader_errors():
    moe = FusedMoE(4, 2, HIDDEN, INTER, renormalize=True)
    with pytest.raises(ValueError, match="expert 4 out of range"):
        moe.weight_loader(moe.w13_weight, torch.zeros(INTER, HIDDEN), (4, "w1"))
    with pytest.raises(ValueError, match="shard id must be"):
        moe.weight_loader(moe.w13_weight, torch.zeros(INTER, HIDDEN), "w1")
    with pytest.raises(ValueError, match="does not fit"):
        moe.weight_loader(moe.w2_weight, torch.zeros(INTER, HIDDEN), (0, "w2"))
    with pytest.raises(ValueError, match="num_experts_per_tok=5"):
        FusedMoE(4, 5, HIDDEN, INTER, renormalize=True)
    assert moe.w13_weight.expected_shards == {(e, s) for e in range(4) for s in ("w1", "w3")}


def test_checkpoint_missing_an_expert_is_named(tiny_model, tmp_path):
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    from graphserve.models.config_loader import create_model_config
    from graphserve.models.loader import get_model

    path, _ = tiny_model("mixtral")
    broken = tmp_path / "mixtral-missing-expert"
    shutil.copytree(path, broken)
    tensors = load_file(os.path.join(broken, "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.3.w3.weight"]
    save_file(tensors, os.path.join(broken, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.w13_weight"):
        get_model(create_model_config(str(broken)), "cpu")
