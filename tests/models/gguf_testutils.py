"""Synthetic GGUF files from tiny HF Llamas, written the way llama.cpp's converter writes them."""
import numpy as np
import torch

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


def write_llama_gguf(hf_model, path: str, types: dict | None = None) -> None:
    """Convert a HF Llama to a GGUF the way llama.cpp would (names, metadata, permuted q/k): F32, or for the
    tensors `types` names ({"attn_q": "Q4_0", "token_embd": "Q8_0", ...}) that type, from the gguf quantizer."""
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
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp stores no output.weight for a tied head
        if name.endswith("q_proj.weight"):
            tensor = llama_cpp_permute(tensor, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            tensor = llama_cpp_permute(tensor, config.num_key_value_heads)
        gguf_name = _gguf_name(name)
        array = np.ascontiguousarray(tensor.float().numpy())
        qtype = (types or {}).get(gguf_name.split(".")[-2] if gguf_name.startswith("blk.") else gguf_name[:-7])
        if qtype is None:
            writer.add_tensor(gguf_name, array)
        else:
            qtype = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# llama.cpp-style mixed recipe: q/k/v of three types (one GEMM per shard), gate/up of one (a single GEMM), F16 and
# F32 projections, a quantized embedding and head.
MIXED_TYPES = {"attn_q": "Q4_0", "attn_k": "Q8_0", "attn_v": "Q5_1", "attn_output": "F16", "ffn_gate": "Q4_1",
               "ffn_up": "Q4_1", "ffn_down": "Q5_0", "token_embd": "Q8_0", "output": "Q4_0"}
