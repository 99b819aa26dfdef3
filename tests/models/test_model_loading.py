"""Weight sources: sharded safetensors, dummy weights, dtypes, and loud failures on bad checkpoints."""
import json
import os
import shutil

import pytest
import torch
from model_testutils import hf_logits, our_logits
from safetensors.torch import load_file, save_file

from graphserve.models.config_loader import create_model_config
from graphserve.models.loader import get_model


def _state(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_sharded_safetensors_load_identically(tiny_checkpoint, tmp_path):
    path, hf_model = tiny_checkpoint("qwen2")
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 2
    single = _state(get_model(create_model_config(path), "cpu"))
    sharded = _state(get_model(create_model_config(str(tmp_path)), "cpu"))
    assert single.keys() == sharded.keys()
    for name in single:
        assert torch.equal(single[name], sharded[name]), name


def test_dummy_weights_need_only_config_and_are_seeded(tiny_checkpoint, tmp_path, prompt_ids):
    shutil.copy(os.path.join(tiny_checkpoint("llama")[0], "config.json"), tmp_path / "config.json")
    assert os.listdir(tmp_path) == ["config.json"]
    first = get_model(create_model_config(str(tmp_path), load_format="dummy", seed=3), "cpu")
    again = get_model(create_model_config(str(tmp_path), load_format="dummy", seed=3), "cpu")
    other = get_model(create_model_config(str(tmp_path), load_format="dummy", seed=4), "cpu")
    for (name, p), q, r in zip(first.named_parameters(), again.parameters(), other.parameters()):
        assert p.abs().max() <= 1e-3, name
        assert torch.equal(p, q) and not torch.equal(p, r), name
    assert torch.isfinite(our_logits(first, prompt_ids)).all()
    with pytest.raises(ValueError, match="safetensors"):
        create_model_config(str(tmp_path))  # the real load format needs weights


def test_bfloat16_loading(tiny_checkpoint, prompt_ids):
    path, hf_model = tiny_checkpoint("llama")
    before = torch.get_default_dtype()
    model = get_model(create_model_config(path, dtype="bf16"), "cpu")
    assert torch.get_default_dtype() == before  # the build-time default dtype is restored
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    logits = our_logits(model, prompt_ids)
    expected = hf_logits(hf_model, prompt_ids)
    assert logits.dtype == torch.float32
    assert (logits - expected).abs().max() < 0.1  # bf16 rounding only, on logits of magnitude ~3
    assert (logits - expected).abs().max() > 1e-5  # and it really ran in bf16


def test_dtype_auto_follows_checkpoint(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("llama")[0]
    shutil.copytree(src, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps(config))
    model_config = create_model_config(str(tmp_path))
    assert model_config.dtype == "bfloat16"
    assert create_model_config(str(tmp_path), dtype="float32").dtype == "float32"
    assert next(get_model(model_config, "cpu").parameters()).dtype == torch.bfloat16


def _rewrite_weights(src, dst, edit):
    shutil.copytree(src, dst, dirs_exist_ok=True)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    path = _rewrite_weights(tiny_checkpoint("llama")[0], tmp_path,
                            lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.qkv_proj\.weight"):
        get_model(create_model_config(path), "cpu")


def test_unexpected_or_misshapen_tensor_is_an_error(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("llama")[0]
    path = _rewrite_weights(src, tmp_path / "extra", lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="model.extra.weight"):
        get_model(create_model_config(path), "cpu")
    path = _rewrite_weights(src, tmp_path / "shape",
                            lambda t: t.update({"model.norm.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match="model.norm.weight"):
        get_model(create_model_config(path), "cpu")


def test_old_rotary_buffers_and_tied_head_copies_are_skipped(tiny_checkpoint, tmp_path, prompt_ids):
    src, hf_model = tiny_checkpoint("llama_tied_bias")

    def add_legacy(tensors):
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        tensors["lm_head.weight"] = torch.zeros_like(tensors["model.embed_tokens.weight"])

    model = get_model(create_model_config(_rewrite_weights(src, tmp_path, add_legacy)), "cpu")
    assert (our_logits(model, prompt_ids) - hf_logits(hf_model, prompt_ids)).abs().max() < 1e-4
