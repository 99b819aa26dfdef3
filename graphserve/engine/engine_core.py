"""The engine core: schedule → run → update. Only requests go in, only EngineCoreOutputs come out."""
from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections import deque
from collections.abc import Iterable

from graphserve.config import EngineConfig
from graphserve.core.async_scheduler import create_scheduler
from graphserve.core.request import Request, RequestStatus
from graphserve.core.scheduler_output import EngineCoreOutput, SchedulerOutput
from graphserve.executor import create_executor
from graphserve.executor.base import ModelRunnerOutputFuture

logger = logging.getLogger(__name__)


class EngineCore:
    """Owns the scheduler and the executor; the boundary that can later move to its own process.

    Launched steps wait in `batch_queue` until booked. The executor says how many may be in flight: one (each
    step is booked as soon as it is launched), or two with async scheduling (step N+1 is launched before step N
    is booked, so the host's work overlaps the device's; the AsyncScheduler schedules N+1 without N's tokens).
    """

    def __init__(self, config: EngineConfig) -> None:
        t0 = time.perf_counter()
        self.model_executor = create_executor(config)
        t1 = time.perf_counter()
        num_blocks = self.model_executor.initialize_kv_cache()
        logger.info("engine start-up: model %.1f s; KV sizing, compile and graph capture %.1f s",
                    t1 - t0, time.perf_counter() - t1)
        # The pool size is known only now: freeze it into the config every other part reads.
        cache_config = dataclasses.replace(config.cache_config, num_blocks=num_blocks)
        self.config = dataclasses.replace(config, cache_config=cache_config)
        self.scheduler = create_scheduler(config.scheduler_config, cache_config, config.lora_config,
                                          config.speculative_config)
        self.async_scheduling = config.scheduler_config.async_scheduling
        self.max_concurrent_batches = self.model_executor.max_concurrent_batches
        self.batch_queue: deque[tuple[SchedulerOutput, ModelRunnerOutputFuture]] = deque()
        self._booked_early: list[EngineCoreOutput] = []  # booked outputs the next step() has not returned yet
        # Everything built so far (model, tokenizer, library state) lives for the whole run: move it out of the
        # collector's reach so full collections during serving do not walk it (they cost ~1 ms per step).
        gc.collect()
        gc.freeze()

    def add_request(self, request: Request) -> None:
        """Queue a request (raises ValueError if it can never fit)."""
        if any(request.request_id in so.num_scheduled_tokens for so, _ in self.batch_queue):
            # The id of an aborted request, reused while that request's last step is still in flight: book the
            # steps now, so their output cannot be taken for the new request's.
            while self.batch_queue:
                self._book_oldest()
        self.scheduler.add_request(request)

    def _book_oldest(self) -> None:
        """Wait for the oldest launched step's tokens and book them; its outputs go out with the next step()."""
        scheduler_output, future = self.batch_queue.popleft()
        self._booked_early += self.scheduler.update_from_output(scheduler_output, future.get_output())

    def abort_requests(self, req_ids: Iterable[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        """End requests now (client gone, stop string found); their KV blocks are freed at once."""
        self.scheduler.finish_requests(list(req_ids), status)

    def step(self) -> list[EngineCoreOutput]:
        """One engine iteration: schedule and launch a step, then book launched steps down to what may stay in flight.

        With async scheduling the outputs returned are those of the step launched by the previous call: this
        call launches step N+1 first, then waits for step N's tokens while the device computes N+1. A request
        that stops at step N therefore has one more (discarded) token computed in step N+1.
        """
        scheduler_output = self.scheduler.schedule()
        # Also for an empty step: the workers drop the requests that finished since the last one.
        future = self.model_executor.execute_model(scheduler_output)
        if not scheduler_output.is_empty:
            self.batch_queue.append((scheduler_output, future))
        # With nothing new launched, nothing is left to overlap: book everything.
        keep = self.max_concurrent_batches - 1 if not scheduler_output.is_empty else 0
        while len(self.batch_queue) > keep:
            self._book_oldest()
        outputs, self._booked_early = self._booked_early, []
        return outputs

    def has_unfinished_requests(self) -> bool:
        """Requests waiting or running, or a launched step whose output is not booked yet."""
        return bool(self.batch_queue) or bool(self._booked_early) or self.scheduler.has_unfinished_requests()

    def reset_prefix_cache(self) -> bool:
        """Drop the prefix cache; False while requests hold KV blocks."""
        return self.scheduler.reset_prefix_cache()

    def shutdown(self) -> None:
        """Release the executor's workers."""
        self.model_executor.shutdown()
