"""Async scheduling: step N+1 is scheduled while step N still runs, before N's sampled tokens are known.

The engine core launches step N+1 and only then waits for step N's output (so the host's scheduling, input
preparation and detokenization overlap the device's work). What the scheduler needs for that is one count per
request: the tokens being sampled by a step in flight (`num_output_placeholders`). Step N+1 computes such a
token as its input (the runner reads it from step N's sampled-id tensor on the device), and a request whose
in-flight tokens already reach its length limit is not scheduled again. Everything else is the plain Scheduler:
tokens count as computed from the moment they are scheduled, so step N+1 starts where step N ends.
"""
from __future__ import annotations

from graphserve.config import CacheConfig, LoRAConfig, SchedulerConfig, SpeculativeConfig
from graphserve.core.request import Request, RequestStatus
from graphserve.core.scheduler import Scheduler
from graphserve.core.scheduler_output import EngineCoreOutput, ModelRunnerOutput, SchedulerOutput


class AsyncScheduler(Scheduler):
    """The Scheduler with one step in flight: counts the tokens that step samples until its output arrives."""

    def _book_scheduled(self, request: Request, start: int, num_new_tokens: int) -> None:
        """A chunk that reaches the end of the known (and in-flight) tokens samples one more: a placeholder."""
        if start + num_new_tokens >= len(request.all_token_ids) + request.num_output_placeholders:
            request.num_output_placeholders += 1
        request.num_computed_tokens = start + num_new_tokens

    def _preempt(self, request: Request) -> None:
        """Recompute from scratch: the in-flight step's tokens for it will be dropped."""
        super()._preempt(request)
        request.num_output_placeholders = 0

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """The sampled tokens arrived: they stop being placeholders, then are booked as usual."""
        requests = self.requests
        for req_id, token_ids in zip(model_runner_output.req_ids, model_runner_output.sampled_token_ids):
            if token_ids:
                request = requests.get(req_id)
                if request is not None and request.status is RequestStatus.RUNNING:
                    request.num_output_placeholders -= 1
        return super().update_from_output(scheduler_output, model_runner_output)


def create_scheduler(scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                     lora_config: LoRAConfig | None = None,
                     speculative_config: SpeculativeConfig | None = None) -> Scheduler:
    """The AsyncScheduler when the engine keeps a step in flight, else the plain Scheduler."""
    if scheduler_config.async_scheduling and speculative_config is not None:
        # Drafts are proposed from the tokens a step samples, so the next step waits for them (EngineArgs
        # turns async scheduling off when speculation is on).
        raise ValueError("speculative decoding needs async_scheduling off")
    cls = AsyncScheduler if scheduler_config.async_scheduling else Scheduler
    return cls(scheduler_config, cache_config, lora_config, speculative_config)
