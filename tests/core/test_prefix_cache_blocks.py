"""Prefix caching below the scheduler: block hashing, the cached-block index of the BlockPool, KVCacheManager hits."""
import hashlib
import struct

import pytest
from core_testutils import make_prompt, make_request, reference_block_hashes

from graphserve.core.block_pool import BlockPool
from graphserve.core.kv_cache_manager import KVCacheManager
from graphserve.core.kv_cache_utils import NONE_HASH, extend_block_hashes, hash_block_tokens


# -- hashing ----------------------------------------------------------------------------------------------------------
def test_block_hash_is_sha256_of_parent_tokens_and_extra_keys():
    base = hash_block_tokens(None, [1, 2, 3, 4])
    assert len(base) == 32 and base == hash_block_tokens(NONE_HASH, (1, 2, 3, 4))
    variants = [
        hash_block_tokens(base, [1, 2, 3, 4]),  # another parent
        hash_block_tokens(None, [1, 2, 3, 5]),  # another token
        hash_block_tokens(None, [2, 1, 3, 4]),  # another order
        hash_block_tokens(None, [1, 2, 3, 4], ("cache_salt", "a")),
        hash_block_tokens(None, [1, 2, 3, 4], ("cache_salt", "b")),
        hash_block_tokens(None, [1, 2, 3]),  # a shorter block is another block
        hash_block_tokens(None, [1 << 40, 2, 3, 4]),  # large ids are not truncated
    ]
    assert len({base, *variants}) == 1 + len(variants)
    # A full sha256 digest of the canonical bytes, not Python's 64-bit hash().
    assert base == hashlib.sha256(NONE_HASH + struct.pack("<I4q", 4, 1, 2, 3, 4)).digest()


@pytest.mark.parametrize("num_tokens, expected_blocks", [(3, 0), (4, 1), (7, 1), (8, 2), (9, 2)])
def test_only_full_blocks_are_hashed(num_tokens, expected_blocks):
    request = make_request("r", num_tokens)
    assert len(extend_block_hashes(request, 4, num_tokens)) == expected_blocks
    assert request.block_hashes == reference_block_hashes(request.prompt_token_ids, 4, None)


def test_hashes_extend_over_generated_tokens_and_equal_a_fresh_computation():
    request = make_request("r", 6)
    extend_block_hashes(request, 4, request.num_tokens)
    request.append_output_token_ids([100, 101, 102])
    hashes = extend_block_hashes(request, 4, request.num_tokens)
    assert len(hashes) == 2
    assert hashes == reference_block_hashes(request.all_token_ids, 4, None)


def test_salt_changes_every_block_through_the_chain():
    prompt = make_prompt(12)
    plain = extend_block_hashes(make_request("a", prompt=prompt), 4, 12)
    salted = extend_block_hashes(make_request("b", prompt=prompt, cache_salt="s"), 4, 12)
    other = extend_block_hashes(make_request("c", prompt=prompt, cache_salt="t"), 4, 12)
    assert len(plain) == 3 and all(len({p, s, o}) == 3 for p, s, o in zip(plain, salted, other))


# -- BlockPool --------------------------------------------------------------------------------------------------------
def _cached_pool(num_blocks=4, num_cached=2):
    pool = BlockPool(num_blocks)
    blocks = pool.get_new_blocks(num_cached)
    hashes = [bytes([i]) * 32 for i in range(num_cached)]
    pool.cache_full_blocks(blocks, hashes, 0, num_cached)
    return pool, blocks, hashes


def test_freed_cached_blocks_keep_their_hash_until_evicted_lru_first():
    pool, blocks, hashes = _cached_pool()
    pool.free_blocks(reversed(blocks))  # tail first
    assert [pool.get_cached_block(h) for h in hashes] == blocks and pool.num_cached_blocks == 2
    assert list(pool.iter_free_block_ids()) == [2, 3, 1, 0]
    assert [b.block_id for b in pool.get_new_blocks(3)] == [2, 3, 1]  # evicts block 1 (the tail block)
    assert pool.get_cached_block(hashes[1]) is None and blocks[1].block_hash is None
    assert pool.get_cached_block(hashes[0]) is blocks[0] and pool.num_cached_blocks == 1


def test_touch_revives_a_free_cached_block():
    pool, blocks, hashes = _cached_pool()
    pool.free_blocks(blocks)
    pool.touch([pool.get_cached_block(hashes[0])])
    assert blocks[0].ref_cnt == 1 and not pool.is_free(blocks[0])
    assert 0 not in [b.block_id for b in pool.get_new_blocks(3)]
    assert pool.get_cached_block(hashes[0]) is blocks[0]


def test_a_second_copy_of_a_cached_block_stays_unhashed():
    pool, blocks, hashes = _cached_pool(num_cached=1)
    (twin,) = pool.get_new_blocks(1)
    pool.cache_full_blocks([twin], hashes, 0, 1)
    assert twin.block_hash is None and pool.get_cached_block(hashes[0]) is blocks[0]
    with pytest.raises(RuntimeError, match="another hash"):
        pool.cache_full_blocks(blocks, [b"\x09" * 32], 0, 1)


def test_reset_prefix_cache_refuses_while_blocks_are_in_use():
    pool, blocks, hashes = _cached_pool()
    assert not pool.reset_prefix_cache() and pool.num_cached_blocks == 2
    pool.free_blocks(blocks)
    assert pool.reset_prefix_cache()
    assert pool.num_cached_blocks == 0 and all(b.block_hash is None for b in pool.blocks)
    assert pool.get_cached_block(hashes[0]) is None


# -- KVCacheManager ---------------------------------------------------------------------------------------------------
def _compute(kv, request, num_tokens=None):
    """Allocate and 'compute' the request's tokens (minus the last, as in a finished prefill) and cache them."""
    num_tokens = request.num_tokens if num_tokens is None else num_tokens
    hit, num_hit = kv.get_computed_blocks(request)
    assert kv.allocate_slots(request, num_tokens - num_hit, hit) is not None
    request.num_computed_tokens = num_tokens
    kv.cache_blocks(request)
    return num_hit


def test_two_requests_share_a_2000_token_prefix():
    # formats.md §7.4: 2000 shared tokens are 125 blocks of 16.
    kv = KVCacheManager(block_size=16, num_blocks=300)
    prefix = make_prompt(2000, seed=1)
    first = make_request("a", prompt=prefix + [7, 8, 9])
    second = make_request("b", prompt=prefix + [9, 8])
    assert _compute(kv, first) == 0
    hit, num_hit = kv.get_computed_blocks(second)
    assert (len(hit), num_hit) == (125, 2000)
    assert hit == kv.get_blocks("a")[:125]
    kv.allocate_slots(second, second.num_tokens - num_hit, hit)
    assert all(block.ref_cnt == 2 for block in hit)
    kv.free(first)
    kv.free(second)
    assert all(block.ref_cnt == 0 and kv.block_pool.is_free(block) for block in hit)
    assert kv.get_computed_blocks(make_request("c", prompt=prefix + [1]))[1] == 2000  # still cached


@pytest.mark.parametrize(
    "prompt_len, expected_hit",
    [(3, 0), (4, 0), (5, 4), (8, 4), (9, 8), (12, 8), (13, 12)],  # never the block holding the last token
)
def test_hit_never_covers_the_last_token(prompt_len, expected_hit):
    kv = KVCacheManager(block_size=4, num_blocks=16)
    prompt = make_prompt(prompt_len)
    _compute(kv, make_request("a", prompt=prompt + [99] * 4))
    request = make_request("b", prompt=prompt)
    assert kv.get_computed_blocks(request)[1] == expected_hit


@pytest.mark.parametrize("change", ["salt", "token", "prompt_logprobs", "disabled"])
def test_what_prevents_a_hit(change):
    kv = KVCacheManager(block_size=4, num_blocks=16, enable_caching=change != "disabled")
    prompt = make_prompt(9)
    _compute(kv, make_request("a", prompt=prompt))
    if change == "salt":
        request = make_request("b", prompt=prompt, cache_salt="tenant")
    elif change == "token":
        request = make_request("b", prompt=[prompt[0] + 1] + prompt[1:])
    elif change == "prompt_logprobs":  # asked for the logprobs of every prompt token: computes them all
        request = make_request("b", prompt=prompt, prompt_logprobs=1)
    else:
        request = make_request("b", prompt=prompt)
    assert kv.get_computed_blocks(request) == ([], 0)
    assert kv.get_computed_blocks(make_request("c", prompt=prompt))[1] == (0 if change == "disabled" else 8)


def test_partial_blocks_are_cached_only_once_full_and_computed():
    kv = KVCacheManager(block_size=4, num_blocks=16)
    request = make_request("a", 14)
    kv.allocate_slots(request, 6)  # a first chunk: one full block, one partial
    request.num_computed_tokens = 6
    kv.cache_blocks(request)
    assert kv.block_pool.num_cached_blocks == 1 and request.next_cache_boundary == 8
    kv.allocate_slots(request, 8)  # the rest: blocks 1, 2 fill up, block 3 stays partial
    request.num_computed_tokens = 14
    kv.cache_blocks(request)
    assert [b.block_hash is not None for b in kv.get_blocks("a")] == [True, True, True, False]
    assert [b.block_hash for b in kv.get_blocks("a")[:3]] == reference_block_hashes(request.all_token_ids, 4, None)


def test_free_hits_count_against_the_free_blocks():
    kv = KVCacheManager(block_size=4, num_blocks=4)
    prompt = make_prompt(9)
    _compute(kv, make_request("a", prompt=prompt))  # blocks 0, 1 cached, 2 partial
    kv.free(make_request("a"))
    other = make_request("x", 5)
    kv.allocate_slots(other, 5)  # takes blocks 3 and 2: blocks 0 and 1 stay free and cached
    request = make_request("b", prompt=prompt + [5, 6, 7])
    hit, num_hit = kv.get_computed_blocks(request)
    assert [b.block_id for b in hit] == [0, 1] and num_hit == 8
    # Sharing the 2 free hits takes them out of the free queue: with 1 new block that is 3 > 2 free.
    assert kv.allocate_slots(request, 4, hit) is None
    assert all(b.ref_cnt == 0 for b in hit) and kv.get_blocks("b") == []
    kv.free(other)
    new_blocks = kv.allocate_slots(request, 4, hit)
    assert [b.block_id for b in new_blocks] == [2]  # a hit is never evicted to make room for its own request
    assert kv.get_block_ids("b") == [0, 1, 2] and [b.ref_cnt for b in hit] == [1, 1]
