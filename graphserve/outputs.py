"""What the user gets back: vLLM's RequestOutput / CompletionOutput / Logprob / RequestMetrics.

Field names follow vLLM (v0.4+: logprobs are `dict[token_id, Logprob]`, `stop_reason` exists) so code written
against vLLM's offline API reads these objects unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]

# One entry per position: the chosen token and the top-k alternatives, keyed by token id.
SampleLogprobs = list[dict[int, "Logprob"]]
# Position 0 has no logprob (nothing precedes the first prompt token), hence Optional.
PromptLogprobs = list[dict[int, "Logprob"] | None]


@dataclass
class Logprob:
    """Log probability of one token at one position, its rank (1 = most likely) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One generated sequence of a request (there are n of them)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: FinishReason | None = None
    # The stop string or stop token id that ended the sequence; None for EOS, length or abort.
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        """True once the sequence has a finish reason."""
        return self.finish_reason is not None

    def __repr__(self) -> str:
        num_logprobs = None if self.logprobs is None else f"<{len(self.logprobs)} positions>"
        return (
            f"CompletionOutput(index={self.index}, text={self.text!r}, token_ids={self.token_ids}, "
            f"cumulative_logprob={self.cumulative_logprob}, logprobs={num_logprobs}, "
            f"finish_reason={self.finish_reason}, stop_reason={self.stop_reason!r})"
        )


@dataclass
class RequestMetrics:
    """Timestamps of one request, on the clock of `Request.arrival_time` (time.monotonic)."""

    arrival_time: float
    last_token_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    time_in_queue: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    """Everything generated so far for one user request: the prompt and its n completions."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0

    def __repr__(self) -> str:
        num_prompt_logprobs = None if self.prompt_logprobs is None else f"<{len(self.prompt_logprobs)} positions>"
        return (
            f"RequestOutput(request_id={self.request_id!r}, prompt={self.prompt!r}, "
            f"prompt_token_ids={self.prompt_token_ids}, prompt_logprobs={num_prompt_logprobs}, "
            f"outputs={self.outputs}, finished={self.finished}, metrics={self.metrics}, "
            f"num_cached_tokens={self.num_cached_tokens})"
        )
