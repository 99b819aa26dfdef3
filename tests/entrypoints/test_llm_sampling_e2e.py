"""Every SamplingParams field changes engine output as specified (end to end, tiny Llama, real BPE tokenizer)."""
import math

import pytest
import torch

from graphserve import LLM, SamplingParams

EOS = 1  # "</s>" in the test tokenizer and the tiny config
IM_START, IM_END = 2, 3


@pytest.fixture(scope="module")
def llm(tiny_model):
    path, _ = tiny_model("llama")
    return LLM(path, dtype="float32", max_num_batched_tokens=128)


@pytest.fixture(scope="module")
def hf(tiny_model):
    return tiny_model("llama")[1]


PROMPT = "The capital of France is"


def gen(llm, prompt=PROMPT, **kw):
    kw.setdefault("temperature", 0.0)
    return llm.generate(prompt, SamplingParams(**kw), use_tqdm=False)[0]


def force(seq):
    """A logits processor that makes the model emit `seq` (then anything)."""
    def proc(output_ids, logits):
        i = len(output_ids)
        if i < len(seq):
            logits[:] = -math.inf
            logits[seq[i]] = 0.0
        return logits
    return proc


def test_max_tokens_and_length_finish(llm):
    out = gen(llm, max_tokens=7, ignore_eos=True).outputs[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"


def test_max_tokens_none_fills_the_context(llm):
    prompt_len = len(llm.get_tokenizer()(PROMPT).input_ids)
    out = gen(llm, max_tokens=None, ignore_eos=True).outputs[0]
    assert len(out.token_ids) == 256 - prompt_len and out.finish_reason == "length"


def test_eos_stops_and_ignore_eos_continues(llm):
    stopped = gen(llm, max_tokens=10, logit_bias={EOS: 100.0}).outputs[0]
    assert stopped.token_ids == [EOS] and stopped.finish_reason == "stop" and stopped.stop_reason is None
    assert stopped.text == ""
    ignored = gen(llm, max_tokens=10, logit_bias={EOS: 100.0}, ignore_eos=True).outputs[0]
    assert ignored.token_ids == [EOS] * 10 and ignored.finish_reason == "length"


def test_min_tokens_delays_eos(llm):
    out = gen(llm, max_tokens=10, min_tokens=4, logit_bias={EOS: 100.0}).outputs[0]
    assert len(out.token_ids) == 5 and out.token_ids[-1] == EOS and EOS not in out.token_ids[:4]


def test_stop_token_ids(llm):
    base = gen(llm, max_tokens=12, ignore_eos=True).outputs[0]
    target = base.token_ids[5]
    first = base.token_ids.index(target)
    out = gen(llm, max_tokens=12, ignore_eos=True, stop_token_ids=[target]).outputs[0]
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == target


def test_stop_string_spanning_tokens(llm):
    base = gen(llm, max_tokens=24, ignore_eos=True).outputs[0]
    tok = llm.get_tokenizer()
    # A stop string made of the last char of one token's text and the first char of the next token's text.
    ends = [len(tok.decode(base.token_ids[:i])) for i in range(len(base.token_ids) + 1)]
    cut = next(e for i, e in enumerate(ends) if i >= 4 and e >= 2 and ends[i + 1] > e)
    stop = base.text[cut - 1 : cut + 1]
    idx = base.text.index(stop)
    out = gen(llm, max_tokens=24, ignore_eos=True, stop=[stop]).outputs[0]
    assert out.text == base.text[:idx] and out.finish_reason == "stop" and out.stop_reason == stop
    kept = gen(llm, max_tokens=24, ignore_eos=True, stop=[stop], include_stop_str_in_output=True).outputs[0]
    assert kept.text == base.text[: idx + len(stop)]
    # The request ended at the stop string: far fewer than 24 tokens.
    assert len(out.token_ids) < 24


def test_skip_special_tokens_and_spaces_between(llm):
    seq = [IM_START, IM_END, IM_START]
    kw = dict(max_tokens=3, logits_processors=[force(seq)])
    assert gen(llm, **kw).outputs[0].text == ""
    assert gen(llm, skip_special_tokens=False, **kw).outputs[0].text == "<|im_start|> <|im_end|> <|im_start|>"
    assert (gen(llm, skip_special_tokens=False, spaces_between_special_tokens=False, **kw).outputs[0].text
            == "<|im_start|><|im_end|><|im_start|>")


def test_logits_processors_receive_prompt_and_output(llm):
    seen = []

    def proc(prompt_ids, output_ids, logits):
        seen.append((list(prompt_ids), list(output_ids)))
        return logits

    out = gen(llm, max_tokens=4, ignore_eos=True, logits_processors=[proc]).outputs[0]
    prompt_ids = llm.get_tokenizer()(PROMPT).input_ids
    assert seen == [(prompt_ids, out.token_ids[:i]) for i in range(4)]


def test_logprobs_shape_and_values(llm, hf):
    out = gen(llm, max_tokens=5, ignore_eos=True, logprobs=4)
    comp = out.outputs[0]
    ids = out.prompt_token_ids + comp.token_ids
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    p = len(out.prompt_token_ids)
    for step, entry in enumerate(comp.logprobs):
        assert len(entry) in (4, 5) and comp.token_ids[step] in entry
        top4 = ref[p - 1 + step].topk(4).indices.tolist()
        assert set(top4) <= set(entry)
        for tok, lp in entry.items():
            assert abs(lp.logprob - ref[p - 1 + step, tok].item()) < 1e-4
            assert lp.decoded_token is not None
    assert math.isclose(comp.cumulative_logprob, sum(e[t].logprob for e, t in zip(comp.logprobs, comp.token_ids)),
                        abs_tol=1e-4)


@pytest.mark.parametrize("chunk", [128, 4])
def test_prompt_logprobs_match_transformers(tiny_model, hf, chunk):
    llm = LLM(tiny_model("llama")[0], dtype="float32", max_num_batched_tokens=chunk, max_num_seqs=4)
    prompt = list(range(10, 30))
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, prompt_logprobs=2),
                       use_tqdm=False)[0]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].log_softmax(-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        entry = out.prompt_logprobs[i]
        assert prompt[i] in entry
        for tok, lp in entry.items():
            assert abs(lp.logprob - ref[i - 1, tok].item()) < 1e-4


def test_temperature_top_k_top_p_min_p(llm):
    greedy = gen(llm, max_tokens=16, ignore_eos=True).outputs[0].token_ids
    # Truncations that leave only the top token are greedy whatever the temperature and seed.
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):
        assert gen(llm, temperature=1.5, seed=5, max_tokens=16, ignore_eos=True, **kw).outputs[0].token_ids == greedy
    hot = gen(llm, temperature=1.5, seed=5, max_tokens=16, ignore_eos=True).outputs[0].token_ids
    assert hot != greedy
    cold = gen(llm, temperature=1e-3, seed=5, max_tokens=16, ignore_eos=True).outputs[0].token_ids
    assert cold == greedy


def test_penalties_change_greedy_output(llm):
    base = gen(llm, max_tokens=24, ignore_eos=True).outputs[0].token_ids
    for kw in (dict(repetition_penalty=1.8), dict(presence_penalty=2.0), dict(frequency_penalty=2.0)):
        out = gen(llm, max_tokens=24, ignore_eos=True, **kw).outputs[0].token_ids
        assert out != base, kw
        # Penalised runs repeat tokens less.
        assert len(set(out)) >= len(set(base)), kw


def test_n_and_best_of(llm):
    many = gen(llm, temperature=1.0, seed=11, n=3, max_tokens=8, ignore_eos=True, logprobs=0)
    assert [c.index for c in many.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in many.outputs}) == 3
    best = gen(llm, temperature=1.0, seed=11, n=1, best_of=3, max_tokens=8, ignore_eos=True).outputs
    assert len(best) == 1
    top = max(many.outputs, key=lambda c: c.cumulative_logprob)
    assert best[0].token_ids == top.token_ids and best[0].index == 0


def test_seed_reproducible(llm):
    a = gen(llm, temperature=1.0, seed=3, max_tokens=12, ignore_eos=True).outputs[0].token_ids
    b = gen(llm, temperature=1.0, seed=3, max_tokens=12, ignore_eos=True).outputs[0].token_ids
    assert a == b


def test_per_prompt_sampling_params_and_order(llm):
    outs = llm.generate([PROMPT, "Paged KV cache"], [SamplingParams(max_tokens=3, ignore_eos=True),
                                                     SamplingParams(max_tokens=5, ignore_eos=True)], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 5]
    assert outs[0].prompt == PROMPT


def test_chat_uses_template(llm):
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=2), use_tqdm=False)[0]
    tok = llm.get_tokenizer()
    expected = tok("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
    assert out.prompt_token_ids == expected


def test_bad_inputs_raise_value_error_naming_the_field(llm):
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="maximum context length"):
        gen(llm, prompt="word " * 300)
    with pytest.raises(ValueError, match="role"):
        llm.chat([{"role": "wizard", "content": "hi"}], use_tqdm=False)
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate([PROMPT, PROMPT], [SamplingParams()], use_tqdm=False)
    # The engine is still healthy and holds nothing.
    assert gen(llm, max_tokens=2, ignore_eos=True).outputs[0].finish_reason == "length"
    assert not llm.llm_engine.has_unfinished_requests()
