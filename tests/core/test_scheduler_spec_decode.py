"""Scheduler with speculative decoding: drafts scheduled after the decode token, capped by max_tokens, the context
and the budget; rejected positions rolled back (num_computed_tokens, and never a cached block holding them);
drafts dropped on preemption and in steps at or above disable_by_batch_size.

The fake runner accepts a draft iff it is what the fake model would generate, proposes some right and some wrong
drafts, and checks through the KV fingerprints that no step reads a slot a rejected draft left behind."""
from core_testutils import FakeRunner, check_invariants, make_request, next_token

from graphserve.config import CacheConfig, SchedulerConfig
from graphserve.core.async_scheduler import create_scheduler
from graphserve.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from graphserve.spec_decode.config import SpeculativeConfig


def make_spec_scheduler(k: int = 3, num_blocks: int = 64, max_num_batched_tokens: int = 64, max_model_len: int = 64,
                        disable_by_batch_size: int | None = None):
    spec = SpeculativeConfig("ngram", k, disable_by_batch_size=disable_by_batch_size)
    return create_scheduler(SchedulerConfig(max_model_len=max_model_len, max_num_seqs=8,
                                            max_num_batched_tokens=max_num_batched_tokens),
                            CacheConfig(block_size=4, num_blocks=num_blocks), None, spec)


class SpecFakeRunner(FakeRunner):
    """Verifies drafts against the fake model and proposes the next ones: right ones for the first `good` of k,
    then a wrong one (so both acceptance and rollback happen)."""

    def __init__(self, scheduler, k: int = 3) -> None:
        super().__init__(scheduler)
        self.k = k
        self.num_steps = 0

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self._apply(so)
        for req_id in so.num_scheduled_tokens:
            self._check_reads(req_id, self.states[req_id])
        self.num_steps += 1
        req_ids, sampled, proposals = [], [], {}
        for req_id, num_tokens in so.num_scheduled_tokens.items():
            state = self.states[req_id]
            drafts = so.scheduled_spec_decode_tokens.get(req_id, [])
            start = state.num_computed_tokens
            known = len(state.token_ids)
            assert not drafts or start + num_tokens == known + len(drafts)
            state.token_ids.extend(drafts)  # the step computes the drafts' positions too
            state.num_computed_tokens += num_tokens
            assert len(state.block_ids) * self.scheduler.block_size >= state.num_computed_tokens
            self._write(state, start, state.num_computed_tokens)
            emitted = []
            if state.num_computed_tokens == len(state.token_ids):
                del state.token_ids[known:]
                for d in drafts:  # accept while the draft is what the model generates
                    if d != next_token(state.token_ids):
                        break
                    state.token_ids.append(d)
                    emitted.append(d)
                emitted.append(next_token(state.token_ids))
                state.token_ids.append(emitted[-1])
                rejected = len(drafts) - (len(emitted) - 1)
                state.num_computed_tokens -= rejected
                del state.fingerprints[state.num_computed_tokens:]
                proposals[req_id] = self._propose(state.token_ids)
            req_ids.append(req_id)
            sampled.append(emitted)
        return ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=sampled, spec_token_ids=proposals)

    def _propose(self, token_ids: list[int]) -> list[int]:
        good = self.num_steps % (self.k + 1)
        out, ids = [], list(token_ids)
        for i in range(self.k):
            t = next_token(ids) if i < good else 3  # 3 is never generated
            out.append(t)
            ids.append(t)
        return out


def _run_to_completion(scheduler, runner, max_steps=500):
    outputs = {}
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests():
            break
        so = scheduler.schedule()
        for out in scheduler.update_from_output(so, runner.execute_model(so)):
            outputs.setdefault(out.req_id, []).extend(out.new_token_ids)
        check_invariants(scheduler)
    return outputs


def _expected(req, n):
    ids = list(req.prompt_token_ids)
    for _ in range(n):
        ids.append(next_token(ids))
    return ids[len(req.prompt_token_ids):]


def test_outputs_match_the_model_with_rollback_prefix_caching_and_preemption():
    # 12 blocks of 4 tokens for 6 requests of up to 30 tokens: preemptions happen; shared prompts hit the cache.
    scheduler = make_spec_scheduler(num_blocks=12, max_num_batched_tokens=20)
    runner = SpecFakeRunner(scheduler)
    shared = list(range(10, 22))
    reqs = [make_request(f"r{i}", prompt=shared + [30 + i] * (i % 3 + 1), max_tokens=9 + i) for i in range(6)]
    for r in reqs:
        scheduler.add_request(r)
    outputs = _run_to_completion(scheduler, runner)
    for r in reqs:
        assert outputs[r.request_id] == _expected(r, r.max_tokens)
    assert scheduler.num_preemptions > 0 and scheduler.prefix_cache_hits > 0
    assert 0 < scheduler.spec_num_accepted_tokens < scheduler.spec_num_draft_tokens
    assert scheduler.kv_cache_manager.usage == 0.0


def test_drafts_are_capped_by_max_tokens_and_context():
    scheduler = make_spec_scheduler(k=5, max_model_len=20)
    runner = SpecFakeRunner(scheduler, k=5)
    a = make_request("a", 6, max_tokens=4)
    b = make_request("b", 14, max_tokens=50)  # the context (20) ends it first
    scheduler.add_request(a)
    scheduler.add_request(b)
    seen = []
    while scheduler.has_unfinished_requests():
        so = scheduler.schedule()
        for req_id, drafts in so.scheduled_spec_decode_tokens.items():
            req = scheduler.requests[req_id]
            # Accepting every draft plus one more token never passes max_tokens or max_model_len.
            assert len(req.output_token_ids) + len(drafts) + 1 <= req.max_tokens
            assert req.num_tokens + len(drafts) + 1 <= 20
            seen.append(len(drafts))
        scheduler.update_from_output(so, runner.execute_model(so))
    assert seen and max(seen) <= 5


def test_no_drafts_at_or_above_disable_by_batch_size():
    scheduler = make_spec_scheduler(disable_by_batch_size=3)
    runner = SpecFakeRunner(scheduler)
    for i in range(3):
        scheduler.add_request(make_request(f"r{i}", 5, max_tokens=6 + 4 * i))
    sizes = []
    while scheduler.has_unfinished_requests():
        so = scheduler.schedule()
        if so.scheduled_spec_decode_tokens:
            sizes.append(len(so.num_scheduled_tokens))
        scheduler.update_from_output(so, runner.execute_model(so))
    assert sizes and max(sizes) < 3


def test_budget_limits_drafts_and_preemption_drops_them():
    scheduler = make_spec_scheduler(k=4, max_num_batched_tokens=6)
    runner = SpecFakeRunner(scheduler, k=4)
    scheduler.add_request(make_request("a", 5, max_tokens=20))
    scheduler.add_request(make_request("b", 5, max_tokens=20))
    for _ in range(6):
        so = scheduler.schedule()
        assert so.total_num_scheduled_tokens <= 6
        scheduler.update_from_output(so, runner.execute_model(so))
    req = scheduler.requests["b"]
    req.spec_token_ids = [3, 3]
    scheduler._preempt(scheduler.running.pop())
    assert req.spec_token_ids == [] and req.num_computed_tokens == 0
