"""The one message from the scheduler to the model runner, and the one message back.

Both are plain Python (lists, ints, floats) so the engine core can live in another process.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from graphserve.lora.request import LoRARequest
    from graphserve.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the runner has not seen (or must rebuild after preemption): everything it needs."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # non-empty when resumed after preemption (recompute)
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int  # tokens whose KV is already in the blocks
    lora_request: LoRARequest | None = None  # the adapter its tokens run through


@dataclass
class CachedRequestData:
    """A request the runner already holds: only what changed since the last step."""

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    """What to compute this step: per request, how many of its next tokens."""

    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # Requests finished, aborted or preempted since the previous step: the runner drops their state.
    finished_req_ids: set[str] = field(default_factory=set)
    # Speculative decoding: per request, the draft tokens this step verifies. They are the last
    # len(drafts) of its scheduled tokens (counted in num_scheduled_tokens); requests without drafts are absent.
    scheduled_spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class LogprobsLists:
    """Top logprobs of some positions: row i has the chosen token first, then the top-k."""

    token_ids: list[list[int]]  # [num_positions][1 + k]
    logprobs: list[list[float]]  # [num_positions][1 + k]
    ranks: list[int]  # [num_positions] rank of the chosen token (1 = most likely)


@dataclass
class ModelRunnerOutput:
    """What the runner computed: sampled tokens per request (empty while a prefill is partial)."""

    req_ids: list[str]
    sampled_token_ids: list[list[int]]  # aligned with req_ids
    # Per request: logprob of each sampled token (always), plus top-k when requested.
    sampled_logprobs: dict[str, list[float]] = field(default_factory=dict)
    logprobs: dict[str, LogprobsLists] = field(default_factory=dict)
    # Per request: (first prompt position covered, logprobs of positions start.. in this chunk).
    prompt_logprobs: dict[str, tuple[int, LogprobsLists]] = field(default_factory=dict)
    # Speculative decoding: draft tokens proposed for each request's next step (absent: none).
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class EngineCoreOutput:
    """Per request per step: what the output processor needs to build a RequestOutput."""

    req_id: str
    new_token_ids: list[int]
    new_sampled_logprobs: list[float] = field(default_factory=list)
    new_logprobs: LogprobsLists | None = None
    new_prompt_logprobs: tuple[int, LogprobsLists] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    # time.monotonic() of the request's first scheduling (serving metrics: queue time = this - arrival_time).
    first_scheduled_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
