"""Tiny random Llama / Mistral / Qwen2 / Qwen3 in fp32 on the GPU: graphserve against transformers on the same device.

Each architecture is served three times: with the GPU defaults (torch.compile + decode CUDA graphs + async
scheduling), with enforce_eager, and with the TORCH_SDPA attention backend (compiled, no graphs). One engine is
alive at a time; its start-up and serving counters are recorded in the fixture and asserted by the tests.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from gpu_testutils import (
    EngineRun,
    assert_compiled_once_and_captured,
    counting_compiles,
    generate,
    random_prompts,
    release_device_memory,
    serving_engine,
)

from graphserve import LLM, SamplingParams

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe",
         "granite", "phi3", "starcoder2", "olmo2", "gemma", "gpt_neox", "falcon", "falcon_new",
         "gemma3", "gemma2"]
# The second attention backend runs compiled on the GPU too, without graphs (it loops on the host).
MODES = {"compile_graphs": {}, "enforce_eager": {"enforce_eager": True},
         "torch_sdpa": {"attention_backend": "TORCH_SDPA"}}
# Around block boundaries (block_size 16), past Mistral's window of 12; 175 tokens > the 128-token budget, so the
# first steps mix prefill chunks with decodes, then 5 decodes pad to the graph of 8.
PROMPT_LENS = [3, 15, 17, 40, 100]
NEW_TOKENS = 32
GRAPH_SIZES = [1, 2, 4, 8]
ENGINE = {"dtype": "float32", "max_num_seqs": 8, "max_num_batched_tokens": 128, "cuda_graph_sizes": GRAPH_SIZES}
# EOS masked for the whole run on both sides (transformers: min_new_tokens), so every sequence is NEW_TOKENS long.
PARAMS = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=3)
LOGPROB_ATOL = 1e-4


@torch.no_grad()
def hf_greedy(model, prompt: list[int], device: str) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy generate: the tokens and the log-softmax of its raw logits at each step."""
    out = model.generate(torch.tensor([prompt], device=device), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                         do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    logprobs = torch.stack([step[0].float().log_softmax(-1) for step in out.logits]).cpu()
    return out.sequences[0, len(prompt):].tolist(), logprobs


@dataclass
class Served:
    """One architecture in one mode: its transformers references and what the engine did."""

    arch: str
    mode: str
    run: EngineRun  # run.llm: the engine, alive for the tests of this (arch, mode)
    refs: list[tuple[list[int], torch.Tensor]]


@pytest.fixture(scope="module")
def hf_references(tiny_model, device):
    """arch -> transformers' greedy references, computed once per architecture on the test device."""
    cache: dict[str, list] = {}

    def get(arch: str) -> list[tuple[list[int], torch.Tensor]]:
        if arch not in cache:
            model = copy.deepcopy(tiny_model(arch)[1]).to(device)  # the session's CPU model stays as it is
            cache[arch] = [hf_greedy(model, p, device) for p in random_prompts(PROMPT_LENS, 512, seed=0)]
            del model
            release_device_memory()
        return cache[arch]

    return get


@pytest.fixture(scope="module", params=[pytest.param((a, m), id=f"{a}-{m}") for a in ARCHS for m in MODES
                                        if not (a == "gemma2" and m == "torch_sdpa")])  # soft-cap: PAGED only
def served(request, tiny_model, hf_references, device):
    """The prompts served as one batch, then one at a time, by an engine of this arch and mode (freed after
    the tests of this pair)."""
    arch, mode = request.param
    path = tiny_model(arch)[0]
    prompts = random_prompts(PROMPT_LENS, 512, seed=0)
    workloads = {"batch": (prompts, PARAMS)}
    workloads.update({f"single{i}": ([p], PARAMS) for i, p in enumerate(prompts)})
    with serving_engine(lambda: LLM(path, device=device, **ENGINE, **MODES[mode]), workloads) as run:
        yield Served(arch, mode, run, hf_references(arch))


def _assert_matches_transformers(outputs, refs) -> None:
    for i, (out, (ref_tokens, ref_logprobs)) in enumerate(zip(outputs, refs)):
        comp = out.outputs[0]
        assert comp.token_ids == ref_tokens, f"prompt {i}: first difference at step " + str(
            next((s for s, (a, b) in enumerate(zip(comp.token_ids, ref_tokens)) if a != b), None))
        assert comp.finish_reason == "length"
        for step, entry in enumerate(comp.logprobs):
            for token_id, lp in entry.items():
                assert abs(lp.logprob - ref_logprobs[step, token_id].item()) < LOGPROB_ATOL, (i, step, token_id)


def test_batch_greedy_matches_transformers(served: Served):
    """All prompts in one batch (chunked prefill mixed with decodes, graph padding): the greedy tokens are
    transformers' on the same GPU, and the top-3 logprobs agree within 1e-4."""
    _assert_matches_transformers(served.run.outputs["batch"], served.refs)


def test_single_prompts_greedy_match_transformers(served: Served):
    """Each prompt alone (decode batch 1, the smallest graph): the same tokens as transformers."""
    for i, ref in enumerate(served.refs):
        _assert_matches_transformers(served.run.outputs[f"single{i}"], [ref])


def test_compiled_once_and_no_recompile_or_capture_while_serving(served: Served, device):
    """Defaults on the GPU: one torch.compile of the forward and one graph per bucket at start-up; serving never
    recompiles or captures and replays graphs for decode steps. enforce_eager: no compile, no graph at all.
    TORCH_SDPA: compiled once, no graphs (the backend cannot be captured)."""
    compiled = served.mode != "enforce_eager" and device == "cuda"
    graphs = served.mode == "compile_graphs" and device == "cuda"
    assert_compiled_once_and_captured(served.run, compiled=compiled, num_graphs=len(GRAPH_SIZES) if graphs else 0)


def test_filters_that_keep_only_the_argmax_sample_it(served: Served):
    """Through the engine's sampler and the device kernels (penalties, then temperature + top-k / top-p / min-p):
    rows whose filter keeps only the most likely token produce the greedy tokens of the same penalized logits,
    in one batch with the greedy rows; this serving neither recompiles nor captures."""
    penalties = {"presence_penalty": 0.5, "frequency_penalty": 0.3, "repetition_penalty": 1.2}
    kinds = [{"temperature": 0.0}, {"temperature": 1.3, "top_k": 1}, {"temperature": 0.8, "top_p": 1e-7},
             {"temperature": 0.7, "min_p": 1.0}]
    prompts = random_prompts([7, 30], 512, seed=3)
    params = [SamplingParams(max_tokens=16, ignore_eos=True, **penalties, **kind)
              for kind in kinds for _ in prompts]
    with counting_compiles() as delta:
        outputs = generate(served.run.llm, prompts * len(kinds), params)
    tokens = [o.outputs[0].token_ids for o in outputs]
    n = len(prompts)
    for k in range(1, len(kinds)):
        assert tokens[k * n:(k + 1) * n] == tokens[:n], kinds[k]
    assert len(set(map(tuple, tokens[:n]))) == n  # the prompts gave different sequences: rows were not mixed up
    assert delta["num_graphs_compiled"] == 0 and delta["num_cudagraphs_captured"] == 0
