"""Quantized checkpoints end to end: written from the format spec (quant_testutils), served by graphserve, and
compared token for token with transformers running the same model with its weights dequantized in fp32."""
from __future__ import annotations

import pytest
import torch

from graphserve import LLM, SamplingParams
from tests.quantization.quant_testutils import reference_model, write_quantized_checkpoint

NEW_TOKENS = 16
PROMPT_LENS = [3, 17, 40]
CASES = {
    "awq-g32": ("awq", {"group_size": 32}),
    "awq-per-channel-legacy-file": ("awq", {"group_size": -1, "legacy_config_file": True}),
    "gptq4-g32-sym": ("gptq", {"bits": 4, "group_size": 32}),
    "gptq4-g32-asym-act-order": ("gptq", {"bits": 4, "group_size": 32, "sym": False, "desc_act": True}),
    "gptq2-g64": ("gptq", {"bits": 2, "group_size": 64}),
    "gptq3-g32-act-order": ("gptq", {"bits": 3, "group_size": 32, "desc_act": True}),
    "gptq8-per-channel-v2": ("gptq", {"bits": 8, "group_size": -1, "checkpoint_format": "gptq_v2"}),
    "gptq4-legacy-file": ("gptq", {"bits": 4, "group_size": 64, "legacy_config_file": True}),
    # act-order with one group per column: the qzeros-shape case TGI got wrong (TGI #1302)
    "gptq4-per-channel-act-order": ("gptq", {"bits": 4, "group_size": -1, "desc_act": True}),
    "squeezellm": ("squeezellm", {}),
}


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(4, 512, (n,), generator=g).tolist() for n in PROMPT_LENS]


@torch.no_grad()
def _hf_greedy(model, prompt: list[int]) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                         do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("case", list(CASES))
def test_quantized_model_matches_transformers_on_dequantized_weights(tiny_model, tmp_path, arch, case):
    """The greedy tokens of the quantized checkpoint are those of transformers running the dequantized weights."""
    method, options = CASES[case]
    src, hf_model = tiny_model(arch)
    dequantized = write_quantized_checkpoint(src, str(tmp_path), method, **options)
    reference = reference_model(hf_model, dequantized)
    llm = LLM(str(tmp_path), dtype="float32", max_num_batched_tokens=32)
    assert llm.llm_engine.model_config.quantization == method
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    outputs = llm.generate(prompt_token_ids=_prompts(), sampling_params=params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [_hf_greedy(reference, p) for p in _prompts()]
