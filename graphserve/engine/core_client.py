"""The boundary between the asyncio frontend and the engine core: requests and aborts go in, output batches out.

`EngineCoreClient` is the interface the frontend (AsyncLLM) talks to. Today's implementation runs the core's
busy loop in a background thread; every message is plain data (a core `Request`, lists of ids, an
`EngineCoreOutputs` batch), so a process-based client (a socket instead of a queue) can replace it without
touching the frontend.
"""
from __future__ import annotations

import abc
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from graphserve.config import EngineConfig
from graphserve.core.request import Request, RequestStatus
from graphserve.core.scheduler_output import EngineCoreOutput
from graphserve.metrics.stats import SchedulerStats

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine core failed (or was shut down): no request can be served any more."""


@dataclass
class EngineCoreOutputs:
    """One batch from the engine core: a step's outputs and the scheduler after it."""

    outputs: list[EngineCoreOutput]
    scheduler_stats: SchedulerStats | None = None
    # Requests the core refused at add time: request id -> the ValueError's message.
    failed_requests: dict[str, str] = field(default_factory=dict)
    # Set on the last batch of a core that died: what went wrong. Nothing follows it.
    engine_error: str | None = None
    timestamp: float = field(default_factory=time.monotonic)


OutputHandler = Callable[[EngineCoreOutputs], None]


class EngineCoreClient(abc.ABC):
    """What the frontend needs from an engine core, wherever it runs."""

    config: EngineConfig  # with the KV pool size resolved

    @abc.abstractmethod
    def add_request(self, request: Request) -> None:
        """Queue a validated request; a refusal comes back in `EngineCoreOutputs.failed_requests`."""

    @abc.abstractmethod
    def abort_requests(self, request_ids: Iterable[str],
                       status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        """Finish requests before the next step, freeing their KV blocks."""

    @abc.abstractmethod
    def call_utility(self, method: str, *args: Any) -> concurrent.futures.Future:
        """Run `EngineCore.<method>(*args)` between two steps; the future holds its result."""

    @abc.abstractmethod
    def is_alive(self) -> bool:
        """False once the core died or was shut down."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop the core (requests still queued are dropped) and wait for it."""


def _scheduler_stats(core: Any) -> SchedulerStats:
    scheduler = core.scheduler
    return SchedulerStats(
        num_running_reqs=scheduler.num_running,
        num_waiting_reqs=scheduler.num_waiting,
        kv_cache_usage=scheduler.kv_cache_usage,
        num_preemptions=scheduler.num_preemptions,
        prefix_cache_queries=getattr(scheduler, "prefix_cache_queries", 0),
        prefix_cache_hits=getattr(scheduler, "prefix_cache_hits", 0),
        spec_decode_num_drafts=getattr(scheduler, "spec_num_drafts", 0),
        spec_decode_num_draft_tokens=getattr(scheduler, "spec_num_draft_tokens", 0),
        spec_decode_num_accepted_tokens=getattr(scheduler, "spec_num_accepted_tokens", 0),
    )


_ADD, _ABORT, _UTILITY, _SHUTDOWN = range(4)


def _leave_a_core_to_the_frontend() -> None:
    """Cap torch's intra-op threads at (usable CPUs - 1) while the frontend shares this process.

    The event loop needs a core of its own: when it preempts one of torch's OpenMP threads, every parallel region
    waits at its barrier for that thread, and a step that takes 30 ms alone takes seconds under HTTP load
    (measured: 200 streams of 16 tokens, tiny model, 2 cores: 10.8 s with 2 threads, 1.5 s with 1).
    """
    import os

    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    num_threads = max(1, min(torch.get_num_threads(), usable - 1))
    if num_threads != torch.get_num_threads():
        logger.info("engine core: %d torch threads (one of %d CPUs left to the HTTP frontend)", num_threads, usable)
        torch.set_num_threads(num_threads)


class ThreadedEngineCoreClient(EngineCoreClient):
    """Runs EngineCore's busy loop (drain inputs → step → emit outputs) in a daemon thread.

    `on_outputs` is called from that thread after every step (and after inputs that change the scheduler while
    idle); it must only hand the batch over, e.g. with `loop.call_soon_threadsafe`.
    """

    def __init__(self, config: EngineConfig, on_outputs: OutputHandler) -> None:
        self._on_outputs = on_outputs
        self._inputs: queue.SimpleQueue = queue.SimpleQueue()
        self._alive = False
        self._startup_error: BaseException | None = None
        # The core itself. It belongs to the engine thread: the frontend never calls it; tests and debuggers
        # may read it while the engine is idle.
        self.core: Any | None = None
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(config, ready), name="graphserve-engine-core", daemon=True
        )
        self._thread.start()
        ready.wait()
        if self._startup_error is not None:
            raise self._startup_error

    # -- frontend side --------------------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a validated request for the core."""
        self._inputs.put((_ADD, request))

    def abort_requests(self, request_ids: Iterable[str],
                       status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        """Finish requests before the next step, freeing their KV blocks."""
        self._inputs.put((_ABORT, list(request_ids), status))

    def call_utility(self, method: str, *args: Any) -> concurrent.futures.Future:
        """Run `EngineCore.<method>(*args)` between two steps."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if not self._alive:
            future.set_exception(EngineDeadError("the engine core is not running"))
        else:
            self._inputs.put((_UTILITY, future, method, args))
        return future

    def is_alive(self) -> bool:
        """False once the core died or was shut down."""
        return self._alive and self._thread.is_alive()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the busy loop after the current step and wait for the thread."""
        if self._thread.is_alive():
            self._inputs.put((_SHUTDOWN,))
            self._thread.join(timeout)
        self._alive = False

    # -- engine thread ----------------------------------------------------------------------------------------
    def _run(self, config: EngineConfig, ready: threading.Event) -> None:
        from graphserve.engine.engine_core import EngineCore  # torch is imported here, not by the frontend

        try:
            _leave_a_core_to_the_frontend()
            core = self.core = EngineCore(config)
            self.config = core.config
            self._alive = True
        except BaseException as e:  # noqa: BLE001 (re-raised in the constructor's thread)
            self._startup_error = e
            return
        finally:
            ready.set()
        try:
            self._busy_loop(core)
        except BaseException as e:  # noqa: BLE001 (reported to the frontend, which fails every request)
            logger.exception("engine core failed")
            self._alive = False
            self._emit(EngineCoreOutputs([], engine_error=f"{type(e).__name__}: {e}"))
        finally:
            self._alive = False
            core.shutdown()  # the executor's workers go with the loop that drove them

    def _busy_loop(self, core: Any) -> None:
        inputs = self._inputs
        while True:
            failed: dict[str, str] = {}
            if not core.has_unfinished_requests():
                # Idle: sleep until the frontend sends something.
                if not self._handle(core, inputs.get(), failed):
                    return
            while True:  # everything that arrived during the last step goes in before the next one
                try:
                    message = inputs.get_nowait()
                except queue.Empty:
                    break
                if not self._handle(core, message, failed):
                    return
            outputs = core.step() if core.has_unfinished_requests() else []
            self._emit(EngineCoreOutputs(outputs, _scheduler_stats(core), failed))

    def _handle(self, core: Any, message: tuple, failed: dict[str, str]) -> bool:
        """Apply one input message; False means shut down."""
        kind = message[0]
        if kind == _ADD:
            request = message[1]
            try:
                core.add_request(request)
            except ValueError as e:  # the frontend validates first; this is the core's last word
                failed[request.request_id] = str(e)
        elif kind == _ABORT:
            core.abort_requests(message[1], message[2])
        elif kind == _UTILITY:
            _, future, method, args = message
            try:
                future.set_result(getattr(core, method)(*args))
            except Exception as e:  # noqa: BLE001 (handed to the caller)
                future.set_exception(e)
        elif kind == _SHUTDOWN:
            return False
        return True

    def _emit(self, batch: EngineCoreOutputs) -> None:
        try:
            self._on_outputs(batch)
        except RuntimeError:  # the frontend's event loop is closed: nobody is listening any more
            pass


def make_engine_core_client(config: EngineConfig, on_outputs: OutputHandler) -> EngineCoreClient:
    """Start an engine core for `config` (in a background thread today) and return its client."""
    return ThreadedEngineCoreClient(config, on_outputs)
