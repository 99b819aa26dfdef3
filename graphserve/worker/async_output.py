"""A step's sampled tokens on their way to the host: launched now, read later (async scheduling).

`ModelRunner.execute_model_async` returns an `AsyncModelRunnerOutput` as soon as the step's work is queued on
the device. Its tensors are copied into pinned host memory by copies queued right behind the sampler, and an
event marks their end, so `get_output()` waits for this step only, never for a step launched after it. The
device tensor of sampled ids stays alive: the next step reads its decode inputs from it without waiting.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from graphserve.core.scheduler_output import LogprobsLists, ModelRunnerOutput

if TYPE_CHECKING:
    from graphserve.platforms.interface import Platform
    from graphserve.sample.sampler import SamplerOutput
    from graphserve.worker.input_batch import CachedRequestState


def _to_host(tensor: torch.Tensor | None, pin_memory: bool) -> torch.Tensor | None:
    """Queue a device→host copy, into pinned memory where the platform pins (the tensor itself on the CPU)."""
    if tensor is None or tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin_memory)
    host.copy_(tensor, non_blocking=pin_memory)
    return host


class AsyncModelRunnerOutput:
    """The output of one launched step; `get_output()` waits for its sampled tokens and books them."""

    def __init__(
        self,
        output: ModelRunnerOutput,  # req_ids and one empty token list per request, filled by get_output()
        states: list[CachedRequestState],  # every scheduled request, in output order
        sampling_req_indices: list[int],  # which of them sample (row r of the sampler = states[indices[r]])
        sampler_output: SamplerOutput | None,
        platform: Platform | None = None,  # records the event that marks the copies' end (None: ready)
        on_ready: Callable[[ModelRunnerOutput, list[CachedRequestState]], None] | None = None,
    ) -> None:
        self._output = output
        self._states = states
        self._sampling_req_indices = sampling_req_indices
        self._done = sampler_output is None
        self._on_ready = on_ready  # called once the tokens are booked (speculative decoding proposes drafts)
        self._row_starts = None if sampler_output is None else sampler_output.logprob_row_starts
        # Decode inputs of the next step (see row_of_request).
        self.sampled_token_ids: torch.Tensor | None = None
        self._row_of_request: dict[str, int] | None = None
        if sampler_output is None:
            return
        self.sampled_token_ids = sampler_output.sampled_token_ids
        pin_memory = platform is not None and platform.capabilities.supports_pin_memory
        self._host = [_to_host(t, pin_memory) for t in (
            sampler_output.sampled_token_ids, sampler_output.sampled_logprobs, sampler_output.topk_token_ids,
            sampler_output.topk_logprobs, sampler_output.sampled_ranks)]
        self._event = platform.record_event() if platform is not None else None

    @classmethod
    def ready(cls, output: ModelRunnerOutput) -> AsyncModelRunnerOutput:
        """An output that needs no device work (an empty step, or nothing sampled)."""
        return cls(output, [], [], None)

    @property
    def row_of_request(self) -> dict[str, int]:
        """Row of each sampling request in `sampled_token_ids` (built on first use: only async steps ask)."""
        if self._row_of_request is None:
            self._row_of_request = {self._states[i].req_id: row for row, i in enumerate(self._sampling_req_indices)}
        return self._row_of_request

    @property
    def done(self) -> bool:
        """True once the sampled tokens are on the host and appended to the requests' state."""
        return self._done

    def get_output(self) -> ModelRunnerOutput:
        """Wait for the sampled tokens (this step's only host sync), append them, and return plain lists."""
        if self._done:
            return self._output
        if self._event is not None:
            self._event.synchronize()
        token_ids, sampled_logprobs, topk_ids, topk_logprobs, ranks = (
            None if t is None else t.tolist() for t in self._host)
        out, states = self._output, self._states
        if self._row_starts is not None:
            self._book_verified(out, states, token_ids, sampled_logprobs, topk_ids, topk_logprobs, ranks)
            return self._finish(out)
        for row, i in enumerate(self._sampling_req_indices):
            st = states[i]
            tok = token_ids[row]
            out.sampled_token_ids[i].append(tok)
            st.output_token_ids.append(tok)  # the runner's copy of the request (also the sampler's view)
            params = st.sampling_params
            if sampled_logprobs is not None and (params.logprobs is not None or params.compute_cumulative_logprob):
                out.sampled_logprobs[st.req_id] = [sampled_logprobs[row]]
            k = params.logprobs
            if topk_ids is not None and k is not None:
                out.logprobs[st.req_id] = LogprobsLists(
                    token_ids=[[tok] + topk_ids[row][:k]],
                    logprobs=[[sampled_logprobs[row]] + topk_logprobs[row][:k]],
                    ranks=[ranks[row]],
                )
        return self._finish(out)

    def _finish(self, out: ModelRunnerOutput) -> ModelRunnerOutput:
        self._done = True
        self._host = []
        if self._on_ready is not None:
            self._on_ready(out, self._states)
        return out

    def _book_verified(self, out: ModelRunnerOutput, states, token_ids, sampled_logprobs, topk_ids,
                       topk_logprobs, ranks) -> None:
        """A speculative verify step: each row holds the accepted drafts and one more token, then -1; the logprob
        rows of request r start at row_starts[r], one per emitted token."""
        for row, i in enumerate(self._sampling_req_indices):
            st = states[i]
            tokens = [t for t in token_ids[row] if t >= 0]
            out.sampled_token_ids[i].extend(tokens)
            st.output_token_ids.extend(tokens)
            params = st.sampling_params
            first = self._row_starts[row]
            rows = range(first, first + len(tokens))
            if sampled_logprobs is not None and (params.logprobs is not None or params.compute_cumulative_logprob):
                out.sampled_logprobs[st.req_id] = [sampled_logprobs[r] for r in rows]
            k = params.logprobs
            if topk_ids is not None and k is not None:
                out.logprobs[st.req_id] = LogprobsLists(
                    token_ids=[[tok] + topk_ids[r][:k] for tok, r in zip(tokens, rows)],
                    logprobs=[[sampled_logprobs[r]] + topk_logprobs[r][:k] for r in rows],
                    ranks=[ranks[r] for r in rows],
                )
