"""Helpers of the GPU tests: engines built and served through the public API, with the compile/capture counters."""
from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from graphserve import LLM, SamplingParams
from graphserve.compile.counters import compilation_counter, dynamo_counts


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in fp32."""
    ref = ref.float()
    return float((out.float() - ref).norm() / ref.norm())


def random_prompts(lens: list[int], vocab_size: int, seed: int, low: int = 4) -> list[list[int]]:
    """Seeded random token ids, one prompt per length (ids below `low` are left out: BOS/EOS of the tiny models)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, vocab_size, (n,), generator=g).tolist() for n in lens]


def release_device_memory() -> None:
    """Collect what the caller dropped and return the cached device memory (after `del llm`)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


@contextmanager
def counting_compiles() -> Iterator[dict[str, int]]:
    """Yield a dict that holds, once the block is left, how much each compile/capture counter and torch._dynamo's
    unique graphs grew inside it."""
    before, dynamo_before = compilation_counter.snapshot(), dynamo_counts()["unique_graphs"]
    delta: dict[str, int] = {}
    yield delta
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    delta.update(compilation_counter.since(before))
    delta["dynamo_unique_graphs"] = dynamo_counts()["unique_graphs"] - dynamo_before


def summary(outputs) -> list[tuple[list[int], str, Any]]:
    """(token ids, finish reason, stop reason) of each request's first completion."""
    return [(list(o.outputs[0].token_ids), o.outputs[0].finish_reason, o.outputs[0].stop_reason) for o in outputs]


def generate(llm: LLM, prompts: list[list[int]], params) -> list:
    """Generate from token-id prompts, without a progress bar."""
    return llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)


def tokens_of_fresh_engine(path: str, prompts: list[list[int]], params, **engine_kwargs: Any) -> list[list[int]]:
    """Greedy reference tokens from an engine built for this one run and freed afterwards (the GPU holds one
    engine at a time in these tests)."""
    llm = LLM(path, **engine_kwargs)
    tokens = [list(o.outputs[0].token_ids) for o in generate(llm, prompts, params)]
    del llm
    release_device_memory()
    return tokens


@dataclass
class EngineRun:
    """What one engine did: counters at start-up and while serving, the outputs of each workload, and the engine
    itself while it is alive (None once freed)."""

    startup: dict[str, int]
    serving: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, list] = field(default_factory=dict)
    llm: LLM | None = None


@contextmanager
def serving_engine(build: Callable[[], LLM], workloads: dict[str, tuple[list[list[int]], Any]]) -> Iterator[EngineRun]:
    """Build an engine, serve each workload (name -> (prompts, params)) in order, yield the run, then free it."""
    with counting_compiles() as startup:
        run = EngineRun(startup=startup, llm=build())
    try:
        with counting_compiles() as run.serving:
            for name, (prompts, params) in workloads.items():
                run.outputs[name] = generate(run.llm, prompts, params)
        yield run
    finally:
        run.llm = None
        release_device_memory()


def assert_compiled_once_and_captured(run: EngineRun, compiled: bool, num_graphs: int) -> None:
    """Start-up compiled the forward once (or never) and captured `num_graphs` graphs; serving added neither."""
    expected_compiles = 1 if compiled else 0
    assert run.startup["num_models_compiled"] == expected_compiles, run.startup
    assert run.startup["num_graphs_compiled"] == expected_compiles, run.startup
    assert run.startup["dynamo_unique_graphs"] == expected_compiles, run.startup
    assert run.startup["num_cudagraphs_captured"] == num_graphs, run.startup
    assert run.serving["num_graphs_compiled"] == 0, f"recompiled while serving: {run.serving}"
    assert run.serving["dynamo_unique_graphs"] == 0, f"dynamo traced a new graph while serving: {run.serving}"
    assert run.serving["num_cudagraphs_captured"] == 0, f"captured a graph while serving: {run.serving}"
    if num_graphs:
        assert run.serving["num_cudagraph_replays"] > 0, "no decode step was served by a graph"
    else:
        assert run.serving["num_cudagraph_replays"] == 0, run.serving


def greedy(max_tokens: int, **kwargs: Any) -> SamplingParams:
    """Greedy sampling of exactly `max_tokens` tokens unless a stop condition in kwargs ends it first."""
    kwargs.setdefault("ignore_eos", True)
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)
