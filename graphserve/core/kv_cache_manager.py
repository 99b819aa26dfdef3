"""Per-request block tables on top of the BlockPool, with prefix-cache lookups and registrations."""
from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from graphserve.core.block_pool import BlockPool, KVCacheBlock
from graphserve.core.kv_cache_utils import BlockHash, extend_block_hashes

if TYPE_CHECKING:
    from graphserve.core.request import Request


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints."""
    return -(-a // b)


class KVCacheManager:
    """Owns the block table of every request that holds KV blocks, and the prefix cache over them.

    With caching on, a request's full blocks are indexed by their chained hash once their tokens are computed
    (`cache_blocks`), and a new request starts from the longest indexed chain of its own blocks
    (`get_computed_blocks` + `allocate_slots(..., new_computed_blocks)`). Shared blocks are always full and
    computed, and a request only writes at positions >= its num_computed_tokens, so no shared block is ever
    written: sharing needs no copy-on-write.
    """

    def __init__(self, block_size: int, num_blocks: int, enable_caching: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.block_pool = BlockPool(num_blocks)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}

    @property
    def usage(self) -> float:
        """Fraction of the KV pool in use, in [0, 1]."""
        return self.block_pool.get_usage()

    def get_num_free_blocks(self) -> int:
        """Blocks no request holds (cached or not)."""
        return self.block_pool.get_num_free_blocks()

    # -- prefix cache ---------------------------------------------------------------------------------------------
    def can_use_cache(self, request: Request) -> bool:
        """Whether the request may start from cached blocks.

        A request that asks for prompt logprobs skips the lookup (its own blocks are still cached for others):
        the logprobs of cached tokens would need their hidden states, which the KV cache does not keep.
        """
        return self.enable_caching and request.sampling_params.prompt_logprobs is None

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest cached chain of the request's full blocks, and the number of tokens it covers.

        Only blocks within the first num_tokens - 1 tokens count: the last token is always computed because its
        logits are needed, so a prompt cached whole still recomputes the block holding its last token (that
        block is shared and must not be written again).
        """
        if not self.can_use_cache(request):
            return [], 0
        block_size = self.block_size
        max_hit_blocks = (request.num_tokens - 1) // block_size
        block_hashes = extend_block_hashes(request, block_size, max_hit_blocks * block_size)
        get_cached = self.block_pool.cached_block_hash_to_block.get
        hit_blocks = []
        for i in range(max_hit_blocks):
            block = get_cached(block_hashes[i])
            if block is None:
                break
            hit_blocks.append(block)
        return hit_blocks, len(hit_blocks) * block_size

    def next_block_hash(self, request: Request, num_computed_blocks: int) -> BlockHash | None:
        """Hash of the block right after a hit of `num_computed_blocks` blocks, if the request could hit it."""
        if not self.can_use_cache(request) or num_computed_blocks >= (request.num_tokens - 1) // self.block_size:
            return None
        return request.block_hashes[num_computed_blocks]  # filled by get_computed_blocks

    def hashes_to_be_written(self, request: Request, start: int, num_new_tokens: int) -> list[BlockHash]:
        """Hashes of the blocks the request fills by computing positions [start, start + num_new_tokens).

        Those blocks are not shareable yet. A block holding a token still being sampled (async scheduling) has
        no hash yet and nobody can be waiting for it.
        """
        if not self.enable_caching:
            return []
        block_size = self.block_size
        first = start // block_size
        end = min(start + num_new_tokens, request.num_tokens) // block_size
        if end <= first:
            return []
        return extend_block_hashes(request, block_size, end * block_size)[first:end]

    def cache_blocks(self, request: Request) -> None:
        """Index the request's blocks that became full and computed (num_computed_tokens >= next_cache_boundary)."""
        block_size = self.block_size
        start = request.next_cache_boundary // block_size - 1
        end = request.num_computed_tokens // block_size
        block_hashes = extend_block_hashes(request, block_size, end * block_size)
        self.block_pool.cache_full_blocks(self.req_to_blocks[request.request_id], block_hashes, start, end)
        request.next_cache_boundary = (end + 1) * block_size

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block; False (nothing done) while any block is in use."""
        return self.block_pool.reset_prefix_cache()

    # -- block tables ---------------------------------------------------------------------------------------------
    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: Sequence[KVCacheBlock] = ()
    ) -> list[KVCacheBlock] | None:
        """Grow the request's block table so its computed tokens plus `num_new_tokens` fit.

        `new_computed_blocks` (from get_computed_blocks, only for a request that holds no blocks yet) start its
        table and are shared, not copied; the caller then advances num_computed_tokens past them. Returns the
        newly allocated blocks (often none: a decode token usually fits the last block), or None, with nothing
        allocated or shared, when the pool has too few free blocks.
        """
        if num_new_tokens < 1:
            raise ValueError(f"num_new_tokens must be >= 1, got {num_new_tokens}")
        block_size = self.block_size
        req_id = request.request_id
        blocks = self.req_to_blocks.get(req_id)
        num_held = len(blocks) if blocks is not None else 0
        num_computed_blocks = len(new_computed_blocks)
        num_tokens = request.num_computed_tokens + num_computed_blocks * block_size + num_new_tokens
        num_missing = -(-num_tokens // block_size) - num_held - num_computed_blocks
        num_free_hits = 0
        if num_computed_blocks:
            if num_held:
                raise RuntimeError(f"request {req_id!r} already holds blocks: cached blocks only start a table")
            # Hit blocks sitting in the free queue stop being free once shared.
            num_free_hits = sum(1 for block in new_computed_blocks if block.ref_cnt == 0)
        elif num_missing <= 0:
            return []
        if num_missing + num_free_hits > self.block_pool.get_num_free_blocks():
            return None
        if num_computed_blocks:
            self.block_pool.touch(new_computed_blocks)  # before allocating, so that no hit gets evicted
        new_blocks = self.block_pool.get_new_blocks(num_missing) if num_missing > 0 else []
        if blocks is None:
            self.req_to_blocks[req_id] = [*new_computed_blocks, *new_blocks]
            if self.enable_caching:
                request.next_cache_boundary = (num_computed_blocks + 1) * block_size
        else:
            blocks.extend(new_blocks)
        return new_blocks

    def free(self, request: Request) -> None:
        """Release every block of the request (no-op when it holds none); cached ones stay cached until evicted."""
        blocks = self.req_to_blocks.pop(request.request_id, None)
        request.next_cache_boundary = sys.maxsize
        if blocks:
            # Tail first: the LRU queue then evicts a request's last (least shareable) blocks before its prefix.
            self.block_pool.free_blocks(reversed(blocks))

    def get_blocks(self, req_id: str) -> list[KVCacheBlock]:
        """The request's block table (empty when it holds no blocks); do not mutate."""
        return self.req_to_blocks.get(req_id, [])

    def get_block_ids(self, req_id: str) -> list[int]:
        """Block ids of the request's block table, in token order."""
        return [block.block_id for block in self.req_to_blocks.get(req_id, ())]
