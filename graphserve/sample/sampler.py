"""From logits to next tokens without a device-to-host sync.

Order (vLLM): logits processors → logit_bias → min_tokens stop-id masking → repetition / presence / frequency
penalties → (greedy rows: argmax) → temperature → top-k → top-p → min-p → exponential-race sampling.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from graphserve.ops import sampling as sampling_ops
from graphserve.sample.logprobs import compute_topk_logprobs
from graphserve.sample.metadata import SamplingMetadata

# q ~ Exp(1) can be exactly 0 on some backends; 0/0 would give NaN, which argmax treats as the maximum.
_MIN_EXPONENTIAL = 1e-20


@dataclass
class SamplerOutput:
    """Sampled tokens and their logprobs, still on the device (the runner does the one .tolist())."""

    sampled_token_ids: torch.Tensor  # [B] int64
    # [B] float32, raw logprob of the sampled token; None when no row needs it (metadata.need_sampled_logprobs)
    sampled_logprobs: torch.Tensor | None = None
    # Only when metadata.max_num_logprobs is not None (K = max_num_logprobs, may be 0):
    topk_token_ids: torch.Tensor | None = None  # [B, K] int64
    topk_logprobs: torch.Tensor | None = None  # [B, K] float32
    sampled_ranks: torch.Tensor | None = None  # [B] int64, 1 = most likely
    # Speculative verify steps only: sampled_token_ids is [B, max_spec_len + 1] (each row's emitted tokens, then
    # -1), and the logprob tensors have one row per scored position; request i's rows start at
    # logprob_row_starts[i] (its emitted tokens' logprobs, in order).
    logprob_row_starts: list[int] | None = None


def _takes_prompt_ids(processor: Callable) -> bool:
    """vLLM accepts f(output_ids, logits) and f(prompt_ids, output_ids, logits); tell them apart by arity."""
    try:
        params = inspect.signature(processor).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature: assume the classic two-argument form
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) == 3


def apply_logits_processors(logits: torch.Tensor, metadata: SamplingMetadata) -> None:
    """Run user logits processors on their rows, in place. logits: [B, V]."""
    for entry in metadata.logits_processors:
        row = logits[entry.row]
        for processor in entry.processors:
            # Copies, so a processor cannot corrupt the runner's token lists.
            if _takes_prompt_ids(processor):
                row = processor(list(entry.prompt_token_ids), list(entry.output_token_ids), row)
            else:
                row = processor(list(entry.output_token_ids), row)
        logits[entry.row] = row


def exponential_race(probs: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """Sample each row of probs [B, V] as argmax(probs / q), q ~ Exp(1): exact categorical sampling, no sync.

    Seeded rows draw q from their own generator so their tokens do not depend on the rest of the batch.
    """
    q = torch.empty_like(probs)
    if len(metadata.generators) < probs.shape[0]:
        q.exponential_(generator=metadata.generator)
    for row, generator in metadata.generators.items():
        q[row].exponential_(generator=generator)
    return probs.div_(q.clamp_min_(_MIN_EXPONENTIAL)).argmax(dim=-1)


def with_logprobs(output: SamplerOutput, raw_logits: torch.Tensor, tokens: torch.Tensor,
                  metadata: SamplingMetadata) -> SamplerOutput:
    """`output` with the logprobs the rows ask for, of `tokens` [B] under the raw logits [B, V]: none, the
    token's own (cheaper than a full log_softmax: logit - logsumexp), or its rank and the top-k."""
    if metadata.max_num_logprobs is None:
        if metadata.need_sampled_logprobs:
            # A pass over [B, V] logits saved otherwise: at batch 256 x 128k vocabulary it costs ~0.5 ms per step.
            token_logit = raw_logits.gather(1, tokens.unsqueeze(1)).squeeze(1)
            output.sampled_logprobs = token_logit - torch.logsumexp(raw_logits, dim=-1)
        return output
    token_ids, logprobs, ranks = compute_topk_logprobs(raw_logits.log_softmax(dim=-1), tokens,
                                                       metadata.max_num_logprobs)
    output.sampled_logprobs = logprobs[:, 0]
    output.topk_token_ids = token_ids[:, 1:]
    output.topk_logprobs = logprobs[:, 1:]
    output.sampled_ranks = ranks
    return output


class Sampler(nn.Module):
    """Turns the last-position logits of each sampling request into its next token (vLLM V1 semantics).

    Returned logprobs are those of the model's RAW logits (log_softmax before logits processors, bias, penalties,
    temperature and truncation), like vLLM V1's default logprobs_mode="raw_logprobs"; vLLM v0.3 returned the
    processed ones. The input logits are not modified.
    """

    def forward(
        self,
        logits: torch.Tensor,  # [B, V] float32
        metadata: SamplingMetadata,
    ) -> SamplerOutput:
        """Sample one token per row and gather its logprob (plus top-k and rank when requested)."""
        sampled = self.sample(self.process_logits(logits, metadata), metadata)
        return with_logprobs(SamplerOutput(sampled_token_ids=sampled), logits, sampled, metadata)

    @staticmethod
    def process_logits(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """Logits processors, logit_bias, min_tokens masking and penalties, on a copy when any applies."""
        if not (
            metadata.logits_processors
            or metadata.logit_bias_indices is not None
            or metadata.min_tokens_indices is not None
            or not metadata.no_penalties
        ):
            return logits
        logits = logits.clone()
        apply_logits_processors(logits, metadata)
        flat = logits.view(-1)
        if metadata.logit_bias_indices is not None:
            flat.index_add_(0, metadata.logit_bias_indices, metadata.logit_bias_values)
        if metadata.min_tokens_indices is not None:
            flat.index_fill_(0, metadata.min_tokens_indices, float("-inf"))
        if not metadata.no_penalties:
            sampling_ops.apply_penalties(logits, metadata.output_token_ids, metadata.prompt_token_ids,
                                         metadata.presence_penalties, metadata.frequency_penalties,
                                         metadata.repetition_penalties)
        return logits

    @staticmethod
    def sample(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """Greedy rows take the argmax; random rows go through temperature, top-k, top-p, min-p and the race."""
        greedy = None if metadata.all_random else logits.argmax(dim=-1)
        if metadata.all_greedy:
            return greedy
        random = exponential_race(Sampler.compute_probs(logits, metadata), metadata)
        if metadata.all_random:
            return random
        return torch.where(metadata.is_greedy, greedy, random)

    @staticmethod
    def compute_probs(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """The distribution random rows sample from: temperature, top-k, top-p, min-p, softmax (a new tensor; greedy
        rows get the softmax of their logits, whose argmax is theirs). Needs metadata.temperature (not all_greedy)."""
        if metadata.top_k is None and metadata.top_p is None and metadata.min_p is None:
            logits = logits / metadata.temperature.unsqueeze(1)
        else:
            # One op: temperature, apply_top_k_top_p and apply_min_p on the CPU, a sort-free kernel on CUDA.
            logits = sampling_ops.apply_sampling_filters(
                logits, metadata.temperature, metadata.top_k, metadata.top_p, metadata.min_p
            )
        return logits.softmax(dim=-1)
