"""graphserve.outputs: vLLM field names, finished(), readable reprs."""
from __future__ import annotations

import dataclasses

from graphserve.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput


def test_field_names_match_vllm():
    names = lambda cls: [f.name for f in dataclasses.fields(cls)]  # noqa: E731
    assert names(Logprob) == ["logprob", "rank", "decoded_token"]
    assert names(CompletionOutput) == [
        "index", "text", "token_ids", "cumulative_logprob", "logprobs", "finish_reason", "stop_reason"
    ]
    assert names(RequestMetrics) == [
        "arrival_time", "last_token_time", "first_scheduled_time", "first_token_time", "time_in_queue",
        "finished_time",
    ]
    assert names(RequestOutput) == [
        "request_id", "prompt", "prompt_token_ids", "prompt_logprobs", "outputs", "finished", "metrics",
        "num_cached_tokens",
    ]


def test_completion_finished_and_repr():
    running = CompletionOutput(0, "Hel", [1, 2], -1.5, None)
    done = CompletionOutput(1, "Hello", [1, 2, 3], -2.0, [{3: Logprob(-0.5, 1, "lo")}], "stop", "\n\n")
    assert not running.finished() and done.finished()
    text = repr(done)
    assert "index=1" in text and "text='Hello'" in text and "finish_reason=stop" in text
    assert "stop_reason='\\n\\n'" in text and "logprobs=<1 positions>" in text


def test_request_output_repr_lists_its_completions():
    completion = CompletionOutput(0, "Paris.", [5, 6], -0.25, None, "length")
    output = RequestOutput("req-1", "Capital?", [1, 2], [None, {2: Logprob(-3.0)}], [completion], True,
                           RequestMetrics(arrival_time=1.0, last_token_time=2.0), num_cached_tokens=16)
    text = repr(output)
    assert text.startswith("RequestOutput(request_id='req-1', prompt='Capital?'")
    assert "prompt_logprobs=<2 positions>" in text and "text='Paris.'" in text and "num_cached_tokens=16" in text
    assert output.outputs[0].finished() and output.metrics.first_token_time is None
