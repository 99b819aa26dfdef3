"""A small model with Llama-3-8B's attention geometry: graph replay vs eager and compile counters in bf16, async
vs synchronous steps in fp32.

4 layers, hidden 2048, head_dim 128, 16 query heads over 4 KV heads (GQA 4:1), transformers' random init, saved
once. 16 prompts of 5 to 1000 tokens under a 1024-token step budget, so prefill chunks share steps with decodes.
Each mode gets its own engine, built on first use and freed after its workloads; the results are kept.
"""
from __future__ import annotations

import pytest
import torch
from gpu_testutils import (
    EngineRun,
    assert_compiled_once_and_captured,
    greedy,
    random_prompts,
    release_device_memory,
    serving_engine,
    summary,
)

from graphserve import LLM

GPU_CONFIG = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 4, "num_attention_heads": 16,
              "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 4096}
# The CPU dry run (GRAPHSERVE_GPU_TESTS_DEVICE=cpu) keeps the shape of the test, not its size.
CPU_CONFIG = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 1, "vocab_size": 32000, "max_position_embeddings": 4096}
PROMPT_LENS = [5, 9, 16, 17, 31, 33, 64, 100, 128, 200, 257, 300, 511, 600, 700, 1000]
NEW_TOKENS = 64
GRAPH_SIZES = [1, 2, 4, 8, 16]
ENGINE = {"dtype": "bfloat16", "max_model_len": 2048, "max_num_seqs": 16, "max_num_batched_tokens": 1024,
          "cuda_graph_sizes": GRAPH_SIZES}
MODES = {
    "eager": {"enforce_eager": True},
    "compile_graphs": {"async_scheduling": True},  # the GPU defaults (compile, graphs), async spelled out
    "eager_forward_graphs": {"compile": False},
    # Async vs synchronous steps compose different batches (a stopping request computes one more, discarded
    # token), so their GEMMs run at other sizes; in fp32 that cannot flip a greedy token of this model, in bf16
    # with its near-uniform random logits it can.
    "eager_fp32": {"enforce_eager": True, "dtype": "float32"},  # where the stop ids come from
    "async_fp32": {"async_scheduling": True, "dtype": "float32"},
    "sync_fp32": {"async_scheduling": False, "dtype": "float32"},
}


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory, device) -> str:
    """A checkpoint dir: random bf16 weights (seeded, drawn on the device) and the benchmark tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from perf.tiny_checkpoint import build_tokenizer

    path = str(tmp_path_factory.mktemp("small-llama-bf16"))
    config = LlamaConfig(**(GPU_CONFIG if device == "cuda" else CPU_CONFIG), rope_theta=500000.0, rms_norm_eps=1e-5,
                         bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    del model
    release_device_memory()
    return path


class Runs:
    """One engine per mode, built on first use; keeps each mode's counters and outputs."""

    def __init__(self, path: str, device: str) -> None:
        self.path, self.device = path, device
        self.prompts = random_prompts(PROMPT_LENS, 32000, seed=1)
        self._runs: dict[str, EngineRun] = {}

    def __call__(self, mode: str) -> EngineRun:
        if mode not in self._runs:
            workloads = {"mixed": (self.prompts, greedy(NEW_TOKENS))}
            if mode in ("async_fp32", "sync_fp32"):
                workloads = {"stops": (self.prompts, self.stop_params())}
            engine = {**ENGINE, **MODES[mode]}
            with serving_engine(lambda: LLM(self.path, device=self.device, **engine), workloads) as run:
                self._runs[mode] = run
        return self._runs[mode]

    def stop_params(self) -> list:
        """Request i stops on (the first occurrence of) the token fp32 eager greedy produced at step 2 + 3i."""
        free = self("eager_fp32").outputs["mixed"]
        return [greedy(NEW_TOKENS, ignore_eos=False,
                       stop_token_ids=[o.outputs[0].token_ids[min(2 + 3 * i, NEW_TOKENS - 1)]])
                for i, o in enumerate(free)]


@pytest.fixture(scope="module")
def runs(small_llama, device) -> Runs:
    """The engines of this module, one mode at a time, shared by its tests."""
    return Runs(small_llama, device)


def _first_differences(outputs, expected) -> dict[int, int]:
    """prompt index -> first step where the greedy tokens differ."""
    diffs = {}
    for i, (a, b) in enumerate(zip(summary(outputs), summary(expected))):
        if a[0] != b[0]:
            diffs[i] = next((s for s, (x, y) in enumerate(zip(a[0], b[0])) if x != y), min(len(a[0]), len(b[0])))
    return diffs


def test_compiled_graph_replay_matches_eager_bf16(runs):
    """Defaults (compile + decode graphs + async scheduling) give exactly eager's greedy tokens in bf16, for 16
    prompts of mixed lengths, with decode steps actually replayed from graphs."""
    assert _first_differences(runs("compile_graphs").outputs["mixed"], runs("eager").outputs["mixed"]) == {}
    assert len(runs("eager").outputs["mixed"]) == len(PROMPT_LENS)


def test_graphs_of_the_eager_forward_match_eager_bf16(runs):
    """compile=False with graphs (the eager forward captured per bucket) gives exactly eager's greedy tokens."""
    assert _first_differences(runs("eager_forward_graphs").outputs["mixed"], runs("eager").outputs["mixed"]) == {}


def test_compile_and_capture_counters_bf16(runs, device):
    """One compiled forward and one graph per bucket at start-up, none while serving (graphs replayed); the eager
    forward with graphs captures the same buckets without compiling; enforce_eager does neither."""
    graphs = len(GRAPH_SIZES) if device == "cuda" else 0
    assert_compiled_once_and_captured(runs("compile_graphs"), compiled=device == "cuda", num_graphs=graphs)
    assert_compiled_once_and_captured(runs("eager_forward_graphs"), compiled=False, num_graphs=graphs)
    assert_compiled_once_and_captured(runs("eager"), compiled=False, num_graphs=0)


def test_async_scheduling_matches_sync_with_stops(runs):
    """Async scheduling on (the default) vs off, compile + graphs both, fp32: identical tokens, finish and stop
    reasons for requests that stop on stop ids at different steps (each stop discards one in-flight token)."""
    on, off = summary(runs("async_fp32").outputs["stops"]), summary(runs("sync_fp32").outputs["stops"])
    assert on == off
    stopped = [tokens for tokens, reason, _ in on if reason == "stop"]
    assert len(stopped) >= len(PROMPT_LENS) // 2, "too few requests ended on their stop id to test anything"
    assert len({len(t) for t in stopped}) >= 4, "the stops should end requests at different steps"

