"""Prefix caching in the scheduler: hits at admission, forks (n > 1), chunked prefill, preemption, stats, reset.

The fake runner simulates the KV cache (see core_testutils.FakeRunner): every hit is checked to attend to exactly
its own prefix, and no shared or cached block is ever written.
"""
from core_testutils import FakeRunner, check_invariants, find_output, make_prompt, make_request, make_scheduler, step

from graphserve.core.request import RequestStatus


def _run_to_end(scheduler, runner, max_steps=200):
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests():
            return
        step(scheduler, runner)
        check_invariants(scheduler, runner)
    raise AssertionError("requests did not finish")


def test_a_later_request_starts_after_the_cached_prefix():
    scheduler = make_scheduler(block_size=4)
    runner = FakeRunner(scheduler)
    system = make_prompt(10, seed=1)
    scheduler.add_request(make_request("a", prompt=system + [3, 4], max_tokens=2))
    _run_to_end(scheduler, runner)
    scheduler.add_request(make_request("b", prompt=system + [5, 6, 7], max_tokens=2))
    so, outputs = step(scheduler, runner)
    (new,) = so.scheduled_new_reqs
    assert (new.req_id, new.num_computed_tokens, so.num_scheduled_tokens["b"]) == ("b", 8, 5)
    assert find_output(outputs, "b").num_cached_tokens == 8
    assert scheduler.get_request("b").num_cached_tokens == 8
    assert (scheduler.prefix_cache_queries, scheduler.prefix_cache_hits) == (12 + 13, 8)
    assert scheduler.prefix_cache_hit_rate == 8 / 25
    check_invariants(scheduler, runner)


def test_forks_of_one_prompt_compute_its_full_blocks_once():
    scheduler = make_scheduler(block_size=4, max_num_batched_tokens=64)
    runner = FakeRunner(scheduler)
    prompt = make_prompt(10, seed=2)
    for i in range(4):  # n = 4: children with identical prompts, added together
        scheduler.add_request(make_request(f"{i}_req", prompt=prompt, max_tokens=3, ignore_eos=True))
    so, _ = step(scheduler, runner)
    # The others wait: the blocks they would share are being written by the first one in this step.
    assert so.num_scheduled_tokens == {"0_req": 10}
    assert [r.request_id for r in scheduler.waiting] == ["1_req", "2_req", "3_req"]
    so, _ = step(scheduler, runner)
    assert so.num_scheduled_tokens == {"0_req": 1, "1_req": 2, "2_req": 2, "3_req": 2}
    assert all(d.num_computed_tokens == 8 for d in so.scheduled_new_reqs)
    shared = scheduler.kv_cache_manager.get_blocks("0_req")[:2]
    assert all(b.ref_cnt == 4 for b in shared)
    _run_to_end(scheduler, runner)
    assert scheduler.prefix_cache_hits == 3 * 8


def test_deferred_request_keeps_its_place_and_lets_unrelated_ones_in():
    scheduler = make_scheduler(block_size=4)
    runner = FakeRunner(scheduler)
    prompt = make_prompt(9, seed=3)
    scheduler.add_request(make_request("first", prompt=prompt))
    scheduler.add_request(make_request("twin", prompt=prompt))
    scheduler.add_request(make_request("other", 6))
    so, _ = step(scheduler, runner)
    assert set(so.num_scheduled_tokens) == {"first", "other"}
    assert [r.request_id for r in scheduler.waiting] == ["twin"]
    so, _ = step(scheduler, runner)
    assert so.num_scheduled_tokens["twin"] == 1 and so.scheduled_new_reqs[0].num_computed_tokens == 8


def test_no_wait_for_a_block_it_could_not_hit_anyway():
    scheduler = make_scheduler(block_size=4)
    runner = FakeRunner(scheduler)
    prompt = make_prompt(4, seed=4)  # one block, which holds the last token: never a hit
    scheduler.add_request(make_request("a", prompt=prompt))
    scheduler.add_request(make_request("b", prompt=prompt))
    so, _ = step(scheduler, runner)
    assert so.num_scheduled_tokens == {"a": 4, "b": 4}
    assert scheduler.kv_cache_manager.block_pool.num_cached_blocks == 1  # b's twin block stays unindexed
    check_invariants(scheduler, runner)


def test_blocks_are_cached_as_chunks_fill_them():
    scheduler = make_scheduler(block_size=4, max_num_batched_tokens=6)
    runner = FakeRunner(scheduler)
    prompt = make_prompt(20, seed=5)
    scheduler.add_request(make_request("long", prompt=prompt, max_tokens=1))
    num_cached = []
    for _ in range(4):
        step(scheduler, runner)
        num_cached.append(scheduler.kv_cache_manager.block_pool.num_cached_blocks)
    assert num_cached == [1, 3, 4, 5]  # 6, 12, 18, 20 tokens computed
    scheduler.add_request(make_request("again", prompt=prompt[:19] + [7], max_tokens=1))
    so, _ = step(scheduler, runner)
    assert so.scheduled_new_reqs[0].num_computed_tokens == 16


def test_generated_tokens_become_cacheable():
    scheduler = make_scheduler(block_size=4)
    runner = FakeRunner(scheduler)
    first_turn = make_request("chat", 6, max_tokens=7, ignore_eos=True)
    scheduler.add_request(first_turn)
    _run_to_end(scheduler, runner)
    # Prompt + 7 outputs; 12 of them were computed (the last output is never fed back): 3 full blocks.
    scheduler.add_request(make_request("next-turn", prompt=first_turn.all_token_ids + [9, 9]))
    so, _ = step(scheduler, runner)
    assert so.scheduled_new_reqs[0].num_computed_tokens == 12


def test_preempted_request_resumes_from_its_own_cached_blocks():
    scheduler = make_scheduler(block_size=4, num_blocks=7, max_model_len=32)
    runner = FakeRunner(scheduler)
    new = make_request("new", 9, max_tokens=8, ignore_eos=True)
    scheduler.add_request(make_request("old", 8, max_tokens=8, ignore_eos=True))
    scheduler.add_request(new)
    resumed = []
    for _ in range(40):
        if not scheduler.has_unfinished_requests():
            break
        so, _ = step(scheduler, runner)
        check_invariants(scheduler, runner)
        resumed += [d.num_computed_tokens for d in so.scheduled_new_reqs if new.num_preemptions]
    # "old" needs a block, "new" is preempted after computing 13 tokens, and once "old" is done it resumes
    # from its 3 full blocks (prompt and outputs), which the LRU queue kept while "old" evicted its tail.
    assert scheduler.num_preemptions == 1 and resumed == [12]
    assert new.num_cached_tokens == 0 and len(new.output_token_ids) == 8  # the first admission had no hit
    assert scheduler.prefix_cache_hits == 12


def test_salt_isolates_and_equal_salts_share():
    scheduler = make_scheduler(block_size=4)
    runner = FakeRunner(scheduler)
    prompt = make_prompt(9, seed=6)
    scheduler.add_request(make_request("a", prompt=prompt, cache_salt="alice"))
    _run_to_end(scheduler, runner)
    for req_id, salt in [("plain", None), ("bob", "bob"), ("alice2", "alice")]:
        scheduler.add_request(make_request(req_id, prompt=prompt, cache_salt=salt))
    so, _ = step(scheduler, runner)
    assert {d.req_id: d.num_computed_tokens for d in so.scheduled_new_reqs} == {"plain": 0, "bob": 0, "alice2": 8}


def test_prompt_logprobs_request_skips_the_lookup_but_feeds_the_cache():
    scheduler = make_scheduler(block_size=4)
    runner = FakeRunner(scheduler)
    prompt = make_prompt(9, seed=7)
    scheduler.add_request(make_request("a", prompt=prompt))
    _run_to_end(scheduler, runner)
    scheduler.add_request(make_request("lp", prompt=prompt, prompt_logprobs=2))
    so, _ = step(scheduler, runner)
    assert so.scheduled_new_reqs[0].num_computed_tokens == 0 and so.num_scheduled_tokens == {"lp": 9}
    assert scheduler.prefix_cache_queries == 9  # only "a" queried
    _run_to_end(scheduler, runner)
    scheduler.reset_prefix_cache()
    scheduler.add_request(make_request("lp2", prompt=prompt, prompt_logprobs=2))
    _run_to_end(scheduler, runner)
    scheduler.add_request(make_request("b", prompt=prompt))
    so, _ = step(scheduler, runner)
    assert so.scheduled_new_reqs[0].num_computed_tokens == 8


def test_reset_prefix_cache_only_when_idle():
    scheduler = make_scheduler(block_size=4)
    runner = FakeRunner(scheduler)
    prompt = make_prompt(9, seed=8)
    scheduler.add_request(make_request("a", prompt=prompt, max_tokens=3))
    step(scheduler, runner)
    assert not scheduler.reset_prefix_cache()
    assert scheduler.kv_cache_manager.block_pool.num_cached_blocks == 2
    _run_to_end(scheduler, runner)
    assert scheduler.reset_prefix_cache()
    scheduler.add_request(make_request("b", prompt=prompt))
    so, _ = step(scheduler, runner)
    assert so.scheduled_new_reqs[0].num_computed_tokens == 0


def test_caching_off_shares_nothing():
    scheduler = make_scheduler(block_size=4, enable_prefix_caching=False)
    runner = FakeRunner(scheduler)
    prompt = make_prompt(9, seed=9)
    for req_id in ("a", "b", "c"):
        scheduler.add_request(make_request(req_id, prompt=prompt))
    so, _ = step(scheduler, runner)
    assert len(so.num_scheduled_tokens) == 3 and all(d.num_computed_tokens == 0 for d in so.scheduled_new_reqs)
    _run_to_end(scheduler, runner)
    scheduler.add_request(make_request("d", prompt=prompt))
    so, _ = step(scheduler, runner)
    assert so.scheduled_new_reqs[0].num_computed_tokens == 0
    assert scheduler.kv_cache_manager.block_pool.num_cached_blocks == 0
    assert (scheduler.prefix_cache_queries, scheduler.prefix_cache_hits) == (0, 0)


def test_abort_of_a_sharing_request_keeps_the_shared_blocks():
    scheduler = make_scheduler(block_size=4)
    runner = FakeRunner(scheduler)
    prompt = make_prompt(13, seed=10)
    scheduler.add_request(make_request("a", prompt=prompt, max_tokens=8))
    step(scheduler, runner)
    scheduler.add_request(make_request("b", prompt=prompt, max_tokens=8))
    step(scheduler, runner)
    shared = scheduler.kv_cache_manager.get_blocks("b")[:3]
    assert all(b.ref_cnt == 2 for b in shared)
    scheduler.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert all(b.ref_cnt == 1 for b in shared)
    check_invariants(scheduler, runner)
    _run_to_end(scheduler, runner)
