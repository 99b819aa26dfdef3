"""GGUF: llama.cpp names and q/k row order are undone exactly (synthetic file from a tiny HF Llama)."""
import pytest
import torch
from model_testutils import TINY, hf_logits, our_logits

from graphserve.models.config_loader import create_model_config
from graphserve.models.gguf_loader import gguf_to_hf_name, unpermute_qk
from graphserve.models.loader import get_model
from tests.models.gguf_testutils import MIXED_TYPES, llama_cpp_permute, write_llama_gguf


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


@pytest.mark.parametrize("tied", [False, True])
def test_kept_quantized_matches_dequantized_at_load(tiny_checkpoint, tmp_path, prompt_ids, tied):
    """`quantization="gguf"` keeps the blocks (uint8 parameters, fewer bytes) and computes what the
    dequantize-at-load path computes; a tied head shares the embedding's blocks (GGUF has no output.weight)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from graphserve.worker.memory_profiler import model_weight_bytes

    _, hf_model = tiny_checkpoint("llama")
    if tied:
        torch.manual_seed(5)
        hf_model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY, tie_word_embeddings=True)).eval()
    path = tmp_path / f"tiny-llama-tied{tied}.mixed.gguf"
    write_llama_gguf(hf_model, str(path), MIXED_TYPES)
    dense_config = create_model_config(str(path))  # the CPU default: dequantized at load
    assert dense_config.quantization is None
    kept_config = create_model_config(str(path), quantization="gguf")
    assert kept_config.quantization == "gguf"
    types = kept_config.quantization_config["tensor_types"]
    assert types["model.layers.0.self_attn.v_proj.weight"] == 7 and types["model.embed_tokens.weight"] == 8
    dense, kept = get_model(dense_config, "cpu"), get_model(kept_config, "cpu")
    qkv = kept.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == torch.uint8 and not qkv.gguf_uniform
    assert kept.model.layers[0].mlp.gate_up_proj.gguf_uniform
    assert kept.model.embed_tokens.weight.dtype == torch.uint8
    assert (kept.lm_head.weight is kept.model.embed_tokens.weight) == tied
    assert model_weight_bytes(kept) < model_weight_bytes(dense) / 2
    ours, reference = our_logits(kept, prompt_ids), our_logits(dense, prompt_ids)
    assert (ours - reference).abs().max() < 1e-4
    assert torch.equal(ours.argmax(-1), reference.argmax(-1))


def test_gguf_quantization_choices(tiny_checkpoint, tmp_path):
    from graphserve.quantization import resolve_gguf_quantization

    _, hf_model = tiny_checkpoint("llama")
    path = tmp_path / "tiny.Q8_0.gguf"
    write_llama_gguf(hf_model, str(path), {"attn_q": "Q8_0"})
    with pytest.raises(ValueError, match="checkpoint is a GGUF file"):
        create_model_config(str(path), quantization="awq")
    assert create_model_config(str(path), quantization="fp8").quantization == "fp8"  # dequantized, then FP8
    quantized = {"model.layers.0.self_attn.q_proj.weight": 8, "model.embed_tokens.weight": 0}
    assert resolve_gguf_quantization(quantized, None, keep_by_default=True)[0] == "gguf"  # GPU default
    assert resolve_gguf_quantization(quantized, None, keep_by_default=False) == (None, None)  # CPU default
    floats = {"model.layers.0.self_attn.q_proj.weight": 1}
    assert resolve_gguf_quantization(floats, None, keep_by_default=True) == (None, None)  # nothing to keep
    unsupported = {"model.layers.3.mlp.down_proj.weight": 16}  # IQ2_XXS
    with pytest.raises(ValueError, match=r"'model.layers.3.mlp.down_proj.weight' has quant type 16"):
        resolve_gguf_quantization(unsupported, "gguf", keep_by_default=False)
    with pytest.raises(ValueError, match="needs a .gguf checkpoint"):
        create_model_config(tiny_checkpoint("llama")[0], quantization="gguf")


@pytest.mark.parametrize("recipe", ["Q4_K_M", "Q8_0"])
def test_random_k_quant_llama_kept_matches_dequantized(tmp_path, prompt_ids, recipe):
    """perf/make_gguf.py's random-block Llama (the GPU benchmark's file, here 256 wide): K-quant and Q6_K
    projections, embedding and head kept in blocks compute what the dequantized model computes."""
    from perf.make_gguf import write_random_llama_gguf

    config = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2, max_position_embeddings=128, rms_norm_eps=1e-6, vocab_size=512)
    path = tmp_path / f"random.{recipe}.gguf"
    write_random_llama_gguf(config, recipe, str(path))
    kept_config = create_model_config(str(path), quantization="gguf")
    expected_types = {14, 12} if recipe == "Q4_K_M" else {8}
    assert set(kept_config.quantization_config["tensor_types"].values()) == expected_types
    kept, dense = get_model(kept_config, "cpu"), get_model(create_model_config(str(path)), "cpu")
    ours, reference = our_logits(kept, prompt_ids), our_logits(dense, prompt_ids)
    assert torch.isfinite(ours).all()
    assert (ours - reference).abs().max() < 1e-4 * reference.abs().max()
