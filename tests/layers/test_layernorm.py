"""RMSNorm layer vs transformers' LlamaRMSNorm, with and without the fused residual add."""
import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from graphserve.layers.layernorm import RMSNorm


def _pair(hidden, eps, dtype):
    ours, theirs = RMSNorm(hidden, eps).to(dtype), LlamaRMSNorm(hidden, eps).to(dtype)
    weight = torch.randn(hidden, generator=torch.Generator().manual_seed(1)).to(dtype)
    ours.weight.data.copy_(weight)
    theirs.weight.data.copy_(weight)
    return ours, theirs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_hf_llama_rms_norm(dtype):
    ours, theirs = _pair(64, 1e-5, dtype)
    x = (torch.randn(6, 64, generator=torch.Generator().manual_seed(0)) * 5).to(dtype)
    # Same math in the same order: identical bits, not merely close.
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_residual_matches_hf_decoder_layer_order(dtype):
    ours, theirs = _pair(64, 1e-6, dtype)
    g = torch.Generator().manual_seed(2)
    x, residual = torch.randn(5, 64, generator=g).to(dtype), torch.randn(5, 64, generator=g).to(dtype)
    hf_residual = residual + x  # HF decoder layer: hidden_states = residual + hidden_states
    hf_out = theirs(hf_residual)
    out, new_residual = ours(x.clone(), residual.clone())
    torch.testing.assert_close(new_residual, hf_residual, rtol=0, atol=0)
    torch.testing.assert_close(out, hf_out, rtol=0, atol=0)


def test_weight_is_the_only_parameter_and_loads_by_hf_name():
    norm = RMSNorm(8)
    assert [n for n, _ in norm.named_parameters()] == ["weight"]
    norm.load_state_dict({"weight": torch.full((8,), 2.0)})
    x = torch.ones(1, 8)
    torch.testing.assert_close(norm(x), torch.full((1, 8), 2.0), rtol=1e-5, atol=1e-5)
