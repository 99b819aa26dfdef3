"""UniProcExecutor: the model runner in the engine core's own process, on one device."""
from __future__ import annotations

from graphserve.config import EngineConfig
from graphserve.core.scheduler_output import SchedulerOutput
from graphserve.executor.base import Executor
from graphserve.worker.async_output import AsyncModelRunnerOutput
from graphserve.worker.model_runner import ModelRunner


class UniProcExecutor(Executor):
    """One `ModelRunner`, called directly."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.model_runner = ModelRunner(config)

    def initialize_kv_cache(self) -> int:
        """The runner's KV pool size after profiling, compiling and capturing."""
        return self.model_runner.initialize_kv_cache()

    def execute_model(self, scheduler_output: SchedulerOutput) -> AsyncModelRunnerOutput:
        """Queue the step on the device; the sampled tokens are read later through `get_output()`."""
        return self.model_runner.execute_model_async(scheduler_output)
