"""IncrementalDetokenizer equals a full decode, never streams half a character; StopChecker finds stop strings."""
from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from graphserve.engine.detokenizer import IncrementalDetokenizer, StopChecker

TEXTS = [
    "Hello world, the quick brown fox.",
    "héllo wörld, crème brûlée",
    "中文字符测试 文字",
    "emoji 😀🎉 mixed 中文 and é",
]


def stream(detok: IncrementalDetokenizer, token_ids: list[int], chunk_sizes=None) -> list[str]:
    """Feed token ids (one by one, or in the given chunk sizes) and return every delta, flush last."""
    deltas, i = [], 0
    while i < len(token_ids):
        size = 1 if chunk_sizes is None else chunk_sizes[len(deltas) % len(chunk_sizes)]
        deltas.append(detok.update(token_ids[i:i + size]))
        i += size
    deltas.append(detok.flush())
    return deltas


def byte_token_ids(tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte: the worst case, every multi-byte character split."""
    byte_to_char = bytes_to_unicode()
    return tokenizer.convert_tokens_to_ids([byte_to_char[b] for b in text.encode("utf-8")])


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_equals_full_decode_and_never_emits_partial_chars(tokenizer, text):
    prompt_ids = tokenizer("prompt: ").input_ids
    for output_ids in (tokenizer(text, add_special_tokens=False).input_ids, byte_token_ids(tokenizer, text)):
        detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        deltas = stream(detok, output_ids)
        assert "".join(deltas) == tokenizer.decode(output_ids) == text
        assert not any("\ufffd" in d for d in deltas)
        assert deltas[-1] == ""  # valid text: nothing was left for flush()


def test_emoji_split_into_four_bytes_is_held_until_complete(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [0])
    ids = byte_token_ids(tokenizer, "a😀")
    assert [detok.update([i]) for i in ids] == ["a", "", "", "", "😀"]


def _reference_text(tokenizer, ids: list[int], skip: bool, spaces: bool) -> str:
    """HF slow-tokenizer decoding: special tokens raw, other runs decoded together, pieces joined."""
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    pieces, run = [], []
    for token_id in ids:
        if token_id not in special:
            run.append(token_id)
        elif not skip:
            pieces += ([tokenizer.decode(run)] if run else []) + [tokenizer.convert_ids_to_tokens(token_id)]
            run = []
    pieces += [tokenizer.decode(run)] if run else []
    return (" " if spaces else "").join(pieces)


@pytest.mark.parametrize("skip, spaces", [(True, True), (False, False), (False, True)])
def test_random_token_sequences_equal_full_decode(tokenizer, skip, spaces):
    rng = random.Random(0)
    vocab = len(tokenizer)
    for _ in range(100):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 25))]
        chunks = [rng.randrange(1, 4) for _ in range(3)]  # several tokens per step, like speculative decoding
        # The prompt's tail holds a special token (0 = "<s>"): it must not be separated from the output.
        detok = IncrementalDetokenizer(tokenizer, [0, 5, 0], skip_special_tokens=skip,
                                       spaces_between_special_tokens=spaces)
        deltas = stream(detok, ids, chunks)
        text = "".join(deltas)
        assert text == _reference_text(tokenizer, ids, skip, spaces), ids
        if not (skip is False and spaces is True):
            assert text == tokenizer.decode(ids, skip_special_tokens=skip)  # byte-level: glued == decode()
        # Only flush() may end with an incomplete character.
        assert not any(d.endswith("\ufffd") for d in deltas[:-1])


def test_skip_special_tokens_and_added_tokens(tokenizer):
    eos, tool = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<tool>")
    ids = tokenizer("Hi", add_special_tokens=False).input_ids + [eos, tool] + tokenizer(
        " there", add_special_tokens=False).input_ids

    def text(**kw):
        return "".join(stream(IncrementalDetokenizer(tokenizer, [0], **kw), ids))

    # "<tool>" is an added but not special token: ordinary text, never skipped, never spaced.
    assert text(skip_special_tokens=True) == "Hi<tool> there" == tokenizer.decode(ids, skip_special_tokens=True)
    assert text(skip_special_tokens=False) == "Hi <|im_end|> <tool> there"
    glued = text(skip_special_tokens=False, spaces_between_special_tokens=False)
    assert glued == "Hi<|im_end|><tool> there" == tokenizer.decode(ids)


def test_special_tokens_right_after_the_prompt(tokenizer):
    prompt = tokenizer("The prompt").input_ids
    ids = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|im_start|>"])
    spaced = stream(IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=False), ids)
    assert spaced == ["<|im_start|>", " <|im_end|>", " <|im_start|>", ""]
    glued = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=False, spaces_between_special_tokens=False)
    assert "".join(stream(glued, ids)) == "<|im_start|><|im_end|><|im_start|>"
    assert "".join(stream(IncrementalDetokenizer(tokenizer, prompt), ids)) == ""


def test_ids_past_the_tokenizer_vocab_decode_to_nothing(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [0])
    hello = tokenizer("Hello", add_special_tokens=False).input_ids
    assert "".join(stream(detok, hello + [len(tokenizer) + 7])) == "Hello"


def _word_tokenizer(decoder) -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "<|im_end|>": 1, "hello": 2, "world": 3, "\u2581The": 4, "\u2581Hello": 5, "\u2581world": 6}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoder
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", unk_token="[UNK]")


def test_spaces_between_special_tokens():
    tok = _word_tokenizer(decoders.WordPiece())  # joins tokens with spaces, like BERT
    prompt, ids = [2], [3, 1, 1, 3]  # "hello" | "world <|im_end|> <|im_end|> world"
    spaced = stream(IncrementalDetokenizer(tok, prompt, False, spaces_between_special_tokens=True), ids)
    glued = stream(IncrementalDetokenizer(tok, prompt, False, spaces_between_special_tokens=False), ids)
    # The output continues the prompt, so its text starts with the decoder's separator.
    assert "".join(spaced) == tok.decode(prompt + ids)[len("hello"):] == " world <|im_end|> <|im_end|> world"
    assert "".join(glued) == " world<|im_end|><|im_end|>world"


def test_prompt_context_keeps_sentencepiece_leading_space():
    tok = _word_tokenizer(decoders.Metaspace())
    # Decoded alone, "▁Hello" loses its space (start of text); after the prompt it is a continuation.
    assert tok.decode([5, 6]) == "Hello world"
    assert "".join(stream(IncrementalDetokenizer(tok, [4]), [5, 6])) == " Hello world"


# -- stop strings ---------------------------------------------------------------------------------------------------
def test_stop_string_spanning_the_previous_text():
    checker = StopChecker(["cd"])
    assert checker.check("abc", 3) is None
    assert checker.check("abcde", 2) == ("cd", 2)  # "c" arrived earlier, "d" now
    assert StopChecker(["cd"], include_stop_str_in_output=True).check("abcde", 2) == ("cd", 4)


def test_earliest_stop_string_wins_and_old_text_is_not_rechecked():
    checker = StopChecker(["world", "lo", "o w"])
    assert checker.check("hello world", 11) == ("lo", 3)
    assert checker.check("hello world", 2) == ("world", 6)  # "lo" and "o w" ended before the new chars
    assert StopChecker(["ab"]).check("abx", 1) is None
    assert StopChecker(["xy", "x"]).check("..xy", 2) == ("xy", 2)  # same start: the first listed wins


def test_hold_back_covers_a_partial_stop_string():
    checker = StopChecker(["world", "ab"])
    assert checker.hold_back == 4
    assert checker.streamable_length("hello wor", finished=False) == 5
    assert checker.streamable_length("hello wor", finished=True) == 9
    assert checker.streamable_length("he", finished=False) == 0
    assert StopChecker(["world"], include_stop_str_in_output=True).streamable_length("hello wor", False) == 9
    assert StopChecker([]).streamable_length("hello", False) == 5
