"""Random-weight models from a bare config.json (`load_format="dummy"`), for benchmarks of real shapes.

The engine needs a tokenizer for its input/output processing, and a config directory under perf/configs/
holds only config.json. Benchmarks send token ids and never read the text, so any tokenizer serves: this
module builds the small byte-level BPE of perf/tiny_checkpoint.py once into a cache directory and passes it
as `tokenizer=`. Output ids past its vocabulary detokenize to nothing (the detokenizer skips them).
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

PERF_DIR = os.path.dirname(os.path.abspath(__file__))
CONFIGS_DIR = os.path.join(PERF_DIR, "configs")


def perf_tokenizer_dir(root: str | None = None) -> str:
    """A directory holding the benchmark tokenizer (built on first use)."""
    path = os.path.join(root or tempfile.gettempdir(), "graphserve-perf-tokenizer")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        from perf.tiny_checkpoint import build_tokenizer

        build_tokenizer().save_pretrained(path)
    return path


def bench_engine_args(args: Any):
    """EngineArgs from a benchmark's parsed CLI; dummy weights get the benchmark tokenizer unless one is given."""
    from graphserve.engine.arg_utils import EngineArgs

    engine_args = EngineArgs.from_cli_args(args)
    if engine_args.load_format == "dummy" and engine_args.tokenizer is None:
        engine_args.tokenizer = perf_tokenizer_dir()  # token-id workloads: any tokenizer serves
    return engine_args


def dummy_llm(config: str, **engine_kwargs: Any):
    """`LLM` over random weights of `config` (a directory with config.json, or a name under perf/configs/)."""
    from graphserve import LLM

    model_dir = config if os.path.isdir(config) else os.path.join(CONFIGS_DIR, config)
    engine_kwargs.setdefault("tokenizer", perf_tokenizer_dir())
    return LLM(model_dir, load_format="dummy", **engine_kwargs)
