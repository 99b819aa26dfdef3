"""The real default model (SmolLM2-135M-Instruct, GGUF from PyPI) through the whole engine."""
import contextlib
import io

import pytest
import torch

from graphserve import LLM, SamplingParams

pytestmark = pytest.mark.slow
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32")


@pytest.fixture(scope="module")
def hf_model(llm):
    from transformers import AutoModelForCausalLM

    mc = llm.llm_engine.model_config
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return AutoModelForCausalLM.from_pretrained(mc.model, gguf_file=mc.gguf_file, dtype=torch.float32).eval()


def test_chat_answers_paris(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
                   SamplingParams(temperature=0.0, max_tokens=32), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"  # ended by <|im_end|>, the model's EOS


def test_greedy_tokens_match_transformers_gguf(llm, hf_model):
    tok = llm.get_tokenizer()
    chat = tok.apply_chat_template([{"role": "user", "content": "Name three colours."}], tokenize=False,
                                   add_generation_prompt=True)
    prompts = [tok(t, add_special_tokens=False).input_ids for t in ("The capital of France is", chat)]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                    do_sample=False, pad_token_id=0)
        assert out.outputs[0].token_ids == ref[0, len(prompt):].tolist()


def test_kept_quantized_gguf_answers_the_same(llm):
    """Its Q4_1 / Q8_0 blocks kept on the device (`quantization="gguf"`, the GPU default; the CPU dequantizes at
    load unless asked): the same greedy answer, a third of the weight bytes."""
    from graphserve.worker.memory_profiler import model_weight_bytes

    kept = LLM(dtype="float32", quantization="gguf")
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    params = SamplingParams(temperature=0.0, max_tokens=12)
    expected = llm.chat(messages, params, use_tqdm=False)[0].outputs[0]
    got = kept.chat(messages, params, use_tqdm=False)[0].outputs[0]
    assert "Paris" in got.text and got.token_ids == expected.token_ids

    def weight_bytes(engine):
        return model_weight_bytes(engine.llm_engine.engine_core.model_executor.model_runner.model)

    assert weight_bytes(kept) * 3 < weight_bytes(llm)
