"""GGUF: llama.cpp names and q/k row order are undone exactly (synthetic file from a tiny HF Llama)."""
import numpy as np
import pytest
import torch
from model_testutils import hf_logits, our_logits

from graphserve.models.config_loader import create_model_config
from graphserve.models.gguf_loader import gguf_to_hf_name, unpermute_qk
from graphserve.models.loader import get_model

_HF_TO_GGUF_BLOCK = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def llama_cpp_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """What llama.cpp's convert_hf_to_gguf.py does to Llama q/k rows (independent re-statement)."""
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return weight.reshape(num_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _gguf_name(hf_name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_HF_TO_GGUF_BLOCK[module]}.{kind}"


def write_llama_gguf(hf_model, path: str) -> None:
    """Convert a HF Llama to an F32 GGUF the way llama.cpp would (names, metadata, permuted q/k)."""
    import gguf

    config = hf_model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    for name, tensor in hf_model.state_dict().items():
        if name.endswith("q_proj.weight"):
            tensor = llama_cpp_permute(tensor, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            tensor = llama_cpp_permute(tensor, config.num_key_value_heads)
        writer.add_tensor(_gguf_name(name), np.ascontiguousarray(tensor.float().numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("shape", [(24, 5), (24,)])
def test_unpermute_inverts_llama_cpp(shape):
    weight = torch.randn(shape)
    permuted = llama_cpp_permute(weight, num_heads=3)
    assert not torch.equal(permuted, weight)
    assert torch.equal(unpermute_qk(permuted, num_heads=3), weight)


def test_name_mapping():
    assert gguf_to_hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf_to_hf_name("output.weight") == "lm_head.weight"
    assert gguf_to_hf_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    assert gguf_to_hf_name("blk.0.attn_q.bias") == "model.layers.0.self_attn.q_proj.bias"
    assert gguf_to_hf_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    assert gguf_to_hf_name("rope_freqs.weight") is None
    with pytest.raises(ValueError, match="blk.0.ffn_gate_exps.weight"):
        gguf_to_hf_name("blk.0.ffn_gate_exps.weight")


def test_synthetic_llama_gguf_matches_transformers(tiny_checkpoint, tmp_path, prompt_ids):
    _, hf_model = tiny_checkpoint("llama")
    gguf_path = tmp_path / "tiny-llama.F32.gguf"
    write_llama_gguf(hf_model, str(gguf_path))
    model_config = create_model_config(str(gguf_path))
    assert (model_config.gguf_file, model_config.load_format) == ("tiny-llama.F32.gguf", "gguf")
    assert model_config.model == str(tmp_path) and model_config.tokenizer == str(tmp_path)
    assert model_config.architecture == "LlamaForCausalLM" and model_config.dtype == "float32"
    assert create_model_config(str(tmp_path)).gguf_file == "tiny-llama.F32.gguf"  # a directory works too
    model = get_model(model_config, "cpu")
    diff = (our_logits(model, prompt_ids) - hf_logits(hf_model, prompt_ids)).abs().max()
    assert diff < 1e-4
