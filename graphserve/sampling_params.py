"""Per-request sampling settings, with vLLM's field names, defaults and validation.

Every invalid value raises ValueError whose message starts with the offending field's name, so the OpenAI server
can return it verbatim as an HTTP 400. This module imports no torch: the engine core reads it.
"""
from __future__ import annotations

import copy
import enum
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any

# Below this temperature sampling is greedy (argmax); vLLM uses the same threshold.
_SAMPLING_EPS = 1e-5
_MAX_ABS_LOGIT_BIAS = 100.0  # OpenAI's documented range for logit_bias values

# f(output_token_ids, logits_row) or f(prompt_token_ids, output_token_ids, logits_row) -> logits_row
LogitsProcessor = Callable[..., Any]


class SamplingType(enum.IntEnum):
    """How the next token of a request is chosen."""

    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


class RequestOutputKind(enum.IntEnum):
    """What each streamed RequestOutput carries: everything so far, only the new part, or only the final one."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but `n=True` is a client bug, not a count.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    if not _is_int(value):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value}.")
    return value


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}.")
    return value


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {type(value).__name__} {value!r}.")
    return value


@dataclass
class SamplingParams:
    """Sampling settings of one request (vLLM semantics; see docs/reference-vllm.md §1.3)."""

    MAX_LOGPROBS = 20  # class constant (not a field): the most top logprobs a request may ask for

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: None | str | list[str] = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logits_processors: list[LogitsProcessor] | None = None
    logit_bias: dict[int, float] | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Stop ids masked while fewer than min_tokens were generated: stop_token_ids plus EOS (unless ignore_eos).
    all_stop_token_ids: set[int] = field(default_factory=set, init=False, repr=False)
    # Set by the engine on best_of children, which are ranked by it: the sampler then returns the logprob of
    # every sampled token even without `logprobs` (otherwise cumulative_logprob is None, as in vLLM V1).
    compute_cumulative_logprob: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        best_of_given = self.best_of is not None
        self._verify_counts()
        self._verify_penalties()
        self._verify_truncation()
        self._verify_lengths()
        self._verify_stops()
        self._verify_outputs()
        self._verify_processors()
        if self.temperature < _SAMPLING_EPS:
            self._verify_greedy(best_of_given)
        self.all_stop_token_ids = set(self.stop_token_ids)

    # -- validation -------------------------------------------------------------------------------------------
    def _verify_counts(self) -> None:
        self.n = _check_int("n", self.n, minimum=1)
        if self.best_of is None:
            self.best_of = self.n
        self.best_of = _check_int("best_of", self.best_of, minimum=1)
        if self.best_of < self.n:
            raise ValueError(f"best_of must be greater than or equal to n, got n={self.n} and best_of={self.best_of}.")
        if self.seed is not None:
            self.seed = _check_int("seed", self.seed)

    def _verify_penalties(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = _check_float(name, getattr(self, name))
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}.")
            setattr(self, name, value)
        self.repetition_penalty = _check_float("repetition_penalty", self.repetition_penalty)
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}.")

    def _verify_truncation(self) -> None:
        self.temperature = _check_float("temperature", self.temperature)
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        self.top_p = _check_float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        self.top_k = _check_int("top_k", self.top_k)
        if self.top_k == 0:
            self.top_k = -1  # vLLM V1: 0 and -1 both mean "no top-k"
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disable), 0 (disable) or at least 1, got {self.top_k}.")
        self.min_p = _check_float("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")

    def _verify_lengths(self) -> None:
        if self.max_tokens is not None:
            self.max_tokens = _check_int("max_tokens", self.max_tokens, minimum=1)
        self.min_tokens = _check_int("min_tokens", self.min_tokens, minimum=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}."
            )

    def _verify_stops(self) -> None:
        stop = [] if self.stop is None else self.stop
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise ValueError(f"stop must be a str or a list of str, got {self.stop!r}.")
        if any(s == "" for s in stop):
            raise ValueError("stop strings must be non-empty, got ''.")
        self.stop = list(stop)
        ids = [] if self.stop_token_ids is None else self.stop_token_ids
        if not isinstance(ids, (list, tuple, set)) or not all(_is_int(t) and t >= 0 for t in ids):
            raise ValueError(f"stop_token_ids must be a list of non-negative ints, got {self.stop_token_ids!r}.")
        self.stop_token_ids = list(ids)
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens",
                     "spaces_between_special_tokens"):
            _check_bool(name, getattr(self, name))

    def _verify_outputs(self) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=0, maximum=self.MAX_LOGPROBS)
        if not isinstance(self.output_kind, RequestOutputKind):
            raise ValueError(f"output_kind must be a RequestOutputKind, got {self.output_kind!r}.")

    def _verify_processors(self) -> None:
        procs = self.logits_processors
        if procs is not None:
            if not isinstance(procs, (list, tuple)) or not all(callable(p) for p in procs):
                raise ValueError(f"logits_processors must be a list of callables, got {procs!r}.")
            self.logits_processors = list(procs)
        if self.logit_bias is not None:
            self.logit_bias = _normalize_logit_bias(self.logit_bias)

    def _verify_greedy(self, best_of_given: bool) -> None:
        if self.best_of > 1:
            name = "best_of" if best_of_given else "n"
            raise ValueError(
                f"{name} must be 1 when using greedy sampling (temperature < {_SAMPLING_EPS}), "
                f"got n={self.n} and best_of={self.best_of}."
            )
        # Truncation cannot change an argmax; turning it off lets the sampler skip the work.
        self.top_p = 1.0
        self.top_k = -1
        self.min_p = 0.0

    # -- engine-facing helpers --------------------------------------------------------------------------------
    @property
    def sampling_type(self) -> SamplingType:
        """GREEDY below the temperature threshold, else RANDOM_SEED when seeded, else RANDOM."""
        if self.temperature < _SAMPLING_EPS:
            return SamplingType.GREEDY
        return SamplingType.RANDOM if self.seed is None else SamplingType.RANDOM_SEED

    def update_from_generation_config(self, eos_token_ids: Iterable[int]) -> None:
        """Add the model's EOS ids (unless ignore_eos) to the ids masked before min_tokens is reached."""
        self.all_stop_token_ids = set(self.stop_token_ids)
        if not self.ignore_eos:
            self.all_stop_token_ids.update(int(t) for t in eos_token_ids)

    def clone(self) -> SamplingParams:
        """Deep copy, except logits processors, which may hold models or tokenizers and are shared (vLLM #3087)."""
        memo = {id(p): p for p in self.logits_processors or ()}
        return copy.deepcopy(self, memo=memo)

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            if not f.repr:
                continue
            value = getattr(self, f.name)
            if f.name == "logits_processors" and value is not None:
                value = f"<{len(value)} processors>"
            elif isinstance(value, enum.Enum):
                value = value.name
            else:
                value = repr(value)
            parts.append(f"{f.name}={value}")
        return f"SamplingParams({', '.join(parts)})"


def _normalize_logit_bias(logit_bias: Any) -> dict[int, float]:
    """Keys may be ints or int strings (JSON object keys are strings); values are clamped-range floats."""
    if not isinstance(logit_bias, dict):
        raise ValueError(f"logit_bias must be a dict of token id to bias, got {type(logit_bias).__name__}.")
    out: dict[int, float] = {}
    for key, value in logit_bias.items():
        token_id = key
        if isinstance(key, str):
            try:
                token_id = int(key)
            except ValueError:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}.") from None
        if not _is_int(token_id) or token_id < 0:
            raise ValueError(f"logit_bias keys must be non-negative token ids, got {key!r}.")
        if token_id in out:
            raise ValueError(f"logit_bias has token id {token_id} twice.")
        bias = _check_float("logit_bias value", value)
        if not -_MAX_ABS_LOGIT_BIAS <= bias <= _MAX_ABS_LOGIT_BIAS:
            raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {token_id}.")
        out[token_id] = bias
    return out
