"""Property test: random arrivals, steps, aborts and EOS over a small pool keep the scheduler consistent.

Prompts are drawn from a few shared prefixes (system prompts) plus unique suffixes, arrive in forks of identical
prompts (n > 1), with or without a cache salt, so prefix-cache sharing, eviction and reset are exercised too;
the fake runner checks that every position a request attends to holds its own prefix's KV.

With async scheduling the machine keeps one step in flight: step N+1 is scheduled and run before step N's output
is booked, as the engine core does on GPUs (the fake runner, like the device, knows N's tokens when it runs N+1).
"""
from core_testutils import (
    EOS_ID,
    FakeRunner,
    check_invariants,
    make_prompt,
    make_request,
    make_scheduler,
    next_token,
)
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from graphserve.core.kv_cache_manager import cdiv
from graphserve.core.request import RequestStatus

MAX_MODEL_LEN = 32
MAX_REQUESTS = 24


class SchedulerMachine(RuleBasedStateMachine):
    """Scheduler + fake runner; the pool is small enough that preemption is common."""

    @initialize(
        block_size=st.sampled_from([1, 2, 4, 8]),
        extra_blocks=st.integers(0, 3),
        chunked=st.booleans(),
        budget=st.integers(1, 40),
        max_num_seqs=st.integers(1, 6),
        caching=st.sampled_from([True, True, True, False]),
        async_scheduling=st.booleans(),
    )
    def setup(self, block_size, extra_blocks, chunked, budget, max_num_seqs, caching, async_scheduling):
        self.scheduler = make_scheduler(
            block_size=block_size,
            num_blocks=cdiv(MAX_MODEL_LEN, block_size) + extra_blocks,
            max_model_len=MAX_MODEL_LEN,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget if chunked else max(budget, MAX_MODEL_LEN),
            enable_chunked_prefill=chunked,
            enable_prefix_caching=caching,
            async_scheduling=async_scheduling,
        )
        # Shared prefixes ending on, just before and just after block boundaries.
        self.prefixes = [make_prompt(n * block_size + d, seed=1000 + n) for n, d in ((1, 0), (2, 1), (3, -1))]
        self.runner = FakeRunner(self.scheduler)
        self.requests = {}  # every request added: id -> Request
        self.streamed = {}  # id -> tokens received through EngineCoreOutputs
        self.finish_reasons = {}  # id -> finish reason seen in an output, or "abort"
        self.preemptions_seen = 0
        self.async_scheduling = async_scheduling
        self.inflight = None  # async: (SchedulerOutput, ModelRunnerOutput) of the step not booked yet

    @precondition(lambda self: len(self.requests) < MAX_REQUESTS)
    @rule(
        length=st.one_of(st.integers(1, MAX_MODEL_LEN // 2), st.integers(1, MAX_MODEL_LEN)),
        aligned=st.booleans(),
        delta=st.sampled_from([-1, 0, 1]),
        max_tokens=st.integers(1, 16),
        ignore_eos=st.booleans(),
        copies=st.integers(1, 3),
        prefix=st.sampled_from([None, 0, 1, 2]),
        salt=st.sampled_from([None, None, "tenant-a", "tenant-b"]),
        prompt_logprobs=st.sampled_from([None, None, None, 1]),
    )
    def add_request(self, length, aligned, delta, max_tokens, ignore_eos, copies, prefix, salt, prompt_logprobs):
        block_size = self.scheduler.block_size
        if aligned:  # multiples of block_size +-1 hit the block-boundary cases
            length = min(max(max(length // block_size, 1) * block_size + delta, 1), MAX_MODEL_LEN)
        shared = self.prefixes[prefix] if prefix is not None else []
        prompt = (shared + make_prompt(length, seed=len(self.requests)))[:length]
        # Copies are forks of one prompt (n > 1); bursts also fill the pool, so that requests get preempted.
        for _ in range(copies):
            req_id = f"r{len(self.requests)}"
            request = make_request(req_id, prompt=prompt, max_tokens=max_tokens, ignore_eos=ignore_eos,
                                   cache_salt=salt, prompt_logprobs=prompt_logprobs)
            self.scheduler.add_request(request)
            self.requests[req_id] = request
            self.streamed[req_id] = []

    @rule(num_steps=st.integers(1, 4))
    def step(self, num_steps):
        for _ in range(num_steps):
            self._step()

    @precondition(lambda self: self.scheduler.has_unfinished_requests())
    @rule(index=st.integers(0, MAX_REQUESTS - 1))
    def abort(self, index):
        req_ids = sorted(self.scheduler.requests)
        req_id = req_ids[index % len(req_ids)]
        self.scheduler.finish_requests([req_id, "never-added"], RequestStatus.FINISHED_ABORTED)
        assert self.scheduler.get_request(req_id) is None
        self.finish_reasons[req_id] = "abort"

    @precondition(lambda self: self.scheduler.num_running > 0)
    @rule(index=st.integers(0, MAX_REQUESTS - 1))
    def emit_eos(self, index):
        running = self.scheduler.running
        self.runner.force_eos.add(running[index % len(running)].request_id)

    @rule()
    def reset_prefix_cache(self):
        pool = self.scheduler.kv_cache_manager.block_pool
        idle = pool.get_num_free_blocks() == pool.num_blocks
        num_cached = pool.num_cached_blocks
        assert self.scheduler.reset_prefix_cache() == idle
        if idle:
            assert pool.num_cached_blocks == 0 and all(b.block_hash is None for b in pool.blocks)
            event("prefix cache reset")
        else:
            assert pool.num_cached_blocks == num_cached

    @invariant()
    def consistent(self):
        if hasattr(self, "scheduler"):
            check_invariants(self.scheduler, self.runner)
            for request in self.scheduler.requests.values():
                assert request.num_output_placeholders in (0, 1), request  # at most one step in flight
                if self.inflight is None:  # nothing in flight: nothing counted as in flight
                    assert request.num_output_placeholders == 0, request

    def _step(self):
        scheduler = self.scheduler
        cached_before = set(scheduler.kv_cache_manager.block_pool.cached_block_hash_to_block)
        so = scheduler.schedule()
        assert so.total_num_scheduled_tokens <= scheduler.max_num_batched_tokens
        assert len(so.num_scheduled_tokens) <= scheduler.max_num_seqs
        for new in so.scheduled_new_reqs:
            if new.num_computed_tokens:
                assert self.requests[new.req_id].sampling_params.prompt_logprobs is None
                event("prefix-cache hit")
        if any(b.ref_cnt > 1 for b in scheduler.kv_cache_manager.block_pool.blocks):
            event("block shared")
        model_output = self.runner.execute_model(so)
        if self.async_scheduling:  # book the step launched before this one
            booked, self.inflight = self.inflight, None if so.is_empty else (so, model_output)
            outputs = scheduler.update_from_output(*booked) if booked is not None else []
            if booked is not None and self.inflight is not None:
                event("step booked while the next one is in flight")
        else:
            outputs = scheduler.update_from_output(so, model_output)
        check_invariants(scheduler, self.runner)  # also during the teardown drain
        if cached_before - set(scheduler.kv_cache_manager.block_pool.cached_block_hash_to_block):
            event("cached block evicted")
        for output in outputs:
            assert output.req_id not in self.finish_reasons, "output after the request finished"
            assert output.num_cached_tokens == self.requests[output.req_id].num_cached_tokens
            self.streamed[output.req_id] += output.new_token_ids
            if output.finished:
                self.finish_reasons[output.req_id] = output.finish_reason
        if scheduler.num_preemptions > self.preemptions_seen:
            event("preempted")
        self.preemptions_seen = scheduler.num_preemptions

    def teardown(self):
        if not hasattr(self, "scheduler"):
            return
        scheduler = self.scheduler
        # Every request runs to completion in a bounded number of steps, however it was preempted.
        for _ in range(50 * MAX_REQUESTS * MAX_MODEL_LEN):
            if not scheduler.has_unfinished_requests() and self.inflight is None:
                break
            self._step()
        assert not scheduler.has_unfinished_requests() and self.inflight is None
        last = scheduler.schedule()
        assert last.is_empty
        self.runner.execute_model(last)  # hands the last finished ids to the runner
        assert not self.runner.states
        assert scheduler.kv_cache_manager.get_num_free_blocks() == scheduler.kv_cache_manager.num_blocks
        assert scheduler.reset_prefix_cache()  # nothing in use any more
        assert scheduler.prefix_cache_hits <= scheduler.prefix_cache_queries
        if not scheduler.enable_prefix_caching:
            assert scheduler.prefix_cache_queries == 0 and all(r.num_cached_tokens == 0 for r in self.requests.values())
        for req_id, request in self.requests.items():
            self._check_finished(req_id, request)

    def _check_finished(self, req_id, request):
        reason = self.finish_reasons[req_id]
        assert request.is_finished() and request.get_finished_reason() == reason
        tokens = self.streamed[req_id]
        assert tokens == request.output_token_ids
        if reason == "abort":
            return
        expected_stop = bool(tokens) and tokens[-1] == EOS_ID and not request.sampling_params.ignore_eos
        assert (reason == "stop") == expected_stop
        if reason == "length":
            assert len(tokens) == request.max_tokens or request.num_tokens >= MAX_MODEL_LEN
        # Recompute after preemption reproduces the same continuation: check every non-EOS token.
        token_ids = list(request.prompt_token_ids)
        for token_id in tokens:
            assert token_id in (EOS_ID, next_token(token_ids))
            token_ids.append(token_id)


SchedulerMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSchedulerStateMachine = SchedulerMachine.TestCase
