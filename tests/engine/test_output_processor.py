"""OutputProcessor: output kinds, stop strings, n/best_of gathering, logprobs, prompt logprobs, aborts."""
from __future__ import annotations

import pytest

from graphserve.core.scheduler_output import EngineCoreOutput, LogprobsLists
from graphserve.engine.output_processor import OutputProcessor
from graphserve.sampling_params import RequestOutputKind, SamplingParams

PROMPT = "The prompt"


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def add(processor, tokenizer, params, request_id="r", child_ids=None, arrival_time=0.0):
    prompt_ids = tokenizer(PROMPT).input_ids
    if child_ids is None:
        child_ids = [request_id] if params.best_of == 1 else [f"{i}_{request_id}" for i in range(params.best_of)]
    processor.add_request(request_id, PROMPT, prompt_ids, params, child_ids, arrival_time)
    return prompt_ids


def run_tokens(processor, req_id, token_ids, last_finish="length", logprob=-0.5):
    """Feed one token per step; return per step (request outputs, stopped child ids)."""
    steps = []
    for i, token_id in enumerate(token_ids):
        finish = last_finish if i == len(token_ids) - 1 else None
        out = EngineCoreOutput(req_id, [token_id], [logprob], finish_reason=finish)
        steps.append(processor.process_outputs([out]))
    return steps


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens_ends_the_sequence(tokenizer, include):
    processor = OutputProcessor(tokenizer)
    add(processor, tokenizer, SamplingParams(stop=["brown fox"], include_stop_str_in_output=include))
    token_ids = ids_of(tokenizer, "the quick brown fox jumps")
    steps = run_tokens(processor, "r", token_ids)
    stopped_at = [i for i, (_, stopped) in enumerate(steps) if stopped]
    assert len(stopped_at) == 1 and steps[stopped_at[0]][1] == ["r"]
    assert tokenizer.decode(token_ids[: stopped_at[0] + 1]).endswith("fox")  # fired on the token completing it
    final = steps[stopped_at[0]][0][0]
    assert final.finished and not processor.has_unfinished_requests()
    completion = final.outputs[0]
    assert completion.text == ("the quick brown fox" if include else "the quick ")
    assert (completion.finish_reason, completion.stop_reason) == ("stop", "brown fox")
    assert completion.token_ids == token_ids[: stopped_at[0] + 1]
    assert all(not s[0] for s in steps[stopped_at[0] + 1:])  # late outputs for the stopped child are ignored


def test_streamed_text_never_shows_a_partial_stop_string(tokenizer):
    processor = OutputProcessor(tokenizer)
    add(processor, tokenizer, SamplingParams(stop=["STOP!"], output_kind=RequestOutputKind.DELTA))
    token_ids = ids_of(tokenizer, "ab STX cd STOP! more text")
    shown = ""
    for outputs, _ in run_tokens(processor, "r", token_ids):
        for request_output in outputs:
            shown += request_output.outputs[0].text
            assert "ab STX cd ".startswith(shown)  # nothing shown is ever taken back
    assert shown == "ab STX cd "


@pytest.mark.parametrize("kind", list(RequestOutputKind))
def test_output_kinds(tokenizer, kind):
    processor = OutputProcessor(tokenizer)
    add(processor, tokenizer, SamplingParams(output_kind=kind, max_tokens=50))
    text = "héllo 中文 world"
    token_ids = ids_of(tokenizer, text)
    outputs = [o for step, _ in run_tokens(processor, "r", token_ids) for o in step]
    completions = [o.outputs[0] for o in outputs]
    assert outputs[-1].finished and all(not o.finished for o in outputs[:-1])
    assert completions[-1].finish_reason == "length"
    if kind == RequestOutputKind.FINAL_ONLY:
        assert len(outputs) == 1 and completions[0].text == text and completions[0].token_ids == token_ids
    elif kind == RequestOutputKind.CUMULATIVE:
        assert len(outputs) == len(token_ids)
        assert [c.token_ids for c in completions] == [token_ids[: i + 1] for i in range(len(token_ids))]
        assert all(text.startswith(c.text) for c in completions) and completions[-1].text == text
    else:
        assert len(outputs) == len(token_ids)
        assert all(len(c.token_ids) == 1 for c in completions)
        assert "".join(c.text for c in completions) == text
        assert [t for c in completions for t in c.token_ids] == token_ids
    assert completions[-1].cumulative_logprob == pytest.approx(-0.5 * len(token_ids))


def test_n_children_are_gathered_in_index_order(tokenizer):
    processor = OutputProcessor(tokenizer)
    add(processor, tokenizer, SamplingParams(n=2, temperature=0.8))
    a, b = ids_of(tokenizer, "Hello"), ids_of(tokenizer, "world")
    outputs, _ = processor.process_outputs(
        [EngineCoreOutput("1_r", b[:1], [-1.0]), EngineCoreOutput("0_r", a, [-0.1] * len(a), finish_reason="abort")]
    )
    assert len(outputs) == 1 and not outputs[0].finished  # one RequestOutput per request per step
    assert [c.index for c in outputs[0].outputs] == [0, 1]
    assert outputs[0].outputs[0].text == "Hello" and outputs[0].outputs[0].finished()
    assert processor.get_num_unfinished_requests() == 1
    last = EngineCoreOutput("1_r", b[1:], [-1.0] * (len(b) - 1), finish_reason="length")
    outputs, _ = processor.process_outputs([last])
    assert outputs[0].finished and [c.text for c in outputs[0].outputs] == ["Hello", "world"]
    assert [c.finish_reason for c in outputs[0].outputs] == ["abort", "length"]
    assert not processor.has_unfinished_requests()


def test_delta_with_n_children_only_carries_changed_children(tokenizer):
    processor = OutputProcessor(tokenizer)
    add(processor, tokenizer, SamplingParams(n=2, temperature=0.8, output_kind=RequestOutputKind.DELTA))
    a = ids_of(tokenizer, "Hello world")
    outputs, _ = processor.process_outputs([EngineCoreOutput("1_r", a[:2], [-1.0, -1.0])])
    assert [c.index for c in outputs[0].outputs] == [1]
    outputs, _ = processor.process_outputs([
        EngineCoreOutput("0_r", a, [-1.0] * len(a), finish_reason="length"),
        EngineCoreOutput("1_r", a[2:], [-1.0] * (len(a) - 2), finish_reason="length"),
    ])
    assert [(c.index, c.text) for c in outputs[0].outputs] == [(0, "Hello world"), (1, tokenizer.decode(a[2:]))]
    assert outputs[0].finished


@pytest.mark.parametrize("kind", [RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA])
def test_best_of_keeps_the_n_most_likely_and_renumbers(tokenizer, kind):
    processor = OutputProcessor(tokenizer)
    add(processor, tokenizer, SamplingParams(n=2, best_of=3, temperature=1.0, output_kind=kind))
    texts = {"0_r": ("zero", -5.0), "1_r": ("one", -1.0), "2_r": ("two", -3.0)}
    for child_id, (text, logprob) in texts.items():
        token_ids = ids_of(tokenizer, text)
        outputs, _ = processor.process_outputs(
            [EngineCoreOutput(child_id, token_ids, [logprob / len(token_ids)] * len(token_ids), finish_reason="length")]
        )
        assert len(outputs) == (1 if child_id == "2_r" else 0)  # nothing before every child finished
    completions = outputs[0].outputs
    assert [(c.index, c.text) for c in completions] == [(0, "one"), (1, "two")]
    assert [c.cumulative_logprob for c in completions] == pytest.approx([-1.0, -3.0])


def _logprobs_lists(token_ids, base=-1.0, k=3):
    """Rows with the chosen token first, then k alternatives (ids 10.. are arbitrary other tokens)."""
    rows = [[t] + [10 + j for j in range(k)] for t in token_ids]
    logprobs = [[base] + [base - 1 - j for j in range(k)] for _ in token_ids]
    return LogprobsLists(rows, logprobs, [7] * len(token_ids))


def test_prompt_logprobs_chunks_and_resend_after_preemption(tokenizer):
    processor = OutputProcessor(tokenizer)
    prompt_ids = add(processor, tokenizer, SamplingParams(prompt_logprobs=1))
    num = len(prompt_ids)
    chunk1 = (1, _logprobs_lists(prompt_ids[1:3], base=-9.0))
    chunk2 = (3, _logprobs_lists(prompt_ids[3:], base=-9.0))
    resend = (1, _logprobs_lists(prompt_ids[1:], base=-2.0))  # recomputed from the start after preemption
    for chunk in (chunk1, chunk2, resend):
        outputs, _ = processor.process_outputs([EngineCoreOutput("r", [], new_prompt_logprobs=chunk)])
        assert outputs == []  # prompt chunks alone deliver nothing
    token = ids_of(tokenizer, "x")
    outputs, _ = processor.process_outputs([EngineCoreOutput("r", token, [-0.3], finish_reason="length")])
    prompt_logprobs = outputs[0].prompt_logprobs
    assert len(prompt_logprobs) == num and prompt_logprobs[0] is None
    for position in range(1, num):
        entry = prompt_logprobs[position]
        assert list(entry) == [prompt_ids[position], 10]  # chosen + top-1 (rows carry 3, 1 was asked)
        assert entry[prompt_ids[position]].logprob == -2.0 and entry[prompt_ids[position]].rank == 7
        assert entry[10].rank == 1 and entry[10].decoded_token == tokenizer.decode([10])


def test_prompt_logprobs_row_for_the_wrong_token_is_rejected(tokenizer):
    processor = OutputProcessor(tokenizer)
    prompt_ids = add(processor, tokenizer, SamplingParams(prompt_logprobs=0))
    wrong = (1, _logprobs_lists([prompt_ids[1] + 1]))
    with pytest.raises(RuntimeError, match="prompt position 1"):
        processor.process_outputs([EngineCoreOutput("r", [], new_prompt_logprobs=wrong)])
    with pytest.raises(RuntimeError, match="prompt position 0"):
        processor.process_outputs([EngineCoreOutput("r", [], new_prompt_logprobs=(0, _logprobs_lists(prompt_ids[:1])))])


def test_delta_sends_prompt_logprobs_once(tokenizer):
    processor = OutputProcessor(tokenizer)
    prompt_ids = add(processor, tokenizer, SamplingParams(prompt_logprobs=0, output_kind=RequestOutputKind.DELTA))
    processor.process_outputs([EngineCoreOutput("r", [], new_prompt_logprobs=(1, _logprobs_lists(prompt_ids[1:])))])
    steps = run_tokens(processor, "r", ids_of(tokenizer, "Hello world"))
    prompt_logprobs = [step[0][0].prompt_logprobs for step in steps]
    assert len(prompt_logprobs[0]) == len(prompt_ids) and all(p is None for p in prompt_logprobs[1:])


def test_sample_logprobs_and_decoded_tokens(tokenizer):
    processor = OutputProcessor(tokenizer)
    add(processor, tokenizer, SamplingParams(logprobs=2, output_kind=RequestOutputKind.DELTA))
    token_ids = ids_of(tokenizer, "Hello")
    lists = _logprobs_lists(token_ids, base=-0.25, k=4)
    lists.token_ids[0][2] = token_ids[0]  # the chosen token also in the top-k: it keeps its own rank
    outputs, _ = processor.process_outputs([EngineCoreOutput("r", token_ids, [-0.25] * len(token_ids), lists)])
    logprobs = outputs[0].outputs[0].logprobs
    assert len(logprobs) == len(token_ids)
    assert list(logprobs[0]) == [token_ids[0], 10]
    assert logprobs[0][token_ids[0]].rank == 7
    assert list(logprobs[1]) == [token_ids[1], 10, 11]
    assert [lp.rank for lp in logprobs[1].values()] == [7, 1, 2]
    assert logprobs[1][token_ids[1]].decoded_token == tokenizer.decode([token_ids[1]])
    assert outputs[0].outputs[0].cumulative_logprob == pytest.approx(-0.25 * len(token_ids))


@pytest.mark.parametrize("include", [False, True])
def test_eos_text_is_hidden_unless_included(tokenizer, include):
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(
        skip_special_tokens=False, spaces_between_special_tokens=False, include_stop_str_in_output=include
    )
    add(processor, tokenizer, params)
    token_ids = ids_of(tokenizer, "Paris.") + [tokenizer.eos_token_id]
    outputs, stopped = processor.process_outputs(
        [EngineCoreOutput("r", token_ids, [0.0] * len(token_ids), finish_reason="stop")]
    )
    completion = outputs[0].outputs[0]
    assert completion.text == ("Paris.<|im_end|>" if include else "Paris.")
    assert completion.token_ids == token_ids and completion.stop_reason is None and stopped == []


def test_min_tokens_delays_stop_strings(tokenizer):
    processor = OutputProcessor(tokenizer)
    token_ids = tokenizer.convert_tokens_to_ids(list("abĠabĠab"))  # one token per character ("Ġ" is a space)
    add(processor, tokenizer, SamplingParams(stop=["ab"], min_tokens=len(token_ids)))
    steps = run_tokens(processor, "r", token_ids, last_finish=None)
    assert [i for i, (_, stopped) in enumerate(steps) if stopped] == [len(token_ids) - 1]
    assert steps[-1][0][0].outputs[0].text == "ab ab "


def test_abort_returns_unfinished_children(tokenizer):
    processor = OutputProcessor(tokenizer)
    add(processor, tokenizer, SamplingParams(n=3, temperature=1.0))
    processor.process_outputs([EngineCoreOutput("1_r", ids_of(tokenizer, "x"), [0.0], finish_reason="length")])
    assert processor.abort_requests(["r", "unknown"]) == ["0_r", "2_r"]
    assert not processor.has_unfinished_requests() and processor.get_num_unfinished_requests() == 0
    assert processor.process_outputs([EngineCoreOutput("0_r", [5], [0.0])]) == ([], [])


def test_add_request_rejects_duplicates_and_wrong_child_counts(tokenizer):
    processor = OutputProcessor(tokenizer)
    add(processor, tokenizer, SamplingParams())
    with pytest.raises(ValueError, match="already"):
        add(processor, tokenizer, SamplingParams())
    with pytest.raises(ValueError, match="best_of=2"):
        add(processor, tokenizer, SamplingParams(n=2), request_id="q", child_ids=["q"])


@pytest.mark.parametrize("log_stats", [False, True])
def test_metrics_only_with_log_stats(tokenizer, log_stats):
    processor = OutputProcessor(tokenizer, log_stats=log_stats)
    add(processor, tokenizer, SamplingParams(), arrival_time=1.0)
    steps = run_tokens(processor, "r", ids_of(tokenizer, "Hello world"))
    metrics = [step[0][0].metrics for step in steps]
    if not log_stats:
        assert all(m is None for m in metrics)
        return
    first, last = metrics[0], metrics[-1]
    assert first is last  # one RequestMetrics per request, updated in place
    assert last.arrival_time == 1.0 < last.first_token_time <= last.last_token_time <= last.finished_time
