"""The engine core's view of one sequence being generated."""
from __future__ import annotations

import enum
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from graphserve.lora.request import LoRARequest
    from graphserve.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Lifecycle of a request inside the scheduler; FINISHED_* are terminal."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH_CAPPED = 4
    FINISHED_ABORTED = 5

    @staticmethod
    def is_finished(status: RequestStatus) -> bool:
        return status >= RequestStatus.FINISHED_STOPPED

    @staticmethod
    def get_finished_reason(status: RequestStatus) -> str | None:
        return _FINISHED_REASONS.get(status)


_FINISHED_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    """One sequence: prompt, generated tokens and how much of it has KV in the cache."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: tuple[int, ...] = (),
        arrival_time: float | None = None,
        cache_salt: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = tuple(eos_token_ids)
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = RequestStatus.WAITING
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        # Tokens whose KV is written or being written: advanced when their step is scheduled.
        self.num_computed_tokens = 0
        # Tokens being sampled by a step whose output has not arrived (only the AsyncScheduler sets this): the
        # next step computes them although their ids are not known on the host yet.
        self.num_output_placeholders = 0
        # Speculative decoding: draft tokens proposed after the last step, verified by the next one (then cleared).
        self.spec_token_ids: list[int] = []
        self.num_preemptions = 0
        self.stop_reason: int | str | None = None
        # Resolved by the engine: max_tokens may be None (= fill the context).
        self.max_tokens: int = sampling_params.max_tokens if sampling_params.max_tokens is not None else 0
        # Prefix caching: a salt isolates the cache between tenants; hashes of the full blocks of all_token_ids.
        self.cache_salt = cache_salt
        self.lora_request = lora_request  # the adapter every token of it runs through (None: the base model)
        self.block_hashes: list[bytes] = []
        # Prompt tokens found in the prefix cache when first scheduled (reported in RequestOutput).
        self.num_cached_tokens = 0
        self.first_scheduled_time: float | None = None  # time.monotonic() of the first admission
        # Set by the KVCacheManager: once num_computed_tokens reaches it, the next full block can be cached
        # (sys.maxsize while prefix caching is off or the request holds no blocks). One compare per step.
        self.next_cache_boundary = sys.maxsize

    @property
    def lora_int_id(self) -> int:
        """The adapter's engine id, 0 for the base model."""
        return self.lora_request.lora_int_id if self.lora_request is not None else 0

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token_ids(self, token_ids: list[int]) -> None:
        self.output_token_ids.extend(token_ids)
        self.all_token_ids.extend(token_ids)

    def is_finished(self) -> bool:
        return RequestStatus.is_finished(self.status)

    def get_finished_reason(self) -> str | None:
        return RequestStatus.get_finished_reason(self.status)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, prompt={self.num_prompt_tokens}, "
            f"output={self.num_output_tokens}, computed={self.num_computed_tokens})"
        )
