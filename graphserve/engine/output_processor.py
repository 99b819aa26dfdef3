"""From EngineCoreOutputs to RequestOutputs: detokenize, match stop strings, gather the children of a request.

A user request fans out into best_of child sequences (see InputProcessor). Each child is detokenized on its own;
the parent turns them into one RequestOutput per step in which any child produced tokens, shaped by the
request's output_kind:
- CUMULATIVE: all n completions with everything generated so far,
- DELTA: only the completions that changed, with only their new text, token ids and logprobs,
- FINAL_ONLY: one output when every child has finished.
With best_of > n the n best children (by cumulative logprob) are only known at the end, so such a request
behaves as FINAL_ONLY whatever its kind (vLLM's server does not stream it either); index 0 is the best.
While a request runs, the last (longest stop string - 1) characters are held back so that a stop string that
is still incomplete never reaches the user.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from transformers import PreTrainedTokenizerBase

from graphserve.core.scheduler_output import EngineCoreOutput, LogprobsLists
from graphserve.engine.detokenizer import IncrementalDetokenizer, StopChecker
from graphserve.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestMetrics, RequestOutput
from graphserve.sampling_params import RequestOutputKind, SamplingParams


class _SequenceState:
    """One child sequence: its text so far, token ids, logprobs, and what was already delivered."""

    def __init__(
        self, req_id: str, index: int, params: SamplingParams, tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: list[int],
    ) -> None:
        self.req_id = req_id
        self.index = index
        self.detokenizer = IncrementalDetokenizer(
            tokenizer, prompt_token_ids, params.skip_special_tokens, params.spaces_between_special_tokens
        )
        self.stop_checker = StopChecker(params.stop or [], params.include_stop_str_in_output)
        self.text = ""
        # A FINAL_ONLY sequence without stop strings needs its text only at the end: detokenize it once then.
        self.defer_text = params.output_kind == RequestOutputKind.FINAL_ONLY and not params.stop
        self.num_detokenized = 0  # token_ids[:this] went through the detokenizer
        self.token_ids: list[int] = []
        # None unless the engine returns sampled-token logprobs (logprobs requested, or best_of ranking).
        self.cumulative_logprob: float | None = None
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.updated = False  # got tokens (or finished) since the last delivered output
        self.num_sent_chars = 0  # DELTA: text, token ids and logprobs already delivered
        self.num_sent_tokens = 0

    @property
    def finished(self) -> bool:
        """True once the sequence has a finish reason."""
        return self.finish_reason is not None

    def completion(self, index: int, delta: bool) -> CompletionOutput:
        """This sequence as a CompletionOutput (only the undelivered part when delta)."""
        end = self.stop_checker.streamable_length(self.text, self.finished)
        start_char, start_token = (self.num_sent_chars, self.num_sent_tokens) if delta else (0, 0)
        text = self.text[start_char:end] if end > start_char else ""
        logprobs = None if self.logprobs is None else self.logprobs[start_token:]
        if delta:
            self.num_sent_chars = max(self.num_sent_chars, end)
            self.num_sent_tokens = len(self.token_ids)
        return CompletionOutput(
            index, text, self.token_ids[start_token:], self.cumulative_logprob, logprobs,
            self.finish_reason, self.stop_reason,
        )


def _ranking_key(child: _SequenceState) -> float:
    """best_of ranks children by cumulative logprob (always tracked for them: compute_cumulative_logprob)."""
    return child.cumulative_logprob if child.cumulative_logprob is not None else float("-inf")


class _RequestState:
    """One user request: its prompt, its children and the request-level bookkeeping."""

    def __init__(
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
        children: list[_SequenceState], metrics: RequestMetrics | None,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.n = params.n
        self.children = children
        self.num_unfinished = len(children)
        # Only known at the end when best_of > n: deliver once, whatever the kind.
        self.final_only = params.output_kind == RequestOutputKind.FINAL_ONLY or len(children) > params.n
        self.delta = params.output_kind == RequestOutputKind.DELTA
        self.prompt_logprobs: PromptLogprobs | None = (
            [None] * len(prompt_token_ids) if params.prompt_logprobs is not None else None
        )
        self.prompt_logprobs_sent = False
        self.metrics = metrics
        self.num_cached_tokens = 0

    @property
    def finished(self) -> bool:
        """True once every child sequence has finished."""
        return self.num_unfinished == 0

    def make_output(self) -> RequestOutput | None:
        """The RequestOutput to deliver after this step, or None when the kind says to wait."""
        finished = self.finished
        if self.final_only and not finished:
            return None
        if len(self.children) > self.n:
            ranked = sorted(self.children, key=_ranking_key, reverse=True)[: self.n]
            outputs = [child.completion(i, delta=False) for i, child in enumerate(ranked)]
        elif self.delta:
            outputs = [c.completion(c.index, delta=True) for c in self.children if c.updated]
        else:
            outputs = [c.completion(c.index, delta=False) for c in self.children]
        for child in self.children:
            child.updated = False
        prompt_logprobs = self.prompt_logprobs
        if self.delta and self.prompt_logprobs_sent:
            prompt_logprobs = None  # DELTA sends the prompt's logprobs once, with the first output
        self.prompt_logprobs_sent = True
        return RequestOutput(
            self.request_id, self.prompt, self.prompt_token_ids, prompt_logprobs, outputs, finished,
            self.metrics, self.num_cached_tokens,
        )


class OutputProcessor:
    """Turns each step's EngineCoreOutputs into the RequestOutputs to deliver, and finds stop strings."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, log_stats: bool = False) -> None:
        self.tokenizer = tokenizer
        self.log_stats = log_stats  # fill RequestOutput.metrics (None otherwise, as in vLLM V1)
        self.request_states: dict[str, _RequestState] = {}
        self._children: dict[str, tuple[_RequestState, _SequenceState]] = {}
        self._token_text: dict[int, str] = {}  # decoded_token of logprobs, by token id

    def add_request(
        self, request_id: str, prompt: str | None, prompt_token_ids: Sequence[int], params: SamplingParams,
        child_req_ids: Sequence[str], arrival_time: float,
    ) -> None:
        """Track a request whose children (InputProcessor.process_inputs) go to the scheduler."""
        if request_id in self.request_states:
            raise ValueError(f"request {request_id!r} is already being processed")
        if len(child_req_ids) != params.best_of:
            raise ValueError(f"expected best_of={params.best_of} child requests, got {len(child_req_ids)}")
        prompt_token_ids = list(prompt_token_ids)
        children = [
            _SequenceState(child_id, i, params, self.tokenizer, prompt_token_ids)
            for i, child_id in enumerate(child_req_ids)
        ]
        metrics = RequestMetrics(arrival_time, last_token_time=arrival_time) if self.log_stats else None
        state = _RequestState(request_id, prompt, prompt_token_ids, params, children, metrics)
        self.request_states[request_id] = state
        for child in children:
            self._children[child.req_id] = (state, child)

    def abort_requests(self, request_ids: Iterable[str]) -> list[str]:
        """Forget the given user requests; return their unfinished child ids for the scheduler to abort."""
        child_ids = []
        for request_id in request_ids:
            state = self.request_states.pop(request_id, None)
            if state is None:
                continue  # already finished (or never added): nothing to abort
            for child in state.children:
                del self._children[child.req_id]
                if not child.finished:
                    child_ids.append(child.req_id)
        return child_ids

    def has_unfinished_requests(self) -> bool:
        """True while some user request still waits for tokens."""
        return bool(self.request_states)

    def get_num_unfinished_requests(self) -> int:
        """Number of user requests (not children) still running."""
        return len(self.request_states)

    def process_outputs(
        self, engine_core_outputs: list[EngineCoreOutput]
    ) -> tuple[list[RequestOutput], list[str]]:
        """Apply one step's outputs; return (RequestOutputs to deliver, child ids stopped by a stop string).

        The caller must finish the returned children in the scheduler (FINISHED_STOPPED): the scheduler does not
        see text and would keep generating them.
        """
        touched: dict[str, _RequestState] = {}
        stopped_child_ids = []
        now = time.monotonic()
        for output in engine_core_outputs:
            entry = self._children.get(output.req_id)
            if entry is None:
                continue  # aborted, or finished by a stop string while this step was in flight
            state, child = entry
            if output.new_prompt_logprobs is not None and state.prompt_logprobs is not None:
                self._write_prompt_logprobs(state, *output.new_prompt_logprobs)
            if output.num_cached_tokens:
                state.num_cached_tokens = output.num_cached_tokens
            if child.finished or (not output.new_token_ids and not output.finished):
                continue  # a prompt chunk (or a re-sent one after preemption): nothing to deliver yet
            if self._update_sequence(state, child, output):
                stopped_child_ids.append(child.req_id)
            if child.finished:
                state.num_unfinished -= 1
            self._update_metrics(state, output, now)
            touched[state.request_id] = state
        request_outputs = []
        for state in touched.values():
            request_output = state.make_output()
            if state.finished:
                self._forget(state)
            if request_output is not None:
                request_outputs.append(request_output)
        return request_outputs, stopped_child_ids

    def _update_sequence(self, state: _RequestState, child: _SequenceState, output: EngineCoreOutput) -> bool:
        """Append one output to a child; return True when a stop string ended a child the scheduler still runs."""
        params = state.params
        new_token_ids = output.new_token_ids
        child.updated = True
        child.token_ids.extend(new_token_ids)
        if output.new_sampled_logprobs:
            child.cumulative_logprob = (child.cumulative_logprob or 0.0) + sum(output.new_sampled_logprobs)
        if child.logprobs is not None and output.new_logprobs is not None:
            child.logprobs.extend(self._sample_logprobs(output.new_logprobs, params.logprobs))
        if child.defer_text and not output.finished:
            return False
        detokenized_ids = child.token_ids[child.num_detokenized:]
        child.num_detokenized = len(child.token_ids)
        # EOS / stop token ids end the sequence without showing their text (vLLM V1), unless asked to.
        if output.finish_reason == "stop" and new_token_ids and not params.include_stop_str_in_output:
            detokenized_ids = detokenized_ids[:-1]
        delta = child.detokenizer.update(detokenized_ids)
        if output.finished:
            delta += child.detokenizer.flush()
        child.text += delta
        # Like EOS, stop strings cannot end a sequence before min_tokens tokens were generated.
        if delta and len(child.token_ids) >= params.min_tokens:
            match = child.stop_checker.check(child.text, len(delta))
            if match is not None:
                stop_str, text_len = match
                child.text = child.text[:text_len]
                child.finish_reason, child.stop_reason = "stop", stop_str
                return not output.finished
        if output.finished:
            child.finish_reason, child.stop_reason = output.finish_reason, output.stop_reason
        return False

    def _update_metrics(self, state: _RequestState, output: EngineCoreOutput, now: float) -> None:
        metrics = state.metrics
        if metrics is None:
            return
        if output.new_token_ids:
            if metrics.first_token_time is None:
                metrics.first_token_time = now
            metrics.last_token_time = now
        if state.finished:
            metrics.finished_time = now

    def _forget(self, state: _RequestState) -> None:
        del self.request_states[state.request_id]
        for child in state.children:
            self._children.pop(child.req_id, None)

    # -- logprobs -------------------------------------------------------------------------------------------------
    def _write_prompt_logprobs(self, state: _RequestState, start: int, lists: LogprobsLists) -> None:
        """Row i is prompt position start + i; positions are overwritten, so a re-send after preemption is safe."""
        prompt_logprobs = state.prompt_logprobs
        prompt_token_ids = state.prompt_token_ids
        num_logprobs = state.params.prompt_logprobs
        for row, (token_ids, logprobs, rank) in enumerate(zip(lists.token_ids, lists.logprobs, lists.ranks)):
            position = start + row
            # Position 0 has no logprob; row 0 of a chunk must name the prompt token it scores.
            if not 1 <= position < len(prompt_token_ids) or token_ids[0] != prompt_token_ids[position]:
                raise RuntimeError(
                    f"prompt logprobs of {state.request_id!r}: row {row} of a chunk starting at {start} does not "
                    f"score prompt position {position} (prompt has {len(prompt_token_ids)} tokens)"
                )
            prompt_logprobs[position] = self._logprob_dict(token_ids, logprobs, rank, num_logprobs)

    def _sample_logprobs(self, lists: LogprobsLists, num_logprobs: int) -> list[dict[int, Logprob]]:
        return [
            self._logprob_dict(token_ids, logprobs, rank, num_logprobs)
            for token_ids, logprobs, rank in zip(lists.token_ids, lists.logprobs, lists.ranks)
        ]

    def _logprob_dict(
        self, token_ids: list[int], logprobs: list[float], rank: int, num_logprobs: int
    ) -> dict[int, Logprob]:
        """The chosen token (column 0, its true rank) then the top-k; rows may carry more columns than asked."""
        entries = {token_ids[0]: Logprob(logprobs[0], rank, self._decode_token(token_ids[0]))}
        for k in range(1, min(len(token_ids), num_logprobs + 1)):
            if token_ids[k] not in entries:  # the chosen token keeps its own rank
                entries[token_ids[k]] = Logprob(logprobs[k], k, self._decode_token(token_ids[k]))
        return entries

    def _decode_token(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            self._token_text[token_id] = text
        return text
