"""BlockPool and KVCacheManager: reference counts, LRU free queue, just-enough allocation."""
import pytest

from graphserve.core.block_pool import BlockPool
from graphserve.core.kv_cache_manager import KVCacheManager
from graphserve.core.request import Request
from graphserve.sampling_params import SamplingParams


def _request(req_id: str, num_computed_tokens: int = 0) -> Request:
    request = Request(req_id, [5] * 8, SamplingParams())
    request.num_computed_tokens = num_computed_tokens
    return request


def test_new_blocks_come_from_the_head_with_one_reference():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(3)
    assert [b.block_id for b in blocks] == [0, 1, 2]
    assert all(b.ref_cnt == 1 for b in blocks)
    assert pool.get_num_free_blocks() == 1
    assert pool.get_usage() == pytest.approx(0.75)


def test_freed_blocks_go_to_the_tail_in_lru_order():
    pool = BlockPool(4)
    first, second = pool.get_new_blocks(2)
    pool.free_blocks([second, first])
    assert list(pool.iter_free_block_ids()) == [2, 3, 1, 0]
    assert [b.block_id for b in pool.get_new_blocks(3)] == [2, 3, 1]


def test_shared_block_is_free_only_after_its_last_reference():
    pool = BlockPool(2)
    (block,) = pool.get_new_blocks(1)
    pool.touch([block])
    assert block.ref_cnt == 2
    pool.free_blocks([block])
    assert not pool.is_free(block) and pool.get_num_free_blocks() == 1
    pool.free_blocks([block])
    assert pool.is_free(block) and pool.get_num_free_blocks() == 2


def test_touch_revives_a_free_block_out_of_the_queue():
    pool = BlockPool(3)
    pool.touch([pool.blocks[1]])
    assert pool.blocks[1].ref_cnt == 1
    assert list(pool.iter_free_block_ids()) == [0, 2]
    assert [b.block_id for b in pool.get_new_blocks(2)] == [0, 2]


def test_double_free_and_overallocation_raise():
    pool = BlockPool(2)
    (block,) = pool.get_new_blocks(1)
    pool.free_blocks([block])
    with pytest.raises(RuntimeError, match="freed more times"):
        pool.free_blocks([block])
    with pytest.raises(ValueError, match="only 2 free"):
        pool.get_new_blocks(3)
    with pytest.raises(ValueError):
        BlockPool(0)


@pytest.mark.parametrize(
    "num_computed, num_new, expected_total",
    [(0, 1, 1), (0, 4, 1), (0, 5, 2), (3, 1, 1), (4, 1, 2), (7, 9, 4), (0, 16, 4)],
)
def test_allocate_slots_allocates_just_enough_blocks(num_computed, num_new, expected_total):
    kv = KVCacheManager(block_size=4, num_blocks=8)
    request = _request("r", num_computed_tokens=0)
    if num_computed:
        kv.allocate_slots(request, num_computed)
        request.num_computed_tokens = num_computed
    held_before = len(kv.get_blocks("r"))
    new_blocks = kv.allocate_slots(request, num_new)
    assert len(kv.get_blocks("r")) == expected_total
    assert len(new_blocks) == expected_total - held_before
    assert kv.get_block_ids("r")[held_before:] == [b.block_id for b in new_blocks]


def test_allocate_slots_returns_none_and_allocates_nothing_when_short():
    kv = KVCacheManager(block_size=4, num_blocks=3)
    other = _request("other")
    kv.allocate_slots(other, 8)
    request = _request("r")
    assert kv.allocate_slots(request, 5) is None
    assert kv.get_blocks("r") == [] and kv.get_num_free_blocks() == 1
    assert [b.block_id for b in kv.allocate_slots(request, 4)] == [2]
    assert kv.usage == pytest.approx(1.0)


def test_free_returns_every_block_tail_first():
    kv = KVCacheManager(block_size=2, num_blocks=4)
    request = _request("r")
    kv.allocate_slots(request, 6)
    kv.free(request)
    assert kv.get_num_free_blocks() == 4 and kv.usage == 0.0
    # Tail first, so with LRU eviction the prefix block (0) is evicted last.
    assert list(kv.block_pool.iter_free_block_ids()) == [3, 2, 1, 0]
    assert kv.get_block_ids("r") == []
    kv.free(request)  # freeing a request that holds nothing is a no-op
    assert kv.get_num_free_blocks() == 4
