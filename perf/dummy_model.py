"""Random-weight models from a bare config.json (`load_format="dummy"`), for benchmarks of real shapes.

A config directory under perf/configs/ holds only config.json; the engine gets the benchmark tokenizer
(`graphserve.benchmarks.tokenizer`, which also explains why any tokenizer serves a token-id workload).
"""
from __future__ import annotations

import os
from typing import Any

from graphserve.benchmarks.tokenizer import bench_engine_args, benchmark_tokenizer_dir

PERF_DIR = os.path.dirname(os.path.abspath(__file__))
CONFIGS_DIR = os.path.join(PERF_DIR, "configs")

__all__ = ["CONFIGS_DIR", "bench_engine_args", "dummy_llm", "perf_tokenizer_dir"]


def perf_tokenizer_dir(root: str | None = None) -> str:
    """A directory holding the benchmark tokenizer (built on first use)."""
    return benchmark_tokenizer_dir(root)


def dummy_llm(config: str, **engine_kwargs: Any):
    """`LLM` over random weights of `config` (a directory with config.json, or a name under perf/configs/)."""
    from graphserve import LLM

    model_dir = config if os.path.isdir(config) else os.path.join(CONFIGS_DIR, config)
    engine_kwargs.setdefault("tokenizer", benchmark_tokenizer_dir())
    return LLM(model_dir, load_format="dummy", **engine_kwargs)
