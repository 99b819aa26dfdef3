"""Sampling: from the last-position logits of each request to its next token, on the device, without a sync.

- `metadata`: `SamplingRequestState` (what the runner keeps per request for sampling) and
  `build_sampling_metadata` (the step's requests → a few device tensors, only those some row needs).
- `sampler`: `Sampler` (logits processors, logit_bias, min_tokens masks, penalties, temperature, top-k / top-p /
  min-p filters, greedy or exponential-race draws) and its `SamplerOutput`.
- `logprobs`: top-k logprobs with the chosen token's rank (sampled tokens and prompt positions).

The heavy steps are `torch.ops.graphserve` ops (`ops/sampling.py`: torch reference, Triton kernels on GPUs).
A rejection sampler (speculative decoding) and structured-output token masks belong here too, as further
steps of the same `Sampler` driven by fields of `SamplingMetadata`.
"""
from graphserve.sample.logprobs import compute_topk_logprobs
from graphserve.sample.metadata import (
    SamplingMetadata,
    SamplingRequestState,
    build_sampling_metadata,
    needs_output_token_ids,
)
from graphserve.sample.sampler import Sampler, SamplerOutput

__all__ = [
    "Sampler",
    "SamplerOutput",
    "SamplingMetadata",
    "SamplingRequestState",
    "build_sampling_metadata",
    "compute_topk_logprobs",
    "needs_output_token_ids",
]
