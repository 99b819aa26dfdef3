"""Incremental detokenization and stop-string matching for one generated sequence.

Decoding token by token is not `decode(ids)` piecewise: byte-level BPE splits UTF-8 characters across tokens
and SentencePiece decoders drop the leading space of the first token they see. So each step decodes a small
window of tokens twice (with and without the new ones) and emits the difference, and holds text back while it
ends in U+FFFD (the decoder's mark for an incomplete character). The window starts with the prompt's last tokens,
so the first output token is decoded with its real left context.
"""
from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from graphserve.engine.tokenizer import get_token_info

# Prompt tokens decoded in front of the first output token: enough left context for SentencePiece spaces and for
# a character split between the prompt and the output.
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns the growing list of output token ids into text deltas that never end inside a character.

    Text without visible special tokens equals `tokenizer.decode(output_ids)`. Special tokens are only visible
    with skip_special_tokens=False; then, as in HF's slow tokenizers and vLLM, the output is split into special
    tokens (shown raw) and runs of other tokens (decoded together), joined by one space when
    spaces_between_special_tokens is True and by nothing when False. The first output piece is never separated
    from the prompt. Non-special added tokens (e.g. "<tool_call>") are ordinary text here, as in decode().
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self._info = get_token_info(tokenizer)
        self.tokens: list[str] = []  # token strings: the prompt's tail, then every output token kept
        self._is_special: list[bool] = []  # parallel to tokens: shown raw, apart from the text around them
        self._append(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._num_prompt_tokens = len(self.tokens)  # tokens[this:] are output tokens
        # tokens[prefix_offset:read_offset] was already emitted (or is prompt); tokens[read_offset:] is pending.
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)

    def update(self, new_token_ids: Sequence[int]) -> str:
        """Add output tokens; return the newly completed text (possibly empty)."""
        self._append(new_token_ids)
        return self._advance(allow_partial=False)

    def flush(self) -> str:
        """Emit whatever is still held back (a trailing incomplete character becomes U+FFFD, as decode() does)."""
        return self._advance(allow_partial=True)

    def _append(self, token_ids: Sequence[int]) -> None:
        info = self._info
        for token_id in token_ids:
            if self.skip_special_tokens and token_id in info.special_ids:
                continue
            # Ids past the tokenizer's vocabulary (padded embedding rows) decode to nothing, as in decode().
            token = self.tokenizer.convert_ids_to_tokens(token_id) if 0 <= token_id < info.vocab_len else None
            if token is None:
                continue
            self.tokens.append(token)
            self._is_special.append(token_id in info.special_ids)

    def _advance(self, allow_partial: bool) -> str:
        if self.read_offset == len(self.tokens):
            return ""
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        new_text = self._decode(self.prefix_offset, len(self.tokens))
        if len(new_text) <= len(prefix_text) or (not allow_partial and new_text.endswith(_REPLACEMENT_CHAR)):
            return ""
        delta = new_text[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.tokens)
        return delta

    def _decode(self, start: int, end: int) -> str:
        convert = self.tokenizer.convert_tokens_to_string
        if not any(self._is_special[start:end]):
            return convert(self.tokens[start:end]) if end > start else ""
        pieces: list[tuple[int, str]] = []  # (index of the piece's first token, its text)
        run_start = start
        for i in range(start, end):
            if not self._is_special[i]:
                continue
            if run_start < i:
                pieces.append((run_start, convert(self.tokens[run_start:i])))
            pieces.append((i, self.tokens[i]))
            run_start = i + 1
        if run_start < end:
            pieces.append((run_start, convert(self.tokens[run_start:end])))
        separator = " " if self.spaces_between_special_tokens else ""
        text = pieces[0][1]
        for first, piece in pieces[1:]:
            # Pieces of output are separated; the first output piece is not separated from the prompt.
            text += (separator if first > self._num_prompt_tokens else "") + piece
        return text


class StopChecker:
    """Finds the earliest stop string in generated text and says how much text may be streamed safely.

    Stop strings may span tokens; only occurrences that end in the newest characters are searched for, since
    older text was checked when it arrived.
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self.stop = list(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        # A prefix of a stop string at the end of the text may still become a stop string: never stream it.
        # When the stop string is kept in the output there is nothing to hide.
        if self.stop and not include_stop_str_in_output:
            self.hold_back = max(len(s) for s in self.stop) - 1
        else:
            self.hold_back = 0

    def check(self, text: str, num_new_chars: int) -> tuple[str, int] | None:
        """Return (stop string, length to truncate `text` to) for the earliest match, or None.

        The match must end within the last `num_new_chars` characters. Ties (same start) go to the stop string
        listed first. The truncated text excludes the stop string unless include_stop_str_in_output.
        """
        if num_new_chars <= 0:
            return None
        best: tuple[str, int] | None = None
        for stop_str in self.stop:
            start = max(0, len(text) - num_new_chars - len(stop_str) + 1)
            index = text.find(stop_str, start)
            if index != -1 and (best is None or index < best[1]):
                best = (stop_str, index)
        if best is None:
            return None
        stop_str, index = best
        end = index + len(stop_str) if self.include_stop_str_in_output else index
        return stop_str, end

    def streamable_length(self, text: str, finished: bool) -> int:
        """How many leading characters of `text` can be shown to the user now."""
        if finished:
            return len(text)
        return max(0, len(text) - self.hold_back)
