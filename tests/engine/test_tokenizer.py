"""get_tokenizer: chat template sources (jinja file, tokenizer_config.json, GGUF metadata, override), token info."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from graphserve.engine.tokenizer import get_token_info, get_tokenizer, load_chat_template

MESSAGES = [{"role": "user", "content": "hi"}]


def test_chat_template_from_jinja_file(tokenizer_dir, chat_template):
    assert os.path.isfile(os.path.join(tokenizer_dir, "chat_template.jinja"))
    tokenizer = get_tokenizer(tokenizer_dir)
    assert tokenizer.chat_template == chat_template
    assert tokenizer.apply_chat_template(MESSAGES, tokenize=False) == "<s><|im_start|>user\nhi<|im_end|>\n"


def test_chat_template_from_tokenizer_config(tmp_path, make_tokenizer):
    make_tokenizer().save_pretrained(tmp_path)  # no template: no chat_template.jinja
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = [{"name": "default", "template": "{{ messages[0].content }}?"}]
    config_path.write_text(json.dumps(config))
    assert get_tokenizer(str(tmp_path)).apply_chat_template(MESSAGES, tokenize=False) == "hi?"


def test_explicit_chat_template_overrides_the_checkpoint(tokenizer_dir, tmp_path):
    assert get_tokenizer(tokenizer_dir, chat_template="{{ 'x' }}").chat_template == "{{ 'x' }}"
    path = tmp_path / "template.jinja"
    path.write_text("{{ 'from file' }}")
    assert get_tokenizer(tokenizer_dir, chat_template=str(path)).chat_template == "{{ 'from file' }}"
    with pytest.raises(ValueError, match="neither an existing file"):
        load_chat_template("missing.jinja")


def test_missing_paths_are_value_errors(tmp_path, tokenizer_dir):
    with pytest.raises(ValueError, match="does not exist"):
        get_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="not found"):
        get_tokenizer(tokenizer_dir, gguf_file="nope.gguf")


def test_token_info_follows_the_rust_special_flags(tokenizer):
    info = get_token_info(tokenizer)
    assert info is get_token_info(tokenizer)  # computed once
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tool = tokenizer.convert_tokens_to_ids("<tool>")
    # "<|endoftext|>" is not in the Python special-token map, yet decode(skip_special_tokens=True) drops it.
    assert endoftext not in tokenizer.all_special_ids and endoftext in info.special_ids
    assert tokenizer.decode([endoftext], skip_special_tokens=True) == ""
    assert tool not in info.special_ids and info.added_tokens[tool] == "<tool>"
    assert info.vocab_len == len(tokenizer)


def _write_gguf(path, tokenizer, chat_template):
    """A GGUF holding only tokenizer metadata (GPT-2 style vocabulary) and one dummy tensor."""
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = backend["model"]["vocab"]
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    special = {t["id"] for t in backend["added_tokens"] if t["special"]}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # 3 = control token
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(3)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_tokenizer_and_chat_template(tmp_path, capfd, make_tokenizer, chat_template):
    source = make_tokenizer()
    _write_gguf(tmp_path / "tiny.gguf", source, chat_template)
    capfd.readouterr()
    tokenizer = get_tokenizer(str(tmp_path), gguf_file="tiny.gguf")
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""  # loading GGUF prints nothing
    text = "héllo 中文 😀 world"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert ids == source(text, add_special_tokens=False).input_ids and tokenizer.decode(ids) == text
    assert tokenizer.chat_template == chat_template  # from the GGUF metadata
    assert tokenizer.eos_token == "<|im_end|>"


@pytest.mark.parametrize("layout", ["none", "jinja", "tokenizer_config"])
def test_gguf_without_template_uses_files_next_to_it(tmp_path, make_tokenizer, layout):
    _write_gguf(tmp_path / "bare.gguf", make_tokenizer(), None)
    if layout == "jinja":
        (tmp_path / "chat_template.jinja").write_text("{{ 'next to it' }}")
    elif layout == "tokenizer_config":
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ 'next to it' }}"}))
    template = get_tokenizer(str(tmp_path), gguf_file="bare.gguf").chat_template
    assert template == (None if layout == "none" else "{{ 'next to it' }}")
