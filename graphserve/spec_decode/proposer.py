"""The runner's side of speculative decoding: after a step's tokens reach the host, propose each request's drafts
for the next step (handed to the scheduler in `ModelRunnerOutput.spec_token_ids`).

The proposer behind it is the n-gram prompt lookup today; a draft model or an EAGLE / MTP head is another
`propose(token_ids, max_tokens)` behind the same component.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from graphserve.spec_decode.config import SpeculativeConfig
from graphserve.spec_decode.ngram_proposer import NgramProposer

if TYPE_CHECKING:
    from graphserve.core.scheduler_output import ModelRunnerOutput
    from graphserve.sampling_params import SamplingParams
    from graphserve.worker.input_batch import CachedRequestState


class Proposer(Protocol):
    def propose(self, token_ids: Sequence[int], max_tokens: int | None = None) -> list[int]:
        """Up to num_speculative_tokens draft tokens continuing `token_ids` (at most max_tokens of them)."""


def can_speculate(params: SamplingParams) -> bool:
    """Requests whose sampling can be verified exactly: user logits processors would run on positions that are
    then thrown away (and may keep state), so their requests decode one token per step."""
    return not params.logits_processors


class SpecDecodeProposer:
    """Proposes drafts for the requests that sampled in a step, unless the step was too large to gain from them."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.proposer: Proposer = NgramProposer(config)
        self.disable_by_batch_size = config.disable_by_batch_size

    def propose_for_step(self, out: ModelRunnerOutput, states: list[CachedRequestState]) -> None:
        """Fill `out.spec_token_ids` for the requests of a step whose sampled tokens were just booked."""
        if self.disable_by_batch_size is not None and len(states) >= self.disable_by_batch_size:
            return
        for st, tokens in zip(states, out.sampled_token_ids):
            if not tokens or not can_speculate(st.sampling_params):
                continue
            # The scheduler caps the drafts by max_tokens, the context and the budget (Scheduler._limit_drafts).
            drafts = self.proposer.propose(st.prompt_token_ids + st.output_token_ids)
            if drafts:
                out.spec_token_ids[st.req_id] = drafts


def create_proposer(config: SpeculativeConfig | None) -> SpecDecodeProposer | None:
    """The runner's proposer, None when speculative decoding is off."""
    return None if config is None else SpecDecodeProposer(config)
