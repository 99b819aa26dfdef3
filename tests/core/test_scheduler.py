"""Scheduler: token budget, chunked prefill, FCFS, max_num_seqs, preemption, stops, aborts, outputs."""
import pytest
from core_testutils import (
    EOS_ID,
    FakeRunner,
    check_invariants,
    find_output,
    make_prompt,
    make_request,
    make_scheduler,
    next_token,
    prompt_seed,
    step,
)

from graphserve.config import CacheConfig, SchedulerConfig
from graphserve.core.request import Request, RequestStatus
from graphserve.core.scheduler import Scheduler
from graphserve.core.scheduler_output import LogprobsLists, ModelRunnerOutput
from graphserve.sampling_params import SamplingParams


def expected_outputs(request_id: str, prompt_len: int, num_tokens: int) -> list[int]:
    """What the fake model generates for this request, preempted or not."""
    token_ids = make_prompt(prompt_len, seed=prompt_seed(request_id))
    for _ in range(num_tokens):
        token_ids.append(next_token(token_ids))
    return token_ids[prompt_len:]


def test_budget_is_shared_by_decodes_and_a_prefill_chunk():
    scheduler = make_scheduler(max_num_batched_tokens=16)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("a", 3))
    scheduler.add_request(make_request("b", 3))
    so, _ = step(scheduler, runner)
    assert so.num_scheduled_tokens == {"a": 3, "b": 3}
    scheduler.add_request(make_request("c", 40))
    so, outputs = step(scheduler, runner)
    assert so.num_scheduled_tokens == {"a": 1, "b": 1, "c": 14}
    assert so.total_num_scheduled_tokens == 16
    assert [r.req_id for r in so.scheduled_cached_reqs] == ["a", "b"]
    assert [(r.req_id, r.num_computed_tokens) for r in so.scheduled_new_reqs] == [("c", 0)]
    assert sorted(o.req_id for o in outputs) == ["a", "b"]  # c's prefill is partial: nothing sampled yet
    check_invariants(scheduler)


def test_chunked_prefill_progresses_and_samples_only_at_the_end():
    scheduler = make_scheduler(max_num_batched_tokens=16)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("r", 40, max_tokens=2))
    seen = []
    for _ in range(4):
        so, outputs = step(scheduler, runner)
        new = [(d.num_computed_tokens, "new") for d in so.scheduled_new_reqs]
        cached = [(d.num_computed_tokens, "cached") for d in so.scheduled_cached_reqs]
        seen.append((so.num_scheduled_tokens["r"], *(new + cached), [o.new_token_ids for o in outputs]))
    assert seen == [
        (16, (0, "new"), []),
        (16, (16, "cached"), []),
        (8, (32, "cached"), [expected_outputs("r", 40, 1)]),
        (1, (40, "cached"), [expected_outputs("r", 40, 2)[1:]]),
    ]
    assert not scheduler.has_unfinished_requests()


def test_prefill_that_does_not_fit_waits_when_chunking_is_off():
    scheduler = make_scheduler(max_model_len=16, max_num_batched_tokens=16, enable_chunked_prefill=False)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("a", 2, max_tokens=3))
    scheduler.add_request(make_request("a2", 2, max_tokens=3))
    scheduler.add_request(make_request("b", 15, max_tokens=2))
    scheduler.add_request(make_request("c", 2, max_tokens=2))
    schedules = [step(scheduler, runner)[0].num_scheduled_tokens for _ in range(5)]
    assert schedules == [
        {"a": 2, "a2": 2},  # b (15) does not fit the 12 left, and c may not overtake it
        {"a": 1, "a2": 1},
        {"a": 1, "a2": 1},  # their third tokens end them
        {"b": 15},  # c (2) does not fit the 1 left; b's one token reaches max_model_len
        {"c": 2},
    ]


def test_max_num_seqs_caps_the_running_set():
    scheduler = make_scheduler(max_num_seqs=2)
    runner = FakeRunner(scheduler)
    for i, max_tokens in enumerate([2, 5, 5]):
        scheduler.add_request(make_request(f"r{i}", 4, max_tokens=max_tokens))
    so, _ = step(scheduler, runner)
    assert list(so.num_scheduled_tokens) == ["r0", "r1"]
    assert scheduler.num_running == 2 and scheduler.num_waiting == 1
    so, _ = step(scheduler, runner)  # r2 cannot join although the budget has room
    assert so.num_scheduled_tokens == {"r0": 1, "r1": 1}
    so, _ = step(scheduler, runner)  # r0 finished with its second token: r2 takes its seat
    assert so.num_scheduled_tokens == {"r1": 1, "r2": 4}
    assert so.finished_req_ids == {"r0"}


def test_waiting_requests_are_admitted_fcfs():
    scheduler = make_scheduler(max_num_batched_tokens=15)
    runner = FakeRunner(scheduler)
    for i in range(5):
        scheduler.add_request(make_request(f"r{i}", 6))
    so, _ = step(scheduler, runner)
    assert [d.req_id for d in so.scheduled_new_reqs] == ["r0", "r1", "r2"]
    assert so.num_scheduled_tokens == {"r0": 6, "r1": 6, "r2": 3}
    so, _ = step(scheduler, runner)
    assert so.num_scheduled_tokens == {"r0": 1, "r1": 1, "r2": 3, "r3": 6, "r4": 4}
    assert [d.req_id for d in so.scheduled_new_reqs] == ["r3", "r4"]


def test_preemption_takes_the_newest_and_it_resumes_with_its_outputs():
    scheduler = make_scheduler(block_size=4, num_blocks=4, max_model_len=16)
    runner = FakeRunner(scheduler)
    for name in "abcd":
        scheduler.add_request(make_request(name, 4, max_tokens=2))
    step(scheduler, runner)
    assert scheduler.kv_cache_manager.get_num_free_blocks() == 0
    so, outputs = step(scheduler, runner)  # a and b each need a second block: d, then c, are preempted
    assert so.num_scheduled_tokens == {"a": 1, "b": 1}
    assert so.finished_req_ids == {"c", "d"}
    assert [r.request_id for r in scheduler.waiting] == ["c", "d"]
    assert scheduler.num_preemptions == 2
    c = scheduler.get_request("c")
    assert c.status == RequestStatus.PREEMPTED and c.num_computed_tokens == 0 and c.num_preemptions == 1
    assert [o.finish_reason for o in outputs] == ["length", "length"]
    check_invariants(scheduler)
    so, outputs = step(scheduler, runner)
    resumed = {d.req_id: d for d in so.scheduled_new_reqs}
    assert set(resumed) == {"c", "d"} and so.num_scheduled_tokens == {"c": 5, "d": 5}
    assert resumed["c"].output_token_ids == expected_outputs("c", 4, 1)
    assert resumed["c"].num_computed_tokens == 0
    # Recompute gives the same continuation as if nothing happened.
    assert find_output(outputs, "c").new_token_ids == expected_outputs("c", 4, 2)[1:]
    assert not scheduler.has_unfinished_requests()
    assert scheduler.kv_cache_manager.get_num_free_blocks() == 4


def test_request_that_must_preempt_itself_stops_the_running_pass():
    scheduler = make_scheduler(block_size=4, num_blocks=3, max_model_len=12)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("a", 6, max_tokens=4))
    scheduler.add_request(make_request("b", 4, max_tokens=2))
    step(scheduler, runner)
    so, _ = step(scheduler, runner)  # a's token fits its blocks; b needs one more and is the newest itself
    assert so.num_scheduled_tokens == {"a": 1}
    assert so.finished_req_ids == {"b"}
    assert [r.request_id for r in scheduler.waiting] == ["b"]
    so, _ = step(scheduler, runner)  # b (5 tokens, 2 blocks) cannot come back while a holds 2 of 3 blocks
    assert so.num_scheduled_tokens == {"a": 1}
    for _ in range(10):
        step(scheduler, runner)
        check_invariants(scheduler)
    assert not scheduler.has_unfinished_requests()


def test_no_request_is_admitted_in_a_step_that_preempted():
    scheduler = make_scheduler(block_size=2, num_blocks=3, max_model_len=16, max_num_batched_tokens=3)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("a", 2, max_tokens=4))
    scheduler.add_request(make_request("v", 2, max_tokens=4))
    history = []
    for _ in range(5):
        so, _ = step(scheduler, runner)
        history.append((so.num_scheduled_tokens, scheduler.num_preemptions))
    # In step 3 a preempts v. A chunk of v would fit the freed block and the budget, but admitting it would
    # only get v preempted again in step 4 (thrashing).
    assert history == [({"a": 2, "v": 1}, 0), ({"a": 1, "v": 1}, 0), ({"a": 1}, 1), ({"a": 1}, 1), ({"v": 3}, 1)]


def _run_one(request: Request, runner_eos: bool = False, max_model_len: int = 64, steps: int = 40):
    scheduler = make_scheduler(max_model_len=max_model_len)
    runner = FakeRunner(scheduler)
    if runner_eos:
        runner.force_eos.add(request.request_id)
    scheduler.add_request(request)
    token_ids, last = [], None
    for _ in range(steps):
        if not scheduler.has_unfinished_requests():
            break
        _, outputs = step(scheduler, runner)
        for output in outputs:
            token_ids += output.new_token_ids
            last = output
    assert scheduler.kv_cache_manager.usage == 0.0
    return token_ids, last


def test_eos_stops_with_no_stop_reason():
    token_ids, last = _run_one(make_request("r", 5), runner_eos=True)
    assert token_ids == [EOS_ID] and (last.finish_reason, last.stop_reason) == ("stop", None)


def test_ignore_eos_runs_to_max_tokens():
    token_ids, last = _run_one(make_request("r", 5, max_tokens=4, ignore_eos=True), runner_eos=True)
    assert token_ids == [EOS_ID] * 4 and last.finish_reason == "length"


def test_stop_token_id_sets_stop_reason():
    second = expected_outputs("r", 5, 2)[1]
    token_ids, last = _run_one(make_request("r", 5, stop_token_ids=[second]))
    assert token_ids == expected_outputs("r", 5, 2)
    assert (last.finish_reason, last.stop_reason) == ("stop", second)


def test_min_tokens_defers_eos_and_stop_token_ids():
    token_ids, last = _run_one(make_request("r", 5, min_tokens=3), runner_eos=True)
    assert token_ids == [EOS_ID] * 3 and last.finish_reason == "stop"
    first = expected_outputs("r", 5, 1)[0]
    token_ids, last = _run_one(make_request("r", 5, max_tokens=3, min_tokens=2, stop_token_ids=[first]))
    assert token_ids == expected_outputs("r", 5, 3) and last.finish_reason == "length"


def test_stop_token_wins_over_length_on_the_same_token():
    first = expected_outputs("r", 5, 1)[0]
    token_ids, last = _run_one(make_request("r", 5, max_tokens=1, stop_token_ids=[first]))
    assert token_ids == [first] and (last.finish_reason, last.stop_reason) == ("stop", first)


def test_max_tokens_caps_length():
    token_ids, last = _run_one(make_request("r", 5, max_tokens=3))
    assert token_ids == expected_outputs("r", 5, 3) and last.finish_reason == "length"


@pytest.mark.parametrize("prompt_len, expected_num_tokens", [(10, 2), (12, 1)])
def test_max_model_len_caps_length(prompt_len, expected_num_tokens):
    token_ids, last = _run_one(make_request("r", prompt_len, max_tokens=100), max_model_len=12)
    assert token_ids == expected_outputs("r", prompt_len, expected_num_tokens)
    assert last.finish_reason == "length"


def test_several_tokens_in_one_step_are_cut_at_the_stop():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("r", 4, max_tokens=10))
    so = scheduler.schedule()
    logprobs = LogprobsLists([[7], [EOS_ID], [9]], [[-0.1], [-0.2], [-0.3]], [1, 1, 1])
    runner_output = ModelRunnerOutput(["r"], [[7, EOS_ID, 9]], sampled_logprobs={"r": [-0.1, -0.2, -0.3]},
                                      logprobs={"r": logprobs})
    (output,) = scheduler.update_from_output(so, runner_output)
    assert output.new_token_ids == [7, EOS_ID] and output.finish_reason == "stop"
    assert output.new_sampled_logprobs == [-0.1, -0.2]
    assert output.new_logprobs.token_ids == [[7], [EOS_ID]] and output.new_logprobs.ranks == [1, 1]


def test_logprobs_and_prompt_logprobs_are_carried_even_for_a_partial_prefill():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    scheduler.add_request(make_request("r", 12))
    prompt_lp = (0, LogprobsLists([[3]] * 7, [[-1.0]] * 7, [1] * 7))
    so = scheduler.schedule()
    (output,) = scheduler.update_from_output(so, ModelRunnerOutput(["r"], [[]], prompt_logprobs={"r": prompt_lp}))
    assert output.new_token_ids == [] and output.new_prompt_logprobs is prompt_lp and not output.finished
    so = scheduler.schedule()
    sampled_lp = LogprobsLists([[42, 7]], [[-0.5, -0.9]], [1])
    runner_output = ModelRunnerOutput(["r"], [[42]], sampled_logprobs={"r": [-0.5]}, logprobs={"r": sampled_lp})
    (output,) = scheduler.update_from_output(so, runner_output)
    assert output.new_token_ids == [42] and output.new_sampled_logprobs == [-0.5]
    assert output.new_logprobs is sampled_lp and output.new_prompt_logprobs is None


def test_no_output_for_a_partial_prefill_without_prompt_logprobs():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    scheduler.add_request(make_request("r", 12))
    so = scheduler.schedule()
    assert scheduler.update_from_output(so, ModelRunnerOutput(["r"], [[]])) == []
    assert scheduler.get_request("r").num_computed_tokens == 8


def test_runner_that_samples_nothing_for_a_complete_input_is_an_error():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("r", 4))
    so = scheduler.schedule()
    with pytest.raises(RuntimeError, match="sampled no token"):
        scheduler.update_from_output(so, ModelRunnerOutput(["r"], [[]]))


def test_runner_output_must_cover_every_scheduled_request():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 4))
    scheduler.add_request(make_request("b", 4))
    so = scheduler.schedule()
    with pytest.raises(RuntimeError, match="every scheduled request"):
        scheduler.update_from_output(so, ModelRunnerOutput(["a"], [[5]]))


def test_abort_of_waiting_and_running_requests_frees_blocks_silently():
    scheduler = make_scheduler(max_num_seqs=1)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("run", 9))
    scheduler.add_request(make_request("wait", 4))
    step(scheduler, runner)
    assert scheduler.kv_cache_manager.get_num_free_blocks() == 61
    scheduler.finish_requests(["run", "wait", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert scheduler.kv_cache_manager.get_num_free_blocks() == 64
    assert scheduler.num_running == 0 and scheduler.num_waiting == 0 and not scheduler.has_unfinished_requests()
    so = scheduler.schedule()
    assert so.is_empty and so.finished_req_ids == {"run", "wait"}
    assert scheduler.schedule().finished_req_ids == set()  # handed over once
    with pytest.raises(ValueError, match="FINISHED"):
        scheduler.finish_requests("x", RequestStatus.RUNNING)


def test_request_finished_between_schedule_and_update_is_skipped():
    scheduler = make_scheduler()
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("a", 4))
    scheduler.add_request(make_request("b", 4))
    so = scheduler.schedule()
    runner_output = runner.execute_model(so)
    scheduler.finish_requests("a", RequestStatus.FINISHED_STOPPED)  # e.g. a stop string seen meanwhile
    outputs = scheduler.update_from_output(so, runner_output)
    assert [o.req_id for o in outputs] == ["b"]
    assert [r.request_id for r in scheduler.running] == ["b"]
    check_invariants(scheduler)


def test_add_request_rejects_what_could_never_finish():
    scheduler = make_scheduler(block_size=4, num_blocks=4, max_model_len=32)
    with pytest.raises(ValueError, match="empty"):
        scheduler.add_request(Request("e", [], SamplingParams()))
    with pytest.raises(ValueError, match="max_model_len"):
        scheduler.add_request(make_request("long", 33))
    with pytest.raises(ValueError, match="KV cache holds 16"):
        scheduler.add_request(make_request("big", 10, max_tokens=8))  # 17 KV tokens > 16 slots
    with pytest.raises(ValueError, match="max_tokens"):
        scheduler.add_request(Request("unresolved", [3], SamplingParams(max_tokens=None)))
    scheduler.add_request(make_request("fits", 10, max_tokens=7))  # 16 KV tokens: the last one needs none
    with pytest.raises(ValueError, match="already"):
        scheduler.add_request(make_request("fits", 3))
    assert scheduler.get_num_unfinished_requests() == 1


def test_scheduler_needs_a_sized_pool():
    with pytest.raises(ValueError, match="num_blocks"):
        Scheduler(SchedulerConfig(max_model_len=16), CacheConfig())


def test_stats_track_the_queues_and_the_pool():
    scheduler = make_scheduler(block_size=4, num_blocks=8, max_num_seqs=1)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("a", 8))
    scheduler.add_request(make_request("b", 3))
    assert (scheduler.num_running, scheduler.num_waiting, scheduler.kv_cache_usage) == (0, 2, 0.0)
    step(scheduler, runner)
    assert (scheduler.num_running, scheduler.num_waiting) == (1, 1)
    assert scheduler.kv_cache_usage == pytest.approx(2 / 8)
    assert scheduler.get_request("a").status == RequestStatus.RUNNING and scheduler.get_request("zz") is None
