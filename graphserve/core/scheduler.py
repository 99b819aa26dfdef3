"""Continuous batching, vLLM V1 style: no prefill/decode phases, one token budget per step.

Each step gives every request `num_tokens - num_computed_tokens` more tokens (prompt chunks and decode tokens
alike), running requests first, then waiting ones in FCFS order. When the KV pool runs out, the newest running
request is preempted (recompute: its blocks are freed and it starts over from the front of the waiting queue).

With prefix caching a waiting request starts from the longest cached chain of its full blocks. A block becomes
shareable only once computed, so a waiting request whose next block is being written by this very step (a
sibling of `n > 1`, or the same system prompt arriving together) waits one step and then hits it instead of
computing it a second time.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable

from graphserve.config import CacheConfig, LoRAConfig, SchedulerConfig, SpeculativeConfig
from graphserve.core.kv_cache_manager import KVCacheManager, cdiv
from graphserve.core.kv_cache_utils import BlockHash
from graphserve.core.request import Request, RequestStatus
from graphserve.core.scheduler_output import (
    CachedRequestData,
    EngineCoreOutput,
    LogprobsLists,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)

_RUNNING = RequestStatus.RUNNING


def check_stop(request: Request, token_id: int, max_model_len: int) -> bool:
    """Set a FINISHED_* status if `token_id`, just appended to the request, ends it."""
    params = request.sampling_params
    num_output_tokens = len(request.output_token_ids)
    # Stop ids only count once min_tokens tokens exist (the sampler masks them before that anyway).
    if num_output_tokens >= params.min_tokens:
        if token_id in request.eos_token_ids and not params.ignore_eos:
            request.status = RequestStatus.FINISHED_STOPPED
            return True  # stop_reason stays None for EOS, as in vLLM
        stop_token_ids = params.stop_token_ids
        if stop_token_ids and token_id in stop_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
            request.stop_reason = token_id
            return True
    if num_output_tokens >= request.max_tokens or len(request.all_token_ids) >= max_model_len:
        request.status = RequestStatus.FINISHED_LENGTH_CAPPED
        return True
    return False


def max_kv_tokens(request: Request, max_model_len: int) -> int:
    """The most KV slots the request can ever hold: every token but the last one sampled."""
    num_prompt = request.num_prompt_tokens
    # A prompt of exactly max_model_len still samples one token; that token's KV is never written.
    return min(num_prompt + request.max_tokens - 1, max(max_model_len - 1, num_prompt))


def _truncate_logprobs(logprobs: LogprobsLists | None, num_positions: int) -> LogprobsLists | None:
    if logprobs is None or len(logprobs.ranks) <= num_positions:
        return logprobs
    return LogprobsLists(
        logprobs.token_ids[:num_positions], logprobs.logprobs[:num_positions], logprobs.ranks[:num_positions]
    )


class Scheduler:
    """Decides, each step, which requests compute how many tokens, and books their KV blocks."""

    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 lora_config: LoRAConfig | None = None,
                 speculative_config: SpeculativeConfig | None = None) -> None:
        if cache_config.num_blocks is None:
            raise ValueError("cache_config.num_blocks must be resolved (by the worker) before building the Scheduler")
        self.scheduler_config = scheduler_config
        self.cache_config = cache_config
        self.max_model_len = scheduler_config.max_model_len
        self.max_num_seqs = scheduler_config.max_num_seqs
        self.max_num_batched_tokens = scheduler_config.max_num_batched_tokens
        self.enable_chunked_prefill = scheduler_config.enable_chunked_prefill
        self.block_size = cache_config.block_size
        self.enable_prefix_caching = cache_config.enable_prefix_caching
        # Distinct LoRA adapters the running requests may use (the device slots); 0 = LoRA off.
        self.max_loras = lora_config.max_loras if lora_config is not None else 0
        # Speculative decoding: steps with at least this many running requests verify no drafts.
        self.spec_disable_batch_size = None
        # A draft model writes its speculative positions past a step's tokens: the slots are reserved with the step.
        self.num_lookahead_tokens = 0
        if speculative_config is not None:
            self.spec_disable_batch_size = speculative_config.disable_by_batch_size
            if speculative_config.method == "draft_model":
                self.num_lookahead_tokens = speculative_config.num_speculative_tokens
        # Cumulative since start: verify steps per request, draft tokens verified, drafts accepted.
        self.spec_num_drafts = 0
        self.spec_num_draft_tokens = 0
        self.spec_num_accepted_tokens = 0
        self.kv_cache_manager = KVCacheManager(
            cache_config.block_size, cache_config.num_blocks, enable_caching=self.enable_prefix_caching
        )
        self.requests: dict[str, Request] = {}  # every unfinished request, waiting or running
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Finished, aborted or preempted since the last schedule(): the runner drops their state.
        self.finished_req_ids: set[str] = set()
        self.num_preemptions = 0  # total since start
        # Prefix-cache stats, in tokens, cumulative since start: every admission of a request that may use the
        # cache (also a resume after preemption) queries its num_tokens and hits the cached part of them.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        # Requests (with their chunk's start) that fill at least one block this step: their hashes must not be
        # hit before the step's output arrives.
        self._block_writers: list[tuple[Request, int]] = []

    # -- requests in and out ----------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a new request; raise ValueError if it could never run to completion."""
        req_id = request.request_id
        if req_id in self.requests:
            raise ValueError(f"request id {req_id!r} is already in the scheduler")
        num_prompt = request.num_prompt_tokens
        if num_prompt == 0:
            raise ValueError(f"request {req_id!r}: the prompt is empty")
        if num_prompt > self.max_model_len:
            raise ValueError(
                f"request {req_id!r}: the prompt ({num_prompt} tokens) is longer than max_model_len "
                f"({self.max_model_len})"
            )
        if request.max_tokens < 1:
            raise ValueError(f"request {req_id!r}: max_tokens must be >= 1, got {request.max_tokens}")
        # A request that alone outgrows the pool would preempt itself forever: refuse it up front.
        num_kv_tokens = max_kv_tokens(request, self.max_model_len)
        capacity = self.kv_cache_manager.num_blocks * self.block_size
        if cdiv(num_kv_tokens, self.block_size) > self.kv_cache_manager.num_blocks:
            raise ValueError(
                f"request {req_id!r} may need KV for {num_kv_tokens} tokens (prompt {num_prompt}, max_tokens "
                f"{request.max_tokens}) but the KV cache holds {capacity}; lower max_tokens or give the cache "
                "more memory"
            )
        request.status = RequestStatus.WAITING
        self.requests[req_id] = request
        self.waiting.append(request)

    def finish_requests(self, req_ids: str | Iterable[str], finished_status: RequestStatus) -> None:
        """End requests from outside (stop string, abort); unknown ids are ignored, no output is emitted."""
        if not RequestStatus.is_finished(finished_status):
            raise ValueError(f"finished_status must be a FINISHED_* status, got {finished_status!r}")
        if isinstance(req_ids, str):
            req_ids = (req_ids,)
        from_running = from_waiting = False
        for req_id in req_ids:
            request = self.requests.pop(req_id, None)
            if request is None:
                continue
            if request.status == _RUNNING:
                from_running = True
            else:
                from_waiting = True
            request.status = finished_status
            self.kv_cache_manager.free(request)
            self.finished_req_ids.add(req_id)
        # One rebuild per call instead of a list.remove per id keeps mass aborts linear.
        if from_running:
            self.running = [r for r in self.running if r.status == _RUNNING]
        if from_waiting:
            self.waiting = deque(r for r in self.waiting if not r.is_finished())

    # -- scheduling ---------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Pick this step's tokens: running requests first, then (if nobody was preempted) waiting ones."""
        num_scheduled_tokens: dict[str, int] = {}
        cached_reqs: list[CachedRequestData] = []
        new_reqs: list[NewRequestData] = []
        spec_tokens: dict[str, list[int]] = {}
        token_budget, preempted = self._schedule_running(num_scheduled_tokens, cached_reqs, spec_tokens)
        # After a preemption the pool is known to be short: admitting new work would only thrash.
        if not preempted:
            token_budget = self._schedule_waiting(token_budget, num_scheduled_tokens, new_reqs)
        self._block_writers.clear()
        finished_req_ids, self.finished_req_ids = self.finished_req_ids, set()
        return SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cached_reqs,
            num_scheduled_tokens=num_scheduled_tokens,
            total_num_scheduled_tokens=self.max_num_batched_tokens - token_budget,
            finished_req_ids=finished_req_ids,
            scheduled_spec_decode_tokens=spec_tokens,
        )

    def _schedule_running(
        self, num_scheduled_tokens: dict[str, int], cached_reqs: list[CachedRequestData],
        spec_tokens: dict[str, list[int]],
    ) -> tuple[int, bool]:
        """Schedule running requests in order, preempting from the back on KV shortage; returns (budget, preempted)."""
        token_budget = self.max_num_batched_tokens
        running = self.running
        req_to_blocks = self.kv_cache_manager.req_to_blocks
        block_size = self.block_size
        preempted = False
        speculate = self.spec_disable_batch_size is None or len(running) < self.spec_disable_batch_size
        # Preemption only pops from the back, at or after the current request, so iterating while it shrinks
        # is safe: the iterator just ends sooner.
        for request in running:
            if token_budget <= 0:
                break
            # Positions before `start` are computed or being computed; placeholders are tokens a step still in
            # flight samples, known to the device but not yet to us (AsyncScheduler; always 0 here otherwise).
            start = request.num_computed_tokens
            num_placeholders = request.num_output_placeholders
            num_new_tokens = len(request.all_token_ids) + num_placeholders - start
            if num_placeholders and self._ends_with_placeholders(request):
                continue  # its last token is being sampled now: the in-flight step's output finishes it
            drafts = request.spec_token_ids
            if drafts:
                request.spec_token_ids = []  # consumed by this step (or dropped)
                drafts = self._limit_drafts(request, drafts, token_budget - num_new_tokens) if speculate else []
                num_new_tokens += len(drafts)
            if num_new_tokens > token_budget:
                if not self.enable_chunked_prefill:
                    continue  # keeps its place; a later, shorter request may still fit
                num_new_tokens = token_budget
            req_id = request.request_id
            # Lookahead slots (draft model): never past the context, so never more KV than add_request promised.
            lookahead = 0
            if self.num_lookahead_tokens and speculate:
                lookahead = max(0, min(self.num_lookahead_tokens, self.max_model_len - start - num_new_tokens))
            # Fast path for the common decode step: the new token fits the last block (a running request always
            # holds blocks). This is allocate_slots' own first check, without the call.
            if start + num_new_tokens + lookahead <= len(req_to_blocks[req_id]) * block_size:
                new_block_ids = []
            else:
                new_block_ids, preempted_now = self._allocate_or_preempt(request, num_new_tokens + lookahead)
                preempted = preempted or preempted_now
                if new_block_ids is None:
                    break  # the request preempted itself: everything after it already went too
            if start + num_new_tokens >= request.next_cache_boundary:
                self._block_writers.append((request, start))
            cached_reqs.append(CachedRequestData(req_id, new_block_ids, start))
            if drafts:
                spec_tokens[req_id] = drafts
            num_scheduled_tokens[req_id] = num_new_tokens
            token_budget -= num_new_tokens
            self._book_scheduled(request, start, num_new_tokens)
        return token_budget, preempted

    def _limit_drafts(self, request: Request, drafts: list[int], budget_left: int) -> list[int]:
        """The drafts a verify step may take: within the token budget, and never so many that accepting all of
        them (plus the bonus token) would pass max_tokens or the context, so the KV stays within what
        add_request promised the request."""
        num_tokens = len(request.all_token_ids)
        limit = min(budget_left, request.max_tokens - len(request.output_token_ids) - 1,
                    self.max_model_len - num_tokens - 1)
        if limit <= 0 or request.num_computed_tokens != num_tokens - 1:
            return []  # drafts only extend a request whose next step is a plain decode
        return drafts[:limit]

    def _ends_with_placeholders(self, request: Request) -> bool:
        """True when the tokens being sampled for the request reach max_tokens or the context limit."""
        num_placeholders = request.num_output_placeholders
        return (len(request.output_token_ids) + num_placeholders >= request.max_tokens
                or len(request.all_token_ids) + num_placeholders >= self.max_model_len)

    def _book_scheduled(self, request: Request, start: int, num_new_tokens: int) -> None:
        """The scheduled tokens count as computed from now on (their KV is written before any later step reads it)."""
        request.num_computed_tokens = start + num_new_tokens

    def _allocate_or_preempt(self, request: Request, num_new_tokens: int) -> tuple[list[int] | None, bool]:
        """Allocate slots, preempting the newest running requests until they fit; (None, True) if it went itself."""
        running = self.running
        preempted = False
        while (new_blocks := self.kv_cache_manager.allocate_slots(request, num_new_tokens)) is None:
            victim = running.pop()
            self._preempt(victim)
            preempted = True
            if victim is request:
                return None, True
        return [block.block_id for block in new_blocks], preempted

    def _schedule_waiting(
        self, token_budget: int, num_scheduled_tokens: dict[str, int], new_reqs: list[NewRequestData]
    ) -> int:
        """Admit waiting requests FCFS while budget, max_num_seqs and KV blocks allow; returns the budget left.

        A request whose next cacheable block is being written this step is skipped (it keeps its place) so that
        it hits that block next step.
        """
        waiting, running = self.waiting, self.running
        kv_cache_manager = self.kv_cache_manager
        being_written: set[BlockHash] | None = None  # built on first need
        deferred: list[Request] = []
        active_loras = {r.lora_int_id for r in running if r.lora_int_id} if self.max_loras else set()
        while waiting and token_budget > 0 and len(running) < self.max_num_seqs:
            request = waiting[0]
            lora_id = request.lora_int_id
            if self.max_loras and lora_id and lora_id not in active_loras and len(active_loras) >= self.max_loras:
                deferred.append(waiting.popleft())  # its adapter waits for a free slot; it keeps its place
                continue
            computed_blocks, num_computed_tokens = kv_cache_manager.get_computed_blocks(request)
            next_hash = kv_cache_manager.next_block_hash(request, len(computed_blocks))
            if next_hash is not None:
                if being_written is None:
                    being_written = self._hashes_being_written(num_scheduled_tokens)
                if next_hash in being_written:
                    deferred.append(waiting.popleft())
                    continue
            num_new_tokens = request.num_tokens - num_computed_tokens
            if num_new_tokens > token_budget:
                if not self.enable_chunked_prefill:
                    break  # strict FCFS: nobody overtakes the head of the queue
                num_new_tokens = token_budget
            if kv_cache_manager.allocate_slots(request, num_new_tokens, computed_blocks) is None:
                break
            waiting.popleft()
            running.append(request)
            if lora_id:
                active_loras.add(lora_id)
            self._admit(request, num_computed_tokens, new_reqs)
            start = request.num_computed_tokens
            if being_written is not None:
                being_written.update(kv_cache_manager.hashes_to_be_written(request, start, num_new_tokens))
            elif start + num_new_tokens >= request.next_cache_boundary:
                self._block_writers.append((request, start))
            num_scheduled_tokens[request.request_id] = num_new_tokens
            token_budget -= num_new_tokens
            self._book_scheduled(request, start, num_new_tokens)
        if deferred:
            waiting.extendleft(reversed(deferred))
        return token_budget

    def _admit(self, request: Request, num_computed_tokens: int, new_reqs: list[NewRequestData]) -> None:
        """Mark an allocated waiting request running, starting after its cached prefix, and describe it."""
        request.status = _RUNNING
        request.num_computed_tokens = num_computed_tokens
        if request.num_preemptions == 0:
            request.num_cached_tokens = num_computed_tokens  # as vLLM: the hit of the first scheduling
            request.first_scheduled_time = time.monotonic()
        if self.kv_cache_manager.can_use_cache(request):
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += num_computed_tokens
        req_id = request.request_id
        new_reqs.append(
            NewRequestData(
                req_id=req_id,
                prompt_token_ids=list(request.prompt_token_ids),
                output_token_ids=list(request.output_token_ids),  # non-empty when resumed after preemption
                sampling_params=request.sampling_params,
                block_ids=self.kv_cache_manager.get_block_ids(req_id),
                num_computed_tokens=num_computed_tokens,
                lora_request=request.lora_request,
            )
        )

    def _hashes_being_written(self, num_scheduled_tokens: dict[str, int]) -> set[BlockHash]:
        """Hashes of the blocks that the requests scheduled so far fill this step."""
        hashes_to_be_written = self.kv_cache_manager.hashes_to_be_written
        being_written: set[BlockHash] = set()
        for request, start in self._block_writers:
            being_written.update(hashes_to_be_written(request, start, num_scheduled_tokens[request.request_id]))
        return being_written

    def _preempt(self, request: Request) -> None:
        """Recompute-mode preemption: drop the KV, requeue at the front of the waiting queue."""
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0  # an in-flight step's output for it is dropped (status is not RUNNING)
        request.num_preemptions += 1
        request.spec_token_ids = []
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        self.finished_req_ids.add(request.request_id)

    # -- results --------------------------------------------------------------------------------------------------
    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """Append sampled tokens, cache the blocks computed by now, apply stop checks, free finished requests."""
        num_scheduled_tokens = scheduler_output.num_scheduled_tokens
        if len(model_runner_output.req_ids) != len(num_scheduled_tokens):
            raise RuntimeError(f"model runner returned {len(model_runner_output.req_ids)} requests for "
                               f"{len(num_scheduled_tokens)} scheduled: it must return every scheduled request")
        sampled_logprobs = model_runner_output.sampled_logprobs
        logprobs = model_runner_output.logprobs
        prompt_logprobs = model_runner_output.prompt_logprobs
        requests = self.requests
        max_model_len = self.max_model_len
        kv_cache_manager = self.kv_cache_manager
        spec_decode_tokens = scheduler_output.scheduled_spec_decode_tokens
        new_spec_tokens = model_runner_output.spec_token_ids
        outputs: list[EngineCoreOutput] = []
        num_finished = 0
        for req_id, token_ids in zip(model_runner_output.req_ids, model_runner_output.sampled_token_ids):
            request = requests.get(req_id)
            if request is None or request.status is not _RUNNING:
                continue  # finished from outside between schedule() and now
            new_prompt_logprobs = prompt_logprobs.get(req_id) if prompt_logprobs else None
            if not token_ids:  # partial prefill
                if request.num_computed_tokens >= request.next_cache_boundary:
                    kv_cache_manager.cache_blocks(request)  # full blocks computed by now become shareable
                self._check_partial(request, scheduler_output)
                if new_prompt_logprobs is not None:
                    outputs.append(EngineCoreOutput(req_id, [], new_prompt_logprobs=new_prompt_logprobs,
                                                    num_cached_tokens=request.num_cached_tokens))
                continue
            if spec_decode_tokens and req_id in spec_decode_tokens:
                self._rollback_rejected(request, len(spec_decode_tokens[req_id]), len(token_ids))
            if len(token_ids) == 1:  # the common case, kept free of extra calls
                token_id = token_ids[0]
                request.output_token_ids.append(token_id)
                request.all_token_ids.append(token_id)
                stopped = check_stop(request, token_id, max_model_len)
            else:
                token_ids, stopped = self._append_tokens(request, token_ids)
            # After the append: a block may end with the token just sampled (a step scheduled after this one,
            # async scheduling, computes it), and a block's hash needs all of its tokens.
            if request.num_computed_tokens >= request.next_cache_boundary:
                kv_cache_manager.cache_blocks(request)
            new_sampled_logprobs = sampled_logprobs.get(req_id) if sampled_logprobs else None
            new_logprobs = logprobs.get(req_id) if logprobs else None
            finish_reason = None
            if new_spec_tokens and not stopped:
                request.spec_token_ids = new_spec_tokens.get(req_id, [])
            if stopped:
                num_finished += 1
                self._free_finished(request)
                finish_reason = request.get_finished_reason()
                if new_sampled_logprobs is not None:
                    new_sampled_logprobs = new_sampled_logprobs[: len(token_ids)]
                new_logprobs = _truncate_logprobs(new_logprobs, len(token_ids))
            outputs.append(
                EngineCoreOutput(
                    req_id,
                    token_ids,
                    new_sampled_logprobs if new_sampled_logprobs is not None else [],
                    new_logprobs,
                    new_prompt_logprobs,
                    finish_reason,
                    request.stop_reason,
                    request.num_cached_tokens,
                    request.first_scheduled_time,
                )
            )
        if num_finished:
            self.running = [r for r in self.running if r.status == _RUNNING]
        return outputs

    def _rollback_rejected(self, request: Request, num_drafts: int, num_emitted: int) -> None:
        """A verify step emitted the accepted drafts plus one token: the rejected drafts' positions stop counting as
        computed (their KV slots are rewritten by the next step; the blocks stay with the request, and only
        blocks full of computed tokens are ever cached)."""
        num_accepted = num_emitted - 1
        request.num_computed_tokens -= num_drafts - num_accepted
        self.spec_num_drafts += 1
        self.spec_num_draft_tokens += num_drafts
        self.spec_num_accepted_tokens += num_accepted

    @staticmethod
    def _check_partial(request: Request, scheduler_output: SchedulerOutput) -> None:
        """A step that sampled nothing for the request must have ended before its last known token."""
        req_id = request.request_id
        start = next(d.num_computed_tokens for d in (*scheduler_output.scheduled_new_reqs,
                                                     *scheduler_output.scheduled_cached_reqs) if d.req_id == req_id)
        if start + scheduler_output.num_scheduled_tokens[req_id] >= len(request.all_token_ids):
            # Scheduling it again would compute zero tokens forever.
            raise RuntimeError(f"model runner sampled no token for {req_id!r} although its input is complete")

    def _append_tokens(self, request: Request, token_ids: list[int]) -> tuple[list[int], bool]:
        """Append several sampled tokens one by one, cutting them at the first that stops the request."""
        for i, token_id in enumerate(token_ids):
            request.append_output_token_ids([token_id])
            if check_stop(request, token_id, self.max_model_len):
                return token_ids[: i + 1], True
        return token_ids, False

    def _free_finished(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        del self.requests[request.request_id]
        self.finished_req_ids.add(request.request_id)

    # -- stats ------------------------------------------------------------------------------------------------------
    def get_request(self, req_id: str) -> Request | None:
        """The unfinished request with this id, or None."""
        return self.requests.get(req_id)

    def has_unfinished_requests(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        """Waiting plus running requests."""
        return len(self.requests)

    @property
    def num_running(self) -> int:
        """Requests holding KV blocks and scheduled each step."""
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        """Requests queued (new or preempted)."""
        return len(self.waiting)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (e.g. after new weights); False, with nothing done, while blocks are in use."""
        return self.kv_cache_manager.reset_prefix_cache()

    @property
    def prefix_cache_hit_rate(self) -> float:
        """prefix_cache_hits / prefix_cache_queries since start (0.0 before any query)."""
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of KV blocks in use, in [0, 1]."""
        return self.kv_cache_manager.usage
