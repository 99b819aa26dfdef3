"""create_model_config: both transformers config spellings, limits, special tokens, refusals."""
import json
import os
import shutil

import pytest
import torch
from model_testutils import TINY, hf_logits, our_logits

from graphserve.models.config_loader import create_model_config
from graphserve.models.loader import get_model
from graphserve.models.registry import get_supported_archs


def _copy(src, dst):
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


def _edit_config(path, edit):
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    edit(config)
    with open(config_path, "w") as f:
        json.dump(config, f)


def _to_transformers4_spelling(config):
    rope = config.pop("rope_parameters")
    assert rope["rope_type"] == "linear"
    config["rope_theta"] = rope["rope_theta"]
    config["rope_scaling"] = {"type": "linear", "factor": rope["factor"]}
    config["torch_dtype"] = "float32"
    config.pop("dtype", None)
    config["transformers_version"] = "4.44.2"


def test_transformers4_config_spelling(tiny_checkpoint, tmp_path, prompt_ids):
    src, hf_model = tiny_checkpoint("llama_linear_rope")
    path = str(_copy(src, tmp_path))
    _edit_config(path, _to_transformers4_spelling)
    text = open(os.path.join(path, "config.json")).read()
    assert '"rope_scaling"' in text and '"rope_parameters"' not in text
    model_config = create_model_config(path)
    assert model_config.dtype == "float32"
    model = get_model(model_config, "cpu")
    # rope_theta 20000 and linear factor 2 must both survive the old spelling to match.
    assert (our_logits(model, prompt_ids) - hf_logits(hf_model, prompt_ids)).abs().max() < 1e-4
    _edit_config(path, lambda c: c.update(torch_dtype="bfloat16"))
    assert create_model_config(path).dtype == "bfloat16"


def test_model_config_fields(tiny_checkpoint):
    path = tiny_checkpoint("qwen3")[0]
    mc = create_model_config(path, max_model_len=64, seed=7, tokenizer="/some/tokenizer")
    assert (mc.model, mc.architecture, mc.load_format, mc.seed) == (path, "Qwen3ForCausalLM", "safetensors", 7)
    assert (mc.vocab_size, mc.hidden_size, mc.num_hidden_layers) == (512, 64, 2)
    assert (mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim) == (4, 2, 32)  # head_dim from config
    assert (mc.max_model_len, mc.tokenizer, mc.gguf_file, mc.sliding_window) == (64, "/some/tokenizer", None, None)
    assert create_model_config(path).tokenizer == path


def test_max_model_len_defaults_and_limits(tiny_checkpoint):
    path = tiny_checkpoint("llama")[0]
    assert create_model_config(path).max_model_len == TINY["max_position_embeddings"]
    with pytest.raises(ValueError, match=r"max_model_len \(129\).*128"):
        create_model_config(path, max_model_len=129)
    with pytest.raises(ValueError, match="max_model_len"):
        create_model_config(path, max_model_len=0)
    # Context-extending RoPE scaling stretches the limit (linear x2; yarn: original 32 x 4; llama3: as stated).
    assert create_model_config(tiny_checkpoint("llama_linear_rope")[0]).max_model_len == 256
    assert create_model_config(tiny_checkpoint("llama_yarn_rope")[0]).max_model_len == 128
    assert create_model_config(tiny_checkpoint("llama_llama3_rope")[0]).max_model_len == 128


def test_eos_ids_merge_generation_config(tiny_checkpoint, tmp_path):
    path = str(_copy(tiny_checkpoint("llama")[0], tmp_path))
    _edit_config(path, lambda c: c.update(eos_token_id=2, bos_token_id=1))
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [7, 2, 9], "bos_token_id": 1}, f)
    mc = create_model_config(path)
    assert mc.eos_token_ids == (2, 7, 9) and mc.bos_token_id == 1
    _edit_config(path, lambda c: c.update(eos_token_id=[3, 4]))
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": 5}, f)
    assert create_model_config(path).eos_token_ids == (3, 4, 5)


def test_unknown_architecture_lists_supported(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_embd=64, n_layer=1, n_head=4, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as info:
        create_model_config(str(tmp_path), load_format="dummy")
    for arch in get_supported_archs():
        assert arch in str(info.value)
    assert "MistralForCausalLM" in get_supported_archs()


def test_pickle_checkpoints_are_refused(tiny_checkpoint, tmp_path):
    shutil.copy(os.path.join(tiny_checkpoint("llama")[0], "config.json"), tmp_path)
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle.*safetensors"):
        create_model_config(str(tmp_path))
    # dummy weights never open the checkpoint, so they remain possible
    assert create_model_config(str(tmp_path), load_format="dummy").load_format == "dummy"


def test_bad_arguments(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("llama")[0]
    with pytest.raises(ValueError, match="load_format"):
        create_model_config(path, load_format="pt")
    with pytest.raises(ValueError, match="dtype"):
        create_model_config(path, dtype="int8")
    with pytest.raises(ValueError, match="does not exist"):
        create_model_config(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="config.json"):
        create_model_config(str(tmp_path))
