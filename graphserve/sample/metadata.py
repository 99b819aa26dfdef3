"""Per-step sampling inputs: host-side request state turned into a few device tensors, built once per step.

Everything is gathered into Python lists / numpy arrays first and copied to the device with one host-to-device
copy per tensor (from pinned memory where the platform pins, so the copies do not block). Tensors that no request
in the batch needs are left as None, so the common all-greedy, no-penalty batch costs almost nothing.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from graphserve.sampling_params import SamplingParams, SamplingType

_MASK_64 = (1 << 64) - 1


@dataclass
class SamplingRequestState:
    """What the model runner keeps per request for sampling; it appends each sampled token to output_token_ids."""

    req_id: str
    sampling_params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    # Seeded requests only: created on first use, re-seeded every step (see _position_seed).
    generator: torch.Generator | None = field(default=None, repr=False)


class LogitsProcessorRow(NamedTuple):
    """The logits processors of one batch row, with the token ids they may read."""

    row: int
    processors: list[Callable]
    prompt_token_ids: list[int]
    output_token_ids: list[int]


@dataclass
class SamplingMetadata:
    """Device tensors and flags for the B requests that sample this step (row i = reqs[i])."""

    all_greedy: bool
    all_random: bool
    temperature: torch.Tensor | None  # [B] float32; greedy rows hold 1.0; None when all_greedy
    top_k: torch.Tensor | None  # [B] int64 in [1, V]; V = off; None when no row uses top-k
    top_p: torch.Tensor | None  # [B] float32; 1.0 = off; None when no row uses top-p
    min_p: torch.Tensor | None  # [B] float32; 0.0 = off; None when no row uses min-p
    is_greedy: torch.Tensor | None  # [B] bool; only for mixed batches
    # Seeded rows: row -> its generator, already seeded for this step's position.
    generators: dict[int, torch.Generator]
    # Draws for unseeded random rows (None = torch's default generator of the device).
    generator: torch.Generator | None
    # Penalties (None when no row has one). Token-id tensors are right-padded with V.
    presence_penalties: torch.Tensor | None  # [B] float32
    frequency_penalties: torch.Tensor | None  # [B] float32
    repetition_penalties: torch.Tensor | None  # [B] float32
    prompt_token_ids: torch.Tensor | None  # [B, max_prompt_len] int64; only when a repetition penalty is set
    output_token_ids: torch.Tensor | None  # [B, max_output_len] int64
    # Flattened (row * V + token) indices into logits.view(-1).
    logit_bias_indices: torch.Tensor | None  # [num_biases] int64
    logit_bias_values: torch.Tensor | None  # [num_biases] float32
    min_tokens_indices: torch.Tensor | None  # [num_masked] int64; set to -inf (stop ids before min_tokens)
    logits_processors: list[LogitsProcessorRow]
    # None: no row wants logprobs; k >= 0: return the sampled token's rank and the top-k (k = max over rows).
    max_num_logprobs: int | None
    # Some row needs the logprob of its sampled token (it asked for logprobs, or it is a best_of child).
    need_sampled_logprobs: bool = False

    @property
    def no_penalties(self) -> bool:
        """True when no row has a presence, frequency or repetition penalty."""
        return self.output_token_ids is None


def _position_seed(seed: int, position: int) -> int:
    """Mix (seed mod 2**64, output position) into a 63-bit seed (splitmix64 finaliser).

    Seeding from the position rather than advancing one stream makes the draw at position p a pure function of
    (seed, p): the same text whatever else shares the batch, and after preemption and recompute.
    """
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK_64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK_64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK_64
    return (z ^ (z >> 31)) >> 1


class _Target(NamedTuple):
    """Where the metadata tensors go, and whether their host copies are pinned first (the platform says)."""

    device: torch.device
    pin_memory: bool


def _to_device(data, dtype: torch.dtype, target: _Target) -> torch.Tensor:
    """One host-to-device copy; from pinned memory, and so non-blocking, where the platform pins."""
    cpu = torch.from_numpy(data) if isinstance(data, np.ndarray) else torch.tensor(data, dtype=dtype)
    cpu = cpu.to(dtype)
    if target.device.type == "cpu":
        return cpu
    if target.pin_memory:
        cpu = cpu.pin_memory()
    return cpu.to(target.device, non_blocking=True)


def _pad_token_ids(rows: list[list[int]], pad_id: int) -> np.ndarray:
    """Right-pad token-id lists with pad_id into a [B, max_len] int64 array (max_len >= 1)."""
    out = np.full((len(rows), max(1, max(len(r) for r in rows))), pad_id, dtype=np.int64)
    for i, ids in enumerate(rows):
        if ids:
            out[i, : len(ids)] = ids
    return out


def _seeded_generator(state: SamplingRequestState, device: torch.device) -> torch.Generator:
    """The request's cached generator, re-seeded for its next output position."""
    # getattr: any object with SamplingRequestState's four fields works (e.g. the runner's own state class).
    gen = getattr(state, "generator", None)
    if gen is None or gen.device != device:
        gen = torch.Generator(device=device)
        state.generator = gen
    gen.manual_seed(_position_seed(state.sampling_params.seed, len(state.output_token_ids)))
    return gen


def _build_truncation(params: list[SamplingParams], vocab_size: int, target: _Target) -> dict:
    """Temperature / top-k / top-p / min-p tensors, each only if some row needs it."""
    temperature = [1.0 if p.sampling_type == SamplingType.GREEDY else p.temperature for p in params]
    top_k = [vocab_size if p.top_k < 1 else min(p.top_k, vocab_size) for p in params]
    top_p = [p.top_p for p in params]
    min_p = [p.min_p for p in params]
    return {
        "temperature": _to_device(temperature, torch.float32, target),
        "top_k": _to_device(top_k, torch.int64, target) if any(k < vocab_size for k in top_k) else None,
        "top_p": _to_device(top_p, torch.float32, target) if any(p < 1.0 for p in top_p) else None,
        "min_p": _to_device(min_p, torch.float32, target) if any(p > 0.0 for p in min_p) else None,
    }


def _build_penalties(reqs: list[SamplingRequestState], vocab_size: int, target: _Target) -> dict:
    """Penalty factors plus the padded token ids the sampler counts on the device."""
    params = [r.sampling_params for r in reqs]
    presence = [p.presence_penalty for p in params]
    frequency = [p.frequency_penalty for p in params]
    repetition = [p.repetition_penalty for p in params]
    needs_prompt = any(r != 1.0 for r in repetition)
    if not needs_prompt and not any(presence) and not any(frequency):
        return dict.fromkeys(("presence_penalties", "frequency_penalties", "repetition_penalties",
                              "prompt_token_ids", "output_token_ids"))
    prompt = _pad_token_ids([r.prompt_token_ids for r in reqs], vocab_size) if needs_prompt else None
    return {
        "presence_penalties": _to_device(presence, torch.float32, target),
        "frequency_penalties": _to_device(frequency, torch.float32, target),
        "repetition_penalties": _to_device(repetition, torch.float32, target),
        "prompt_token_ids": None if prompt is None else _to_device(prompt, torch.int64, target),
        "output_token_ids": _to_device(_pad_token_ids([r.output_token_ids for r in reqs], vocab_size),
                                       torch.int64, target),
    }


def _build_logit_masks(reqs: list[SamplingRequestState], vocab_size: int, target: _Target) -> dict:
    """Flattened indices for logit_bias (added) and for stop ids masked before min_tokens."""
    bias_idx: list[int] = []
    bias_val: list[float] = []
    min_tokens_idx: list[int] = []
    for row, req in enumerate(reqs):
        params = req.sampling_params
        for token_id, bias in (params.logit_bias or {}).items():
            if token_id >= vocab_size:
                raise ValueError(f"logit_bias token id {token_id} of request {req.req_id!r} is out of the "
                                 f"vocabulary (size {vocab_size}).")
            bias_idx.append(row * vocab_size + token_id)
            bias_val.append(bias)
        if len(req.output_token_ids) < params.min_tokens:
            # Ids beyond the vocabulary can never be sampled, so there is nothing to mask.
            min_tokens_idx.extend(row * vocab_size + t for t in sorted(params.all_stop_token_ids) if t < vocab_size)
    return {
        "logit_bias_indices": _to_device(bias_idx, torch.int64, target) if bias_idx else None,
        "logit_bias_values": _to_device(bias_val, torch.float32, target) if bias_idx else None,
        "min_tokens_indices": _to_device(min_tokens_idx, torch.int64, target) if min_tokens_idx else None,
    }


def _has_penalties(params: SamplingParams) -> bool:
    """A presence, frequency or repetition penalty is set."""
    return bool(params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0)


def needs_output_token_ids(params: SamplingParams) -> bool:
    """Whether sampling reads the request's generated tokens (so they must all be on the host first).

    Penalties and logits processors read their values; a seed (the draw's position) and min_tokens read their
    number. Everything else samples correctly while the previous step's token is still on its way.
    """
    return bool(_has_penalties(params) or params.logits_processors or params.seed is not None or params.min_tokens)


def _all_plain_greedy(reqs: list[SamplingRequestState]) -> bool:
    """True when every row is an argmax with nothing to apply first (the common serving batch): one cheap pass."""
    for req in reqs:
        p = req.sampling_params
        if (p.sampling_type != SamplingType.GREEDY or p.logits_processors or p.logit_bias or p.logprobs is not None
                or p.compute_cumulative_logprob or _has_penalties(p) or len(req.output_token_ids) < p.min_tokens):
            return False
    return True


def _plain_greedy_metadata(generator: torch.Generator | None) -> SamplingMetadata:
    """Metadata of an all-greedy batch without penalties, biases, processors, logprobs or min_tokens masks."""
    return SamplingMetadata(
        all_greedy=True, all_random=False, temperature=None, top_k=None, top_p=None, min_p=None, is_greedy=None,
        generators={}, generator=generator, presence_penalties=None, frequency_penalties=None,
        repetition_penalties=None, prompt_token_ids=None, output_token_ids=None, logit_bias_indices=None,
        logit_bias_values=None, min_tokens_indices=None, logits_processors=[], max_num_logprobs=None,
    )


def build_sampling_metadata(
    reqs: list[SamplingRequestState],
    vocab_size: int,
    device: torch.device | str,
    generator: torch.Generator | None = None,
    pin_memory: bool = False,
) -> SamplingMetadata:
    """Build this step's SamplingMetadata for the requests that sample (row i = reqs[i]).

    `generator` is the engine-level generator for unseeded random rows; seeded rows use their own cached
    generator (stored on the SamplingRequestState), seeded from (seed, number of tokens generated so far).
    `device` names its index (cuda:0, not cuda): a seeded row's generator is kept while its device matches.
    `pin_memory` stages host copies in pinned memory (the platform's `supports_pin_memory`).
    """
    if not reqs:
        raise ValueError("build_sampling_metadata needs at least one request")
    device = torch.device(device)
    target = _Target(device, pin_memory)
    if _all_plain_greedy(reqs):
        return _plain_greedy_metadata(generator)
    params = [r.sampling_params for r in reqs]
    greedy = [p.sampling_type == SamplingType.GREEDY for p in params]
    all_greedy, all_random = all(greedy), not any(greedy)
    if all_greedy:
        truncation = dict.fromkeys(("temperature", "top_k", "top_p", "min_p"))
    else:
        truncation = _build_truncation(params, vocab_size, target)
    generators = {
        row: _seeded_generator(req, device)
        for row, req in enumerate(reqs)
        if req.sampling_params.sampling_type == SamplingType.RANDOM_SEED
    }
    processors = [
        LogitsProcessorRow(row, req.sampling_params.logits_processors, req.prompt_token_ids, req.output_token_ids)
        for row, req in enumerate(reqs)
        if req.sampling_params.logits_processors
    ]
    requested = [p.logprobs for p in params if p.logprobs is not None]
    return SamplingMetadata(
        all_greedy=all_greedy,
        all_random=all_random,
        is_greedy=None if all_greedy or all_random else _to_device(greedy, torch.bool, target),
        generators=generators,
        generator=generator,
        logits_processors=processors,
        max_num_logprobs=max(requested) if requested else None,
        need_sampled_logprobs=bool(requested) or any(p.compute_cumulative_logprob for p in params),
        **truncation,
        **_build_penalties(reqs, vocab_size, target),
        **_build_logit_masks(reqs, vocab_size, target),
    )
