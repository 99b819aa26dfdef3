"""The scheduler and LoRA: never more distinct adapters among running requests than `max_loras` (waiting requests
of another adapter keep their place), and the adapter is part of every prefix-cache key."""
from __future__ import annotations

from core_testutils import FakeRunner, check_invariants, make_request, step

from graphserve.config import CacheConfig, LoRAConfig, SchedulerConfig
from graphserve.core.kv_cache_utils import block_extra_keys
from graphserve.core.scheduler import Scheduler
from graphserve.lora.request import LoRARequest

ADAPTERS = {i: LoRARequest(f"a{i}", i, f"/adapters/a{i}") for i in (1, 2, 3)}


def _scheduler(max_loras: int) -> Scheduler:
    return Scheduler(SchedulerConfig(max_model_len=64, max_num_seqs=8, max_num_batched_tokens=64),
                     CacheConfig(block_size=4, num_blocks=64), LoRAConfig(max_loras=max_loras))


def _request(req_id: str, lora_id: int | None, max_tokens: int = 4):
    request = make_request(req_id, prompt_len=6, max_tokens=max_tokens)
    request.lora_request = ADAPTERS.get(lora_id)
    return request


def test_at_most_max_loras_adapters_run_and_the_others_keep_their_place():
    scheduler = _scheduler(max_loras=1)
    runner = FakeRunner(scheduler)
    for req_id, lora_id in [("a", 1), ("b", 2), ("base", None), ("c", 1), ("d", 3)]:
        scheduler.add_request(_request(req_id, lora_id, max_tokens=4 if lora_id == 1 else 2))
    admitted_order, seen = [], set()
    for _ in range(40):
        if not scheduler.has_unfinished_requests():
            break
        so, _ = step(scheduler, runner)
        running_loras = {r.lora_int_id for r in scheduler.running if r.lora_int_id}
        assert len(running_loras) <= 1
        for new in so.scheduled_new_reqs:
            assert new.lora_request is scheduler.requests.get(new.req_id, new).lora_request
            if new.req_id not in seen:
                seen.add(new.req_id)
                admitted_order.append(new.req_id)
        check_invariants(scheduler, runner)
    assert not scheduler.has_unfinished_requests()
    # Adapter 1's requests and the base one first; b (adapter 2) before d (adapter 3): FCFS among the deferred.
    assert admitted_order == ["a", "base", "c", "b", "d"]


def test_without_lora_config_nothing_is_limited():
    scheduler = Scheduler(SchedulerConfig(max_model_len=64, max_num_seqs=8, max_num_batched_tokens=64),
                          CacheConfig(block_size=4, num_blocks=64))
    for req_id, lora_id in [("a", 1), ("b", 2), ("c", 3)]:
        scheduler.add_request(_request(req_id, lora_id))
    so = scheduler.schedule()
    assert len(so.scheduled_new_reqs) == 3


def test_block_keys_name_the_adapter_in_the_first_block_only():
    base, with_a, with_b = _request("x", None), _request("y", 1), _request("z", 2)
    assert block_extra_keys(base, 0) is None
    assert block_extra_keys(with_a, 0) == ("lora", 1, "a1")
    assert block_extra_keys(with_a, 0) != block_extra_keys(with_b, 0)
    assert block_extra_keys(with_a, 1) is None
    salted = _request("s", 2)
    salted.cache_salt = "tenant"
    assert block_extra_keys(salted, 0) == ("cache_salt", "tenant", "lora", 2, "a2")
