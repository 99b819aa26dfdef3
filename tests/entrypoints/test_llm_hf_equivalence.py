"""graphserve vs transformers on tiny random models: greedy tokens identical, logprobs within 1e-4."""
import pytest
import torch

from graphserve import LLM, SamplingParams

ARCHS = ["llama", "llama3_rope", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe",
         "granite", "phi3", "starcoder2", "olmo2", "gemma", "gpt_neox", "gpt_neox_seq", "falcon", "falcon_new",
         "gemma3", "gemma2"]
SOFT_CAPPED = {"gemma2"}  # attention-logit soft-capping: PAGED_ATTN only
ATTENTION_BACKENDS = ["PAGED_ATTN", "TORCH_SDPA"]  # every backend must match transformers
PROMPT_LENS = [3, 15, 17, 40]  # around block boundaries (block_size 16); 40 > mistral's window of 12
NEW_TOKENS = 32
EOS_ID = 1  # the tiny checkpoints' eos_token_id


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(4, 512, (n,), generator=g).tolist() for n in PROMPT_LENS]


@torch.no_grad()
def hf_greedy(hf_model, prompt: list[int]):
    """transformers' generate, greedy; EOS masked for the whole run (our side: min_tokens)."""
    out = hf_model.generate(
        torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0,
    )
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = torch.stack([lg[0].float().log_softmax(-1) for lg in out.logits])  # raw logits per step
    return tokens, logprobs


@pytest.fixture(scope="module", params=[(a, b) for b in ATTENTION_BACKENDS for a in ARCHS
                                        if not (a in SOFT_CAPPED and b == "TORCH_SDPA")], ids="-".join)
def arch_setup(request, tiny_model):
    arch, attention_backend = request.param
    path, hf_model = tiny_model(arch)
    llm = LLM(path, dtype="float32", max_num_batched_tokens=64, max_num_seqs=8, attention_backend=attention_backend)
    refs = [hf_greedy(hf_model, p) for p in _prompts()]
    return llm, refs


PARAMS = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=3)


def _check(outputs, refs):
    for out, (ref_tokens, ref_logprobs) in zip(outputs, refs):
        comp = out.outputs[0]
        assert comp.token_ids == ref_tokens
        assert comp.finish_reason == "length"
        for step, (tok, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
            # Logprobs are the raw model's: EOS, masked by min_tokens (as in transformers' generate), may rank above.
            assert all(t == EOS_ID for t, lp in entry.items() if lp.rank < entry[tok].rank)
            for token_id, lp in entry.items():
                assert abs(lp.logprob - ref_logprobs[step, token_id].item()) < 1e-4


def test_batch_matches_transformers(arch_setup):
    llm, refs = arch_setup
    outputs = llm.generate(prompt_token_ids=_prompts(), sampling_params=PARAMS, use_tqdm=False)
    _check(outputs, refs)


def test_one_by_one_matches_transformers(arch_setup):
    llm, refs = arch_setup
    for prompt, ref in zip(_prompts(), refs):
        _check(llm.generate({"prompt_token_ids": prompt}, PARAMS, use_tqdm=False), [ref])


def test_soft_capped_model_refuses_the_sdpa_backend(tiny_model):
    path, _ = tiny_model("gemma2")
    with pytest.raises(ValueError, match="cannot soft-cap attention logits.*PAGED_ATTN"):
        LLM(path, dtype="float32", attention_backend="TORCH_SDPA")
