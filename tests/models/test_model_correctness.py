"""graphserve models vs transformers on tiny random checkpoints: full-prompt logits in fp32."""
import copy
import dataclasses

import pytest
import torch
from model_testutils import PROMPT_LEN, hf_logits, our_logits

from graphserve.models.config_loader import create_model_config
from graphserve.models.loader import get_model

ATOL = 1e-4
CHECKPOINTS = ["llama", "llama_llama3_rope", "llama_yarn_rope", "llama_linear_rope", "llama_tied_bias",
               "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe",
               "granite", "phi3", "phi3_longrope", "starcoder2", "olmo2", "gemma", "gpt_neox", "gpt_neox_seq",
               "falcon", "falcon_new", "falcon_seq", "gemma3", "gemma2"]


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_logits_match_transformers(name, tiny_checkpoint, prompt_ids):
    path, hf_model = tiny_checkpoint(name)
    model_config = create_model_config(path)
    assert model_config.dtype == "float32"
    model = get_model(model_config, torch.device("cpu"))
    expected = hf_logits(hf_model, prompt_ids)
    actual = our_logits(model, prompt_ids)
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    assert expected.std() > 0.1  # the random model is not degenerate, so ATOL is a real bound
    assert (actual - expected).abs().max().item() < ATOL


def test_architectures_resolve_to_shared_decoder(tiny_checkpoint):
    from graphserve.models.llama import LlamaForCausalLM

    expected = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM"}
    for name, arch in expected.items():
        model_config = create_model_config(tiny_checkpoint(name)[0], load_format="dummy")
        assert model_config.architecture == arch
        assert isinstance(get_model(model_config, "cpu"), LlamaForCausalLM)


def _without_sliding_window(model_config):
    hf_config = copy.deepcopy(model_config.hf_config)
    hf_config.sliding_window = None
    return dataclasses.replace(model_config, hf_config=hf_config, sliding_window=None)


@pytest.mark.parametrize("name,sliding_layers", [("mistral", [0, 1]), ("qwen2", [1])])
def test_sliding_window_is_applied(name, sliding_layers, tiny_checkpoint, prompt_ids):
    model_config = create_model_config(tiny_checkpoint(name)[0])
    assert model_config.sliding_window == 8 < PROMPT_LEN
    model = get_model(model_config, "cpu")
    windows = [layer.self_attn.attn.sliding_window for layer in model.model.layers]
    assert [i for i, w in enumerate(windows) if w is not None] == sliding_layers
    # Without the window the later positions change: the match with transformers depends on it.
    full = get_model(_without_sliding_window(model_config), "cpu")
    diff = (our_logits(model, prompt_ids) - our_logits(full, prompt_ids)).abs()
    assert diff[:8].max() < 1e-5 and diff[8:].max() > 1e-3


def test_qwen2_without_use_sliding_window_has_no_window(tmp_path):
    from model_testutils import TINY
    from transformers import Qwen2Config

    Qwen2Config(**TINY, sliding_window=8, use_sliding_window=False, architectures=["Qwen2ForCausalLM"]) \
        .save_pretrained(tmp_path)
    model_config = create_model_config(str(tmp_path), load_format="dummy")
    assert model_config.sliding_window is None
    model = get_model(model_config, "cpu")
    assert all(layer.self_attn.attn.sliding_window is None for layer in model.model.layers)


def test_tied_embeddings_share_storage(tiny_checkpoint, prompt_ids):
    path, _ = tiny_checkpoint("llama_tied_bias")
    model = get_model(create_model_config(path), "cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = get_model(create_model_config(tiny_checkpoint("llama")[0]), "cpu")
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
