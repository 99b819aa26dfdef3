"""The executor: what the engine core calls to run a step on the device(s), wherever they are.

`EngineCore` holds an `Executor`, never a model runner: the executor owns the workers. `UniProcExecutor` runs
the one `ModelRunner` in this process; a multiprocess executor (one worker process per tensor-parallel rank,
the step's `SchedulerOutput` broadcast to all, rank 0's output returned) and a Ray executor implement the same
four methods. Only `SchedulerOutput` goes in and only `ModelRunnerOutput` comes out.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

from graphserve.config import EngineConfig
from graphserve.core.scheduler_output import ModelRunnerOutput, SchedulerOutput


class ModelRunnerOutputFuture(Protocol):
    """A launched step: its output once the device (or the workers) finished it."""

    def get_output(self) -> ModelRunnerOutput:
        """Wait for the step and return its plain-Python output."""


class Executor(ABC):
    """Runs the model for the engine core; built by `create_executor`."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config

    @abstractmethod
    def initialize_kv_cache(self) -> int:
        """Size and allocate the KV cache on every worker (compiling and capturing graphs); returns its blocks."""

    @abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutputFuture:
        """Launch one step and return at once; `get_output()` waits for it.

        Called with an empty step too: the workers drop the requests that finished since the last one.
        """

    @property
    def max_concurrent_batches(self) -> int:
        """Steps that may be in flight at once: 2 with async scheduling (launch N+1, then wait for N), else 1."""
        return 2 if self.config.scheduler_config.async_scheduling else 1

    def shutdown(self) -> None:
        """Release the workers and their devices (nothing to do in-process)."""
