"""Executors between the engine core and the model runners (`base.Executor`), and the factory that picks one."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from graphserve.config import EngineConfig
    from graphserve.executor.base import Executor


def create_executor(config: EngineConfig) -> Executor:
    """The executor for `config`: the in-process one (tensor parallelism will choose a multiprocess or Ray one)."""
    from graphserve.executor.uniproc_executor import UniProcExecutor

    return UniProcExecutor(config)
