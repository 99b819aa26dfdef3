"""Property test: random arrivals, steps, aborts and EOS over a small pool keep the scheduler consistent."""
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from core_testutils import EOS_ID, FakeRunner, check_invariants, make_request, make_scheduler, next_token
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
    )
    def setup(self, block_size, extra_blocks, chunked, budget, max_num_seqs):
        self.scheduler = make_scheduler(
            block_size=block_size,
            num_blocks=cdiv(MAX_MODEL_LEN, block_size) + extra_blocks,
            max_model_len=MAX_MODEL_LEN,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget if chunked else max(budget, MAX_MODEL_LEN),
            enable_chunked_prefill=chunked,
        )
        self.runner = FakeRunner(self.scheduler)
        self.requests = {}  # every request added: id -> Request
        self.streamed = {}  # id -> tokens received through EngineCoreOutputs
        self.finish_reasons = {}  # id -> finish reason seen in an output, or "abort"
        self.preemptions_seen = 0

    @precondition(lambda self: len(self.requests) < MAX_REQUESTS)
    @rule(
        length=st.one_of(st.integers(1, MAX_MODEL_LEN // 2), st.integers(1, MAX_MODEL_LEN)),
        aligned=st.booleans(),
        delta=st.sampled_from([-1, 0, 1]),
        max_tokens=st.integers(1, 16),
        ignore_eos=st.booleans(),
        copies=st.integers(1, 3),
    )
    def add_request(self, length, aligned, delta, max_tokens, ignore_eos, copies):
        block_size = self.scheduler.block_size
        if aligned:  # multiples of block_size +-1 hit the block-boundary cases
            length = min(max(max(length // block_size, 1) * block_size + delta, 1), MAX_MODEL_LEN)
        for _ in range(copies):  # bursts fill the pool, so that running requests get preempted
            req_id = f"r{len(self.requests)}"
            request = make_request(req_id, length, max_tokens=max_tokens, ignore_eos=ignore_eos)
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

    @invariant()
    def consistent(self):
        if hasattr(self, "scheduler"):
            check_invariants(self.scheduler)

    def _step(self):
        scheduler = self.scheduler
        so = scheduler.schedule()
        assert so.total_num_scheduled_tokens <= scheduler.max_num_batched_tokens
        assert len(so.num_scheduled_tokens) <= scheduler.max_num_seqs
        outputs = scheduler.update_from_output(so, self.runner.execute_model(so))
        check_invariants(scheduler)  # also during the teardown drain
        for output in outputs:
            assert output.req_id not in self.finish_reasons, "output after the request finished"
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
            if not scheduler.has_unfinished_requests():
                break
            self._step()
        assert not scheduler.has_unfinished_requests()
        last = scheduler.schedule()
        assert last.is_empty
        self.runner.execute_model(last)  # hands the last finished ids to the runner
        assert not self.runner.states
        assert scheduler.kv_cache_manager.get_num_free_blocks() == scheduler.kv_cache_manager.num_blocks
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
    max_examples=50,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSchedulerStateMachine = SchedulerMachine.TestCase
