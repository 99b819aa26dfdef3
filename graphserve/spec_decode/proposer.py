"""The runner's side of speculative decoding: after a step's tokens reach the host, propose each request's drafts
for the next step (handed to the scheduler in `ModelRunnerOutput.spec_token_ids`).

Behind it: the n-gram prompt lookup (host-side, per request, `propose(token_ids)`) or a draft model
(`spec_decode/draft_model.py`: batched over the step on the device, with its own KV cache and graphs). An EAGLE /
MTP head would be another batched proposer.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from graphserve.spec_decode.config import SpeculativeConfig
from graphserve.spec_decode.ngram_proposer import NgramProposer

if TYPE_CHECKING:
    from graphserve.core.scheduler_output import ModelRunnerOutput
    from graphserve.sampling_params import SamplingParams
    from graphserve.spec_decode.draft_model import DraftModelProposer
    from graphserve.worker.input_batch import CachedRequestState, InputBatch


class Proposer(Protocol):
    def propose(self, token_ids: Sequence[int], max_tokens: int | None = None) -> list[int]:
        """Up to num_speculative_tokens draft tokens continuing `token_ids` (at most max_tokens of them)."""


def can_speculate(params: SamplingParams) -> bool:
    """Requests whose sampling can be verified exactly: user logits processors would run on positions that are
    then thrown away (and may keep state), so their requests decode one token per step."""
    return not params.logits_processors


class SpecDecodeProposer:
    """Proposes drafts for the requests that sampled in a step, unless the step was too large to gain from them."""

    def __init__(self, config: SpeculativeConfig, draft: DraftModelProposer | None = None,
                 input_batch: InputBatch | None = None) -> None:
        self.config = config
        self.proposer: Proposer | None = NgramProposer(config) if draft is None else None
        self.draft = draft
        self.input_batch = input_batch  # its block table: where the draft model's KV goes
        self.disable_by_batch_size = config.disable_by_batch_size

    def propose_for_step(self, out: ModelRunnerOutput, states: list[CachedRequestState]) -> None:
        """Fill `out.spec_token_ids` for the requests of a step whose sampled tokens were just booked."""
        if self.disable_by_batch_size is not None and len(states) >= self.disable_by_batch_size:
            return
        if self.draft is not None:
            pairs = [(st, bool(tokens)) for st, tokens in zip(states, out.sampled_token_ids)
                     if can_speculate(st.sampling_params)]
            if pairs:
                out.spec_token_ids.update(self.draft.propose([st for st, _ in pairs], self.input_batch.block_table,
                                                             [wants for _, wants in pairs]))
            return
        for st, tokens in zip(states, out.sampled_token_ids):
            if not tokens or not can_speculate(st.sampling_params):
                continue
            # The scheduler caps the drafts by max_tokens, the context and the budget (Scheduler._limit_drafts).
            drafts = self.proposer.propose(st.prompt_token_ids + st.output_token_ids)
            if drafts:
                out.spec_token_ids[st.req_id] = drafts


def create_proposer(config: SpeculativeConfig | None, draft: DraftModelProposer | None = None,
                    input_batch: InputBatch | None = None) -> SpecDecodeProposer | None:
    """The runner's proposer, None when speculative decoding is off."""
    return None if config is None else SpecDecodeProposer(config, draft, input_batch)
