"""InputProcessor: tokenization, every validation error, max_tokens resolution, fan-out, chat templates."""
from __future__ import annotations

import pytest

from graphserve.config import ModelConfig
from graphserve.engine.input_processor import InputProcessor
from graphserve.sampling_params import SamplingParams

MAX_MODEL_LEN = 64
EOS_IDS = (3, 1)


@pytest.fixture
def processor(tokenizer, tokenizer_dir) -> InputProcessor:
    config = ModelConfig(
        model=tokenizer_dir, architecture="LlamaForCausalLM", hf_config=None, dtype="float32",
        max_model_len=MAX_MODEL_LEN, vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=16, tokenizer=tokenizer_dir, eos_token_ids=EOS_IDS,
        bos_token_id=0,
    )
    return InputProcessor(config, tokenizer)


def test_text_prompt_is_tokenized_like_hf(processor, tokenizer):
    (request,) = processor.process_inputs("r", "Hello world", SamplingParams(max_tokens=4))
    assert request.prompt_token_ids == tokenizer("Hello world").input_ids
    assert request.prompt_token_ids[0] == tokenizer.bos_token_id  # plain prompts get BOS from the tokenizer
    (no_bos,) = processor.process_inputs("r", "Hello world", SamplingParams(max_tokens=4), add_special_tokens=False)
    assert no_bos.prompt_token_ids == request.prompt_token_ids[1:]
    assert request.request_id == "r" and request.max_tokens == 4 and request.eos_token_ids == EOS_IDS


def test_token_and_dict_prompts(processor, tokenizer):
    params = SamplingParams(max_tokens=2)
    assert processor.process_inputs("a", [5, 6, 7], params)[0].prompt_token_ids == [5, 6, 7]
    by_text = processor.process_inputs("b", {"prompt": "Hello"}, params)[0]
    assert by_text.prompt_token_ids == tokenizer("Hello").input_ids
    both = {"prompt": "shown text", "prompt_token_ids": [9, 10]}
    assert processor.process_inputs("c", both, params)[0].prompt_token_ids == [9, 10]
    assert InputProcessor.get_prompt_text(both) == "shown text"
    assert InputProcessor.get_prompt_text("Hi") == "Hi" and InputProcessor.get_prompt_text([1, 2]) is None


@pytest.mark.parametrize(
    "prompt, match",
    [
        ("", "must not be empty"),
        ([], "must not be empty"),
        ({"prompt_token_ids": []}, "must not be empty"),
        ([5, "6"], r"prompt_token_ids\[1\] must be an int"),
        ([5, True], r"prompt_token_ids\[1\] must be an int"),
        ([5, -1], "Token id -1 is out of vocabulary"),
        ([5, 10_000], "Token id 10000 is out of vocabulary"),
        ({"text": "hi"}, "needs 'prompt' or 'prompt_token_ids'"),
        ({"prompt": "hi", "extra": 1}, "needs 'prompt' or 'prompt_token_ids'"),
        (3.5, "prompt must be a str"),
    ],
)
def test_invalid_prompts(processor, prompt, match):
    with pytest.raises(ValueError, match=match):
        processor.process_inputs("r", prompt, SamplingParams(max_tokens=1))


def test_context_length_errors_use_vllm_messages(processor):
    prompt = list(range(5, 55))  # 50 tokens
    with pytest.raises(ValueError) as e:
        processor.process_inputs("r", prompt, SamplingParams(max_tokens=15))
    assert str(e.value) == (
        "This model's maximum context length is 64 tokens. However, you requested 65 tokens (50 in the messages, "
        "15 in the completion). Please reduce the length of the messages or completion."
    )
    assert processor.process_inputs("r", prompt, SamplingParams(max_tokens=14))[0].max_tokens == 14
    with pytest.raises(ValueError, match="you requested 65 tokens \\(64 in the messages, 1 in the completion\\)"):
        processor.process_inputs("r", list(range(64)), SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="However, your request has 64 input tokens"):
        processor.process_inputs("r", list(range(64)), SamplingParams(max_tokens=None))


def test_max_tokens_none_fills_the_context(processor):
    (request,) = processor.process_inputs("r", list(range(5, 55)), SamplingParams(max_tokens=None))
    assert request.max_tokens == MAX_MODEL_LEN - 50
    assert request.sampling_params.max_tokens is None


@pytest.mark.parametrize("field, value", [("logit_bias", {10_000: 1.0}), ("stop_token_ids", [10_000])])
def test_token_ids_in_params_must_be_in_vocab(processor, field, value):
    with pytest.raises(ValueError, match=f"{field} has token id 10000"):
        processor.process_inputs("r", [5, 6], SamplingParams(max_tokens=1, **{field: value}))


def test_single_child_keeps_the_request_id_and_gets_eos_stop_ids(processor):
    params = SamplingParams(max_tokens=3, seed=7)
    (request,) = processor.process_inputs("req", [5, 6], params)
    assert request.request_id == "req" and request.sampling_params.seed == 7
    assert request.sampling_params.all_stop_token_ids == set(EOS_IDS)
    assert request.sampling_params is not params and params.all_stop_token_ids == set()  # caller's object intact
    (ignoring,) = processor.process_inputs("req", [5, 6], SamplingParams(max_tokens=3, ignore_eos=True))
    assert ignoring.sampling_params.all_stop_token_ids == set()


def test_best_of_fans_out_children_with_distinct_seeds(processor):
    params = SamplingParams(n=2, best_of=3, temperature=0.7, seed=100, max_tokens=5)
    children = processor.process_inputs("req", [5, 6, 7], params, arrival_time=12.5)
    assert [c.request_id for c in children] == ["0_req", "1_req", "2_req"]
    assert [c.sampling_params.seed for c in children] == [100, 101, 102]
    assert all(c.sampling_params.n == 1 and c.sampling_params.best_of == 1 for c in children)
    assert all(c.arrival_time == 12.5 and c.max_tokens == 5 for c in children)
    assert len({id(c.sampling_params) for c in children}) == 3
    unseeded = processor.process_inputs("u", [5], SamplingParams(n=2, temperature=0.7, max_tokens=1))
    assert [c.request_id for c in unseeded] == ["0_u", "1_u"]
    assert [c.sampling_params.seed for c in unseeded] == [None, None]
    assert params.n == 2 and params.best_of == 3 and params.seed == 100


# -- chat --------------------------------------------------------------------------------------------------------------
def test_chat_template_renders_and_tokenizes_with_one_bos(processor, tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]},
    ]
    text = processor.apply_chat_template(messages)
    assert text == "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello\nworld<|im_end|>\n" \
                   "<|im_start|>assistant\n"
    assert not processor.apply_chat_template(messages, add_generation_prompt=False).endswith("assistant\n")
    (request,) = processor.process_inputs("r", text, SamplingParams(max_tokens=1), add_special_tokens=False)
    assert request.prompt_token_ids.count(tokenizer.bos_token_id) == 1
    assert isinstance(messages[1]["content"], list)  # the caller's messages are not modified


def test_explicit_chat_template_overrides(processor, tmp_path):
    messages = [{"role": "user", "content": "hi"}]
    assert processor.apply_chat_template(messages, chat_template="{{ messages[0].content }}!") == "hi!"
    path = tmp_path / "t.jinja"
    path.write_text("[{{ messages[0].role }}]")
    assert processor.apply_chat_template(messages, chat_template=str(path)) == "[user]"
    with pytest.raises(ValueError, match="neither an existing file nor a Jinja template"):
        processor.apply_chat_template(messages, chat_template="no/such/file.jinja")


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        (["hello"], r"messages\[0\] must be a dict"),
        ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], r"messages\[1\]\.role"),
        ([{"content": "a"}], r"messages\[0\]\.role"),
        ([{"role": "user", "content": 5}], r"messages\[0\]\.content must be a string"),
        ([{"role": "user", "content": None}], r"messages\[0\]\.content must be a string"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], r"messages\[0\]\.content\[0\]"),
    ],
)
def test_invalid_messages(processor, messages, match):
    with pytest.raises(ValueError, match=match):
        processor.apply_chat_template(messages)


def test_assistant_tool_call_turn_may_omit_content(processor):
    messages = [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]
    template = "{{ messages[0].tool_calls[0].id }}"
    assert processor.apply_chat_template(messages, chat_template=template) == "1"


def test_missing_template_and_template_errors(processor, tokenizer_dir):
    from graphserve.engine.tokenizer import get_tokenizer

    no_template = get_tokenizer(tokenizer_dir)
    no_template.chat_template = None
    bare = InputProcessor(processor.model_config, no_template)
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])
    raising = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ValueError, match="roles must alternate"):
        processor.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=raising)
