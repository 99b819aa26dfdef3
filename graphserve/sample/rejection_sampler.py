"""Sampling of a speculative verify step: the target's logits at each request's k draft positions and its bonus
position → the accepted drafts plus one token per request, exact for every sampling parameter.

Each scored position is one row of an expanded batch: position j of a request is sampled as if drafts d_1..d_j-1
were already its output, so penalties count them, min_tokens and stop-id masks see their number and a seeded
request's draw at position j uses the generator of its output position (what plain decoding would use). The
processed distributions p_j go to the `rejection_sample` op (ops/rejection_sampler.py) with the n-gram drafts'
one-hot q; the bonus token is the normal sampler's draw at the last position. Requests without drafts in the same
step are rows with k = 0 and get exactly the normal sampler's token. Logprobs are the target's raw ones of the
emitted tokens, as without speculation. Nothing syncs with the host.
"""
from __future__ import annotations

import dataclasses

import torch

from graphserve.ops.rejection_sampler import rejection_sample
from graphserve.sample.metadata import SamplingMetadata, SamplingRequestState, build_sampling_metadata
from graphserve.sample.sampler import Sampler, SamplerOutput, exponential_race, with_logprobs
from graphserve.sampling_params import SamplingType


def expand_for_drafts(reqs: list[SamplingRequestState], spec_token_ids: list[list[int]]) -> list[SamplingRequestState]:
    """One sampling row per scored position: request i's rows see its output extended by 0..k_i of its drafts."""
    rows: list[SamplingRequestState] = []
    for req, drafts in zip(reqs, spec_token_ids):
        rows.append(req)  # position 0: the request as it is (keeps its cached generator)
        for j in range(1, len(drafts) + 1):
            rows.append(SamplingRequestState(req.req_id, req.sampling_params, req.prompt_token_ids,
                                             req.output_token_ids + drafts[:j]))
    return rows


class RejectionSampler:
    """Samples a verify step's rows and runs the rejection sampler over them (see the module docstring)."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler

    def __call__(
        self,
        logits: torch.Tensor,  # [R, V] float32: each request's k_i + 1 rows, request after request
        reqs: list[SamplingRequestState],
        spec_token_ids: list[list[int]],  # per request, its drafts (possibly none)
        generator: torch.Generator | None,
        pin_memory: bool = False,
    ) -> SamplerOutput:
        device = logits.device
        num_drafts = [len(d) for d in spec_token_ids]
        rows = expand_for_drafts(reqs, spec_token_ids)
        if len(rows) != logits.shape[0]:
            raise ValueError(f"rejection sampler: {logits.shape[0]} logits rows for {len(rows)} scored positions")
        metadata = build_sampling_metadata(rows, logits.shape[-1], device, generator, pin_memory)
        processed = Sampler.process_logits(logits, metadata)
        # The argmax is all a greedy row needs, so an all-greedy step skips the softmax.
        probs = processed if metadata.all_greedy else Sampler.compute_probs(processed, metadata)
        starts, draft_rows, bonus_rows = _row_layout(num_drafts)
        bonus_idx = torch.tensor(bonus_rows, dtype=torch.int64).to(device, non_blocking=True)
        if metadata.all_greedy:
            bonus = probs.index_select(0, bonus_idx).argmax(dim=-1)
        else:
            bonus_probs = probs.index_select(0, bonus_idx)
            bonus = _sample_rows(bonus_probs, processed.index_select(0, bonus_idx), metadata, bonus_rows)
        greedy = [r.sampling_params.sampling_type == SamplingType.GREEDY for r in reqs]
        draft_idx = torch.tensor(draft_rows, dtype=torch.int64).to(device, non_blocking=True)
        target_probs = probs.index_select(0, draft_idx)
        uniform, noise = _draws(metadata, draft_rows, bonus_rows, num_drafts, greedy, logits.shape[-1], device)
        flat_drafts = [t for d in spec_token_ids for t in d]
        out = rejection_sample(
            torch.tensor(flat_drafts, dtype=torch.int64).to(device, non_blocking=True),
            torch.tensor(_cumsum(num_drafts), dtype=torch.int32).to(device, non_blocking=True),
            None,
            target_probs.float(),
            bonus,
            torch.tensor(greedy, dtype=torch.bool).to(device, non_blocking=True),
            uniform,
            noise,
            max(num_drafts),
        )
        output = SamplerOutput(sampled_token_ids=out, logprob_row_starts=starts)
        if metadata.max_num_logprobs is None and not metadata.need_sampled_logprobs:
            return output
        # The token each row emitted (-1 past a request's last one: any valid id, its logprob is never read).
        owner = [i for i, k in enumerate(num_drafts) for _ in range(k + 1)]
        column = [j for k in num_drafts for j in range(k + 1)]
        emitted = out[torch.tensor(owner, device=device), torch.tensor(column, device=device)].clamp_min(0)
        return with_logprobs(output, logits, emitted, metadata)


def _row_layout(num_drafts: list[int]) -> tuple[list[int], list[int], list[int]]:
    """First row of each request, the rows of all draft positions, and each request's bonus row."""
    starts, draft_rows, bonus_rows = [], [], []
    row = 0
    for k in num_drafts:
        starts.append(row)
        draft_rows.extend(range(row, row + k))
        bonus_rows.append(row + k)
        row += k + 1
    return starts, draft_rows, bonus_rows


def _cumsum(values: list[int]) -> list[int]:
    total, out = 0, []
    for v in values:
        total += v
        out.append(total)
    return out


def _sample_rows(probs: torch.Tensor, processed: torch.Tensor, metadata: SamplingMetadata,
                 rows: list[int]) -> torch.Tensor:
    """The normal sampler's draw for a subset of the expanded rows: argmax for greedy rows, the exponential race
    (each seeded row with the generator of its own position) for the others."""
    position = {row: i for i, row in enumerate(rows)}
    sub = dataclasses.replace(
        metadata, generators={position[r]: g for r, g in metadata.generators.items() if r in position})
    random = exponential_race(probs, sub)
    if metadata.all_random:
        return random
    is_greedy = metadata.is_greedy.index_select(0, torch.tensor(rows, device=probs.device))
    return torch.where(is_greedy, processed.argmax(dim=-1), random)


def _draws(metadata: SamplingMetadata, draft_rows: list[int], bonus_rows: list[int], num_drafts: list[int],
           greedy: list[bool], vocab_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Acceptance uniforms [T] and recovery noise [B, V] (Exp(1)); a seeded request draws both from the generators
    of its positions, so its output is a function of (seed, text) as without speculation."""
    uniform = torch.rand(len(draft_rows), device=device, generator=metadata.generator)
    noise = torch.empty(len(num_drafts), vocab_size, device=device)
    if not all(greedy):
        noise.exponential_(generator=metadata.generator)
    for t, row in enumerate(draft_rows):
        gen = metadata.generators.get(row)
        if gen is not None:
            uniform[t] = torch.rand((), device=device, generator=gen)
    for i, row in enumerate(bonus_rows):
        gen = metadata.generators.get(row - num_drafts[i])
        if gen is not None and num_drafts[i]:
            noise[i].exponential_(generator=gen)
    return uniform, noise.clamp_min_(1e-20)
