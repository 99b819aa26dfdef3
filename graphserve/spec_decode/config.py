"""`--speculative-config` / `LLM(speculative_config=...)`, with vLLM's spellings, validated field by field."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

METHODS = ("ngram", "draft_model")
MAX_SPEC_TOKENS = 32  # the rejection sampler's widest row (vLLM's MAX_SPEC_LEN)


@dataclass(frozen=True)
class SpeculativeConfig:
    """How draft tokens are proposed, and how many per step."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 1  # ngram: shortest suffix n-gram looked up in the context
    prompt_lookup_max: int = 3  # ngram: longest one (longer matches win)
    model: str | None = None  # draft_model: a checkpoint sharing the target's tokenizer
    disable_by_batch_size: int | None = None  # no speculation in steps with at least this many requests
    # draft_model: the draft's resolved ModelConfig (EngineArgs fills it in; not a user field)
    draft_model_config: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def from_user(cls, value: str | dict[str, Any] | None) -> SpeculativeConfig | None:
        """A JSON string or dict as users write it; None stays None. ValueError names the bad field."""
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise ValueError("speculative_config must be a JSON object")
        known = {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "model",
                 "disable_by_batch_size"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown fields {unknown} (known: {sorted(known)})")
        fields = dict(value)
        if "method" not in fields:
            fields["method"] = "draft_model" if fields.get("model") else "ngram"
        if "num_speculative_tokens" not in fields:
            raise ValueError("speculative_config: num_speculative_tokens is required")
        return cls(**fields)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {METHODS}, got {self.method!r}")
        _check_int("num_speculative_tokens", self.num_speculative_tokens, 1, MAX_SPEC_TOKENS)
        _check_int("prompt_lookup_min", self.prompt_lookup_min, 1, None)
        _check_int("prompt_lookup_max", self.prompt_lookup_max, self.prompt_lookup_min, None)
        if self.method == "draft_model" and not self.model:
            raise ValueError("speculative_config.model is required for method 'draft_model'")
        if self.method == "ngram" and self.model:
            raise ValueError("speculative_config.model is only used with method 'draft_model'")
        if self.disable_by_batch_size is not None:
            _check_int("disable_by_batch_size", self.disable_by_batch_size, 1, None)


def _check_int(name: str, value: Any, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"speculative_config.{name} must be an integer {bound}, got {value!r}")
