"""The engine core: schedule → run → update. Only requests go in, only EngineCoreOutputs come out."""
from __future__ import annotations

import dataclasses
import gc
import logging
import time
from typing import Iterable

from graphserve.config import EngineConfig
from graphserve.core.request import Request, RequestStatus
from graphserve.core.scheduler import Scheduler
from graphserve.core.scheduler_output import EngineCoreOutput, SchedulerOutput
from graphserve.worker.async_output import AsyncModelRunnerOutput
from graphserve.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class EngineCore:
    """Owns the scheduler and the model runner; the boundary that can later move to its own process."""

    def __init__(self, config: EngineConfig) -> None:
        t0 = time.perf_counter()
        self.model_runner = ModelRunner(config)
        t1 = time.perf_counter()
        num_blocks = self.model_runner.initialize_kv_cache()
        logger.info("engine start-up: model %.1f s; KV sizing, compile and graph capture %.1f s",
                    t1 - t0, time.perf_counter() - t1)
        # The pool size is known only now: freeze it into the config every other part reads.
        cache_config = dataclasses.replace(config.cache_config, num_blocks=num_blocks)
        self.config = dataclasses.replace(config, cache_config=cache_config)
        self.scheduler = Scheduler(config.scheduler_config, cache_config)
        self.async_scheduling = config.scheduler_config.async_scheduling
        # Async scheduling: the step launched last, whose output is booked during the next step() call.
        self._inflight: tuple[SchedulerOutput, AsyncModelRunnerOutput] | None = None
        self._booked_early: list[EngineCoreOutput] = []  # booked outputs the next step() has not returned yet
        # Everything built so far (model, tokenizer, library state) lives for the whole run: move it out of the
        # collector's reach so full collections during serving do not walk it (they cost ~1 ms per step).
        gc.collect()
        gc.freeze()

    def add_request(self, request: Request) -> None:
        """Queue a request (raises ValueError if it can never fit)."""
        if self._inflight is not None and request.request_id in self._inflight[0].num_scheduled_tokens:
            # The id of an aborted request, reused while that request's last step is still in flight: book the
            # step now, so its output cannot be taken for the new request's.
            self._book_inflight()
        self.scheduler.add_request(request)

    def _book_inflight(self) -> None:
        """Wait for the in-flight step's tokens and book them; its outputs go out with the next step()."""
        scheduler_output, result = self._inflight
        self._inflight = None
        self._booked_early += self.scheduler.update_from_output(scheduler_output, result.get_output())

    def abort_requests(self, req_ids: Iterable[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        """End requests now (client gone, stop string found); their KV blocks are freed at once."""
        self.scheduler.finish_requests(list(req_ids), status)

    def step(self) -> list[EngineCoreOutput]:
        """One engine iteration: schedule, run the model, book the results.

        With async scheduling the results returned are those of the step launched by the previous call: this
        call schedules and launches step N+1 first, then waits for step N's tokens and books them while the
        device computes N+1. Its outputs therefore arrive one call later, and a request that stops at step N
        has one more (discarded) token computed in step N+1.
        """
        if not self.async_scheduling:
            scheduler_output = self.scheduler.schedule()
            model_output = self.model_runner.execute_model(scheduler_output)
            if scheduler_output.is_empty:
                return []
            return self.scheduler.update_from_output(scheduler_output, model_output)
        scheduler_output = self.scheduler.schedule()
        # Also for an empty step: the runner drops the requests that finished since the last one.
        launched = self.model_runner.execute_model_async(scheduler_output)
        if self._inflight is not None:
            self._book_inflight()
        outputs, self._booked_early = self._booked_early, []
        self._inflight = None if scheduler_output.is_empty else (scheduler_output, launched)
        return outputs

    def has_unfinished_requests(self) -> bool:
        """Requests waiting or running, or a launched step whose output is not booked yet."""
        return (self._inflight is not None or bool(self._booked_early)
                or self.scheduler.has_unfinished_requests())

    def reset_prefix_cache(self) -> bool:
        """Drop the prefix cache; False while requests hold KV blocks."""
        return self.scheduler.reset_prefix_cache()
