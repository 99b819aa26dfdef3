"""Multi-LoRA serving against transformers + peft: one batch mixing base requests and several adapters (different
ranks, target modules, rslora, per-module ranks) gives each request the tokens peft gives it alone."""
from __future__ import annotations

import pytest

from graphserve import LLM, LoRARequest, SamplingParams
from tests.lora.lora_testutils import reference_greedy, write_peft_adapter

NEW_TOKENS = 8
PROMPTS = [[5, 6, 7, 8], list(range(20, 41)), [100, 3, 77], list(range(300, 317)), [9, 9, 9, 9, 9, 9]]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def adapters(request, tiny_model, tmp_path_factory):
    """(checkpoint dir, base HF model, {name: (LoRARequest, PeftModel)}) for one architecture."""
    path, hf_model = tiny_model(request.param)
    root = tmp_path_factory.mktemp(f"adapters-{request.param}")
    specs = {
        "attn8": dict(r=8, target_modules=["q_proj", "v_proj"], lora_alpha=16, seed=1),
        "all16": dict(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"], lora_alpha=8, seed=2, use_rslora=True),
        "mlp_mixed": dict(r=8, target_modules=["gate_proj", "down_proj", "k_proj"], lora_alpha=32, seed=3,
                          rank_pattern={"down_proj": 4}),
    }
    made = {}
    for i, (name, spec) in enumerate(specs.items(), start=1):
        adapter_dir = str(root / name)
        made[name] = (LoRARequest(name, i, adapter_dir), write_peft_adapter(hf_model, adapter_dir, **spec))
    return path, hf_model, made


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def test_mixed_batch_matches_peft_per_request(adapters):
    path, hf_model, made = adapters
    names = [None, "attn8", "all16", "mlp_mixed", "attn8"]
    expected = [reference_greedy(hf_model if name is None else made[name][1], p, NEW_TOKENS)
                for name, p in zip(names, PROMPTS)]
    llm = LLM(path, dtype="float32", enable_lora=True, max_loras=3, max_lora_rank=16)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], _greedy(NEW_TOKENS), use_tqdm=False,
                           lora_request=[None if n is None else made[n][0] for n in names])
    assert [o.outputs[0].token_ids for o in outputs] == expected
    # The adapters change the output (the test would be void otherwise).
    assert expected[1] != reference_greedy(hf_model, PROMPTS[1], NEW_TOKENS)


def test_more_adapters_than_slots_queue_and_evict(adapters):
    """--max-loras 1 with three adapters in flight: requests wait for the slot, outputs unchanged."""
    path, hf_model, made = adapters
    names = ["attn8", "all16", "mlp_mixed", None, "all16"]
    expected = [reference_greedy(hf_model if name is None else made[name][1], p, NEW_TOKENS)
                for name, p in zip(names, PROMPTS)]
    llm = LLM(path, dtype="float32", enable_lora=True, max_loras=1, max_lora_rank=16, max_cpu_loras=2)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], _greedy(NEW_TOKENS), use_tqdm=False,
                           lora_request=[None if n is None else made[n][0] for n in names])
    assert [o.outputs[0].token_ids for o in outputs] == expected
