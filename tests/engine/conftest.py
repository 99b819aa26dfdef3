"""A tiny byte-level BPE tokenizer (GPT-2 style), trained in the test session: no hub, about a second."""
from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# Few merges on purpose: accented, CJK and emoji characters stay split across byte tokens.
CORPUS = [
    "Hello world, the quick brown fox jumps over the lazy dog.",
    "héllo wörld, café crème brûlée",
    "中文字符测试 中文 文字",
    "emoji 😀 🎉 fun 😀 party 🎉",
    "stop here. STOP! the end.",
] * 8
SPECIAL_TOKENS = ["<s>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2-like tokenizer: byte-level BPE, BOS "<s>" added to plain prompts, EOS "<|im_end|>"."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>")
    tokenizer.add_tokens(["<tool>"])  # an added token that is not special: never skipped
    return tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    """The tiny tokenizer saved with a chat template (transformers 5 writes chat_template.jinja)."""
    tokenizer = build_byte_level_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("byte_bpe")
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    """The saved tokenizer loaded back through graphserve's loader."""
    from graphserve.engine.tokenizer import get_tokenizer

    return get_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def make_tokenizer():
    """The builder itself, for tests that save or convert a fresh tokenizer."""
    return build_byte_level_tokenizer


@pytest.fixture(scope="session")
def chat_template() -> str:
    """The chat template saved with `tokenizer_dir`."""
    return CHAT_TEMPLATE
