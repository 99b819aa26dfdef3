"""SamplingParams: vLLM defaults, normalisation, validation messages, clone and stop-id bookkeeping.

Fields whose effect lives outside the sampler (stop, stop_token_ids, include_stop_str_in_output, ignore_eos,
max_tokens, skip_special_tokens, spaces_between_special_tokens, n, best_of, prompt_logprobs, output_kind) are
validated here; their behaviour is checked end to end by the engine tests.
"""
import math

import pytest

from graphserve.sampling_params import RequestOutputKind, SamplingParams, SamplingType


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.best_of, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1, 1.0, 1.0, -1, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.seed is None and p.stop == [] and p.stop_token_ids == []
    assert not p.include_stop_str_in_output and not p.ignore_eos
    assert p.max_tokens == 16 and p.min_tokens == 0 and p.logprobs is None and p.prompt_logprobs is None
    assert p.skip_special_tokens and p.spaces_between_special_tokens
    assert p.logits_processors is None and p.logit_bias is None
    assert p.output_kind is RequestOutputKind.CUMULATIVE
    assert SamplingParams.MAX_LOGPROBS == 20
    assert p.all_stop_token_ids == set()


def test_sampling_type():
    assert SamplingParams(temperature=0.0).sampling_type is SamplingType.GREEDY
    assert SamplingParams(temperature=1e-6).sampling_type is SamplingType.GREEDY
    assert SamplingParams(temperature=0.5).sampling_type is SamplingType.RANDOM
    assert SamplingParams(temperature=0.5, seed=3).sampling_type is SamplingType.RANDOM_SEED
    assert SamplingParams(temperature=0.0, seed=3).sampling_type is SamplingType.GREEDY


def test_greedy_turns_truncation_off():
    p = SamplingParams(temperature=0.0, top_p=0.5, top_k=5, min_p=0.3)
    assert (p.top_p, p.top_k, p.min_p) == (1.0, -1, 0.0)
    # Random sampling keeps them.
    p = SamplingParams(temperature=0.7, top_p=0.5, top_k=5, min_p=0.3)
    assert (p.top_p, p.top_k, p.min_p) == (0.5, 5, 0.3)


def test_normalisation():
    assert SamplingParams(top_k=0).top_k == -1  # V1: 0 means off
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(7, 9)).stop_token_ids == [7, 9]
    assert SamplingParams(n=3).best_of == 3
    assert SamplingParams(n=2, best_of=4).best_of == 4
    assert SamplingParams(logit_bias={"5": 2, 7: -1.5}).logit_bias == {5: 2.0, 7: -1.5}
    assert SamplingParams(temperature=1).temperature == 1.0 and isinstance(SamplingParams(temperature=1).temperature,
                                                                            float)
    assert SamplingParams(max_tokens=None).max_tokens is None
    assert SamplingParams(min_tokens=4, max_tokens=4).min_tokens == 4


def test_boundary_values_are_accepted():
    SamplingParams(presence_penalty=-2, frequency_penalty=2, repetition_penalty=2.0, top_p=1.0, min_p=1.0,
                   logprobs=0, prompt_logprobs=20, logit_bias={0: -100, 1: 100}, seed=-5, top_k=1)


BAD_VALUES = [
    ("n", {"n": 0}),
    ("n", {"n": 1.0}),
    ("n", {"n": True}),
    ("best_of", {"n": 3, "best_of": 2}),
    ("best_of", {"best_of": 0}),
    ("best_of", {"best_of": 2, "temperature": 0.0}),
    ("n", {"n": 2, "temperature": 0.0}),
    ("presence_penalty", {"presence_penalty": 2.5}),
    ("presence_penalty", {"presence_penalty": "1"}),
    ("frequency_penalty", {"frequency_penalty": -2.01}),
    ("repetition_penalty", {"repetition_penalty": 0.0}),
    ("repetition_penalty", {"repetition_penalty": 2.5}),
    ("temperature", {"temperature": -1}),
    ("temperature", {"temperature": math.nan}),
    ("temperature", {"temperature": math.inf}),
    ("temperature", {"temperature": None}),
    ("top_p", {"top_p": 0.0}),
    ("top_p", {"top_p": 1.5}),
    ("top_k", {"top_k": -2}),
    ("top_k", {"top_k": 2.0}),
    ("min_p", {"min_p": -0.1}),
    ("min_p", {"min_p": 1.1}),
    ("seed", {"seed": 1.5}),
    ("seed", {"seed": "42"}),
    ("stop", {"stop": 5}),
    ("stop", {"stop": ["ok", 3]}),
    ("stop", {"stop": [""]}),
    ("stop_token_ids", {"stop_token_ids": [1, "2"]}),
    ("stop_token_ids", {"stop_token_ids": [-1]}),
    ("stop_token_ids", {"stop_token_ids": 5}),
    ("include_stop_str_in_output", {"include_stop_str_in_output": 1}),
    ("ignore_eos", {"ignore_eos": "yes"}),
    ("skip_special_tokens", {"skip_special_tokens": None}),
    ("spaces_between_special_tokens", {"spaces_between_special_tokens": 0}),
    ("max_tokens", {"max_tokens": 0}),
    ("max_tokens", {"max_tokens": 3.0}),
    ("min_tokens", {"min_tokens": -1}),
    ("min_tokens", {"min_tokens": 5, "max_tokens": 4}),
    ("logprobs", {"logprobs": -1}),
    ("logprobs", {"logprobs": 21}),
    ("logprobs", {"logprobs": 2.0}),
    ("prompt_logprobs", {"prompt_logprobs": 21}),
    ("logits_processors", {"logits_processors": [1]}),
    ("logits_processors", {"logits_processors": lambda ids, logits: logits}),
    ("logit_bias", {"logit_bias": [1, 2]}),
    ("logit_bias", {"logit_bias": {"abc": 1.0}}),
    ("logit_bias", {"logit_bias": {-3: 1.0}}),
    ("logit_bias", {"logit_bias": {1.5: 1.0}}),
    ("logit_bias", {"logit_bias": {3: 101}}),
    ("logit_bias", {"logit_bias": {3: "high"}}),
    ("logit_bias", {"logit_bias": {3: 1.0, "3": 2.0}}),
    ("output_kind", {"output_kind": "delta"}),
]


@pytest.mark.parametrize("field_name,kwargs", BAD_VALUES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_VALUES)])
def test_invalid_values_raise_naming_the_field(field_name, kwargs):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert str(info.value).startswith(field_name), str(info.value)


def test_error_message_is_readable():
    with pytest.raises(ValueError, match=r"^temperature must be non-negative, got -1.0.$"):
        SamplingParams(temperature=-1)


def test_all_stop_token_ids_for_min_tokens():
    p = SamplingParams(stop_token_ids=[5, 6])
    assert p.all_stop_token_ids == {5, 6}
    p.update_from_generation_config([2, 3])
    assert p.all_stop_token_ids == {2, 3, 5, 6}
    p.update_from_generation_config([2, 3])  # idempotent
    assert p.all_stop_token_ids == {2, 3, 5, 6}
    assert p.stop_token_ids == [5, 6]  # EOS is the scheduler's business, not added to stop_token_ids
    ignoring = SamplingParams(stop_token_ids=[5], ignore_eos=True)
    ignoring.update_from_generation_config([2])
    assert ignoring.all_stop_token_ids == {5}


def test_clone_is_deep_except_logits_processors():
    class Proc:
        def __call__(self, ids, logits):
            return logits

    proc = Proc()
    p = SamplingParams(stop=["x"], stop_token_ids=[1], logit_bias={3: 1.0}, logits_processors=[proc], seed=9)
    p.update_from_generation_config([2])
    c = p.clone()
    assert c == p and c is not p
    assert c.logits_processors[0] is proc
    c.stop.append("y")
    c.logit_bias[4] = 2.0
    c.all_stop_token_ids.add(99)
    assert p.stop == ["x"] and p.logit_bias == {3: 1.0} and p.all_stop_token_ids == {1, 2}
    assert c.all_stop_token_ids == {1, 2, 99}


def test_repr():
    text = repr(SamplingParams(temperature=0.5, stop="##", logits_processors=[lambda ids, x: x]))
    assert text.startswith("SamplingParams(n=1, best_of=1,")
    assert "temperature=0.5" in text and "stop=['##']" in text
    assert "logits_processors=<1 processors>" in text and "output_kind=CUMULATIVE" in text
    assert "all_stop_token_ids" not in text
