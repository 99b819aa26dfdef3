"""Shared helpers for the core tests: request/scheduler factories, a fake model runner, an integrity check."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from graphserve.config import CacheConfig, SchedulerConfig
from graphserve.core.kv_cache_manager import cdiv
from graphserve.core.request import Request, RequestStatus
from graphserve.core.scheduler import Scheduler
from graphserve.core.scheduler_output import EngineCoreOutput, ModelRunnerOutput, SchedulerOutput
from graphserve.sampling_params import SamplingParams

EOS_ID = 1


def make_prompt(prompt_len: int, seed: int = 0) -> list[int]:
    """Token ids in [2, 52): never EOS and never a token the fake runner samples."""
    return [(i * 13 + seed) % 50 + 2 for i in range(prompt_len)]


def make_request(req_id: str, prompt_len: int, max_tokens: int = 16, eos_token_ids=(EOS_ID,), **params) -> Request:
    """A request with a deterministic prompt; extra kwargs go to SamplingParams."""
    sampling_params = SamplingParams(max_tokens=max_tokens, **params)
    return Request(req_id, make_prompt(prompt_len, seed=len(req_id)), sampling_params, eos_token_ids=eos_token_ids)


def make_scheduler(
    block_size: int = 4,
    num_blocks: int = 64,
    max_model_len: int = 64,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    enable_chunked_prefill: bool = True,
) -> Scheduler:
    """A scheduler over a small pool."""
    scheduler_config = SchedulerConfig(
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        enable_chunked_prefill=enable_chunked_prefill,
    )
    return Scheduler(scheduler_config, CacheConfig(block_size=block_size, num_blocks=num_blocks))


def next_token(token_ids: list[int]) -> int:
    """The fake model: a deterministic function of the sequence so far, never EOS, always >= 100."""
    return 100 + (len(token_ids) * 7 + token_ids[-1]) % 300


@dataclass
class _RunnerState:
    token_ids: list[int]
    num_computed_tokens: int
    block_ids: list[int] = field(default_factory=list)


class FakeRunner:
    """Rebuilds per-request state from SchedulerOutput alone, as the real runner must, and checks the protocol.

    Samples one token for each request whose scheduled tokens complete its sequence (none for a partial prefill).
    Requests listed in `force_eos` get EOS_ID as their next sampled token.
    """

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.states: dict[str, _RunnerState] = {}
        self.force_eos: set[str] = set()

    def _apply(self, so: SchedulerOutput) -> None:
        for req_id in so.finished_req_ids:
            self.states.pop(req_id, None)
        for new in so.scheduled_new_reqs:
            assert new.req_id not in self.states, f"{new.req_id} sent as new while the runner holds it"
            self.states[new.req_id] = _RunnerState(
                list(new.prompt_token_ids) + list(new.output_token_ids), new.num_computed_tokens, list(new.block_ids)
            )
        for cached in so.scheduled_cached_reqs:
            state = self.states[cached.req_id]
            assert state.num_computed_tokens == cached.num_computed_tokens
            state.block_ids.extend(cached.new_block_ids)

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        """Check the message against the runner's own view, then 'compute' and sample."""
        self._apply(so)
        scheduled = [r.req_id for r in so.scheduled_new_reqs] + [r.req_id for r in so.scheduled_cached_reqs]
        assert sorted(scheduled) == sorted(so.num_scheduled_tokens)
        assert so.total_num_scheduled_tokens == sum(so.num_scheduled_tokens.values())
        block_size = self.scheduler.block_size
        req_ids, sampled = [], []
        for req_id, num_tokens in so.num_scheduled_tokens.items():
            state = self.states[req_id]
            assert num_tokens >= 1
            assert state.block_ids == self.scheduler.kv_cache_manager.get_block_ids(req_id)
            state.num_computed_tokens += num_tokens
            assert state.num_computed_tokens <= len(state.token_ids)
            assert len(state.block_ids) * block_size >= state.num_computed_tokens
            new_token_ids = []
            if state.num_computed_tokens == len(state.token_ids):
                token_id = EOS_ID if req_id in self.force_eos else next_token(state.token_ids)
                state.token_ids.append(token_id)
                new_token_ids = [token_id]
            req_ids.append(req_id)
            sampled.append(new_token_ids)
        return ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=sampled)


def step(scheduler: Scheduler, runner: FakeRunner) -> tuple[SchedulerOutput, list[EngineCoreOutput]]:
    """One engine step: schedule, run, update."""
    so = scheduler.schedule()
    return so, scheduler.update_from_output(so, runner.execute_model(so))


def check_invariants(scheduler: Scheduler) -> None:
    """Integrity of the pool, the block tables and the queues."""
    kv = scheduler.kv_cache_manager
    pool = kv.block_pool
    holders = Counter(b.block_id for blocks in kv.req_to_blocks.values() for b in blocks)
    free_ids = list(pool.iter_free_block_ids())
    assert len(free_ids) == len(set(free_ids)), "a block is twice in the free queue"
    for block in pool.blocks:
        assert block.ref_cnt == holders.get(block.block_id, 0), block
        assert pool.is_free(block) == (block.ref_cnt == 0), block
    num_used = sum(1 for b in pool.blocks if b.ref_cnt > 0)
    assert pool.get_num_free_blocks() + num_used == pool.num_blocks
    assert len(scheduler.running) <= scheduler.max_num_seqs
    running_ids = [r.request_id for r in scheduler.running]
    waiting_ids = [r.request_id for r in scheduler.waiting]
    assert len(set(running_ids)) == len(running_ids) and len(set(waiting_ids)) == len(waiting_ids)
    assert not set(running_ids) & set(waiting_ids)
    assert set(running_ids) | set(waiting_ids) == set(scheduler.requests)
    assert set(kv.req_to_blocks) <= set(running_ids)
    for request in scheduler.running:
        assert request.status == RequestStatus.RUNNING
        assert request.num_computed_tokens <= request.num_tokens
        assert len(kv.get_blocks(request.request_id)) >= cdiv(request.num_computed_tokens, scheduler.block_size)
    for request in scheduler.waiting:
        assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert request.num_computed_tokens == 0 and not kv.get_blocks(request.request_id)


def find_output(outputs: list[EngineCoreOutput], req_id: str) -> Optional[EngineCoreOutput]:
    """The output of one request in a step's outputs, or None."""
    matches = [o for o in outputs if o.req_id == req_id]
    assert len(matches) <= 1
    return matches[0] if matches else None
