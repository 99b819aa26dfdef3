"""Shared helpers for the core tests: request/scheduler factories, a fake model runner, an integrity check."""
from __future__ import annotations

import random
import zlib
from collections import Counter
from dataclasses import dataclass, field

from graphserve.config import CacheConfig, SchedulerConfig
from graphserve.core.async_scheduler import create_scheduler
from graphserve.core.kv_cache_manager import cdiv
from graphserve.core.kv_cache_utils import hash_block_tokens
from graphserve.core.request import Request, RequestStatus
from graphserve.core.scheduler import Scheduler
from graphserve.core.scheduler_output import EngineCoreOutput, ModelRunnerOutput, SchedulerOutput
from graphserve.sampling_params import SamplingParams

EOS_ID = 1


def prompt_seed(req_id: str) -> int:
    """The seed of a request's default prompt: distinct ids get (practically) distinct prompts."""
    return zlib.crc32(req_id.encode())


def make_prompt(prompt_len: int, seed: int = 0) -> list[int]:
    """Token ids in [2, 52): never EOS and never a token the fake runner samples."""
    rng = random.Random(seed)
    return [rng.randrange(2, 52) for _ in range(prompt_len)]


def make_request(
    req_id: str,
    prompt_len: int = 0,
    max_tokens: int = 16,
    eos_token_ids=(EOS_ID,),
    prompt: list[int] | None = None,
    cache_salt: str | None = None,
    **params,
) -> Request:
    """A request with the given prompt, or a deterministic one of `prompt_len`; extra kwargs go to SamplingParams."""
    sampling_params = SamplingParams(max_tokens=max_tokens, **params)
    if prompt is None:
        prompt = make_prompt(prompt_len, seed=prompt_seed(req_id))
    return Request(req_id, prompt, sampling_params, eos_token_ids=eos_token_ids, cache_salt=cache_salt)


def make_scheduler(
    block_size: int = 4,
    num_blocks: int = 64,
    max_model_len: int = 64,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    enable_chunked_prefill: bool = True,
    enable_prefix_caching: bool = True,
    async_scheduling: bool = False,
) -> Scheduler:
    """A scheduler over a small pool (the AsyncScheduler with `async_scheduling`)."""
    scheduler_config = SchedulerConfig(
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        enable_chunked_prefill=enable_chunked_prefill,
        async_scheduling=async_scheduling,
    )
    cache_config = CacheConfig(
        block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=enable_prefix_caching
    )
    return create_scheduler(scheduler_config, cache_config)


def next_token(token_ids: list[int]) -> int:
    """The fake model: a deterministic function of the sequence so far, never EOS, always >= 100."""
    return 100 + (len(token_ids) * 7 + token_ids[-1]) % 300


@dataclass
class _RunnerState:
    token_ids: list[int]
    num_computed_tokens: int
    block_ids: list[int] = field(default_factory=list)
    salt: object = None  # (cache salt, LoRA adapter)
    fingerprints: list[int] = field(default_factory=list)  # fingerprints[i]: of (salt, token_ids[:i + 1])

    def fingerprint(self, pos: int) -> int:
        """A stand-in for the KV of position `pos`: it depends on the salt and every token up to `pos`."""
        fps = self.fingerprints
        while len(fps) <= pos:
            parent = fps[-1] if fps else hash(("salt", self.salt))
            fps.append(hash((parent, self.token_ids[len(fps)])))
        return fps[pos]


class FakeRunner:
    """Rebuilds per-request state from SchedulerOutput alone, as the real runner must, and checks the protocol.

    Samples one token for each request whose scheduled tokens complete its sequence (none for a partial prefill).
    Requests listed in `force_eos` get EOS_ID as their next sampled token.

    It also simulates the KV cache: each computed position writes a fingerprint of (cache salt, its whole prefix)
    into its slot, and each step first checks that every position a request attends to holds exactly its own
    prefix's fingerprint (so a wrong prefix-cache hit, an evicted-while-shared block or a salt leak fails) and
    that no block it writes is shared or cached.
    """

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.states: dict[str, _RunnerState] = {}
        self.force_eos: set[str] = set()
        self.kv: dict[int, int] = {}  # slot -> fingerprint of the position written there
        self.prefixes: dict[int, tuple[str | None, tuple[int, ...]]] = {}  # fingerprint -> (salt, prefix)

    def _apply(self, so: SchedulerOutput) -> None:
        for req_id in so.finished_req_ids:
            self.states.pop(req_id, None)
        for new in so.scheduled_new_reqs:
            assert new.req_id not in self.states, f"{new.req_id} sent as new while the runner holds it"
            self.states[new.req_id] = _RunnerState(
                list(new.prompt_token_ids) + list(new.output_token_ids), new.num_computed_tokens, list(new.block_ids),
                # The KV depends on the adapter as much as on the salt: a cross-adapter hit fails like a salt leak.
                salt=(self.scheduler.requests[new.req_id].cache_salt, new.lora_request),
            )
        for cached in so.scheduled_cached_reqs:
            state = self.states[cached.req_id]
            assert state.num_computed_tokens == cached.num_computed_tokens
            state.block_ids.extend(cached.new_block_ids)

    def _slot(self, state: _RunnerState, pos: int) -> int:
        block_size = self.scheduler.block_size
        return state.block_ids[pos // block_size] * block_size + pos % block_size

    def _check_reads(self, req_id: str, state: _RunnerState) -> None:
        for pos in range(state.num_computed_tokens):
            assert self.kv.get(self._slot(state, pos)) == state.fingerprint(pos), (req_id, pos)

    def _write(self, state: _RunnerState, start: int, end: int) -> None:
        pool = self.scheduler.kv_cache_manager.block_pool
        block_size = self.scheduler.block_size
        for pos in range(start, end):
            block = pool.blocks[state.block_ids[pos // block_size]]
            assert block.ref_cnt == 1 and block.block_hash is None, f"writing into shared/cached {block}"
            fp = state.fingerprint(pos)
            self.kv[self._slot(state, pos)] = fp
            self.prefixes[fp] = (state.salt, tuple(state.token_ids[: pos + 1]))

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        """Check the message against the runner's own view, then 'compute' and sample."""
        self._apply(so)
        scheduled = [r.req_id for r in so.scheduled_new_reqs] + [r.req_id for r in so.scheduled_cached_reqs]
        assert sorted(scheduled) == sorted(so.num_scheduled_tokens)
        assert so.total_num_scheduled_tokens == sum(so.num_scheduled_tokens.values())
        block_size = self.scheduler.block_size
        # Reads first, against the cache as the previous steps left it: no request may rely on a block that
        # another request writes in this same step.
        for req_id in so.num_scheduled_tokens:
            self._check_reads(req_id, self.states[req_id])
        req_ids, sampled = [], []
        for req_id, num_tokens in so.num_scheduled_tokens.items():
            state = self.states[req_id]
            assert num_tokens >= 1
            assert state.block_ids == self.scheduler.kv_cache_manager.get_block_ids(req_id)
            start = state.num_computed_tokens
            state.num_computed_tokens += num_tokens
            assert state.num_computed_tokens <= len(state.token_ids)
            assert len(state.block_ids) * block_size >= state.num_computed_tokens
            self._write(state, start, state.num_computed_tokens)
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


def reference_block_hashes(token_ids: list[int], block_size: int, cache_salt: str | None,
                           lora_key: tuple = ()) -> list[bytes]:
    """The hash chain of the full blocks of `token_ids`, rebuilt from the spec (salt and adapter in the first block
    only)."""
    hashes: list[bytes] = []
    first = (("cache_salt", cache_salt) if cache_salt is not None else ()) + tuple(lora_key)
    for i in range(len(token_ids) // block_size):
        extra = first if i == 0 and first else None
        hashes.append(hash_block_tokens(hashes[-1] if hashes else None, token_ids[i * block_size:(i + 1) * block_size],
                                        extra))
    return hashes


def check_invariants(scheduler: Scheduler, runner: FakeRunner | None = None) -> None:
    """Integrity of the pool, the block tables, the prefix-cache index and the queues."""
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
        # Scheduled tokens count as computed; with a step in flight they may include the token it samples.
        assert request.num_computed_tokens <= request.num_tokens + request.num_output_placeholders
        assert len(kv.get_blocks(request.request_id)) >= cdiv(request.num_computed_tokens, scheduler.block_size)
    for request in scheduler.waiting:
        assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert request.num_computed_tokens == 0 and not kv.get_blocks(request.request_id)
    check_prefix_cache(scheduler, runner)


def check_prefix_cache(scheduler: Scheduler, runner: FakeRunner | None = None) -> None:
    """hash -> block index consistent; cached blocks full, computed and matching their hash chain."""
    kv = scheduler.kv_cache_manager
    pool = kv.block_pool
    block_size = scheduler.block_size
    cached = pool.cached_block_hash_to_block
    for block_hash, block in cached.items():
        assert block.block_hash == block_hash, block
    assert sum(1 for b in pool.blocks if b.block_hash is not None) == len(cached), "a hashed block is not indexed"
    if not scheduler.enable_prefix_caching:
        assert not cached
    for request in scheduler.running:
        num_computed_blocks = request.num_computed_tokens // block_size
        lora_key = request.lora_request.cache_key if request.lora_request is not None else ()
        chain = reference_block_hashes(request.all_token_ids, block_size, request.cache_salt, lora_key)
        assert request.block_hashes == chain[: len(request.block_hashes)]
        for i, block in enumerate(kv.get_blocks(request.request_id)):
            if block.block_hash is not None:  # cached blocks are full and computed, under their chain hash
                assert i < num_computed_blocks and block.block_hash == chain[i], (request, i, block)
            if block.ref_cnt > 1:  # only cached blocks are ever shared
                assert block.block_hash is not None, (request, i, block)
    if runner is not None:
        for block in pool.blocks:
            if block.block_hash is not None:
                _check_block_content(runner, block, block_size)


def _check_block_content(runner: FakeRunner, block, block_size: int) -> None:
    """The fake KV of a cached block: every slot written, one prefix, whose chain hash is the block's hash."""
    slots = range(block.block_id * block_size, (block.block_id + 1) * block_size)
    assert all(slot in runner.kv for slot in slots), f"cached {block} is not full"
    salt, prefix = runner.prefixes[runner.kv[slots[-1]]]
    assert len(prefix) % block_size == 0
    for j, slot in enumerate(slots):
        assert runner.prefixes[runner.kv[slot]] == (salt, prefix[: len(prefix) - block_size + j + 1])
    cache_salt, lora_request = salt
    lora_key = lora_request.cache_key if lora_request is not None else ()
    assert reference_block_hashes(list(prefix), block_size, cache_salt, lora_key)[-1] == block.block_hash


def find_output(outputs: list[EngineCoreOutput], req_id: str) -> EngineCoreOutput | None:
    """The output of one request in a step's outputs, or None."""
    matches = [o for o in outputs if o.req_id == req_id]
    assert len(matches) <= 1
    return matches[0] if matches else None
