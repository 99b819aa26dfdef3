"""From what the user sent to engine Requests: chat template, tokenization, validation, n/best_of fan-out."""
from __future__ import annotations

import time
from typing import Any

import jinja2
from transformers import PreTrainedTokenizerBase

from graphserve.config import LoRAConfig, ModelConfig
from graphserve.core.request import Request
from graphserve.engine.tokenizer import load_chat_template
from graphserve.lora.peft import AdapterRegistry
from graphserve.lora.request import LoRARequest
from graphserve.sampling_params import SamplingParams

# A prompt is text, token ids, or a dict with "prompt" and/or "prompt_token_ids" (vLLM's TextPrompt/TokensPrompt).
PromptType = str | list[int] | dict[str, Any]

CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")
_PROMPT_KEYS = ("prompt", "prompt_token_ids")
_PROMPT_DICT_KEYS = _PROMPT_KEYS + ("cache_salt",)  # cache_salt: prefix-cache isolation (vLLM's spelling)


class InputProcessor:
    """Turns prompts and chat messages into validated child Requests for the scheduler."""

    def __init__(self, model_config: ModelConfig, tokenizer: PreTrainedTokenizerBase,
                 lora_config: LoRAConfig | None = None) -> None:
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.adapters = AdapterRegistry(model_config, lora_config)
        self.max_model_len = model_config.max_model_len
        self.vocab_size = model_config.vocab_size

    # -- chat -----------------------------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render OpenAI-style messages to prompt text with the tokenizer's (or the given) chat template.

        The text already holds the template's special tokens: tokenize it with add_special_tokens=False.
        """
        conversation = validate_messages(messages)
        template = load_chat_template(chat_template) if chat_template is not None else self.tokenizer.chat_template
        if template is None:
            raise ValueError(
                "The tokenizer has no chat template; pass chat_template= (a Jinja string or a file path)"
            )
        try:
            text = self.tokenizer.apply_chat_template(
                conversation,
                chat_template=template,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                **kwargs,
            )
        except jinja2.TemplateError as e:  # e.g. raise_exception("roles must alternate"): a user error
            raise ValueError(f"chat template failed to render the messages: {e}") from e
        return text

    # -- prompts --------------------------------------------------------------------------------------------------
    @staticmethod
    def get_prompt_text(prompt: PromptType) -> str | None:
        """The prompt's text when the user gave text (RequestOutput.prompt), else None."""
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
            return prompt["prompt"]
        return None

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, with the tokenizer's BOS/EOS policy unless add_special_tokens is False."""
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)

    def process_inputs(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        arrival_time: float | None = None,
        add_special_tokens: bool = True,
        lora_request: LoRARequest | None = None,
    ) -> list[Request]:
        """Tokenize and validate one prompt and fan it out into best_of child Requests.

        Children: with n == best_of == 1 the only child's id is `request_id`, otherwise `f"{i}_{request_id}"`.
        Each child samples one sequence (n = best_of = 1); a seeded request gives child i the seed `seed + i`
        so the children draw different samples yet the whole request stays reproducible.
        Set add_special_tokens=False for chat-templated text, which already contains BOS.
        """
        prompt_token_ids = self._prompt_token_ids(prompt, add_special_tokens)
        cache_salt = get_cache_salt(prompt)
        max_tokens = self._validate_lengths(len(prompt_token_ids), params.max_tokens)
        self._validate_params(params)
        self.adapters.check(lora_request)
        parent_params = params.clone()
        parent_params.update_from_generation_config(self.model_config.eos_token_ids)
        if arrival_time is None:
            arrival_time = time.monotonic()  # one clock reading shared by all children
        num_children = parent_params.best_of
        children = []
        for i in range(num_children):
            child_id = request_id if num_children == 1 else f"{i}_{request_id}"
            child_params = parent_params.clone()
            child_params.n = 1
            child_params.best_of = 1
            child_params.compute_cumulative_logprob = num_children > parent_params.n
            if parent_params.seed is not None:
                child_params.seed = parent_params.seed + i
            request = Request(
                child_id, prompt_token_ids, child_params, self.model_config.eos_token_ids, arrival_time,
                cache_salt=cache_salt, lora_request=lora_request,
            )
            request.max_tokens = max_tokens
            children.append(request)
        return children

    def _prompt_token_ids(self, prompt: PromptType, add_special_tokens: bool) -> list[int]:
        if isinstance(prompt, dict):
            unknown = set(prompt) - set(_PROMPT_DICT_KEYS)
            if unknown or not set(prompt) & set(_PROMPT_KEYS):
                raise ValueError(
                    "a prompt dict needs 'prompt' or 'prompt_token_ids' (and optionally 'cache_salt', nothing "
                    f"else), got keys {sorted(prompt)}"
                )
            # Token ids win when both are given: the text is then only what RequestOutput.prompt reports.
            prompt = prompt["prompt_token_ids"] if "prompt_token_ids" in prompt else prompt["prompt"]
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            token_ids = self.tokenize(prompt, add_special_tokens)
        elif isinstance(prompt, (list, tuple)):
            token_ids = list(prompt)
            for i, token_id in enumerate(token_ids):
                if not isinstance(token_id, int) or isinstance(token_id, bool):
                    raise ValueError(f"prompt_token_ids[{i}] must be an int, got {type(token_id).__name__}")
        else:
            raise ValueError(f"prompt must be a str, a list of token ids or a dict, got {type(prompt).__name__}")
        if not token_ids:
            raise ValueError("prompt must not be empty (it has no tokens)")
        bad = next((t for t in token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"Token id {bad} is out of vocabulary (vocab_size={self.vocab_size})")
        return token_ids

    def _validate_lengths(self, num_prompt_tokens: int, max_tokens: int | None) -> int:
        """Check the prompt and completion fit the context; return max_tokens with None resolved."""
        max_model_len = self.max_model_len
        if max_tokens is None:
            if num_prompt_tokens >= max_model_len:
                raise ValueError(
                    f"This model's maximum context length is {max_model_len} tokens. However, your request has "
                    f"{num_prompt_tokens} input tokens. Please reduce the length of the input messages."
                )
            return max_model_len - num_prompt_tokens
        if num_prompt_tokens >= max_model_len or num_prompt_tokens + max_tokens > max_model_len:
            raise ValueError(
                f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the messages, {max_tokens} in "
                "the completion). Please reduce the length of the messages or completion."
            )
        return max_tokens

    def _validate_params(self, params: SamplingParams) -> None:
        # Token ids the sampler indexes with must exist in the model's vocabulary.
        for name, token_ids in (("logit_bias", params.logit_bias or {}), ("stop_token_ids", params.stop_token_ids)):
            bad = next((t for t in token_ids if t >= self.vocab_size), None)
            if bad is not None:
                raise ValueError(f"{name} has token id {bad}, out of vocabulary (vocab_size={self.vocab_size})")


def get_cache_salt(prompt: PromptType) -> str | None:
    """The prompt dict's `cache_salt` (None when absent): requests with different salts never share KV blocks."""
    if not isinstance(prompt, dict) or prompt.get("cache_salt") is None:
        return None
    salt = prompt["cache_salt"]
    if not isinstance(salt, str) or not salt:
        raise ValueError(f"cache_salt must be a non-empty string, got {salt!r}")
    return salt


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check OpenAI-style chat messages and return copies whose text content is a plain string."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of message dicts")
    conversation = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role must be one of {list(CHAT_ROLES)}, got {role!r}")
        conversation.append({**message, "content": _message_content(i, message)})
    return conversation


def _message_content(i: int, message: dict[str, Any]) -> str | None:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if content is None and message.get("role") == "assistant" and message.get("tool_calls"):
        return None  # an assistant turn that only calls tools
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"messages[{i}].content[{j}] must be a {{'type': 'text', 'text': str}} part")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ValueError(f"messages[{i}].content must be a string or a list of text parts, got {type(content).__name__}")
