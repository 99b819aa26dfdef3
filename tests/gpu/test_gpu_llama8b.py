"""The Llama-3-8B shape (perf/configs/llama-3-8b, random bf16 weights from `load_format="dummy"`): graphs vs eager.

Two engines one after the other (the first is freed before the second is built), each with a 4 GiB KV pool.
The dummy weights are drawn from the engine's seed, so both engines hold the same model.
"""
from __future__ import annotations

import pytest
from gpu_testutils import (
    assert_compiled_once_and_captured,
    greedy,
    random_prompts,
    serving_engine,
    summary,
)

from perf.dummy_model import dummy_llm

PROMPT_LENS = [5, 16, 17, 33, 64, 100, 127, 128, 129, 250, 400, 511, 700, 900, 1000, 1500]
NEW_TOKENS = 32
GRAPH_SIZES = [1, 2, 4, 8, 16]
ENGINE = {"dtype": "bfloat16", "max_model_len": 2048, "max_num_seqs": 16, "kv_cache_memory": "4GiB",
          "cuda_graph_sizes": GRAPH_SIZES, "seed": 0}
MODES = {"graphs": {}, "eager": {"enforce_eager": True}}


@pytest.fixture(scope="module")
def llama8b_runs(needs_cuda) -> dict:
    """mode -> EngineRun of 16 mixed-length prompts, 32 greedy tokens each."""
    prompts = random_prompts(PROMPT_LENS, 128000, seed=7, low=10)
    runs = {}
    for mode, kwargs in MODES.items():
        with serving_engine(lambda kwargs=kwargs: dummy_llm("llama-3-8b", **ENGINE, **kwargs),
                            {"mixed": (prompts, greedy(NEW_TOKENS))}) as run:
            runs[mode] = run
    return runs


def test_llama8b_graph_replay_matches_eager(llama8b_runs):
    """Compile + decode graphs give exactly eager's greedy tokens for 16 prompts of 5 to 1 500 tokens."""
    graphs, eager = summary(llama8b_runs["graphs"].outputs["mixed"]), summary(llama8b_runs["eager"].outputs["mixed"])
    assert len(graphs) == len(PROMPT_LENS) and all(len(t) == NEW_TOKENS for t, _, _ in eager)
    differing = [i for i, (a, b) in enumerate(zip(graphs, eager)) if a != b]
    assert differing == [], f"prompts whose greedy tokens differ: {differing}"


def test_llama8b_compiled_once_graphs_replayed(llama8b_runs):
    """The 8B engine compiles its forward once and captures one graph per bucket at start-up, and serves decode
    steps from graphs with no recompile or capture; the eager engine does neither."""
    assert_compiled_once_and_captured(llama8b_runs["graphs"], compiled=True, num_graphs=len(GRAPH_SIZES))
    assert_compiled_once_and_captured(llama8b_runs["eager"], compiled=False, num_graphs=0)
