"""Incremental detokenization and stop-string matching for one generated sequence.

Decoding token by token is not `decode(ids)` piecewise: byte-level BPE splits UTF-8 characters across tokens
and SentencePiece decoders drop the leading space of the first token they see. So each step decodes a small
window of tokens twice (with and without the new ones) and emits the difference, and holds text back while it
ends in U+FFFD (the decoder's mark for an incomplete character).
"""
from __future__ import annotations

from typing import Optional, Sequence

from transformers import PreTrainedTokenizerBase

from graphserve.engine.tokenizer import get_token_info

# Prompt tokens decoded in front of the first output token: enough left context for SentencePiece spaces and for
# a character split between the prompt and the output.
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns the growing list of output token ids into text deltas that never end inside a character.

    With `spaces_between_special_tokens=True` (the default) the text equals `tokenizer.decode(output_ids,
    skip_special_tokens=...)`, the decoder alone deciding the spacing around added tokens. With False, added
    tokens are glued to their neighbours: runs of regular tokens are decoded on their own and concatenated with
    the added tokens' raw text (vLLM's slow-tokenizer semantics; matters for decoders that insert spaces).
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
        self._is_added: list[bool] = []  # parallel to tokens: added tokens are decoded apart when gluing
        self._append(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        # tokens[prefix_offset:read_offset] was already emitted (or is prompt); tokens[read_offset:] is pending.
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.output_text = ""

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
            self._is_added.append(token_id in info.added_tokens)

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
        self.output_text += delta
        return delta

    def _decode(self, start: int, end: int) -> str:
        tokens = self.tokens[start:end]
        if self.spaces_between_special_tokens or not any(self._is_added[start:end]):
            return self.tokenizer.convert_tokens_to_string(tokens) if tokens else ""
        parts: list[str] = []
        run: list[str] = []
        for token, is_added in zip(tokens, self._is_added[start:end]):
            if not is_added:
                run.append(token)
                continue
            if run:
                parts.append(self.tokenizer.convert_tokens_to_string(run))
                run = []
            parts.append(token)
        if run:
            parts.append(self.tokenizer.convert_tokens_to_string(run))
        return "".join(parts)


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

    def check(self, text: str, num_new_chars: int) -> Optional[tuple[str, int]]:
        """Return (stop string, length to truncate `text` to) for the earliest match, or None.

        The match must end within the last `num_new_chars` characters. Ties (same start) go to the stop string
        listed first. The truncated text excludes the stop string unless include_stop_str_in_output.
        """
        if num_new_chars <= 0:
            return None
        best: Optional[tuple[str, int]] = None
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
