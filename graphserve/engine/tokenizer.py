"""Loading the HF tokenizer (directory or GGUF) with its chat template, and the token facts the detokenizer needs."""
from __future__ import annotations

import contextlib
import json
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

_CHAT_TEMPLATE_FILE = "chat_template.jinja"


def get_tokenizer(
    tokenizer_dir: str,
    gguf_file: str | None = None,
    chat_template: str | None = None,
) -> PreTrainedTokenizerBase:
    """Load the tokenizer of `tokenizer_dir` (or of `gguf_file` inside it) and resolve its chat template.

    `chat_template` (a Jinja string or a path to a file holding one) overrides the checkpoint's own template.
    """
    if not os.path.isdir(tokenizer_dir):
        raise ValueError(f"tokenizer directory {tokenizer_dir!r} does not exist")
    kwargs: dict[str, Any] = {}
    if gguf_file is not None:
        if not os.path.isfile(os.path.join(tokenizer_dir, gguf_file)):
            raise ValueError(f"GGUF file {gguf_file!r} not found in {tokenizer_dir!r}")
        kwargs["gguf_file"] = gguf_file
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, **kwargs)
    if chat_template is not None:
        tokenizer.chat_template = load_chat_template(chat_template)
    elif tokenizer.chat_template is None:
        # transformers 5 reads chat_template.jinja and tokenizer_config.json of a directory, and the GGUF metadata
        # of a GGUF, but ignores the files next to a GGUF: a template placed there must still count.
        tokenizer.chat_template = _find_chat_template_file(tokenizer_dir)
    get_token_info(tokenizer)  # warm the cache: the first request should not pay for it
    return tokenizer


def load_chat_template(chat_template: str) -> str:
    """Return the template itself, reading it from disk when `chat_template` names a file."""
    if os.path.isfile(chat_template):
        with open(chat_template, encoding="utf-8") as f:
            return f.read()
    if "{{" in chat_template or "{%" in chat_template:
        return chat_template
    raise ValueError(f"chat_template {chat_template!r} is neither an existing file nor a Jinja template")


def _find_chat_template_file(tokenizer_dir: str) -> str | None:
    path = os.path.join(tokenizer_dir, _CHAT_TEMPLATE_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    config_path = os.path.join(tokenizer_dir, "tokenizer_config.json")
    if not os.path.isfile(config_path):
        return None
    with open(config_path, encoding="utf-8") as f:
        template = json.load(f).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = {t["name"]: t["template"] for t in template}.get("default")
    return template if isinstance(template, str) else None


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' logging and progress bars (GGUF loading is chatty) and restore them afterwards."""
    verbosity = hf_logging.get_verbosity()
    progress_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress_enabled:
            hf_logging.enable_progress_bar()


@dataclass(frozen=True)
class TokenInfo:
    """Token facts the detokenizer reads for every generated token, computed once per tokenizer.

    transformers recomputes `all_special_ids` and the added-token tables on every access, which is too slow for a
    per-token loop.
    """

    special_ids: frozenset[int]  # ids that decode(skip_special_tokens=True) drops
    added_tokens: dict[int, str]  # id -> text of every added token (special or not)
    vocab_len: int  # len(tokenizer): ids at or above it decode to nothing


_TOKEN_INFO: weakref.WeakKeyDictionary[Any, TokenInfo] = weakref.WeakKeyDictionary()


def get_token_info(tokenizer: PreTrainedTokenizerBase) -> TokenInfo:
    """The cached TokenInfo of `tokenizer`."""
    info = _TOKEN_INFO.get(tokenizer)
    if info is None:
        info = _compute_token_info(tokenizer)
        _TOKEN_INFO[tokenizer] = info
    return info


def _compute_token_info(tokenizer: PreTrainedTokenizerBase) -> TokenInfo:
    added = {int(i): str(getattr(t, "content", t)) for i, t in tokenizer.added_tokens_decoder.items()}
    if getattr(tokenizer, "is_fast", False):
        # The Rust decoder skips the tokens flagged special in its added vocabulary, which can be more than the
        # Python-side special-token map lists (e.g. "<|endoftext|>" in a chat tokenizer).
        special = {int(i) for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False)}
    else:
        special = set(tokenizer.all_special_ids)
    return TokenInfo(special_ids=frozenset(special), added_tokens=added, vocab_len=len(tokenizer))
